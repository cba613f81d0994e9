"""Writing files so that a run killed mid-write leaves the old file or the new one, never half of one;
and hashing files. Used by the checkpoint writer (hub), corpus preparation (data), downloads and training."""

import hashlib
import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path, write):
    """Write `path` by calling write(tmp) on a temporary sibling, then renaming it over `path` (an atomic
    step on one filesystem). If `write` fails, the temporary file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600): give it the old file's mode, or what a new file gets
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomically(path, text):
    """`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def sha256_of(path, block_size=1 << 20):
    """The SHA-256 of a file's bytes, as hex, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()

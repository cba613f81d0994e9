"""Writing files so that a run killed mid-write leaves the old file or the new one, never half of one;
and hashing files. Used by the checkpoint writer (hub), corpus preparation (data), downloads and training."""

import hashlib
import os
import secrets
import stat
from pathlib import Path


def atomic_write(path, write):
    """Write `path` by calling write(tmp) on a temporary sibling, then renaming it over `path` (an atomic
    step on one filesystem). If `write` fails, the temporary file is removed and `path` is untouched.
    The new file gets the mode of the file it replaces, or what any new file gets (0o666 less the umask)."""
    path = Path(path)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # (the system applies the umask)
    try:
        write(tmp)
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

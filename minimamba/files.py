"""Writing files so that a run killed mid-write leaves the old file or the new one, never half of one;
and hashing files. Used by the checkpoint writer (hub), corpus preparation (data), downloads and training."""

import hashlib
import os
import secrets
import stat
from pathlib import Path


def fsync_file(path):
    """Flush a file's bytes to the disk (so that a rename of it cannot outlive its contents in a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    """Flush a directory's entries (the renames and new files in it) to the disk. Systems that cannot
    open a directory (Windows) have nothing to flush here: their renames are durable by themselves."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Write `path` by calling write(tmp) on a temporary sibling, then renaming it over `path` (an atomic
    step on one filesystem). If `write` fails, the temporary file is removed and `path` is untouched.
    The temporary file is flushed to the disk before the rename and the directory after it, so a power
    cut too leaves the old file or the whole new one.
    The new file gets the mode of the file it replaces, or what any new file gets (0o666 less the umask)."""
    path = Path(path)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # (the system applies the umask)
    try:
        write(tmp)
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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

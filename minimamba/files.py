"""Writing files so that a run killed mid-write leaves the old file or the new one, never half of one;
JSON without inf/NaN, and JSON read with one kind of error; and hashing files. Used by the checkpoint
writer (hub), corpus preparation (data), downloads, training and the readers of JSON files."""

import errno
import hashlib
import json
import math
import os
import secrets
import stat
import warnings
from pathlib import Path

_WINDOWS = os.name == "nt"
# what fsync of a directory answers on systems and filesystems that cannot flush one (PostgreSQL ignores
# the same): nothing to flush there
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, getattr(errno, "ENOTSUP", errno.EINVAL),
                          getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


def _open_for_fsync(path):
    """A descriptor os.fsync can flush: Windows's FlushFileBuffers (behind os.fsync there) needs one with
    write access, so open for appending (which changes nothing); POSIX flushes through any descriptor, and
    a read-only one also works on a file whose mode forbids writing."""
    if _WINDOWS:
        return os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
    return os.open(path, os.O_RDONLY)


def fsync_file(path):
    """Flush a file's bytes to the disk (so that a rename of it cannot outlive its contents in a power cut)."""
    fd = _open_for_fsync(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    """Flush a directory's entries (the renames and new files in it) to the disk. It never raises: it is
    called after a new file is in place, which a failure here must not undo or hide. Systems that cannot
    open a directory (Windows) have nothing to flush here (their renames are durable by themselves), nor
    do filesystems whose fsync of a directory answers EINVAL, EBADF or ENOTSUP; any other error (EIO) is
    a warning that the rename may not survive a power cut. Returns whether the directory was flushed."""
    if not hasattr(os, "O_DIRECTORY"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            warnings.warn(f"could not flush the directory {path} to the disk ({e}): its new files are in place, "
                          "but a power cut could undo their renames", RuntimeWarning, stacklevel=2)
        return False
    return True


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
        # the descriptor to flush is opened before the mode of a read-only old file is copied: on Windows
        # it must be writable (see _open_for_fsync); the flush comes after, so it covers the mode too
        fd = _open_for_fsync(tmp)
        try:
            if path.exists():
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # (never raises: the new file is in place)


def write_text_atomically(path, text):
    """`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def finite_or_none(value):
    """`value` with every non-finite float (an infinite perplexity, a NaN) replaced by None, in nested
    dicts and lists too. JSON has no inf or NaN (json.dumps would write Infinity and NaN, which other JSON
    readers refuse): they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def parse_json(text):
    """json.loads(text), where JSON nested too deeply for Python's parser (thousands of brackets: a
    RecursionError, not a ValueError) is a ValueError like any other unreadable JSON. The readers of user
    files catch ValueError (JSONDecodeError and UnicodeDecodeError are ValueErrors) and name the file."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def is_json_number(x):
    """Whether a value read from JSON is a number (an int or a float; not true/false, which Python's bool
    makes ints too)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def json_line(record):
    """One line of a JSON Lines file (log.jsonl, eval.py's predictions), non-finite floats as null."""
    return json.dumps(finite_or_none(record), allow_nan=False) + "\n"


def write_json_atomically(path, value):
    """`write_text_atomically` of `value` as indented JSON, non-finite floats as null (`finite_or_none`)."""
    write_text_atomically(path, json.dumps(finite_or_none(value), indent=2, allow_nan=False) + "\n")


def sha256_of(path, block_size=1 << 20):
    """The SHA-256 of a file's bytes, as hex, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()

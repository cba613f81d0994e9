"""minimamba.files: atomic writes keep the old file on failure and give the new one ordinary permissions."""

import json
import os
import stat

import pytest

from minimamba.files import atomic_write, is_json_number, parse_json, sha256_of, write_text_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    write_text_atomically(path, "old")

    def fails(tmp):
        with open(tmp, "w") as f:
            f.write("half of the ne")
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fails)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["meta.json"]


def test_permissions_follow_the_old_file_or_the_umask(tmp_path):
    path = tmp_path / "latest"
    mask = os.umask(0o022)
    try:
        write_text_atomically(path, "a")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
        path.chmod(0o640)
        write_text_atomically(path, "b")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "b"
    finally:
        os.umask(mask)


def test_sha256_of_reads_in_blocks(tmp_path):
    import hashlib

    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_of(tmp_path / "f", block_size=1000) == hashlib.sha256(data).hexdigest()


def test_the_new_file_is_flushed_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                       else "?"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text_atomically(tmp_path / "latest", "step-000002\n")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    if os.path.exists("/proc/self/fd"):  # (Linux: which file each fsync was of)
        assert events[0][1].endswith(".tmp") and events[2][1] == os.path.realpath(tmp_path)
    assert (tmp_path / "latest").read_text() == "step-000002\n"


@pytest.mark.parametrize("error", ["EINVAL", "EBADF", "ENOTSUP", "EIO"])
def test_a_directory_fsync_error_never_undoes_or_hides_the_new_file(tmp_path, monkeypatch, error):
    """fsync of a directory answers EINVAL/EBADF/ENOTSUP on filesystems that cannot flush one: ignored, as
    PostgreSQL does; another error (EIO) is a warning. Either way the new file is in place and nothing raises."""
    import errno
    import warnings

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(getattr(errno, error), os.strerror(getattr(errno, error)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_text_atomically(tmp_path / "latest", "step-000002\n")
    assert (tmp_path / "latest").read_text() == "step-000002\n" and os.listdir(tmp_path) == ["latest"]
    assert [str(w.message)[:30] for w in caught] == (["could not flush the directory "] if error == "EIO" else [])


def test_on_windows_the_file_is_flushed_through_a_writable_descriptor_opened_before_its_mode(tmp_path, monkeypatch):
    """Windows's os.fsync (FlushFileBuffers) needs write access: the descriptor is opened for appending, and
    before a read-only old file's mode is copied to the new one (which would then refuse a writable open)."""
    from minimamba import files

    events, real_open, real_chmod = [], os.open, os.chmod

    def open_(path, flags, *mode):
        if str(path).endswith(".tmp") and not flags & os.O_CREAT:
            events.append(("open", flags & (os.O_WRONLY | os.O_RDWR), bool(flags & os.O_APPEND)))
        return real_open(path, flags, *mode)

    path = tmp_path / "config.json"
    path.write_text("old")
    path.chmod(0o444)
    monkeypatch.setattr(files, "_WINDOWS", True)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "chmod", lambda path, mode: (events.append(("chmod", mode)), real_chmod(path, mode)))
    write_text_atomically(path, "new")
    assert events == [("open", os.O_WRONLY, True), ("chmod", 0o444)]
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o444


def test_non_finite_floats_become_null_at_any_depth(tmp_path):
    import json
    import math

    from minimamba.files import finite_or_none, json_line, write_json_atomically

    value = {"ppl": math.inf, "loss": math.nan, "low": -math.inf, "n": 3, "ok": 1.5, "flag": True,
             "runs": [{"ppl": math.inf}, (math.nan, 2.0)], "name": "inf"}
    want = {"ppl": None, "loss": None, "low": None, "n": 3, "ok": 1.5, "flag": True,
            "runs": [{"ppl": None}, [None, 2.0]], "name": "inf"}
    assert finite_or_none(value) == want
    line = json_line(value)
    assert line.endswith("}\n") and line.count("\n") == 1 and json.loads(line) == want
    write_json_atomically(tmp_path / "results.json", value)
    text = (tmp_path / "results.json").read_text()
    assert json.loads(text) == want and "Infinity" not in text and "NaN" not in text


def test_parse_json_reads_json_and_turns_too_deep_nesting_into_a_value_error():
    """Python's json raises RecursionError (not a ValueError) for arrays nested thousands deep; every reader
    of a user's JSON file catches ValueError, so parse_json makes that one a ValueError too."""
    assert parse_json('{"a": [1, 2.5, null, "\\u00e9"]}') == {"a": [1, 2.5, None, "é"]}
    assert parse_json("[" * 50 + "]" * 50) == json.loads("[" * 50 + "]" * 50)  # (nesting json can read)
    with pytest.raises(ValueError, match="^JSON nested too deeply to read$"):
        parse_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(json.JSONDecodeError):  # (other bad JSON: json's own error, a ValueError)
        parse_json('{"a": ')


def test_is_json_number_takes_ints_and_floats_but_not_booleans_strings_or_null():
    assert all(is_json_number(v) for v in json.loads('[0, -3, 1e308, 2.5, NaN, Infinity]'))
    assert not any(is_json_number(v) for v in json.loads('[true, false, null, "1", [1], {"a": 1}]'))

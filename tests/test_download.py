"""minimamba.download against a real HTTP server on 127.0.0.1 (no internet needed)."""

import errno
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import types

import pytest

from minimamba import download as dl
from minimamba.download import DownloadError, download, hub_file

PAYLOAD = bytes(range(256)) * 1000  # 256,000 bytes: several read chunks' worth after a cut


def test_endpoint_and_cache_dir_defaults(monkeypatch, tmp_path):
    for name in ("HF_ENDPOINT", "MINIMAMBA_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert dl.endpoint() == "https://huggingface.co"
    assert str(dl.cache_dir()).endswith(os.path.join(".cache", "huggingface", "minimamba"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert dl.cache_dir() == tmp_path / "minimamba"
    monkeypatch.setenv("MINIMAMBA_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example/")
    assert dl.cache_dir() == tmp_path / "c" and dl.endpoint() == "http://mirror.example"


def test_hub_file_downloads_once_then_hits_the_cache(server, monkeypatch, tmp_path):
    server.files["/org/model/resolve/main/config.json"] = PAYLOAD
    monkeypatch.setenv("HF_TOKEN", "secret")
    path = hub_file("org/model", "config.json")
    assert path == tmp_path / "cache" / "org--model" / "main" / "config.json"
    assert path.read_bytes() == PAYLOAD
    assert not path.with_suffix(".json.part").exists()
    assert server.requests == [("/org/model/resolve/main/config.json", None, "Bearer secret")]
    assert hub_file("org/model", "config.json") == path  # cached: no second request
    assert len(server.requests) == 1


def test_checks_size_and_sha256(server, tmp_path):
    server.files["/f"] = PAYLOAD
    good = hashlib.sha256(PAYLOAD).hexdigest()
    assert download(f"{server.url}/f", tmp_path / "a", expected_size=len(PAYLOAD), sha256=good).exists()
    with pytest.raises(DownloadError, match="sha256"):
        download(f"{server.url}/f", tmp_path / "b", sha256="0" * 64)
    with pytest.raises(DownloadError, match="expected 5"):
        download(f"{server.url}/f", tmp_path / "c", expected_size=5)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.part").exists()
    server.etags["/f"] = '"v1"'  # a wrong file's .part.validator goes with it (it stayed behind for good)
    for name, check in [("d", {"sha256": "0" * 64}), ("e", {"expected_size": 5})]:
        with pytest.raises(DownloadError, match="deleted it"):
            download(f"{server.url}/f", tmp_path / name, **check)
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_an_existing_file_is_checked_when_a_size_or_sha256_is_asked(server, tmp_path):
    server.files["/f"] = PAYLOAD
    good = hashlib.sha256(PAYLOAD).hexdigest()
    dest = tmp_path / "f"
    dest.write_bytes(b"another version of the file")
    with pytest.raises(DownloadError, match=f"{dest} already exists but has sha256 .*, expected {good}") as err:
        download(f"{server.url}/f", dest, sha256=good)
    assert "Delete it" in str(err.value)
    with pytest.raises(DownloadError, match="has 27 bytes, expected 256000"):
        download(f"{server.url}/f", dest, expected_size=len(PAYLOAD))
    assert dest.read_bytes() == b"another version of the file"  # the user's file is left alone
    assert download(f"{server.url}/f", dest) == dest  # nothing asked: nothing checked
    cached = tmp_path / "cache" / "org--m" / "main" / "f"  # hub_file checks its cached copy the same way
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PAYLOAD)
    assert hub_file("org/m", "f", sha256=good) == cached
    with pytest.raises(DownloadError, match="already exists but has sha256"):
        hub_file("org/m", "f", sha256="0" * 64)
    assert server.requests == []


def test_interrupted_download_resumes_from_the_part_file(server, tmp_path):
    server.files["/big.bin"] = PAYLOAD
    server.drop_after["/big.bin"] = 100_000
    dest = tmp_path / "big.bin"
    with pytest.raises(DownloadError, match="resume") as err:
        download(f"{server.url}/big.bin", dest, retries=0)
    assert f"{server.url}/big.bin" in str(err.value)
    part = tmp_path / "big.bin.part"
    assert part.stat().st_size == 100_000 and not dest.exists()

    download(f"{server.url}/big.bin", dest)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert server.requests[-1][:2] == ("/big.bin", "bytes=100000-")


def test_retries_resume_within_one_call(server, tmp_path):
    server.files["/big.bin"] = PAYLOAD
    server.drop_after["/big.bin"] = 12_345
    assert download(f"{server.url}/big.bin", tmp_path / "big.bin").read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == [None, "bytes=12345-"]


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    server.files["/f"] = PAYLOAD
    server.ignore_range.add("/f")
    (tmp_path / "f.part").write_bytes(b"stale bytes that must not stay in front")
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == PAYLOAD
    assert server.requests[-1][1] == "bytes=39-"  # asked to resume, got 200 and the whole file


def test_file_changed_on_the_server_since_the_part_began_is_fetched_whole(server, tmp_path):
    """The ETag of the first answer goes with the .part; the resume sends it as If-Range, and a server
    whose file has changed answers with the whole new file instead of the rest of the old one."""
    server.files["/f"], server.etags["/f"] = PAYLOAD, '"v1"'
    server.drop_after["/f"] = 100_000
    with pytest.raises(DownloadError, match="resume"):
        download(f"{server.url}/f", tmp_path / "f", retries=0)
    assert (tmp_path / "f.part.validator").read_text().strip() == '"v1"'
    new = PAYLOAD[::-1]
    server.files["/f"], server.etags["/f"] = new, '"v2"'
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == new
    assert not (tmp_path / "f.part.validator").exists()


def test_unchanged_file_resumes_with_if_range(server, tmp_path):
    server.files["/f"], server.etags["/f"] = PAYLOAD, '"v1"'
    server.drop_after["/f"] = 100_000
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == [None, "bytes=100000-"]  # the rest only


def test_a_206_that_does_not_continue_the_part_starts_over(server, tmp_path):
    server.files["/f"] = PAYLOAD
    server.bad_range.add("/f")  # answers 206 from byte 0 whatever is asked
    (tmp_path / "f.part").write_bytes(PAYLOAD[:1000])
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == ["bytes=1000-", None]  # dropped the .part, fetched it whole


def test_a_file_sent_in_parts_is_asked_for_until_it_is_whole(server, tmp_path):
    """A 206 may carry less than the rest of the file ("Content-Range: bytes 0-99999/256000", even for a
    request without a Range): the download asks for the rest at once (not as a failed try) and keeps
    the file only when its size is the one the server gives."""
    server.files["/f"] = PAYLOAD
    server.part_size["/f"] = 100_000
    assert download(f"{server.url}/f", tmp_path / "f", retries=0).read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == [None, "bytes=100000-", "bytes=200000-"]
    server.files["/g"] = PAYLOAD  # a server that always sends the first part whatever is asked never ends
    server.part_size["/g"] = 1000
    server.bad_range.add("/g")
    with pytest.raises(DownloadError, match="answered a request from byte 1000 with Content-Range 'bytes 0-999/"):
        download(f"{server.url}/g", tmp_path / "g", retries=1)
    assert not (tmp_path / "g").exists()


def test_complete_part_file_answered_416_is_kept(server, tmp_path):
    server.files["/f"] = PAYLOAD
    (tmp_path / "f.part").write_bytes(PAYLOAD)
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == PAYLOAD
    assert server.requests == [("/f", f"bytes={len(PAYLOAD)}-", None)]


def test_a_part_file_longer_than_the_servers_file_is_fetched_again(server, tmp_path):
    server.files["/f"] = PAYLOAD
    (tmp_path / "f.part").write_bytes(PAYLOAD + b"junk")  # 416 too, but the server's size is not the .part's
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == [f"bytes={len(PAYLOAD) + 4}-", None]


def test_a_416_that_says_the_file_is_longer_than_the_part_starts_over(server, tmp_path, monkeypatch):
    """A 416 whose size ("bytes */256000") is not the .part's (a broken server or proxy: a range from byte 1000 of
    256,000 is satisfiable) does not make the short .part the file: it is dropped and the file fetched whole."""
    server.files["/f"] = PAYLOAD
    serve = server.RequestHandlerClass.do_GET

    def contradicting(handler):
        if handler.headers.get("Range") is None:
            return serve(handler)
        handler.server.requests.append((handler.path, handler.headers.get("Range"), None))
        handler.send_response(416)
        handler.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    monkeypatch.setattr(server.RequestHandlerClass, "do_GET", contradicting)
    (tmp_path / "f.part").write_bytes(PAYLOAD[:1000])
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == ["bytes=1000-", None]


def test_a_name_too_long_for_the_part_files_is_refused_before_any_request(server, tmp_path):
    """A 244-byte name fits the filesystem, its `.part.validator` (259 bytes) does not: that failed
    mid-download, retried as a network error."""
    server.files["/f"] = PAYLOAD
    dest = tmp_path / ("é" * 120 + ".bin")  # 244 + 4 bytes in UTF-8
    with pytest.raises(DownloadError, match=r"(?s)its name is 244 bytes.*at most 240 bytes, then rename it"):
        download(f"{server.url}/f", dest)
    assert server.requests == [] and list(tmp_path.iterdir()) == []
    fits = tmp_path / ("a" * 240)
    assert download(f"{server.url}/f", fits).read_bytes() == PAYLOAD
    undecodable = tmp_path / os.fsdecode(b"\xffmodel.bin")  # (a name Python holds with a surrogate)
    assert download(f"{server.url}/f", undecodable).read_bytes() == PAYLOAD


def test_a_filesystem_with_shorter_names_fails_at_once_saying_so(server, tmp_path, monkeypatch):
    """Where the filesystem's limit is below 255 bytes (eCryptfs: ~143), ENAMETOOLONG is not retried as
    a network error."""
    server.files["/f"] = PAYLOAD
    tries = []

    def short_names(url, part, desc, timeout):  # (a try whose .part or .validator cannot be named)
        tries.append(url)
        raise OSError(errno.ENAMETOOLONG, "File name too long", str(part))

    monkeypatch.setattr(dl, "_fetch", short_names)
    with pytest.raises(DownloadError, match=r"(?s)shorter file names.*download to a shorter name"):
        download(f"{server.url}/f", tmp_path / "f")
    assert len(tries) == 1


def test_a_lock_file_name_too_long_for_the_filesystem_fails_saying_so(server, tmp_path, monkeypatch):
    """The lock file (dest.part.lock) is the first file a download creates: on a filesystem whose limit is
    below 255 bytes its ENAMETOOLONG is a DownloadError with the same advice, not a bare OSError."""
    if dl.fcntl is None:
        pytest.skip("no lock file without fcntl (Windows)")
    server.files["/f"] = PAYLOAD
    real_open = os.open

    def short_names(path, *args, **kwargs):  # (a filesystem that cannot name the lock file)
        if str(path).endswith(".lock"):
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(dl.os, "open", short_names)
    with pytest.raises(DownloadError, match=r"(?s)f\.part\.lock.*shorter file names.*download to a shorter name"):
        download(f"{server.url}/f", tmp_path / "f")
    assert server.requests == [] and list(tmp_path.iterdir()) == []


def test_404_is_a_clear_error(server):
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        hub_file("org/missing", "model.safetensors")
    assert "/org/missing/resolve/main/model.safetensors" in str(err.value)
    assert "repository id" in str(err.value)
    assert len(server.requests) == 1  # a 404 is not retried


def test_unreachable_host_fails_fast(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MINIMAMBA_CACHE", str(tmp_path))
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="No internet") as err:
        hub_file("state-spaces/mamba2-370m", "config.json")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert f"127.0.0.1:{port}/state-spaces/mamba2-370m/resolve/main/config.json" in message
    assert "HF_ENDPOINT" in message
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")  # a file that is not the Hub's: no mirror to suggest
    with pytest.raises(DownloadError, match="No internet") as err:
        download(f"http://127.0.0.1:{port}/pubmed25n0001.xml.gz", tmp_path / "pubmed25n0001.xml.gz")
    assert "HF_ENDPOINT" not in str(err.value)


def test_offline_mode_never_touches_the_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MINIMAMBA_CACHE", str(tmp_path))
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE") as err:
        hub_file("org/model", "config.json")
    assert str(tmp_path / "org--model" / "main" / "config.json") in str(err.value)
    cached = tmp_path / "org--model" / "main" / "config.json"
    cached.parent.mkdir(parents=True)
    cached.write_text("{}")
    assert hub_file("org/model", "config.json") == cached


def test_offline_values_are_those_huggingface_hub_takes_as_true(monkeypatch, tmp_path):
    for value in ("1", "ON", "on", "Yes", "TRUE", "true"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert dl.offline(), value
        with pytest.raises(DownloadError, match=f"HF_HUB_OFFLINE is set and {tmp_path / 'x'} does not exist"):
            download("http://127.0.0.1:9/x", tmp_path / "x")  # (port 9: nothing would answer anyway)
    for value in ("0", "off", "no", "false", ""):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert not dl.offline(), value


def test_hf_endpoint_without_a_scheme_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIMAMBA_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "hf-mirror.com")
    with pytest.raises(DownloadError, match="HF_ENDPOINT='hf-mirror.com' is not a web address: it needs http:// or "
                       "https:// in front, e.g. HF_ENDPOINT=https://hf-mirror.com"):
        hub_file("org/model", "config.json")
    with pytest.raises(DownloadError, match="not an http:// or https:// address"):
        download("ftp.example.org/file", tmp_path / "file")


@pytest.fixture
def redirects(server, monkeypatch):
    """`server`, answering the paths in the returned dict with a 307 to their location (recorded as requests)."""
    locations = {}
    handler_class = server.RequestHandlerClass  # (conftest's, as pytest imported it)
    serve = handler_class.do_GET

    def do_GET(handler):
        if handler.path not in locations:
            return serve(handler)
        handler.server.requests.append((handler.path, None, handler.headers.get("Authorization")))
        handler.send_response(307)
        handler.send_header("Location", locations[handler.path])
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    monkeypatch.setattr(handler_class, "do_GET", do_GET)
    return locations


def test_token_follows_a_redirect_on_the_hubs_host_only(server, redirects, monkeypatch):
    """The Hub answers some resolve/ URLs with a relative 307 to /api/resolve-cache/... on its own host: the
    token goes along (a gated file needs it there); a redirect to another host (the file storage) drops it."""
    monkeypatch.setenv("HF_TOKEN", "secret")
    redirects["/org/gated/resolve/main/config.json"] = "/api/resolve-cache/org/gated/config.json"
    server.files["/api/resolve-cache/org/gated/config.json"] = b"{}"
    assert hub_file("org/gated", "config.json").read_bytes() == b"{}"
    assert server.requests == [("/org/gated/resolve/main/config.json", None, "Bearer secret"),
                               ("/api/resolve-cache/org/gated/config.json", None, "Bearer secret")]

    storage = type(server)()  # another port: another host as far as the token goes
    threading.Thread(target=storage.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        storage.files["/blobs/abc"] = PAYLOAD
        redirects["/org/gated/resolve/main/model.bin"] = f"{storage.url}/blobs/abc"
        assert hub_file("org/gated", "model.bin").read_bytes() == PAYLOAD
    finally:
        storage.shutdown()
        storage.server_close()
    assert server.requests[-1] == ("/org/gated/resolve/main/model.bin", None, "Bearer secret")
    assert storage.requests == [("/blobs/abc", None, None)]


def test_a_kill_just_after_a_changed_file_is_tagged_does_not_splice_versions(server, tmp_path, monkeypatch):
    """A resume whose file changed on the server gets the whole new file (200, ETag "v2"). A kill after "v2" is
    noted but before the old .part was emptied left v1's bytes under v2's tag: the next resume appended the rest
    of v2 to the start of v1."""
    from pathlib import Path

    server.files["/f"], server.etags["/f"] = PAYLOAD, '"v1"'
    server.drop_after["/f"] = 100_000
    with pytest.raises(DownloadError, match="resume"):
        download(f"{server.url}/f", tmp_path / "f", retries=0)
    new = PAYLOAD[::-1]
    server.files["/f"], server.etags["/f"] = new, '"v2"'
    write_text = Path.write_text

    def killed_after_the_tag(self, *args, **kwargs):
        write_text(self, *args, **kwargs)
        if self.name.endswith(".validator"):
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_after_the_tag)
    with pytest.raises(KeyboardInterrupt):
        download(f"{server.url}/f", tmp_path / "f")
    monkeypatch.setattr(Path, "write_text", write_text)
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == new


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_fails_at_once_saying_so(server, tmp_path):
    """ENOSPC is no network error: it was retried 4 times (15 s, downloading again each time) and then said
    'run again to resume'."""
    server.files["/f"] = PAYLOAD
    (tmp_path / "f.part").symlink_to("/dev/full")  # every write answers ENOSPC, as on a full disk
    with pytest.raises(DownloadError, match="cannot write .*f.part: .*No space left") as err:
        download(f"{server.url}/f", tmp_path / "f")
    assert "Free some space" in str(err.value)
    assert len(server.requests) == 1 and not (tmp_path / "f").exists()


def test_the_file_is_flushed_before_its_rename_and_the_folder_after(server, tmp_path, monkeypatch):
    """Else a power cut after the rename can leave a `dest` with missing bytes, which counts as downloaded."""
    server.files["/f"] = PAYLOAD
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.stat(a).st_ino)), real_replace(a, b)))
    dest = download(f"{server.url}/f", tmp_path / "f")
    assert events == [("fsync", dest.stat().st_ino), ("replace", dest.stat().st_ino), ("fsync", tmp_path.stat().st_ino)]


def test_two_processes_downloading_the_same_file_take_turns(server, tmp_path, monkeypatch):
    """Every torchrun rank downloads the checkpoint at once: the second waits for the first (a lock), then finds
    the file. (Before, it resumed the first one's growing .part, renamed it, and the first then failed with
    FileNotFoundError; a first one that truncated the other's .part left zeros in a file that counted as whole.)"""
    server.files["/f"] = PAYLOAD
    monkeypatch.setattr(dl, "CHUNK", 4096)  # (so that the first one's .part grows while it waits)
    go, halfway = threading.Event(), threading.Event()
    serve = server.RequestHandlerClass.do_GET

    class Pausing(server.RequestHandlerClass):
        def do_GET(self):
            if len(server.requests) == 0:  # the first answer stops halfway until `go`
                wfile = self.wfile

                class Half:
                    def write(_, data):
                        if len(data) < len(PAYLOAD):  # (the headers)
                            return wfile.write(data)
                        wfile.write(data[: len(data) // 2])
                        wfile.flush()
                        halfway.set()
                        go.wait(5)
                        wfile.write(data[len(data) // 2:])

                    def __getattr__(_, name):
                        return getattr(wfile, name)

                self.wfile = Half()
            serve(self)

    server.RequestHandlerClass = Pausing
    dest, results = tmp_path / "f", []

    def get():
        try:
            results.append(download(f"{server.url}/f", dest))
        except BaseException as e:  # (recorded for the assertion below)
            results.append(e)

    first = threading.Thread(target=get)
    first.start()
    assert halfway.wait(5)
    for _ in range(500):  # until most of the first half is in the .part (writes are buffered)
        if (tmp_path / "f.part").exists() and (tmp_path / "f.part").stat().st_size >= len(PAYLOAD) // 4:
            break
        time.sleep(0.01)
    second = threading.Thread(target=get)
    second.start()
    time.sleep(0.3)  # the second asks while the first is halfway
    go.set()
    first.join(10)
    second.join(10)
    assert results == [dest, dest]
    assert dest.read_bytes() == PAYLOAD and os.listdir(tmp_path) == ["f"]
    assert [r[1] for r in server.requests] == [None]  # downloaded once


@pytest.fixture
def failing(server, monkeypatch):
    """`server`, answering a path in the returned dict with the HTTP error codes listed there first (one per
    request, recorded as requests), then as usual."""
    codes = {}
    handler_class = server.RequestHandlerClass
    serve = handler_class.do_GET

    def do_GET(handler):
        if not codes.get(handler.path):
            return serve(handler)
        handler.server.requests.append((handler.path, handler.headers.get("Range"), None))
        handler.send_error(codes[handler.path].pop(0))

    monkeypatch.setattr(handler_class, "do_GET", do_GET)
    return codes


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])  # (written out: not read from the module)
def test_transient_http_errors_are_retried_exactly_retries_times(server, failing, tmp_path, code):
    server.files["/f"] = PAYLOAD
    failing["/f"] = [code, code]
    assert download(f"{server.url}/f", tmp_path / "a", retries=2).read_bytes() == PAYLOAD
    assert len(server.requests) == 3  # two failures, then the file
    server.requests.clear()
    failing["/f"] = [code, code, code]
    with pytest.raises(DownloadError, match=f"HTTP {code}"):
        download(f"{server.url}/f", tmp_path / "b", retries=2)
    assert len(server.requests) == 3  # 1 + retries tries, no more
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 416])  # (416 to a request without a Range: an error)
def test_other_http_errors_are_not_retried(server, failing, tmp_path, code):
    server.files["/f"] = PAYLOAD
    failing["/f"] = [code]
    with pytest.raises(DownloadError, match=f"downloading {server.url}/f failed: HTTP {code}") as err:
        download(f"{server.url}/f", tmp_path / "f", retries=3)
    assert len(server.requests) == 1
    # the advice fits the code: a gated repo (401, 403) needs its terms accepted and a token; a 404, the names checked
    assert ("Accept its terms on the Hub and set HF_TOKEN" in str(err.value)) == (code in (401, 403))
    assert ("Check the repository id, the file name and the revision" in str(err.value)) == (code == 404)


def test_the_token_goes_to_hf_endpoint_only(server, monkeypatch, tmp_path):
    """HF_TOKEN is for the Hub: a download from any other address (a task file from GitHub) never sends it."""
    monkeypatch.setenv("HF_TOKEN", "secret")
    server.files["/f"] = PAYLOAD
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == PAYLOAD
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/mirror")  # (the same host, another prefix: not the Hub)
    assert download(f"{server.url}/f", tmp_path / "g").read_bytes() == PAYLOAD
    monkeypatch.setenv("HF_ENDPOINT", server.url[:-1])  # :4512 for a server on :45123, whose URLs start the same
    assert download(f"{server.url}/f", tmp_path / "h").read_bytes() == PAYLOAD
    assert server.requests == [("/f", None, None)] * 3


def test_a_weak_etag_is_not_kept_as_the_resume_validator(server, tmp_path):
    """If-Range takes a strong validator only (RFC 9110): a weak ETag (W/"...") is not written to the
    .part.validator (the server here sends no Last-Modified, so no validator is kept at all)."""
    server.files["/f"], server.etags["/f"] = PAYLOAD, 'W/"v1"'
    server.drop_after["/f"] = 100_000
    with pytest.raises(DownloadError, match="resume"):
        download(f"{server.url}/f", tmp_path / "f", retries=0)
    assert (tmp_path / "f.part").stat().st_size == 100_000 and not (tmp_path / "f.part.validator").exists()


def test_an_upper_case_sha256_is_the_same_hash(server, tmp_path):
    server.files["/f"] = PAYLOAD
    good = hashlib.sha256(PAYLOAD).hexdigest().upper()
    assert download(f"{server.url}/f", tmp_path / "f", sha256=good).read_bytes() == PAYLOAD  # downloaded
    assert download(f"{server.url}/f", tmp_path / "f", sha256=good) == tmp_path / "f"  # and already there
    assert len(server.requests) == 1


def test_hub_url_quotes_the_revision_whole_and_the_filename_by_segment(monkeypatch):
    """As the Hub spells them (huggingface_hub's hf_hub_url): a revision such as a PR ref is one path segment
    ("refs/pr/1" -> "refs%2Fpr%2F1"); a file in a folder keeps its "/"; a space is %20."""
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example/")
    assert dl.hub_url("org/m", "sub dir/f.json", "refs/pr/1") == \
        "https://hub.example/org/m/resolve/refs%2Fpr%2F1/sub%20dir/f.json"
    assert dl.hub_url("datasets/org/d", "data.jsonl") == "https://hub.example/datasets/org/d/resolve/main/data.jsonl"


# Mutation audit (each test below fails when the behaviour its docstring names is taken out of minimamba.download)


def test_last_modified_is_the_validator_where_there_is_no_etag(server, tmp_path):
    """A server that sends Last-Modified and no ETag (many plain web servers): the date is kept with the .part and
    sent as If-Range, so an unchanged file resumes and a changed one (a newer date) comes whole."""
    old, new = "Wed, 21 Oct 2015 07:28:00 GMT", "Thu, 22 Oct 2015 08:00:00 GMT"
    for path, changed in [("/same", False), ("/changed", True)]:
        server.files[path], server.last_modified[path] = PAYLOAD, old
        server.drop_after[path] = 100_000
        with pytest.raises(DownloadError, match="resume"):
            download(f"{server.url}{path}", tmp_path / path[1:], retries=0)
        assert (tmp_path / f"{path[1:]}.part.validator").read_text() == old + "\n"
        if changed:
            server.files[path], server.last_modified[path] = PAYLOAD[::-1], new
        assert download(f"{server.url}{path}", tmp_path / path[1:]).read_bytes() == server.files[path]
        assert server.headers[-1]["Range"] == "bytes=100000-" and server.headers[-1]["If-Range"] == old
    assert [r[1] for r in server.requests] == [None, "bytes=100000-"] * 2
    assert sorted(os.listdir(tmp_path)) == ["changed", "same"]


def test_a_new_part_without_a_tag_drops_the_old_versions_validator(server, tmp_path):
    """The .part of version "v1" is answered with the whole new file, which has no ETag nor Last-Modified: v1's tag
    must go with v1's bytes, else the next resume sends If-Range "v1" for bytes of another version."""
    (tmp_path / "f.part").write_bytes(b"bytes of v1")
    (tmp_path / "f.part.validator").write_text('"v1"\n')
    server.files["/f"] = PAYLOAD  # no tag: the If-Range "v1" does not match, so the answer is 200 and the whole file
    server.drop_after["/f"] = 100_000
    with pytest.raises(DownloadError, match="resume"):
        download(f"{server.url}/f", tmp_path / "f", retries=0)
    assert (tmp_path / "f.part").read_bytes() == PAYLOAD[:100_000]
    assert not (tmp_path / "f.part.validator").exists()
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == PAYLOAD
    assert [(h["Range"], h["If-Range"]) for h in server.headers] == [("bytes=11-", '"v1"'), ("bytes=100000-", None)]


def test_a_206_that_sends_no_bytes_is_a_failed_try(server, tmp_path, monkeypatch):
    """A 206 that carries nothing of the rest is retried as a failure (at most `retries` times), not asked again
    and again as a file sent in parts (which never ended)."""
    server.files["/f"] = PAYLOAD
    server.part_size["/f"] = 0  # every answer: 206, no bytes
    serve = server.RequestHandlerClass.do_GET

    def at_most_five(handler):  # (so that a download that never stops asking ends with a 410)
        if len(handler.server.requests) >= 5:
            handler.server.requests.append((handler.path, handler.headers.get("Range"), None))
            return handler.send_error(410)
        return serve(handler)

    monkeypatch.setattr(server.RequestHandlerClass, "do_GET", at_most_five)
    with pytest.raises(DownloadError, match="failed after 3 tries: .*sent none of bytes 0-255999"):
        download(f"{server.url}/f", tmp_path / "f", retries=2)
    assert len(server.requests) == 3 and not (tmp_path / "f").exists()


def test_retries_wait_twice_as_long_each_time_and_a_file_in_parts_does_not_wait(server, failing, tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(dl, "time", types.SimpleNamespace(sleep=waits.append))  # (no real waiting)
    monkeypatch.setattr(dl, "RETRY_WAIT", 0.5)
    server.files["/f"] = PAYLOAD
    failing["/f"] = [503, 503, 503]
    assert download(f"{server.url}/f", tmp_path / "a", retries=3).read_bytes() == PAYLOAD
    assert waits == [0.5, 1.0, 2.0]
    waits.clear()
    server.part_size["/f"] = 100_000  # three answers, none of them a failure
    assert download(f"{server.url}/f", tmp_path / "b", retries=0).read_bytes() == PAYLOAD
    assert waits == [] and len(server.requests) == 4 + 3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_an_untrusted_certificate_fails_at_once_and_ssl_cert_file_fixes_it(server, tmp_path, monkeypatch):
    """An HTTPS server whose certificate no known authority signed (a proxy that re-signs HTTPS): no retry (it
    cannot get better), and the advice (SSL_CERT_FILE pointing at the certificate) makes the download work."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    https = type(server)()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    https.socket = context.wrap_socket(https.socket, server_side=True, do_handshake_on_connect=False)
    https.handle_error = lambda request, address: None  # (the refused handshakes)
    threading.Thread(target=https.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    tries = []
    fetch = dl._fetch
    monkeypatch.setattr(dl, "_fetch", lambda *args: (tries.append(args[0]), fetch(*args)))
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    url = f"https://127.0.0.1:{https.server_address[1]}/f"
    try:
        https.files["/f"] = PAYLOAD
        with pytest.raises(DownloadError, match=r"(?s)certificate verify failed.*Point SSL_CERT_FILE at its"):
            download(url, tmp_path / "f", retries=3)
        assert tries == [url] and not (tmp_path / "f").exists()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert download(url, tmp_path / "f").read_bytes() == PAYLOAD
    finally:
        https.shutdown()
        https.server_close()


def test_a_proxy_from_the_environment_is_used_and_no_proxy_is_honoured(server, tmp_path, monkeypatch):
    """http_proxy: the request goes to the proxy (with the whole address), and the quick reachability check tries
    the proxy, not the host (which only the proxy can reach: here a name that does not resolve). no_proxy: the
    host is asked directly, and a proxy that is down does not matter."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server.files["http://files.invalid/f"] = PAYLOAD  # (what a proxy is asked for: the whole address)
    monkeypatch.setenv("http_proxy", server.url)
    assert download("http://files.invalid/f", tmp_path / "a").read_bytes() == PAYLOAD
    assert server.requests == [("http://files.invalid/f", None, None)]
    with socket.socket() as s:  # a port that nothing listens on: a proxy that is down
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{down}")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server.files["/f"] = PAYLOAD
    assert download(f"{server.url}/f", tmp_path / "b").read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/f", None, None)


@pytest.mark.skipif(dl.fcntl is None, reason="no flock (Windows)")
def test_a_waiter_whose_lock_file_was_removed_locks_the_new_one(tmp_path, monkeypatch, capsys):
    """The holder removes the lock file when it is done. A process that had opened it and waited then holds a lock
    on a file that is no longer there, which a third process (creating the lock file anew) would not see: the
    waiter must lock the file that is there."""
    part, lock, real = tmp_path / "f.part", tmp_path / "f.part.lock", dl.fcntl
    waiting, seen = threading.Event(), []

    class Fcntl:  # fcntl, saying when a process starts to wait
        LOCK_EX, LOCK_NB = real.LOCK_EX, real.LOCK_NB

        @staticmethod
        def flock(fd, operation):
            if not operation & real.LOCK_NB:
                waiting.set()
            return real.flock(fd, operation)

    monkeypatch.setattr(dl, "fcntl", Fcntl)

    def second():
        with dl._only_one_process(part, "f"):
            third = os.open(lock, os.O_RDWR | os.O_CREAT)  # a third process asking for the same file
            try:
                real.flock(third, real.LOCK_EX | real.LOCK_NB)
                seen.append("the third one got the lock too")
            except BlockingIOError:
                seen.append("the third one waits")
            finally:
                os.close(third)

    waiter = threading.Thread(target=second)
    with dl._only_one_process(part, "f"):
        waiter.start()
        assert waiting.wait(5)
    waiter.join(5)
    assert seen == ["the third one waits"] and not lock.exists()
    assert "f: waiting for another process that is downloading it" in capsys.readouterr().err


@pytest.mark.skipif(dl.fcntl is None or not os.path.isdir("/proc/self/fd"), reason="needs flock and /proc")
def test_a_filesystem_without_locks_downloads_without_one(server, tmp_path, monkeypatch):
    """flock fails with ENOLCK on some network filesystems: the download goes on without a lock (as on Windows),
    leaving no lock file and no open descriptor behind."""
    real = dl.fcntl

    class NoLocks:
        LOCK_EX, LOCK_NB = real.LOCK_EX, real.LOCK_NB

        @staticmethod
        def flock(fd, operation):
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(dl, "fcntl", NoLocks)
    server.files["/f"] = PAYLOAD
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == PAYLOAD
    assert sorted(os.listdir(tmp_path)) == ["f"]
    open_files = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # (closed meanwhile)
            pass
    assert not [f for f in open_files if "f.part.lock" in f]

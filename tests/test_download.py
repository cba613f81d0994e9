"""minimamba.download against a real HTTP server on 127.0.0.1 (no internet needed)."""

import errno
import hashlib
import os
import socket
import threading
import time

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


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410])
def test_other_http_errors_are_not_retried(server, failing, tmp_path, code):
    server.files["/f"] = PAYLOAD
    failing["/f"] = [code]
    with pytest.raises(DownloadError, match=f"HTTP {code}"):
        download(f"{server.url}/f", tmp_path / "f", retries=3)
    assert len(server.requests) == 1


def test_the_token_goes_to_hf_endpoint_only(server, monkeypatch, tmp_path):
    """HF_TOKEN is for the Hub: a download from any other address (a task file from GitHub) never sends it."""
    monkeypatch.setenv("HF_TOKEN", "secret")
    server.files["/f"] = PAYLOAD
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
    assert download(f"{server.url}/f", tmp_path / "f").read_bytes() == PAYLOAD
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/mirror")  # (the same host, another prefix: not the Hub)
    assert download(f"{server.url}/f", tmp_path / "g").read_bytes() == PAYLOAD
    assert server.requests == [("/f", None, None), ("/f", None, None)]


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

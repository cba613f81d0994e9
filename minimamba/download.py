"""Downloads with a cache, a progress bar and resume. Standard library (urllib) + tqdm only.

    download(url, dest)                 one file -> dest, via dest.part (resumed with an HTTP Range request)
    hub_file(repo_id, filename)         one file of a Hugging Face Hub repo, cached under cache_dir()
    hub_url(repo_id, filename)          its address on the Hub

Environment variables:
    HF_ENDPOINT       the Hub's address (default https://huggingface.co), e.g. a mirror or a local server
    HF_TOKEN          sent as "Authorization: Bearer ..." to HF_ENDPOINT only, also on its redirects to
                      HF_ENDPOINT's own host (not on those to another host, e.g. the Hub's file storage)
    HF_HUB_OFFLINE=1  never touch the network (1, ON, YES or TRUE in any case, as huggingface_hub reads it):
                      download() and hub_file() only return files already there, and name where the others go
    MINIMAMBA_CACHE   where hub files are cached (default $HF_HOME/minimamba, HF_HOME default ~/.cache/huggingface)

A download first writes `dest.part`. If it is interrupted, the next call asks the server for the
remaining bytes only ("Range: bytes=N-"): a 206 answer continues the .part (if its Content-Range starts
at byte N; else the .part is dropped and the file fetched again), a 200 answer (server ignores Range)
starts it over, a 416 answer means the .part is already complete (if the size that the 416 gives is the
.part's; else the .part is dropped and the file fetched again). The server's ETag (or Last-Modified)
of the first answer is kept in `dest.part.validator` and sent as "If-Range", so that a file that changed
on the server since the .part began is fetched whole instead of being spliced onto the old bytes. Only a complete
(and, when asked, size- and sha256-checked) file is renamed to `dest`, so `dest` is never half-written; a `dest`
that is already there is checked too when a size or sha256 is asked (and left alone if it does not match).
Two processes asking for the same file at once (every rank of a torchrun job) take turns: the second waits
on a lock (flock on `dest.part.lock`, removed after; not on Windows, where they must not), then finds the file.
The .part is flushed to the disk before its rename, so a power cut cannot leave a `dest` that is not whole.
"""

import errno
import os
import socket
import sys
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from minimamba.files import fsync_dir, fsync_file, sha256_of

try:
    import fcntl
except ImportError:  # Windows: no lock (two processes must then not download the same file at once)
    fcntl = None

CONNECT_TIMEOUT = 5.0  # seconds to wait for a TCP connection before declaring the host unreachable
RETRY_WAIT = 1.0  # seconds before the first retry; doubles after each failed try
TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}  # worth retrying; any other HTTP error is final
# errors of the local disk (not of the network), which a retry would only meet again
DISK_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download failed for good; the message names the URL, the error and what to do."""


def endpoint() -> str:
    """HF_ENDPOINT (unset or empty: the Hub) without a final "/"; download() checks that it is an http(s) address."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for no network at all (the values huggingface_hub takes as true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    if os.environ.get("MINIMAMBA_CACHE"):
        return Path(os.environ["MINIMAMBA_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return Path(hf_home).expanduser() / "minimamba"


def hub_file(repo_id: str, filename: str, revision: str = "main", **kwargs) -> Path:
    """Path of `filename` from Hub repo `repo_id` (datasets: "datasets/owner/name"), downloaded on first use.

    Cached at cache_dir()/owner--name/revision/filename; a cached file is returned without any request.
    kwargs go to download() (e.g. sha256=..., which a cached file is checked against too).
    """
    dest = cache_dir() / repo_id.replace("/", "--") / revision / filename
    return download(hub_url(repo_id, filename, revision), dest, desc=f"{repo_id}/{filename}", **kwargs)


def hub_file_or_local(name: str, filename: str) -> Path:
    """`hub_file(name, filename)` for a `name` that is no local path but looks like a Hub repo id; where
    that download fails, the error also says that no such local folder exists (a mistyped local path,
    "runs/step-100", looks like a repo id too)."""
    try:
        return hub_file(name, filename)
    except DownloadError as e:
        raise DownloadError(f"{name!r}: there is no local folder {name} (relative to {Path.cwd()}), and as a "
                            f"Hub repo id it could not be downloaded:\n{e}") from e


def hub_url(repo_id: str, filename: str, revision: str = "main") -> str:
    """The address of one file of a Hub repo (datasets: repo_id = "datasets/owner/name")."""
    return f"{endpoint()}/{repo_id}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(filename)}"


def download(
    url: str,
    dest: Path,
    *,
    desc: str | None = None,
    expected_size: int | None = None,
    sha256: str | None = None,
    timeout: float = 30,
    retries: int = 4,
) -> Path:
    """Download `url` to `dest` and return `dest`.

    An existing `dest` is returned without any request, after checking it against `expected_size` and
    `sha256` when they are given (a mismatch is an error; the file is left for the user to look at).
    With HF_HUB_OFFLINE set, a missing `dest` is an error that says where to put the file.
    Resumes from `dest.part` when one is left over. Transient errors (dropped connections, read
    timeouts, HTTP 408/429/500/502/503/504: TRANSIENT_HTTP) are retried `retries` times with exponential
    backoff, each try resuming where the last one stopped. `timeout` is the read timeout in seconds; an
    unreachable host fails after CONNECT_TIMEOUT seconds without retries.
    """
    dest = Path(dest)
    if dest.exists():
        _check_existing(dest, url, expected_size, sha256)
        return dest
    _check_url(url)
    if offline():  # every download goes through here: nothing below touches the network
        raise DownloadError(
            f"HF_HUB_OFFLINE is set and {dest} does not exist, so {desc or dest.name} is not downloaded.\n"
            f"  Put the file at {dest} (it is fetched from {url}), or unset HF_HUB_OFFLINE."
        )
    part = dest.with_suffix(dest.suffix + ".part")
    _check_name_length(dest, part)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _only_one_process(part, desc or dest.name):
        if dest.exists():  # another process downloaded it while this one waited
            _check_existing(dest, url, expected_size, sha256)
            return dest
        _check_reachable(url, dest)
        attempt = 0
        while True:
            try:
                _fetch(url, part, desc or dest.name, timeout)
                break
            except _PartialContent:  # (not a failure: a server may send a large file in several parts)
                continue
            except urllib.error.HTTPError as e:
                if e.code not in TRANSIENT_HTTP or attempt == retries:
                    raise DownloadError(_http_advice(url, e)) from e
            except (OSError, HTTPException) as e:  # dropped connection, read timeout, reset, truncated body
                reason = getattr(e, "reason", e)  # urllib wraps connection errors in URLError(reason)
                code = getattr(e, "errno", None)
                if isinstance(reason, ssl.SSLCertVerificationError):  # not transient: do not retry
                    raise DownloadError(
                        f"downloading {url} failed: {reason}\n"
                        "  Behind a proxy that re-signs HTTPS? Point SSL_CERT_FILE at its certificate bundle."
                    ) from e
                if code == errno.ENAMETOOLONG:  # a filesystem with a shorter limit on names
                    raise DownloadError(
                        f"downloading {url} failed: {e}\n  {_SHORTER_NAME} (the bytes so far are kept in {part})."
                    ) from e
                if code in DISK_ERRORS:  # the disk, not the network: do not retry
                    raise DownloadError(
                        f"downloading {url} failed: cannot write {part}: {e}\n"
                        f"  Free some space there (or use another folder, e.g. MINIMAMBA_CACHE for Hub files) "
                        "and run again; the bytes so far are kept and resumed."
                    ) from e
                if attempt == retries:
                    raise DownloadError(
                        f"downloading {url} failed after {retries + 1} tries: {reason!r}\n"
                        f"  The bytes so far are kept in {part}; run again to resume."
                    ) from e
            time.sleep(RETRY_WAIT * 2**attempt)
            attempt += 1
        _verify(part, url, expected_size, sha256)
        fsync_file(part)  # its bytes reach the disk before its new name does: a power cut cannot leave a
        os.replace(part, dest)  # dest that looks complete but is not. atomic: dest appears whole or not at all
        fsync_dir(dest.parent)
        _validator_file(part).unlink(missing_ok=True)
    return dest


@contextmanager
def _only_one_process(part: Path, desc: str):
    """Hold an exclusive lock (flock on `part`.lock) while downloading into `part`: a second process asking
    for the same file (every rank of a torchrun job) waits, then finds the file there. The lock file is
    removed by its holder; a waiter that locked a removed one tries again."""
    lock = part.with_name(part.name + ".lock")
    fd = None
    while fcntl is not None:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # (the first file a download creates: where the filesystem's limit is short)
            if e.errno != errno.ENAMETOOLONG:
                raise
            raise DownloadError(
                f"downloading {desc} failed: cannot create {lock}: {e.strerror}\n  {_SHORTER_NAME}.") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"{desc}: waiting for another process that is downloading it", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks (ENOLCK on some NFS mounts): go on without (as on Windows),
            os.close(fd)  # leaving no lock file behind (it would stay beside the downloaded file for good)
            lock.unlink(missing_ok=True)
            fd = None
            break
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it after this process opened it: lock the new one
    try:
        yield
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)
            os.close(fd)


def _discard(part: Path) -> None:
    """Delete a .part that cannot be resumed, with its validator (which belongs to its bytes)."""
    part.unlink()
    _validator_file(part).unlink(missing_ok=True)


def _validator_file(part: Path) -> Path:
    """Where the server's ETag (or Last-Modified) of the file being downloaded into `part` is kept, so
    that a resume asks for the rest of *that* version of the file (If-Range) and not of a newer one."""
    return part.with_name(part.name + ".validator")


def _fetch(url: str, part: Path, desc: str, timeout: float) -> None:
    """One try: append the missing bytes of `url` to `part` (or rewrite it if the server ignores Range)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "minimamba"})
    token = os.environ.get("HF_TOKEN")
    if token and url.startswith(endpoint() + "/"):
        # an "unredirected" header is not forwarded on redirects, except by _HubRedirects to HF_ENDPOINT's host
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    validator = _validator_file(part)
    if have:
        request.add_header("Range", f"bytes={have}-")
        if validator.exists():  # the server sends the whole (new) file if it changed since the .part began
            request.add_header("If-Range", validator.read_text(encoding="utf-8").strip())
    try:
        # a fresh opener reads the proxy settings (http_proxy, no_proxy, ...) from the environment now
        response = urllib.request.build_opener(_HubRedirects).open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        # 416 Range Not Satisfiable: nothing after byte `have`. The .part is complete if the server's
        # size ("Content-Range: bytes */SIZE") agrees; otherwise it is corrupt: drop it and start over.
        size = (e.headers.get("Content-Range") or "").rpartition("/")[2]
        if not (size.isdigit() and int(size) == have):
            part.unlink()
            raise ConnectionError(f"{part.name} is larger than the file on the server; starting over") from e
        return
    with response:
        if have and response.status != 206:  # the server ignored Range, or the file changed: the whole file
            have = 0
        size = None  # the whole file's size, where a 206 says it
        if response.status == 206:  # a part of the file: it must continue the .part where it ends
            content_range = response.headers.get("Content-Range") or ""
            start, size = _content_range(content_range)
            if start != have:
                if have:
                    _discard(part)
                raise ConnectionError(f"the server answered a request from byte {have} with "
                                      f"Content-Range {content_range!r}; starting over")
        if not have:  # a new .part: empty it first (a kill before the writes must not leave old bytes under
            open(part, "wb").close()  # the new version's tag), then remember which version it holds
            tag = response.headers.get("ETag")
            tag = tag if tag and not tag.startswith("W/") else response.headers.get("Last-Modified")
            if tag:
                validator.write_text(tag + "\n", encoding="utf-8")
            else:
                validator.unlink(missing_ok=True)
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = size if size is not None else have + remaining if remaining is not None else None
        written = 0
        with open(part, "ab") as f, tqdm(  # (a new .part was emptied above)
            total=total, initial=have, desc=desc, unit="B", unit_scale=True, unit_divisor=1024
        ) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if remaining is not None and written < remaining:
        raise ConnectionError(f"connection closed after {written} of {remaining} bytes")  # retried, resuming
    if size is not None and have + written < size:  # a 206 may send less than the rest: ask for the rest
        if written == 0:  # (nothing came: a failure, retried as such)
            raise ConnectionError(f"the server sent none of bytes {have}-{size - 1}")
        raise _PartialContent(f"the server sent bytes {have}-{have + written - 1} of {size}")


class _PartialContent(Exception):
    """A 206 that sent some of the bytes still missing, not all: `download` asks for the rest at once."""


def _content_range(header: str) -> tuple:
    """(first byte, whole size) of a 206's "Content-Range: bytes START-END/SIZE"; None for what is missing
    or unreadable (SIZE may be "*": unknown)."""
    span, _, size = header.removeprefix("bytes ").partition("/")
    start = span.partition("-")[0].strip()
    return (int(start) if start.isdigit() else None), (int(size) if size.strip().isdigit() else None)


NAME_MAX = 255  # one file name on the usual filesystems: bytes (ext4, xfs, btrfs, APFS), UTF-16 units (NTFS)
_SHORTER_NAME = f"This filesystem takes shorter file names than {NAME_MAX} bytes: download to a shorter name"


def _name_length(name: str) -> tuple[int, str]:
    """How long a file name is where the limit applies: in UTF-16 units on Windows, else in the bytes the
    filesystem gets (undecodable ones too)."""
    if os.name == "nt":
        return len(name.encode("utf-16-le", "surrogatepass")) // 2, "UTF-16 units"
    return len(os.fsencode(name)), "bytes"


def _check_name_length(dest: Path, part: Path) -> None:
    """Refuse, before any request, a dest whose download files (`part`, its `.lock` and its validator, the
    longest) could not be created: their names would be too long for the filesystem (else the error came
    mid-download, and was retried as if the network had failed)."""
    longest = _validator_file(part).name
    n, unit = _name_length(dest.name)
    extra = _name_length(longest)[0] - n
    if n + extra > NAME_MAX:
        raise DownloadError(
            f"cannot download to {dest}: its name is {n} {unit}, and the file kept beside it while it downloads "
            f"(name + {longest[len(dest.name):]!r}) would pass the limit of {NAME_MAX} {unit} on file names.\n"
            f"  Download it under a name of at most {NAME_MAX - extra} {unit}, then rename it."
        )


def _check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https") and parts.hostname:
        return
    base = endpoint()
    if url.startswith(base + "/"):  # a Hub file: the mistake is in HF_ENDPOINT
        raise DownloadError(f"HF_ENDPOINT={base!r} is not a web address: it needs http:// or https:// in front, "
                            f"e.g. HF_ENDPOINT=https://{base.partition('://')[2] or base}")
    raise DownloadError(f"cannot download {url!r}: not an http:// or https:// address")


def _host_port(parts: urllib.parse.SplitResult) -> tuple:
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, *_host_port(parts)


class _HubRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, keeping HF_TOKEN's header on those to HF_ENDPOINT's own scheme and
    host (the Hub answers some resolve/ URLs with a 307 to /api/resolve-cache/... there) and dropping it on
    those anywhere else (the file storage, a CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        token = req.unredirected_hdrs.get("Authorization")
        if new is not None and token and _origin(newurl) == _origin(endpoint()):
            new.add_unredirected_header("Authorization", token)
        return new


def _check_reachable(url: str, dest: Path) -> None:
    """Fail in seconds, not minutes, when there is no route to the host (or to the proxy, if one is set)."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = _host_port(parts)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        mirror = ", or set HF_ENDPOINT to a reachable mirror" if _origin(url) == _origin(endpoint()) else ""
        raise DownloadError(
            f"cannot reach {parts.hostname}:{port} to download {url}: {e!r}\n"
            f"  No internet? Download the file on a machine that has it and copy it to {dest}\n"
            f"  (or pass a local path instead of a name){mirror}."
        ) from e


def _http_advice(url: str, e: urllib.error.HTTPError) -> str:
    message = f"downloading {url} failed: HTTP {e.code} {e.reason}"
    if e.code in (401, 403):
        return message + "\n  A gated or private repository? Accept its terms on the Hub and set HF_TOKEN."
    if e.code == 404:
        return message + "\n  Check the repository id, the file name and the revision."
    return message


def _check_existing(dest: Path, url: str, expected_size: int | None, sha256: str | None) -> None:
    """A `dest` that is already there must be the file asked for; a wrong one is reported, not deleted."""
    size = dest.stat().st_size
    if expected_size is not None and size != expected_size:
        found = f"has {size} bytes, expected {expected_size}"
    elif sha256 is not None and (got := sha256_of(dest, CHUNK)) != sha256.lower():
        found = f"has sha256 {got}, expected {sha256}"
    else:
        return
    raise DownloadError(
        f"{dest} already exists but {found}: it is not the file at {url} (another version, or damaged).\n"
        f"  Delete it (or move it away) and run again to download it, or put the right file there."
    )


def _verify(part: Path, url: str, expected_size: int | None, sha256: str | None) -> None:
    """A wrong .part is deleted, with its validator (which would otherwise stay behind for good)."""
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        _discard(part)
        raise DownloadError(f"{url}: got {size} bytes, expected {expected_size}; deleted it, run again to retry.")
    if sha256 is not None:
        got = sha256_of(part, CHUNK)
        if got != sha256.lower():
            _discard(part)
            raise DownloadError(
                f"{url}: sha256 {got} does not match the expected {sha256}; "
                "deleted it, run again to retry."
            )

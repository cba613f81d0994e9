"""Shared test fixtures: a local HTTP server standing in for the Hugging Face Hub, and the shared data."""

import json
import tempfile
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from minimamba import download as dl
from minimamba.data import shared_data_dir

# $MINIMAMBA_DATA, else shared/data beside the clone: real public data that some tests read; they skip when it
# is absent
DATA = shared_data_dir()


class FileServer(ThreadingHTTPServer):
    """Serves `files` (URL path -> bytes) with Range support, and records what it was asked.

    ignore_range: paths answered with 200 and the whole file even when a Range is asked.
    drop_after:   path -> n: the next answer for that path sends n bytes of its body, then hangs up.
    etags:        path -> ETag sent with the file; an If-Range that differs gets the whole file (200).
    last_modified: path -> Last-Modified date sent with the file; If-Range may name it instead of the ETag.
    bad_range:    paths whose 206 answers start at byte 0 whatever was asked (a broken server or proxy).
    part_size:    path -> n: every answer for that path is a 206 with at most n bytes from where it was asked
                  (from byte 0 with no Range): the whole file takes several requests.
    """

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.ignore_range, self.drop_after, self.etags, self.bad_range = {}, set(), {}, {}, set()
        self.part_size, self.last_modified = {}, {}
        self.requests = []  # (path, Range header or None, Authorization header or None)
        self.headers = []  # every request's headers (an email.message.Message: ["If-Range"] is None when absent)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        asked = self.headers.get("Range")
        server.requests.append((self.path, asked, self.headers.get("Authorization")))
        server.headers.append(self.headers)
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, partial = 0, False
        etag, last_modified = server.etags.get(self.path), server.last_modified.get(self.path)
        if_range = self.headers.get("If-Range")
        same = if_range is None or if_range in {etag, last_modified} - {None}  # (the version the client has)
        if asked and self.path not in server.ignore_range and same:
            partial = True
            start = int(asked.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path in server.bad_range:
                start = 0
        end = min(len(body), start + server.part_size.get(self.path, len(body)))  # (the bytes sent: start..end-1)
        if partial or end < len(body):
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        else:
            self.send_response(200)
        if etag:
            self.send_header("ETag", etag)
        if last_modified:
            self.send_header("Last-Modified", last_modified)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        cut = server.drop_after.pop(self.path, None)
        self.wfile.write(body[start:end] if cut is None else body[start : min(end, start + cut)])
        # HTTP/1.0: the connection closes when this returns, so a cut body ends early

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch, tmp_path):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(dl, "RETRY_WAIT", 0.0)
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("MINIMAMBA_CACHE", str(tmp_path / "cache"))
    yield srv
    srv.shutdown()
    srv.server_close()


def randomize_(model, seed=0, biases=False):
    """Give every parameter of a Mamba2 LM (ours or HF's) a non-trivial value: norm weights ≠ 1, D ≠ 1,
    varied dt_bias and A, and with `biases` every other bias too (the conv's, the projections'). Returns
    the model. (The HF greedy-generation test keeps the default: its seeded prompt was chosen for it.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", ".D")) or (biases and "bias" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def save_in_state_spaces_layout(hf, cfg, directory):
    """Save HF's Mamba2ForCausalLM `hf` (built from `cfg`, a Mamba2Config) as a public state-spaces checkpoint is
    laid out (backbone.embedding, pytorch_model.bin, its config.json) in `directory`; returns `directory`."""
    directory = Path(directory)
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    torch.save(sd, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(cfg.to_dict("state-spaces")))
    return directory


@contextmanager
def scratch_folder():
    """A new empty folder, removed afterwards: for hypothesis tests, which run many inputs in one test
    (pytest's tmp_path is one folder per test)."""
    with tempfile.TemporaryDirectory(prefix="minimamba-test-") as d:
        yield Path(d)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is ~20× faster than two on a busy 2-core machine (no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_speed_probe(monkeypatch):
    """Skip the 0.25 s matmul measurement of the time estimate of each train() / finetune() run."""
    from minimamba import training

    monkeypatch.setattr(training, "matmul_flops", lambda device, dtype=None: 1e11)


@pytest.fixture
def nan_after():
    """nan_after(model, n): every training forward of `model` after its n-th gives NaN logits."""
    def poison(model, n):
        calls = {"n": 0}

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] > n:
                    return output * float("nan")

        model.register_forward_hook(hook)
        return model

    return poison


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(capability, name): torch.cuda answers as that GPU for every device (what `gpu_too_old` reads), so
    a CPU machine can test the choices made for a CUDA device; nothing is run on it."""
    def install(capability, name):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return install

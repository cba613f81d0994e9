"""The fused C decoding step (kernels/decode_cpu.c) against its PyTorch reference (`Mamba2LM._step_torch`),
the choice between them, its errors, and the 2 MiB-page request."""

import errno
import logging
import math
import os
import pathlib
import shutil
import sys

import pytest
import torch

from kernels import decode_cpu
from minimamba import Mamba2Config, Mamba2LM
from tests.conftest import randomize_

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="the C decode step needs a C compiler (cc)")


def config(**kw):
    base = dict(d_model=64, n_layer=3, vocab_size=1000, d_state=16, headdim=16, ngroups=2, chunk_size=8)
    return Mamba2Config(**{**base, **kw})


def random_model(cfg, seed=0, decode_backend="auto"):
    torch.manual_seed(seed)
    return randomize_(Mamba2LM(cfg, decode_backend=decode_backend), seed, biases=True).eval()


def run_steps(model, backend, ids):
    """Decode ids (b, l) one token at a time from an empty cache: logits (b, l, Vp) and the final cache."""
    model.decode_backend = backend
    cache = model.allocate_cache(ids.shape[0])
    step = model.decoder(ids.shape[0])
    assert model.decode_backend_used[0] == backend
    logits = torch.stack([step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
    return logits, cache


@pytest.mark.parametrize("kw", [
    dict(),                                   # 8 heads in 2 groups
    dict(ngroups=1, n_layer=1),               # one group
    dict(ngroups=8),                          # a group per head
    dict(bias=True, conv_bias=False),         # biases on the projections, none on the conv
    dict(d_model=48, headdim=8, d_conv=2),    # 12 heads, another conv width; in_proj rows not a multiple of 4
    dict(tie_embeddings=False, n_layer=1),    # a head of its own, not the embedding
])
@pytest.mark.parametrize("batch", [1, 3])
def test_c_step_equals_the_torch_step(kw, batch):
    model = random_model(config(**kw))
    ids = torch.randint(0, 1000, (batch, 12), generator=torch.Generator().manual_seed(batch))
    ref, ref_cache = run_steps(model, "torch", ids)
    out, cache = run_steps(model, "c", ids)
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 1e-5 * scale, "logits differ"
    assert (cache.ssm - ref_cache.ssm).abs().max().item() <= 1e-5 * ref_cache.ssm.abs().max().item()
    assert (cache.conv - ref_cache.conv).abs().max().item() <= 1e-5 * ref_cache.conv.abs().max().item()
    assert cache.seqlen_offset == ref_cache.seqlen_offset == 12


def test_c_step_after_a_prefill_equals_the_full_forward():
    model = random_model(config(), decode_backend="c")
    ids = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2)
        model(ids[:, :7], cache=cache)
    step = model.decoder(2)
    steps = torch.stack([step(ids[:, t], cache) for t in range(7, 20)], dim=1)
    assert (steps - full[:, 7:]).abs().max().item() <= 1e-4


def test_greedy_generation_is_the_same_with_either_step():
    model = random_model(config(n_layer=2), seed=3)
    prompt = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
    model.decode_backend = "c"
    ours = model.generate(prompt, max_new_tokens=24)
    model.decode_backend = "torch"
    ref = model.generate(prompt, max_new_tokens=24)
    assert torch.equal(ours, ref)


def test_auto_picks_c_for_float32_on_cpu_and_torch_for_bfloat16_saying_why(caplog):
    model = random_model(config())
    with caplog.at_level(logging.INFO, logger="minimamba"):
        model.decoder(1)
        assert model.decode_backend_used[0] == "c"
        model.to(torch.bfloat16).decoder(1)
    assert model.decode_backend_used == ("torch", "auto: the C step computes in float32 and the weights are "
                                                  "torch.bfloat16")
    assert "decode step = torch (auto: the C step computes in float32" in caplog.text
    model.decode_backend = "c"
    with pytest.raises(ValueError, match="float32.*decode_backend='torch'"):
        model.decoder(1)


def test_a_model_with_one_weight_not_float32_is_refused_naming_that_weight():
    """The reason named the embedding's dtype: 'computes in float32 and the weights are torch.float32'."""
    model = random_model(config(), decode_backend="c")
    model.layers[1].mixer.A_log.data = model.layers[1].mixer.A_log.data.double()
    with pytest.raises(ValueError, match=r"computes in float32 and layers\.1\.mixer\.A_log is torch\.float64"):
        model.decoder(1)


def test_int32_token_ids_step_as_their_int64_values():
    """The step takes torch.int ids too; C reads 8-byte ids, so they are widened first (read as they are, two
    int32 ids made one int64 far outside the vocabulary)."""
    model = random_model(config(n_layer=1))
    ids = torch.tensor([[5, 17, 3], [999, 0, 42]])  # (2, 3)
    ref, ref_cache = run_steps(model, "c", ids)
    out, cache = run_steps(model, "c", ids.int())
    assert torch.equal(out, ref) and torch.equal(cache.ssm, ref_cache.ssm) and torch.equal(cache.conv, ref_cache.conv)


def test_a_weight_that_is_a_strided_view_is_refused_by_c_and_auto_decodes_with_torch():
    """C reads each weight as a dense row-major block from its first address: a transposed view (the same
    values, other strides) would be read as other numbers. 'c' refuses it; 'auto' decodes with torch."""
    model = random_model(config(n_layer=1))
    ids = torch.tensor([[5, 17, 3]])
    ref, _ = run_steps(model, "torch", ids)
    w = model.layers[0].mixer.in_proj.weight
    w.data = w.data.t().contiguous().t()  # the same values, in column-major order
    assert not w.is_contiguous()
    model.decode_backend = "c"
    with pytest.raises(ValueError, match="cannot run this model: some weights are not contiguous"):
        model.decoder(1)
    model.decode_backend = "auto"
    cache = model.allocate_cache(1)
    step = model.decoder(1)
    assert model.decode_backend_used == ("torch", "auto: some weights are not contiguous")
    out = torch.stack([step(ids[:, t], cache) for t in range(3)], dim=1)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_weights_moved_after_a_step_are_read_from_their_new_place():
    model = random_model(config(), decode_backend="c")
    ids = torch.tensor([[5, 17]])
    before, _ = run_steps(model, "c", ids)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone() * 1.01  # new storage: the old addresses are gone
    after, _ = run_steps(model, "c", ids)
    ref, _ = run_steps(model, "torch", ids)
    assert not torch.allclose(after, before)
    assert (after - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_a_step_kept_across_new_weights_reads_the_old_ones_not_freed_memory():
    """The step held the Parameters, not their storage: after `model.half().float()` (every p.data replaced) it
    read the freed weights (AddressSanitizer: heap-use-after-free; here, the NaNs allocated over them)."""
    model = random_model(config(), decode_backend="c")
    step = model.decoder(1)
    before = step(torch.tensor([3]), model.allocate_cache(1))
    model.half().float()  # new storage for every weight; the old is freed unless something holds it
    junk = [torch.full((p.numel(),), float("nan")) for p in model.parameters() for _ in range(4)]  # noqa: F841
    after = step(torch.tensor([3]), model.allocate_cache(1))
    assert torch.equal(after, before)  # the weights it was built with, still alive


def test_bad_token_ids_and_batch_sizes_fail_clearly():
    model = random_model(config(), decode_backend="c")
    cache = model.allocate_cache(2)
    step = model.decoder(2)
    with pytest.raises(IndexError, match=r"token ids must lie in \[0, 1008\)"):
        step(torch.tensor([3, 1008]), cache)
    with pytest.raises(ValueError, match="built for 2 sequences; got 1 token ids"):
        step(torch.tensor([3]), cache)
    # ids on another device (on CUDA, C would read a device address as host memory; "meta" stands in here)
    with pytest.raises(ValueError, match=r"runs on the CPU; the token ids are on meta: pass token_ids.cpu\(\)"):
        step(torch.tensor([3, 4], device="meta"), cache)
    with pytest.raises(ValueError, match="unknown decode backend"):
        Mamba2LM(config(), decode_backend="fortran")


@pytest.mark.parametrize("other, message", [
    (dict(n_layer=8), r"cache.conv has shape \(8, 1, 3, 192\).*n_layer 8 \(this model: 3\)"),  # read past the end
    (dict(n_layer=1), r"cache.conv .*n_layer 1 \(this model: 3\)"),
    (dict(d_state=32), r"cache.conv .*conv_dim 256 \(this model: 192\)"),
    (dict(d_conv=2), r"cache.conv .*d_conv-1 1 \(this model: 3\)"),
    (dict(headdim=8), r"cache.ssm has shape \(3, 1, 16, 8, 16\).*headdim 8 \(this model: 16\)"),
    (dict(d_model=32), r"cache.conv .*conv_dim 128 \(this model: 192\)"),
])
def test_a_cache_of_another_model_is_refused_before_c_reads_it(other, message):
    """Such a cache made the C step read and write out of bounds (a crash, or a hang)."""
    model = random_model(config(), decode_backend="c")
    cache = Mamba2LM(config(**other)).allocate_cache(1)
    before = (cache.conv.clone(), cache.ssm.clone())
    with pytest.raises(ValueError, match=message + r".*model.allocate_cache\(1\)"):
        model.step(torch.tensor([1]), cache)
    assert torch.equal(cache.conv, before[0]) and torch.equal(cache.ssm, before[1])


def test_the_c_step_refuses_a_cache_it_cannot_index():
    model = random_model(config(), decode_backend="c")
    step = model.decoder(2)
    ok = model.allocate_cache(2)
    wide = model.allocate_cache(2, dtype=torch.float64)  # a float64 conv history: fine for the torch step
    with pytest.raises(ValueError, match="contiguous float32 cache, got a conv history in torch.float64"):
        step(torch.tensor([1, 2]), wide)
    strided = model.allocate_cache(2)
    strided.ssm = torch.zeros(strided.ssm.shape[::-1]).permute(4, 3, 2, 1, 0)  # the right shape, transposed
    with pytest.raises(ValueError, match="an SSM state not contiguous"):
        step(torch.tensor([1, 2]), strided)
    for ids, message in ((torch.tensor([[1], [2]]), r"token_ids must be a 1-D tensor \(batch,\): one id per "
                                                    r"sequence, got \(2, 1\)"),  # (b, 1) ids
                         (torch.tensor([1.0, 2.0]), r"token_ids must be integer ids \(torch.long or torch.int\), "
                                                    r"got torch.float32")):  # float ids
        with pytest.raises(ValueError, match=message):
            step(ids, ok)
    assert not ok.ssm.any() and ok.seqlen_offset == 0


def test_the_logits_are_float32_whatever_the_default_dtype():
    """C writes float32: logits allocated in a float64 default dtype were read as garbage."""
    model = random_model(config())
    ids = torch.tensor([[5, 6], [7, 8]])
    ref, _ = run_steps(model, "torch", ids)
    torch.set_default_dtype(torch.float64)
    try:
        out, _ = run_steps(model, "c", ids)
    finally:
        torch.set_default_dtype(torch.float32)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty build directory and no loaded library, restored afterwards."""
    monkeypatch.setenv("MINIMAMBA_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(decode_cpu, "_lib", None)
    return tmp_path


def test_missing_compiler_is_an_error_for_c_and_a_warning_for_auto(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-cc")
    model = random_model(config(), decode_backend="c")
    with pytest.raises(RuntimeError, match="needs a C compiler.*CC='no-such-cc' names none on PATH.*decode_backend='torch'"):
        model.decoder(1)
    model.decode_backend = "auto"
    with caplog.at_level(logging.WARNING, logger="minimamba"):
        step = model.decoder(1)
    assert model.decode_backend_used[0] == "torch" and "failed to build" in caplog.text
    assert step(torch.tensor([1]), model.allocate_cache(1)).shape == (1, 1008)


def test_cc_may_be_a_command_line(fresh_build, monkeypatch):
    """CC="ccache gcc" or "gcc -m64" is a command, as make takes it (it was refused as not on PATH; `env cc`
    stands in for a wrapper here); unbalanced quotes or only spaces are refused by name."""
    monkeypatch.setenv("CC", "env cc")
    decode_cpu.load()
    assert len(list(fresh_build.glob("decode_cpu-*.so"))) == 1
    assert decode_cpu.library_path("env cc") != decode_cpu.library_path("cc")  # (another compiler command)
    for bad in ("'gcc", "   "):
        monkeypatch.setenv("CC", bad)
        monkeypatch.setattr(decode_cpu, "_lib", None)
        with pytest.raises(RuntimeError, match="CC=.* names none on PATH"):
            decode_cpu.load()


def test_a_failing_compiler_leaves_no_partial_library(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exits 1
    with pytest.raises(RuntimeError, match="compiling decode_cpu.c with false failed"):
        decode_cpu.load()
    assert list(fresh_build.iterdir()) == []


def test_the_library_is_built_once_and_reused(fresh_build):
    decode_cpu.load()
    built = list(fresh_build.glob("decode_cpu-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    decode_cpu._lib = None
    decode_cpu.load()
    assert [p.stat().st_mtime_ns for p in fresh_build.glob("decode_cpu-*.so")] == [mtime]


def test_the_library_is_readable_by_every_user_of_a_shared_build_folder(fresh_build):
    """It was built into a mkstemp file (mode 0600; 0711 once the compiler adds x): in a build folder shared by
    several users (MINIMAMBA_BUILD_DIR), the others' dlopen failed with 'Permission denied'."""
    decode_cpu.load()
    (built,) = fresh_build.glob("decode_cpu-*.so")
    assert built.stat().st_mode & 0o777 == 0o755


def _anon_huge_bytes(lo, hi):
    """AnonHugePages of the mappings of this process that overlap [lo, hi) (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and lo < end
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


def test_weights_are_moved_to_2mib_pages_unchanged():
    t = torch.randn(4 << 20)  # 16 MiB
    before = t.clone()
    done, why = decode_cpu.use_huge_pages([t])
    if why:
        pytest.skip(f"this kernel does not give 2 MiB pages: {why}")
    huge = 2 << 20
    lo, hi = -(-t.data_ptr() // huge) * huge, (t.data_ptr() + (16 << 20)) // huge * huge  # whole pages inside
    assert done in (16 << 20, hi - lo)  # the pages around the tensor, or (if those fail) the ones inside it
    assert _anon_huge_bytes(lo, hi) >= hi - lo
    assert torch.equal(t, before)


def test_huge_pages_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MINIMAMBA_HUGE_PAGES", "0")
    assert decode_cpu.use_huge_pages([torch.zeros(1 << 20)]) == (0, "MINIMAMBA_HUGE_PAGES=0")


@pytest.mark.parametrize("args, message", [
    (["--phases", "forward,bogus"], "unknown phase(s) ['bogus']"),
    (["--repeat", "0"], "--repeat: must be >= 1, got 0"),
    (["--decode-tokens", "0"], "--decode-tokens: must be >= 1"),
    (["--scale", "3b"], "invalid choice: '3b'"),
])
def test_model_benchmark_refuses_bad_options(args, message, capsys):
    from minimamba import bench

    with pytest.raises(SystemExit):
        bench.main(["model", *args])
    assert message in capsys.readouterr().err


def test_model_benchmark_reports_decode_against_the_bandwidth_floor(tmp_path, capsys):
    from minimamba import bench

    out = tmp_path / "bench.json"
    bench.main(["model", "--scale", "tiny", "--phases", "generate", "--prompt", "8", "--decode-tokens", "4",
                "--repeat", "1", "--floor-rounds", "2", "--threads", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "minimamba decode step: c (auto" in text
    assert "read bandwidth on 4 KiB pages" in text and "x the floor" in text
    import json

    result = json.loads(out.read_text())
    floor = result["decode_vs_floor"]
    assert result["decode_step"][0] == "c"
    assert floor["decode ms/token"] > 0 and floor["4 KiB GB/s"] > 0.1 and floor["4 KiB ratio"] > 0
    # (the generation row is the difference of two timed runs, 4 tokens apart, once: on a loaded machine it can
    # come out below 0; its arithmetic is checked on a fake clock in tests/test_bench.py)
    assert math.isfinite(result["rows"]["generate decode ms/token"]["minimamba"])


def test_an_unwritable_build_folder_names_the_fix(fresh_build, monkeypatch):
    blocker = fresh_build / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MINIMAMBA_BUILD_DIR", str(blocker / "build"))
    with pytest.raises(RuntimeError, match="cannot write the C decode step's library.*MINIMAMBA_BUILD_DIR"):
        decode_cpu.load()


def _fake_compiler(folder, version, writes):
    """An executable `cc` in `folder` that prints `version` for --version and writes `writes` to its -o file."""
    folder.mkdir(exist_ok=True)
    cc = folder / "cc"
    cc.write_text("#!/bin/sh\n"
                  f'if [ "$1" = --version ]; then echo "{version}"; exit 0; fi\n'
                  'while [ $# -gt 0 ]; do if [ "$1" = -o ]; then out="$2"; fi; shift; done\n'
                  f'printf "{writes}" > "$out"\n')
    cc.chmod(0o755)
    return cc


def test_another_compiler_of_the_same_name_builds_its_own_library(fresh_build, monkeypatch):
    real = decode_cpu.library_path("cc")
    fake = _fake_compiler(fresh_build / "bin", "fakecc 1.0", "x")
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    first = decode_cpu.library_path("cc")
    _fake_compiler(fresh_build / "bin", "fakecc 2.0", "x")  # the same file, upgraded
    upgraded = decode_cpu.library_path("cc")
    assert len({real, first, upgraded}) == 3


def _not_a_program(folder):
    """An executable file that exec() refuses (no #! line: ENOEXEC)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cc-without-shebang"
    path.write_text("echo hi\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("compiler, message", [
    (lambda d: _fake_compiler(d, "brokencc", "not a shared object"),  # it "builds" a file that is no library
     "just built with .* cannot be loaded.*MINIMAMBA_BUILD_DIR"),
    (_not_a_program, "cannot run the C compiler CC=.*cc-without-shebang.*decode_backend='torch'"),  # (was OSError)
], ids=["library-cannot-be-loaded", "compiler-cannot-be-run"])
def test_a_build_that_fails_is_a_runtime_error_and_auto_falls_back(fresh_build, monkeypatch, caplog, compiler,
                                                                   message):
    monkeypatch.setenv("CC", str(compiler(fresh_build / "bin")))
    with pytest.raises(RuntimeError, match=message):
        decode_cpu.load()
    model = random_model(config(), decode_backend="auto")
    with caplog.at_level(logging.WARNING, logger="minimamba"):
        model.decoder(1)
    assert model.decode_backend_used[0] == "torch" and "failed to build" in caplog.text


def test_a_damaged_library_in_the_build_folder_is_rebuilt(fresh_build):
    path = decode_cpu.library_path(os.environ.get("CC", "cc"))
    path.write_bytes(b"\x7fELF truncated")
    lib = decode_cpu.load()
    assert lib.mamba2_step_workspace is not None and path.stat().st_size > 1000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the check reads ELF headers (Linux libraries)")
def test_a_library_cut_short_is_rebuilt_not_loaded(fresh_build, monkeypatch, tmp_path_factory):
    """dlopen of an ELF file cut short can kill the process (SIGBUS), or load one that crashes later: a
    library shorter than its header says is rebuilt."""
    whole = decode_cpu.library_path(os.environ.get("CC") or "cc")
    decode_cpu.load()
    data = whole.read_bytes()
    for fraction in (0.5, 0.9, 0.99):
        other = tmp_path_factory.mktemp("build")  # (a library loaded here must not be overwritten in place)
        monkeypatch.setenv("MINIMAMBA_BUILD_DIR", str(other))
        monkeypatch.setattr(decode_cpu, "_lib", None)
        cut = decode_cpu.library_path(os.environ.get("CC") or "cc")
        cut.write_bytes(data[: int(len(data) * fraction)])
        assert not decode_cpu._whole(cut)
        assert decode_cpu.load().mamba2_step_workspace is not None and decode_cpu._whole(cut)
        assert cut.stat().st_size == len(data), fraction


def test_a_damaged_library_in_a_read_only_build_folder_is_a_runtime_error_and_auto_falls_back(
        fresh_build, monkeypatch, caplog):
    """Removing the damaged file raised OSError (EROFS), which "auto" did not catch: the model could not decode."""
    decode_cpu.library_path(os.environ.get("CC", "cc")).write_bytes(b"\x7fELF truncated")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(pathlib.Path, "unlink", read_only)
    monkeypatch.setattr(decode_cpu.tempfile, "mkstemp", read_only)
    with pytest.raises(RuntimeError, match="cannot write the C decode step's library.*Read-only file system"):
        decode_cpu.load()
    model = random_model(config(), decode_backend="auto")
    with caplog.at_level(logging.WARNING, logger="minimamba"):
        step = model.decoder(1)
    assert model.decode_backend_used[0] == "torch" and "failed to build" in caplog.text
    assert step(torch.tensor([1]), model.allocate_cache(1)).shape == (1, 1008)


@pytest.mark.parametrize("xdg", [None, ""])
def test_an_unset_or_empty_xdg_cache_home_means_the_home_cache(monkeypatch, xdg):
    """An empty XDG_CACHE_HOME built into minimamba/build under the working directory."""
    monkeypatch.delenv("MINIMAMBA_BUILD_DIR", raising=False)
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert decode_cpu.build_dir() == pathlib.Path("~/.cache/minimamba/build").expanduser()


@pytest.mark.parametrize("backend", ["torch", "c"])
def test_a_batch_of_no_sequences_steps_to_no_logits(backend):
    """A step for 0 sequences (the C step handled it; the torch step's `view(b, g, -1, ...)` could not
    infer -1 from 0 elements)."""
    model = random_model(config(), decode_backend=backend)
    logits = model.decoder(0)(torch.zeros(0, dtype=torch.long), model.allocate_cache(0))
    assert logits.shape[0] == 0 and logits.dtype == torch.float32

"""`kernels.offline`: the Triton programs compile for an H100 (sm_90) on this CPU-only machine.

The compile runs in a subprocess: tests/test_kernels.py sets TRITON_INTERPRET=1 for this pytest
process, and an interpreted kernels module cannot compile for a GPU. A cold compile of every program
in every autotuning config takes about 1-2 minutes on 2 cores (Triton caches the binaries after that).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"_chunk_state_kernel", "_state_passing_fwd_kernel", "_chunk_cb_kernel",
            "_chunk_scan_fwd_kernel", "_state_passing_bwd_kernel", "_chunk_scan_bwd_dx_kernel",
            "_chunk_scan_bwd_dcb_kernel", "_chunk_scan_bwd_dc_kernel", "_chunk_scan_bwd_db_kernel",
            "_chunk_cumsum_bwd_kernel", "_grad_sums_kernel"}


def _ptxas():
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return None
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


def _run_python(*args, interpret=False, timeout=900):
    """`python *args` from the project root, with TRITON_INTERPRET set only if `interpret`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _run_offline(*args, interpret=False, timeout=900):
    return _run_python("-m", "kernels.offline", *args, interpret=interpret, timeout=timeout)


@pytest.mark.skipif(_ptxas() is None, reason="needs triton with its NVIDIA backend (ptxas) installed")
def test_every_program_compiles_for_sm90(tmp_path):
    out = tmp_path / "offline.json"
    proc = _run_offline("--arch", "90", "--host-iters", "3", "--host-rounds", "2", "--out", str(out),
                        "--baseline", str(ROOT / "kernels" / "ssd_triton.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["binaries"]
    assert {r["program"] for r in rows} == PROGRAMS
    for program in PROGRAMS:  # at least one config of every program fits the card, with its resources read
        fits = [r for r in rows if r["program"] == program and r["regs"] is not None]
        assert fits, program
        assert all(0 < r["regs"] <= 255 and r["instructions"] > 0 and len(r["sass"]) == 12 for r in fits)
    # stage 2's program has two uses (the forward's S_c; the backward's ∂L/∂S_in), each in each of its 3 configs
    state_rows = [r["config"] for r in rows if r["program"] == "_chunk_state_kernel"]
    assert len(state_rows) == len(set(state_rows)) == 6
    # a config's cap on registers reaches the binary (dCB's 32×64 config capped at 168)
    capped = [r for r in rows if r["program"] == "_chunk_scan_bwd_dcb_kernel" and "maxnreg=168" in r["config"]]
    assert capped and all(r["regs"] <= 168 for r in capped)
    # the launches per call that the docstring of kernels/ssd_triton.py states
    assert sum(report["launches"]["forward"].values()) == 4, report["launches"]
    assert sum(report["launches"]["backward"].values()) == 8, report["launches"]
    for version in ("this", "baseline"):  # (the baseline is the same file here: it only has to run)
        t = report["host_us"][version]
        assert t["forward+backward"] > t["forward"] > 0 and t["forward, no grad"] > 0
    # the direct launches of `_launch` were compared with Triton's launch by launch (9 forward+backward
    # calls: plain, misaligned x, initial state, in bf16, with the final state unused, kept tensors moved by
    # a saved-tensor hook, 1 head split, a launch-enter hook, a launch-exit hook only: 12 launches each, found
    # by their keys and then by the call's plan, 216; then the nine in turn, each after the others and keeping
    # what they kept, through Triton, by the keys and by the plans, 324); a difference exits non-zero
    assert report["direct_launches_checked"] == 216 + 324
    assert "this / baseline: forward" in proc.stdout
    assert "| _chunk_scan_bwd_dc_kernel |" in proc.stdout and "launches per backward: 8" in proc.stdout


@pytest.mark.skipif(_ptxas() is None, reason="needs triton with its NVIDIA backend (ptxas) installed")
def test_configs_that_do_not_fit_a_smaller_card_are_listed(tmp_path):
    """With 70 000 bytes of shared memory per block, the larger tiles do not fit: they are listed as such,
    and every program still runs in one of its other configs (as Triton's autotuner skips them on a GPU)."""
    out = tmp_path / "small.json"
    proc = _run_offline("--shared", "70000", "--host-iters", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["binaries"]
    too_big = [r for r in rows if r["regs"] is None]
    assert too_big and all(r["shared"] > 70000 and "does not fit" in r["note"] for r in too_big)
    assert all(r["shared"] <= 70000 for r in rows if r["regs"] is not None)
    assert {r["program"] for r in rows if r["regs"] is not None} == PROGRAMS
    assert "some configs do not fit the card" in proc.stderr


def test_help_names_the_command(capsys):
    """It said `usage: offline.py`, which is not how it is run."""
    from kernels import offline

    with pytest.raises(SystemExit) as stop:
        offline.main(["--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m kernels.offline ")


def test_refuses_to_run_under_the_interpreter():
    proc = _run_offline("--host-iters", "0", interpret=True, timeout=300)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr


def test_unknown_card_needs_its_numbers():
    pytest.importorskip("triton", reason="needs triton")
    proc = _run_offline("--arch", "75", "--host-iters", "0", timeout=300)
    assert proc.returncode != 0 and "--sms and --shared" in proc.stderr


def test_a_missing_baseline_is_refused_before_compiling(tmp_path):
    proc = _run_offline("--baseline", str(tmp_path / "old_ssd"), timeout=120)
    assert proc.returncode != 0 and "no such file" in proc.stderr


STALE_CHECK = """
import torch
from kernels.offline import OfflineGPU, _inputs, _call, HOST_SHAPE
from kernels.ssd_triton import SSDChunkScanFn
outer, inner = OfflineGPU(90), OfflineGPU(90)
inputs = _inputs(HOST_SHAPE, torch.bfloat16)
with outer:
    with inner:
        _call(SSDChunkScanFn, HOST_SHAPE, inputs, backward=True)
        _call(SSDChunkScanFn, HOST_SHAPE, inputs, backward=True)
    _call(SSDChunkScanFn, HOST_SHAPE, inputs, backward=True)  # (tunes again, for the outer driver)
    outer.launches.clear(); inner.launches.clear()
    _call(SSDChunkScanFn, HOST_SHAPE, inputs, backward=True)
    print(sum(outer.launches.values()), sum(inner.launches.values()))
"""


@pytest.mark.skipif(_ptxas() is None, reason="needs triton with its NVIDIA backend (ptxas) installed")
def test_binaries_chosen_under_a_stand_in_are_forgotten_when_it_exits():
    """After a stand-in driver exits, the calls go to the driver it replaced (for real: a GPU), not to
    binaries that kernels.ssd_triton kept for direct launches while the stand-in was active."""
    proc = _run_python("-c", STALE_CHECK, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["12", "0"]


SM_COUNT_CHECK = """
import torch
from kernels import ssd_triton
from kernels.offline import OfflineGPU, _inputs, _call, HOST_SHAPE
inputs = _inputs(HOST_SHAPE, torch.bfloat16)
for sms in (132, 1, 132):  # 300 programs: 2 splits give 4 programs per SM of 132 (the target), 1 does on 1 SM
    with OfflineGPU(90, sms=sms):
        _call(ssd_triton.SSDChunkScanFn, HOST_SHAPE, inputs, backward=True)
        print(ssd_triton._head_splits(2, 300, torch.device("cpu")), end=" ")
"""


@pytest.mark.skipif(_ptxas() is None, reason="needs triton with its NVIDIA backend (ptxas) installed")
def test_head_splits_follow_the_sm_count_of_each_stand_in():
    """The SM count that the head splits are chosen by is read again under each stand-in driver, not kept
    from the first one (a process that compiles for two cards, or for a card and then runs on a GPU)."""
    proc = _run_python("-c", SM_COUNT_CHECK, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["2", "1", "2"]


HOST_BREAKDOWN = """
import json
import torch
from kernels import bench, ssd_triton
from kernels.offline import OfflineGPU, HOST_SHAPE, _inputs
b, l, h, p, n, g, Q = HOST_SHAPE
with OfflineGPU(90):
    inp = _inputs(HOST_SHAPE, torch.bfloat16)
    dy = torch.randn(b, l, h, p).to(torch.bfloat16)
    scan = lambda x, dt, A, B, C, Q, D: ssd_triton.SSDChunkScanFn.apply(x, dt, A, B, C, Q, D, None)[0]
    print(json.dumps(bench.host_breakdown(scan, ssd_triton, inp, dy, Q, torch.device("cpu"), iters=5)))
"""


@pytest.mark.skipif(_ptxas() is None, reason="needs triton with its NVIDIA backend (ptxas) installed")
def test_host_breakdown_times_the_launcher_of_every_launch():
    """kernels.bench --host-breakdown, with the stand-in driver's launcher in place of the GPU's: the time
    inside the launcher is summed over the 12 launches of a forward+backward, and the rest is split."""
    proc = _run_python("-c", HOST_BREAKDOWN, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = json.loads(proc.stdout.strip().splitlines()[-1])
    assert t["launches"] == 12
    assert 0 < t["in_launcher"] < t["host"] and 0 < t["autograd_floor"] < t["host"]
    assert t["python"] == pytest.approx(t["host"] - t["in_launcher"] - t["autograd_floor"])
    # forward: cs, S_c, the entering states, the final state, CB, y; backward: ∂L/∂S_in, S_in, S_in as a dot
    # operand, ∂L/∂S_c, the α partial sums, dx, ∂L/∂dt through u, through D·x, dCB, dA_diag, the dCB
    # program's row prefix, the dB/dC splits, dA_off, dA_state, ∂L/∂dt, the per-chunk ∂L/∂A, ∂L/∂D parts,
    # their sums, and the summed ∂L/∂B, ∂L/∂C
    assert t["allocations"] == 6 + 18 and t["per_allocation"] > 0


RETUNE_CHECK = """
import torch
from kernels import ssd_triton
from kernels.offline import OfflineGPU, _inputs, HOST_SHAPE

class GPU(OfflineGPU):  # timings as a GPU may give them: the forward's last program is fastest in another
    def get_benchmarker(self):  # config when D is given or dt is bf16
        def bench(kernel_call, quantiles=None, **kw):
            cells = dict(zip(kernel_call.__code__.co_freevars, (c.cell_contents for c in kernel_call.__closure__)))
            nargs, configs = cells["full_nargs"], ssd_triton._chunk_scan_fwd_kernel.configs
            kernel_call()
            plain = nargs.get("D_ptr") is None and getattr(nargs.get("dt_ptr"), "dtype", None) != torch.bfloat16
            t = 1.0 if cells["config"] not in configs or configs.index(cells["config"]) == (0 if plain else 1) else 2.0
            return [t] * len(quantiles or [None])
        return bench

with GPU(90) as gpu:
    inp = _inputs(HOST_SHAPE, torch.bfloat16)
    def launched(D, dt):  # the config of the forward's last program
        gpu.recorded = []
        with torch.no_grad():
            ssd_triton._ssd_forward(inp["x"], dt, inp["A"], inp["B"], inp["C"], HOST_SHAPE[-1], D, None)
        b = gpu.binaries[[i for name, i, _ in gpu.recorded if name == "_chunk_scan_fwd_kernel"][-1]]
        return b.constants["BLOCK_S"], b.num_warps
    print(launched(None, inp["dt"]), launched(inp["D"], inp["dt"]), launched(None, inp["dt"].bfloat16()))
"""


@pytest.mark.skipif(_ptxas() is None, reason="needs triton with its NVIDIA backend (ptxas) installed")
def test_each_autotuner_key_gets_its_own_config():
    """Triton's autotuner tunes once per its key and the dtypes of the tensor arguments, so a call with D (or
    with bf16 dt) after one without gets the config tuned for it, not the earlier call's (before: the
    launcher kept one config per (chunk, headdim, dstate, x's dtype) and launched it for both)."""
    proc = _run_python("-c", RETUNE_CHECK, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "(32, 4) (64, 8) (64, 8)"

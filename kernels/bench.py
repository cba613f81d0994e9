"""Check and time the Triton SSD scan on a GPU: `python -m kernels.bench [--quick] [--out FILE.json]`.

1. Correctness at the shapes of a real layer (Mamba2-370m: 32 heads × 64 channels, d_state 128,
   1 group, chunk 256) for seqlen 2048 and 8192 in bfloat16, and at batch 8 × 2048 (where the dB/dC
   programs sum 8 heads per split, as in training; at batch 1 they sum 1 or 4), and 2048 in float32
   with --fp32 (whose IEEE-precision dots take minutes to compile): y, the final state and every gradient, against
   `minimamba.ssd.ssd_chunked` computed in float32 on the GPU from the same inputs (with D, an initial
   state, and a loss on y and on the final state). The kernel runs with every launch through Triton
   (compiling and tuning), then with the binaries launched directly (kernels/launch.py), found
   by their keys and then by the call's launch plan, which must give the same bits (`repeat_identical`).
2. Timings (skipped with --quick): forward and forward+backward of the PyTorch reference and of this
   kernel, with `triton.testing.do_bench` (median ms), and the speed ratios, at batch 1 (where every
   implementation is bound by its host-side launch overhead) and at a training-like batch (where the
   GPU work dominates; the recipe trains with 48 sequences of 1024 tokens per GPU at 370m). Our
   autotuned programs are tuned again for each timed shape, as a training run tunes them for its own
   shape; the configs chosen are recorded. Also recorded, per implementation: the host time to issue
   one call with an idle GPU, and the wall time of one call bracketed by `torch.cuda.synchronize`.
   `--rounds N` times every implementation N times, in turns, and keeps the median of the N medians (each
   round's readings are in `rounds_ms`): host-bound timings (batch 1) move by tens of percent between
   readings of the same code, and turns spread a drift over every implementation alike.
   With --cuda-graphs, also forward+backward captured in a CUDA graph and replayed (torch, ours and the
   --baseline versions): the GPU work alone, without the host time that bounds batch 1, and a check that a
   replay gives the eager call's gradients bit for bit (ours must: otherwise the run exits 1).
   With --host-breakdown, the host time of ours' forward+backward split into Triton's launcher (the C
   call per launch), autograd (a differentiable call that computes nothing) and this module's Python:
   where the time goes at batch 1, where the host bounds the call (see `host_breakdown`).
3. mamba_ssm's `mamba_chunk_scan_combined`, when it can be imported: its error on y and its timings
   (last, because its large autotuning space takes long to compile).
`--baseline OLD.py` also checks (as in 1.) and times another version of kernels/ssd_triton.py in the same
run (an A/B of a kernel change on one GPU visit: a faster version is worth keeping only if it is right);
given again, a third version, and so on; `--profile` profiles each.

Every measurement is wrapped: a failure is printed and recorded, and the rest still runs. The JSON
written to --out (rewritten after every measurement) holds the same numbers as the printed tables.
`--cpu-smoke` runs the same code on tiny shapes under Triton's interpreter, on CPU, so that the script
itself is tested without a GPU (tests/test_kernels.py does so).
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch

# (name, batch, seqlen, nheads, headdim, dstate, ngroups, chunk, dtype); the layer of Mamba2-370m
REAL_SHAPES = [
    ("370m", 1, 2048, 32, 64, 128, 1, 256, torch.bfloat16),
    ("370m", 1, 8192, 32, 64, 128, 1, 256, torch.bfloat16),
]
BATCHED_SHAPES = [  # timed (the first in a run also checked): the GPU work of a training step, 16k tokens per call
    ("370m", 8, 2048, 32, 64, 128, 1, 256, torch.bfloat16),
    ("370m", 2, 8192, 32, 64, 128, 1, 256, torch.bfloat16),
]
FP32_SHAPES = [("370m", 1, 2048, 32, 64, 128, 1, 256, torch.float32)]
SMOKE_SHAPES = [
    ("smoke", 1, 40, 2, 16, 16, 1, 16, torch.bfloat16),
    ("smoke", 2, 33, 2, 8, 16, 2, 16, torch.float32),
]
SMOKE_BATCHED_SHAPES = [("smoke", 2, 20, 2, 8, 16, 1, 16, torch.bfloat16)]
TIMED = {torch.bfloat16}  # dtypes that are timed (float32 is checked only)
# max|Δ| / max|ref|. float32: as tests/test_kernels.py's (H100, 1 × 2048: y 2.8e-7, gradients ≤ 1.4e-6); TF32 dot
# operands instead of IEEE ones give 2e-4 to 6e-4 here, which 1e-3 let pass
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def make_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, dtype, device, seed=0):
    """Inputs like a trained layer's: dt = softplus(·) mostly in [1e-3, 0.1], A in [-16, -1]."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    return dict(
        x=randn(batch, seqlen, nheads, headdim).to(dtype),
        dt=torch.nn.functional.softplus(randn(batch, seqlen, nheads) - 4.0),
        A=-torch.exp(torch.rand(nheads, generator=g) * math.log(16)).to(device),
        B=randn(batch, seqlen, ngroups, dstate).to(dtype),
        C=randn(batch, seqlen, ngroups, dstate).to(dtype),
        D=randn(nheads),
        initial_state=randn(batch, nheads, headdim, dstate, scale=0.1),
    )


def load_mamba_ssm():
    """mamba_ssm's fused chunked scan, or the reason it is unavailable."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        return mamba_chunk_scan_combined, None
    except Exception as e:  # not installed, or built against another torch/triton
        return None, f"{type(e).__name__}: {e}"


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check(shape, device, scan, module=None):
    """y, final state and gradients of the kernel against the fp32 reference. `module`: the kernel module
    `scan` belongs to (default kernels.ssd_triton; a --baseline version's own module for its scan)."""
    from minimamba.ssd import ssd_chunked

    if module is None:
        from kernels import ssd_triton as module

    name, b, l, h, p, n, g, Q, dtype = shape
    inp = make_inputs(b, l, h, p, n, g, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    dy = torch.randn(b, l, h, p, generator=gen).to(device)
    dfinal = torch.randn(b, h, p, n, generator=gen).to(device)

    def grads(fn, cast):  # run fn on leaf copies of the inputs (in `cast` or their own dtype)
        leaves = {k: v.detach().to(cast or v.dtype).requires_grad_() for k, v in inp.items()}
        y, final = fn(leaves)
        ((y.float() * dy).sum() + (final.float() * dfinal).sum()).backward()
        return y.detach(), final.detach(), {k: v.grad for k, v in leaves.items()}

    def run(t):
        return scan(t["x"], t["dt"], t["A"], t["B"], t["C"], Q, D=t["D"], initial_state=t["initial_state"],
                    return_final_state=True)

    y_ref, f_ref, g_ref = grads(lambda t: ssd_chunked(**t, chunk_size=Q), torch.float32)
    direct = getattr(module, "DIRECT_LAUNCH", None)  # (None: a version older than direct launches)
    if direct is not None:
        module.DIRECT_LAUNCH = False  # every launch through Triton (compiling and tuning on first use)
    try:
        y, f, gr = grads(run, None)
    finally:
        if direct is not None:
            module.DIRECT_LAUNCH = direct
    errs = {"y": rel_err(y, y_ref), "final": rel_err(f, f_ref)}
    errs.update({"d" + k: rel_err(gr[k], g_ref[k]) for k in inp})
    # then with the binaries launched directly (kernels/launch.py; the first call keeps them), found by
    # their keys (the second call, which records its launch plan) and by that plan (the third): the same bits
    grads(run, None)
    repeat_identical = True
    for _ in range(2 if direct else 1):  # (direct launches off, e.g. under the interpreter: no plan to check)
        y2, f2, gr2 = grads(run, None)
        repeat_identical &= all(torch.equal(u, v) for u, v in [(y, y2), (f, f2), *((gr[k], gr2[k]) for k in inp)])
    return dict(shape=name, batch=b, seqlen=l, dtype=str(dtype).replace("torch.", ""), errors=errs,
                tolerance=TOLERANCE[dtype], repeat_identical=repeat_identical,
                ok=repeat_identical and all(e <= TOLERANCE[dtype] for e in errs.values()))


def mamba_y_error(shape, device, mamba):
    """mamba_ssm's y (with D and an initial state) against the fp32 reference, as a sanity check."""
    from minimamba.ssd import ssd_chunked

    name, b, l, h, p, n, g, Q, dtype = shape
    inp = make_inputs(b, l, h, p, n, g, dtype, device)
    with torch.no_grad():
        y_ref = ssd_chunked(**{k: v.float() for k, v in inp.items()}, chunk_size=Q)[0]
        y = mamba(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], Q, D=inp["D"], initial_states=inp["initial_state"])
    return rel_err(y, y_ref)


def timer(device):
    """ms per call of fn: median of triton.testing.do_bench on CUDA, one timed call on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn, grad_to_none=None: triton.testing.do_bench(
            fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")

    def once(fn, grad_to_none=None):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return once


def host_and_wall_ms(fn, device, reset=None):
    """(host ms, wall ms) of one call of fn, medians over 20 calls (1 on CPU) that each start with an
    idle GPU: host = the time Python takes to issue the call (launches, allocations, autograd), wall =
    until the GPU is done, bracketed by torch.cuda.synchronize. `reset` runs before each call, untimed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    host, wall = [], []
    for _ in range(20 if device.type == "cuda" else 1):
        if reset is not None:
            reset()
        sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        host.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return sorted(host)[len(host) // 2], sorted(wall)[len(wall) // 2]


class _NoScan(torch.autograd.Function):
    """A differentiable call that computes nothing: forward allocates y, backward allocates a gradient for
    each input. Its forward+backward is the host time any scan with these inputs pays to autograd (on
    CUDA the backward runs on autograd's device thread, handed over from the caller's) and to allocating
    its outputs: `host_breakdown`'s floor."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D):
        ctx.inputs = [t.detach() for t in (dt, A, B, C, D)]  # (shapes, devices and dtypes of the gradients)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return (torch.empty_like(dy), *(torch.empty_like(t) for t in ctx.inputs))


def _count_allocations(fn):
    """How many tensors `fn()` allocates (aten.empty*, as a dispatch mode sees them; autograd carries the
    mode over to its device thread)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func.__name__.startswith("empty")
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def host_breakdown(scan, module, inp, dy, chunk_size, device, iters=None):
    """Where the host time of one forward+backward of `scan` goes, µs (medians over `iters` calls, each
    from an idle GPU, gradients set to None before it, untimed):
      host           all of it (as `host_and_wall_ms`'s f+b host)
      in_launcher    inside Triton's launcher, summed over the call's `launches`: the C call that hands a
                     binary to the driver and its Python wrapper (None under the interpreter: no launcher)
      autograd_floor forward+backward of `_NoScan` on the same leaves: autograd and the outputs' allocations
      allocations    how many tensors the call allocates (`_count_allocations`), and `per_allocation` µs,
                     one torch.empty of x's size on this device
      python         host − in_launcher − autograd_floor: what this module's Python itself costs (its
                     argument checks, launch plans and scratch buffers).
    `module` is the kernels.ssd_triton (or --baseline) module `scan` belongs to. iters: 50 on CUDA, 1 on CPU."""
    import triton

    iters = iters or (50 if device.type == "cuda" else 1)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    leaves, fwd_bwd = fwd_bwd_call(scan, inp, dy, chunk_size)

    def median_us(fn, inside=None):
        host, launcher = [], []
        for _ in range(iters):
            grads_to_none(leaves.values())
            sync()
            if inside is not None:
                inside.clear()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
            if inside is not None:
                launcher.append(sum(inside))
        return statistics.median(host) * 1e6, (statistics.median(launcher) * 1e6 if inside is not None else None)

    fwd_bwd()  # (compiled and tuned before, by the timings: this call fills the launch plans)
    out = dict(host=median_us(fwd_bwd)[0], in_launcher=None, launches=None)
    if not module.INTERPRET:  # time the launcher's __call__ (every launch: direct or through Triton's run)
        cls = triton.runtime.driver.active.launcher_cls
        inside, original = [], cls.__call__

        def timed(self, *args):
            t = time.perf_counter()
            try:
                return original(self, *args)
            finally:
                inside.append(time.perf_counter() - t)

        cls.__call__ = timed
        try:
            _, out["in_launcher"] = median_us(fwd_bwd, inside)
            inside.clear()
            fwd_bwd()
            out["launches"] = len(inside)
        finally:
            cls.__call__ = original
    x, dt, A, B, C, D = (leaves[k] for k in ("x", "dt", "A", "B", "C", "D"))
    out["autograd_floor"] = median_us(lambda: _NoScan.apply(x, dt, A, B, C, D).backward(dy))[0]
    grads_to_none(leaves.values())
    out["allocations"] = _count_allocations(fwd_bwd)
    grads_to_none(leaves.values())
    empty = lambda: torch.empty(x.shape, device=device, dtype=x.dtype)  # noqa: E731
    out["per_allocation"] = median_us(empty)[0]
    out["python"] = out["host"] - (out["in_launcher"] or 0) - out["autograd_floor"]
    return out


def time_one(scan, inp, dy, chunk_size, bench, device):
    """{fwd_ms, fwd_bwd_ms, fwd_host_ms, fwd_wall_ms, fwd_bwd_host_ms, fwd_bwd_wall_ms} of one scan
    function on the inputs `inp` (see `timer` and `host_and_wall_ms`)."""

    def run(t):
        return scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, D=t["D"])

    out = {}
    with torch.no_grad():
        out["fwd_ms"] = bench(lambda: run(inp))
        out["fwd_host_ms"], out["fwd_wall_ms"] = host_and_wall_ms(lambda: run(inp), device)
    leaves, fwd_bwd = fwd_bwd_call(scan, inp, dy, chunk_size)  # (gradients set to None outside the timings)
    out["fwd_bwd_ms"] = bench(fwd_bwd, grad_to_none=list(leaves.values()))
    out["fwd_bwd_host_ms"], out["fwd_bwd_wall_ms"] = host_and_wall_ms(
        fwd_bwd, device, reset=lambda: grads_to_none(leaves.values()))
    return out


def grads_to_none(tensors):
    for t in tensors:
        t.grad = None


def timing_inputs(shape, device):
    """The inputs of the timed calls at `shape` (no initial state) and ∂L/∂y."""
    name, b, l, h, p, n, g, Q, dtype = shape
    inp = make_inputs(b, l, h, p, n, g, dtype, device)
    inp.pop("initial_state")
    return inp, torch.randn(b, l, h, p, device=device).to(dtype)


def fwd_bwd_call(scan, inp, dy, chunk_size, clear_grads=False):
    """Leaf copies of `inp`, and a function making one forward+backward of `scan` on them with ∂L/∂y = dy
    (first setting their gradients to None if `clear_grads`, else they accumulate into .grad)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}

    def fwd_bwd():
        if clear_grads:
            grads_to_none(leaves.values())
        scan(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size, D=leaves["D"]).backward(dy)

    return leaves, fwd_bwd


def cuda_graph(fn):
    """fn captured in a CUDA graph; returns the graph's replay. fn runs three times first on a side stream,
    as torch.cuda.graph asks (what is lazily set up, compiled or tuned must be before the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graphed_fwd_bwd(scan, inp, dy, chunk_size, bench, capture=cuda_graph):
    """(ms, identical) for one forward+backward of `scan` captured in a CUDA graph (`capture`) and replayed:
    the GPU work alone, without the host time of issuing it (which bounds every implementation at batch 1),
    and whether a replay gives the gradients of an eager call bit for bit (it must: the same programs on
    the same inputs). The gradients are set to None before each call, so the captured call allocates
    them from the graph's pool, where each replay writes them again."""
    leaves, fwd_bwd = fwd_bwd_call(scan, inp, dy, chunk_size, clear_grads=True)
    fwd_bwd()
    eager = {k: v.grad.clone() for k, v in leaves.items()}
    replay = capture(fwd_bwd)
    for v in leaves.values():  # (a capture computes nothing: only a replay writes the gradients)
        v.grad.fill_(float("nan"))
    replay()
    if dy.is_cuda:
        torch.cuda.synchronize()
    identical = all(torch.equal(leaves[k].grad, eager[k]) for k in leaves)
    return bench(replay), identical


def time_graphed(shape, device, impls, bench, capture, row):
    """Into `row` (of `time_shape`): `graphed_fwd_bwd` of each implementation in `impls` at `shape`, ms and
    whether a replay gave the eager gradients; a failure to capture or replay is recorded in its failures."""
    inp, dy = timing_inputs(shape, device)
    row["graphed_fwd_bwd_ms"], row["graph_replay_identical"] = {}, {}
    for impl, scan in impls.items():
        try:
            ms, same = graphed_fwd_bwd(scan, inp, dy, shape[7], bench, capture)
        except Exception as e:
            row["failures"][f"{impl} graphed"] = f"{type(e).__name__}: {e}"
            print(f"  {impl} in a CUDA graph failed: {row['failures'][impl + ' graphed']}", flush=True)
            continue
        row["graphed_fwd_bwd_ms"][impl], row["graph_replay_identical"][impl] = ms, same
        if not same and impl != "torch":  # (ours must be: the same programs on the same inputs)
            row["failures"][f"{impl} graphed"] = "a CUDA graph replay gave other gradients than the eager call"


def time_shape(shape, device, impls, bench, row=None, rounds=1):
    """Forward and forward+backward ms of each implementation in `impls` ({name: scan function with the
    ssd_chunk_scan signature}), D given, no initial or final state; added to `row` if given. With
    `rounds` > 1 the implementations are timed that many times in turns; the row keeps the median of the
    rounds, and each round's readings in `rounds_ms` (host and wall times: the last round's)."""
    name, b, l, h, p, n, g, Q, dtype = shape
    inp, dy = timing_inputs(shape, device)
    row = row or dict(shape=name, batch=b, seqlen=l, nheads=h, headdim=p, dstate=n, ngroups=g, chunk=Q,
                      dtype=str(dtype).replace("torch.", ""), fwd_ms={}, fwd_bwd_ms={}, host_wall_ms={},
                      failures={})
    readings = {impl: {"fwd_ms": [], "fwd_bwd_ms": []} for impl in impls}
    for _ in range(rounds):
        for impl, scan in impls.items():
            if impl in row["failures"]:
                continue
            try:
                t = time_one(scan, inp, dy, Q, bench, device)
                for kind in ("fwd_ms", "fwd_bwd_ms"):
                    readings[impl][kind].append(t.pop(kind))
                    row[kind][impl] = statistics.median(readings[impl][kind])
                row["host_wall_ms"][impl] = t
            except Exception as e:
                row["failures"][impl] = f"{type(e).__name__}: {e}"
                print(f"  {impl} failed at {name} b{b} seqlen {l}: {row['failures'][impl]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if rounds > 1:
        row.setdefault("rounds_ms", {}).update({impl: r for impl, r in readings.items() if r["fwd_ms"]})
    for kind in ("fwd_ms", "fwd_bwd_ms"):
        t = row[kind]
        if "ours" in t and t["ours"] > 0:
            row[kind.replace("_ms", "_speedup_vs_torch")] = t["torch"] / t["ours"] if "torch" in t else None
            row[kind.replace("_ms", "_ratio_vs_mamba_ssm")] = t["mamba_ssm"] / t["ours"] if "mamba_ssm" in t else None
            for impl in t:  # (--baseline: "baseline", "baseline2", ...)
                if impl.startswith("baseline"):
                    row[kind.replace("_ms", f"_ratio_vs_{impl}")] = t[impl] / t["ours"]
    return row


def profile_shape(shape, device, scan, iters=5):
    """GPU time per program of one forward+backward of `scan` (the mean over `iters` calls, after a
    warm-up call), from torch.profiler: [(kernel name, calls per fwd+bwd, µs per fwd+bwd)], largest first."""
    from torch.profiler import ProfilerActivity, profile

    inp, dy = timing_inputs(shape, device)
    _, fwd_bwd = fwd_bwd_call(scan, inp, dy, shape[7], clear_grads=True)  # (as in the timings: no accumulation)
    fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fwd_bwd()
        torch.cuda.synchronize()
    rows = [(e.key, e.count / iters, e.device_time_total / iters) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[2])


def retune_ours(*variants):
    """Forget the configs our autotuned programs chose (and those of the `variants`, other versions of
    the module), so that the next calls tune them for the shape at hand (cheap: the candidates are
    compiled already, only their benchmarks run again)."""
    from kernels import ssd_triton

    for module in (ssd_triton, *variants):
        if hasattr(module, "forget_tuning"):
            module.forget_tuning()
        else:  # (a version older than forget_tuning)
            for k in ssd_triton.autotuned_programs(module).values():
                k.cache.clear()


def load_variant(path, name="ssd_triton_variant"):
    """Another version of kernels/ssd_triton.py (e.g. `git show HEAD~1:kernels/ssd_triton.py > old.py`),
    imported as a module of its own (called `name`), so that it can be timed against this one in the same run."""
    import importlib.machinery
    import importlib.util

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--baseline {path}: no such file")
    loader = importlib.machinery.SourceFileLoader(name, str(path))  # (any file name)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def chosen_configs():
    """{program: [the configs its autotuner chose, one per key it has seen]}."""
    from kernels import ssd_triton

    return {name.strip("_"): sorted({str(c) for c in k.cache.values()})
            for name, k in ssd_triton.autotuned_programs().items()}


def config_timings():
    """{program: {config: median ms}}: what each autotuner measured for every one of its configs at the
    last shape it tuned (Triton keeps only that one), where this Triton records it (`configs_timings`).
    With kernels.offline's registers and spills per config, this says which configs are worth keeping."""
    from kernels import ssd_triton

    out = {}
    for name, k in ssd_triton.autotuned_programs().items():
        timings = getattr(k, "configs_timings", None)
        if timings:
            out[name.strip("_")] = {str(c): t[0] if isinstance(t, (list, tuple)) else t for c, t in timings.items()}
    return out


def fmt(v, spec=".3f"):
    return "—" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def print_tables(report):
    print("\nCorrectness: max|Δ| / max|ref| against ssd_chunked in float32")
    for r in report["correctness"]:
        version = f" [{r['version']}]" if "version" in r else ""
        if "errors" not in r:
            print(f"  {r['shape']}{version} seqlen {r['seqlen']} {r['dtype']}: FAILED TO RUN: {r['failure']}")
            continue
        errs = "  ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        extra = f"  (mamba_ssm: y {fmt(r['mamba_ssm_y_error'], '.1e')})" if "mamba_ssm_y_error" in r else ""
        if not r.get("repeat_identical", True):
            extra += "  (the call with direct launches gave other values than the one through Triton)"
        print(f"  {'PASS' if r['ok'] else 'FAIL'} {r['shape']}{version} b{r['batch']} l{r['seqlen']} {r['dtype']:8s} "
              f"(tol {r['tolerance']:.0e}): {errs}{extra}")
    if report["timings"]:
        print("\nTimings (median ms; speedup = torch/ours; vs mamba_ssm = mamba_ssm/ours, ≥ 1 means ours is faster)")
        head = (f"  {'shape':28s} {'dtype':8s} | {'fwd torch':>9s} {'ours':>7s} {'mamba':>7s} | "
                f"{'f+b torch':>9s} {'ours':>7s} {'mamba':>7s} | {'speedup f':>9s} {'f+b':>6s} | "
                f"{'vs mamba f':>10s} {'f+b':>6s}")
        print(head)
        print("  " + "-" * (len(head) - 2))
        for r in report["timings"]:
            s = f"b{r['batch']} l{r['seqlen']} H{r['nheads']} P{r['headdim']} N{r['dstate']} G{r['ngroups']} Q{r['chunk']}"
            f, fb = r["fwd_ms"], r["fwd_bwd_ms"]
            print(f"  {s:28s} {r['dtype']:8s} | {fmt(f.get('torch')):>9s} {fmt(f.get('ours')):>7s} "
                  f"{fmt(f.get('mamba_ssm')):>7s} | {fmt(fb.get('torch')):>9s} {fmt(fb.get('ours')):>7s} "
                  f"{fmt(fb.get('mamba_ssm')):>7s} | {fmt(r.get('fwd_speedup_vs_torch'), '.1f'):>9s} "
                  f"{fmt(r.get('fwd_bwd_speedup_vs_torch'), '.1f'):>6s} | "
                  f"{fmt(r.get('fwd_ratio_vs_mamba_ssm'), '.2f'):>10s} {fmt(r.get('fwd_bwd_ratio_vs_mamba_ssm'), '.2f'):>6s}")
    for name, path in report.get("baselines", {}).items() if report["timings"] else ():  # (--quick: no table)
        print(f"\n--baseline {path} as '{name}' (median ms; vs {name} = {name}/ours, ≥ 1 means this version is faster)")
        for r in report["timings"]:
            f, fb = r["fwd_ms"], r["fwd_bwd_ms"]
            if name in f:
                print(f"  b{r['batch']} l{r['seqlen']}: fwd {fmt(f[name])} vs {fmt(f.get('ours'))} "
                      f"({fmt(r.get(f'fwd_ratio_vs_{name}'), '.2f')}x), f+b {fmt(fb.get(name))} vs "
                      f"{fmt(fb.get('ours'))} ({fmt(r.get(f'fwd_bwd_ratio_vs_{name}'), '.2f')}x)")
    rounds = [r for r in report["timings"] if r.get("rounds_ms")]
    if rounds:
        print("\nForward+backward in each round (ms; the tables above: the median)")
        for r in rounds:
            for impl, t in r["rounds_ms"].items():
                print(f"  b{r['batch']} l{r['seqlen']} {impl:10s} " + " ".join(fmt(ms) for ms in t["fwd_bwd_ms"]))
    if report["mamba_ssm"] is not True:
        print(f"\nmamba_ssm not compared: {report['mamba_ssm']}")
    if report["timings"]:
        print("\nOne call from an idle GPU (median ms): host = issuing it in Python, wall = until the GPU is done")
        print(f"  {'shape':14s} {'impl':10s} | {'fwd host':>8s} {'wall':>7s} | {'f+b host':>8s} {'wall':>7s}")
        for r in report["timings"]:
            for impl, t in r.get("host_wall_ms", {}).items():
                shape = f"b{r['batch']} l{r['seqlen']}"
                print(f"  {shape:14s} {impl:10s} | {fmt(t['fwd_host_ms']):>8s} "
                      f"{fmt(t['fwd_wall_ms']):>7s} | {fmt(t['fwd_bwd_host_ms']):>8s} {fmt(t['fwd_bwd_wall_ms']):>7s}")
    if report.get("host_breakdown"):
        print("\nHost time of one forward+backward, split (median µs; python = host - in launcher - autograd floor)")
        print(f"  {'shape':14s} {'version':10s} | {'host':>6s} {'in launcher':>11s} {'launches':>8s} "
              f"{'autograd floor':>14s} {'python':>6s} | {'allocations':>11s} {'µs each':>7s}")
        for r in report["host_breakdown"]:
            print(f"  {'b%d l%d' % (r['batch'], r['seqlen']):14s} {r['version']:10s} | {fmt(r['host'], '.0f'):>6s} "
                  f"{fmt(r['in_launcher'], '.0f'):>11s} {fmt(r['launches'], 'd'):>8s} "
                  f"{fmt(r['autograd_floor'], '.0f'):>14s} {fmt(r['python'], '.0f'):>6s} | "
                  f"{fmt(r['allocations'], 'd'):>11s} {fmt(r['per_allocation'], '.1f'):>7s}")
    graphed = [r for r in report["timings"] if r.get("graphed_fwd_bwd_ms")]
    if graphed:
        print("\nForward+backward replayed from a CUDA graph (median ms: the GPU work alone; 'same' = a replay "
              "gave the eager call's gradients bit for bit)")
        for r in graphed:
            t, same = r["graphed_fwd_bwd_ms"], r["graph_replay_identical"]
            ratio = f"  torch/ours {t['torch'] / t['ours']:.1f}x" if "torch" in t and "ours" in t else ""
            print(f"  b{r['batch']} l{r['seqlen']}: " + ", ".join(
                f"{impl} {fmt(ms)}{'' if same[impl] else ' (not same)'}" for impl, ms in t.items()) + ratio)
    for f in report["failures"] + [f"{r['shape']} b{r['batch']} seqlen {r['seqlen']} {k}: {v}"
                                   for r in report["timings"] for k, v in r["failures"].items()]:
        print(f"FAILED: {f}")


def _sizes(shapes):
    """'BxL, BxL' of a list of shapes (batch x seqlen, once each, in order)."""
    return ", ".join(dict.fromkeys(f"{s[1]}x{s[2]}" for s in shapes))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="correctness only, no timings")
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes under TRITON_INTERPRET=1 on CPU: tests this script without a GPU")
    ap.add_argument("--no-mamba", action="store_true", help="do not import mamba_ssm even if installed")
    ap.add_argument("--fp32", action="store_true", help="also check float32 at seqlen 2048 (slow to compile)")
    ap.add_argument("--profile", action="store_true",
                    help="also print the GPU time of each program in one forward+backward (torch.profiler)")
    ap.add_argument("--baseline", action="append", default=[], metavar="FILE.py",
                    help="another version of kernels/ssd_triton.py to check and time (and --profile) beside "
                         "this one (column 'baseline'; given again: 'baseline2', ...)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time forward+backward replayed from a CUDA graph (the GPU work without the host's; "
                         "torch, ours and --baseline versions) and check that a replay gives the eager gradients")
    ap.add_argument("--rounds", type=int, default=1, metavar="N",
                    help="time every implementation N times in turns and keep the median (default 1)")
    ap.add_argument("--host-breakdown", action="store_true",
                    help="also split the host time of one forward+backward of ours (and --baseline versions): "
                         "Triton's launcher, autograd, allocations, this module's Python")
    ap.add_argument("--shape", action="append", default=[], metavar="BxL",
                    help=f"only this batch x seqlen, one of {_sizes(REAL_SHAPES)} (checked and timed), "
                         f"{_sizes(BATCHED_SHAPES)} (timed, and the first of them in the run checked too: "
                         f"{_sizes(BATCHED_SHAPES[:1])} unless --shape leaves it out; 8x2048 is the GPU-bound one), "
                         "with --cpu-smoke "
                         f"{_sizes(SMOKE_SHAPES + SMOKE_BATCHED_SHAPES)}; given again, more")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.cuda_graphs and args.quick:
        ap.error("--cuda-graphs times the graphed calls: it cannot go with --quick (no timings)")

    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels imports triton
        device, shapes, batched = torch.device("cpu"), SMOKE_SHAPES, SMOKE_BATCHED_SHAPES
    else:
        if not torch.cuda.is_available():
            sys.exit("kernels.bench needs a CUDA GPU (or --cpu-smoke to test the script on CPU)")
        device, shapes, batched = torch.device("cuda"), REAL_SHAPES + (FP32_SHAPES if args.fp32 else []), BATCHED_SHAPES
        torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference in fp32
        torch.backends.cudnn.allow_tf32 = False
    if args.shape:  # (a short GPU visit: the shapes an A/B is about)
        known = {(s_[1], s_[2]) for s_ in shapes + batched}
        wanted = set()
        for text in args.shape:
            try:
                wanted.add(tuple(int(v) for v in text.lower().split("x")))
            except ValueError:
                ap.error(f"--shape {text!r}: give batch x seqlen, e.g. 8x2048")
        if not wanted <= known:
            ap.error(f"--shape: {', '.join(f'{b}x{l}' for b, l in sorted(wanted - known))} is not among this "
                     f"run's shapes ({', '.join(f'{b}x{l}' for b, l in sorted(known))})")
        shapes = [s_ for s_ in shapes if (s_[1], s_[2]) in wanted]
        batched = [s_ for s_ in batched if (s_[1], s_[2]) in wanted]
    import triton

    from kernels import ssd_chunk_scan, ssd_triton
    from minimamba.ssd import ssd_chunked

    mamba, why_not = (None, "--no-mamba") if args.no_mamba else load_mamba_ssm()
    names = ["baseline" if i == 0 else f"baseline{i + 1}" for i in range(len(args.baseline))]
    try:
        variants = {name: load_variant(path, f"ssd_triton_{name}") for name, path in zip(names, args.baseline)}
    except FileNotFoundError as e:
        sys.exit(str(e))
    report = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU (Triton interpreter, {platform.machine()})",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        mamba_ssm=True if mamba is not None else why_not, correctness=[], timings=[], failures=[], elapsed_s={},
        direct_launches=ssd_triton.DIRECT_LAUNCH_OFF_BECAUSE or True, baselines=dict(zip(names, args.baseline)),
    )

    def save():  # (whole or not at all: a run killed by a time limit keeps the previous JSON)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(report, f, indent=2)
            os.replace(args.out + ".tmp", args.out)

    print(f"device: {report['device']}; torch {report['torch']}, triton {report['triton']}; "
          f"mamba_ssm: {'yes' if mamba is not None else why_not}; direct launches: "
          f"{'yes' if ssd_triton.DIRECT_LAUNCH else 'no, ' + str(ssd_triton.DIRECT_LAUNCH_OFF_BECAUSE)}", flush=True)

    def phase(name, shapes_, fn):
        t0 = time.time()
        for shape in shapes_:
            t = time.time()
            try:
                fn(shape)
            except Exception as e:  # recorded by fn where it can; never stops the script
                traceback.print_exc()
                report["failures"].append(f"{name} {shape[0]} b{shape[1]} seqlen {shape[2]}: {type(e).__name__}: {e}")
            print(f"{name}: {shape[0]} b{shape[1]} seqlen {shape[2]} {str(shape[8]).replace('torch.', '')} "
                  f"({time.time() - t:.1f} s)", flush=True)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["elapsed_s"][name] = round(time.time() - t0, 1)

    def correctness(shape):  # this version, then each --baseline version (a faster one is kept only if right)
        # tuned for this shape, as the timings are (the autotuners' keys hold no batch or seqlen: without
        # this, every shape after the first was checked with the configs tuned at the first, not with those
        # its timings use; on the H100, 8 × 2048 chose other chunk_cb and dCB configs than 1 × 2048)
        retune_ours(*variants.values())
        errors = []
        for version, module in {None: ssd_triton, **variants}.items():
            row = dict(shape=shape[0], batch=shape[1], seqlen=shape[2], dtype=str(shape[8]).replace("torch.", ""))
            if version is not None:
                row["version"] = version
            report["correctness"].append(row)
            try:
                row.update(check(shape, device, module.ssd_chunk_scan, module))
                if version is None:  # (the configs checked: compare with the timings' `ours_configs`)
                    row["configs"] = chosen_configs()
            except Exception as e:
                row["failure"] = f"{type(e).__name__}: {e}"
                errors.append(e)
        if errors:
            raise errors[0]

    # 1. correctness (the first call compiles and autotunes every program)
    phase("correctness", shapes + batched[:1], correctness)
    timed = [s_ for s_ in shapes if s_[8] in TIMED] + batched
    # 2. timings of the torch reference and of ours (tuned again for each shape, configs recorded)
    bench = timer(device)
    capture = cuda_graph
    if args.cuda_graphs and device.type != "cuda":  # (--cpu-smoke: tests this script, not CUDA graphs)
        print("--cuda-graphs on CPU: no CUDA graphs here, each 'replay' is the eager call", flush=True)
        capture = lambda fn: fn  # noqa: E731
    if not args.quick:
        def timings(shape):
            retune_ours(*variants.values())
            impls = {"torch": lambda *a, **k: ssd_chunked(*a[:5], chunk_size=a[5], **k)[0], "ours": ssd_chunk_scan}
            impls.update({name: module.ssd_chunk_scan for name, module in variants.items()})
            row = time_shape(shape, device, impls, bench, rounds=args.rounds)
            if args.cuda_graphs:  # (with the configs tuned for this shape, as the eager timings)
                time_graphed(shape, device, impls, bench, capture, row)
            row["ours_configs"] = chosen_configs()
            row["ours_config_ms"] = config_timings()
            for program, times in row["ours_config_ms"].items():
                print(f"  autotuner, {program}: " + "; ".join(f"{c} {fmt(t)} ms" for c, t in times.items()))
            report["timings"].append(row)

        phase("timings", timed, timings)
    if args.host_breakdown and not args.quick:
        report["host_breakdown"] = []

        def breakdown(shape):
            inp, dy = timing_inputs(shape, device)
            for name, module in {"ours": ssd_triton, **variants}.items():  # (a row only when complete: a
                # failure is recorded by `phase` and printed with the others)
                row = host_breakdown(module.ssd_chunk_scan, module, inp, dy, shape[7], device)
                report["host_breakdown"].append(dict(batch=shape[1], seqlen=shape[2], version=name, **row))

        phase("host breakdown", timed, breakdown)
    if args.profile and device.type == "cuda":
        report["profile"] = {}

        def profiling(shape):
            retune_ours(*variants.values())  # (tuned for this shape, as timed: not for the last one timed)
            for name, scan in {"ours": ssd_chunk_scan, **{n: m.ssd_chunk_scan for n, m in variants.items()}}.items():
                rows = profile_shape(shape, device, scan)
                report["profile"][f"b{shape[1]} seqlen {shape[2]}" + ("" if name == "ours" else f" ({name})")] = rows
                total = sum(r[2] for r in rows)
                print(f"GPU time of one forward+backward ({name}), b{shape[1]} seqlen {shape[2]}: {total:.0f} µs")
                for k, calls, us in rows:
                    print(f"  {us:8.1f} µs {us / total:6.1%}  ×{calls:g}  {k[:90]}")

        phase("profile", timed, profiling)
    # 3. mamba_ssm, last
    if mamba is not None:
        def mamba_phase(shape):
            row = next((r for r in report["correctness"] if (r["batch"], r["seqlen"]) == shape[1:3]
                        and r["dtype"] == "bfloat16" and "version" not in r), None)
            if row is not None:
                try:
                    row["mamba_ssm_y_error"] = mamba_y_error(shape, device, mamba)
                except Exception as e:
                    row["mamba_ssm_y_error"] = f"{type(e).__name__}: {e}"
            if not args.quick:
                trow = next((r for r in report["timings"] if (r["batch"], r["seqlen"]) == shape[1:3]), None)
                new = time_shape(shape, device, {"mamba_ssm": mamba}, bench, row=trow, rounds=args.rounds)
                if trow is None:
                    report["timings"].append(new)

        phase("mamba_ssm", timed, mamba_phase)

    print_tables(report)
    save()
    if args.out:
        print(f"\nwrote {args.out}")
    failed = [r for r in report["correctness"] if not r.get("ok")]
    # ours (or a baseline) that failed to run at a timed shape, eager or in a CUDA graph, or whose replay
    # computes something else (the torch reference's and mamba_ssm's own failures are only recorded); and
    # a phase that failed (e.g. the host breakdown)
    timing_failed = [k for r in report["timings"] for k in r["failures"] if k.split()[0] not in ("torch", "mamba_ssm")]
    return 1 if failed or timing_failed or report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

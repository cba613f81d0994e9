"""Compile the Triton SSD programs for a GPU this machine does not have, and time their host side:
`python -m kernels.offline [--arch 90] [--dtype bf16] [--out FILE.json]`.

Triton can compile for a GPU architecture (sm_80, sm_90, ...) without the GPU: its compiler and NVIDIA's
`ptxas` come with the triton wheel. What needs the GPU is loading the binary and launching it. This
module gives Triton a stand-in driver, `OfflineGPU`, that names the architecture, keeps each binary
instead of loading it, and counts launches instead of making them. The real wrapper
(`SSDChunkScanFn`: forward, then backward) then runs on CPU tensors as it would on the GPU, and:

1. every program compiles, in every autotuning config and for each of its uses, at the shapes of a real
   layer (the autotuner "benchmarks" every config, and with no timings to compare keeps the first: the
   calls are repeated with each config first in turn, see `compile_all`). For each binary: its
   registers, stack frame (where spilled registers go) and shared memory, read with `cuobjdump` (also
   in the wheel); a config that does not fit the card is listed as such. A kernel change that does not
   compile for the GPU, or that starts to spill, shows here, before any GPU is lent.
2. the launches per call (forward; backward), and the host time of one call: the Python work of
   binding arguments, allocating and autograd, with the launches made no-ops. This is what a batch-1
   call costs on a GPU, where the GPU finishes each small program before the host has issued the next.
   Three calls are timed: a forward through the autograd Function (as in training), a forward of the
   public `ssd_chunk_scan` under torch.no_grad (as in inference and in kernels.bench's forward
   timings), and a forward+backward.
   It is timed on tiny shapes (`HOST_SHAPE`): the host work does not depend on the sizes, and on
   tiny tensors the few PyTorch reductions of the backward do not compute for long on the CPU.
3. the direct launches of `kernels.ssd_triton._launch` (kernels/launch.py) against Triton's own launch path, launch by
   launch (`compare_launch_paths`): the launcher must receive the same binary, grid and arguments.

It tells nothing about GPU time. Its host times are this machine's CPU's (the H100 host measured on
2026-11-26 issued the same forward about 1.3x faster than the 2-core VM this was written on): compare
versions of the code on one machine, in the same run (`--baseline`).
"""

import argparse
import collections
import contextlib
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

# the layer of Mamba2-370m, as in kernels.bench: (batch, seqlen, nheads, headdim, dstate, ngroups, chunk)
REAL_SHAPE = (1, 512, 32, 64, 128, 1, 256)
HOST_SHAPE = (1, 32, 2, 16, 16, 1, 16)  # the same launches and arguments; nothing to compute
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# streaming multiprocessors and shared memory per block (bytes) of the cards we name; others: --sms, --shared
CARDS = {80: (108, 166912), 90: (132, 232448)}  # A100, H100


class _Binary:
    """What the stand-in driver kept of one compiled program: its config and its cubin."""

    def __init__(self, src, metadata):
        names = src.fn.arg_names
        self.program = metadata.name
        # the program's compile-time arguments: tiles, flags (which variant), dot dtype
        self.constants = {names[path[0]]: v for path, v in src.constants.items() if path[0] in src.fn.constexprs}
        self.num_warps, self.num_stages, self.shared = metadata.num_warps, metadata.num_stages, metadata.shared
        self.maxnreg = getattr(metadata, "maxnreg", None)  # a config's cap on registers per thread, if any
        self.cubin = None  # set by load_binary, unless the program does not fit the card

    def row(self, cuobjdump):
        """This binary as a row of the table: program, config, registers, stack and shared bytes,
        instruction count, a hash of its instructions (see `_inspect`), note."""
        config = " ".join([*(f"{k}={v}" for k, v in sorted(self.constants.items()) if k != "DOT_PRECISION"),
                           f"warps={self.num_warps}", f"stages={self.num_stages}",
                           *([f"maxnreg={self.maxnreg}"] if self.maxnreg else [])])
        if self.cubin is None:
            return dict(program=self.program, config=config, regs=None, stack=None, shared=self.shared,
                        instructions=None, sass=None, note="does not fit the card (shared memory)")
        usage, sass = _inspect(cuobjdump, self.cubin)
        note = "spills" if usage.get("STACK", 0) > 0 else "" if usage else "no cuobjdump: resources unknown"
        return dict(program=self.program, config=config, regs=usage.get("REG"), stack=usage.get("STACK"),
                    shared=self.shared, instructions=len(sass) if sass else None,
                    sass=hashlib.sha256("\n".join(sass).encode()).hexdigest()[:12] if sass else None, note=note)


class OfflineGPU:
    """A stand-in Triton driver for an NVIDIA GPU that is not there (see the module docstring).
    `binaries` lists every program it was asked to load; `launches` counts launches by program."""

    def __init__(self, arch=90, sms=None, max_shared=None):
        from triton.backends.compiler import GPUTarget

        card_sms, card_shared = CARDS.get(arch, (None, None))
        if (sms or card_sms) is None or (max_shared or card_shared) is None:
            raise ValueError(f"no card on record for sm_{arch}: give --sms and --shared")
        self.target = GPUTarget("cuda", arch, 32)
        self.properties = dict(multiprocessor_count=sms or card_sms, max_shared_mem=max_shared or card_shared)
        self.binaries, self.launches, self.programs = [], collections.Counter(), set()
        self.recorded = None  # a list: every launch is also described there (see `_describe`)
        self.labels = {}  # for `_describe`: address -> name of the call's inputs
        driver = self

        class Launcher:  # built by Triton once per program, before it loads the binary
            def __init__(self, src, metadata):
                self.name, self.index = metadata.name, len(driver.binaries)
                driver.binaries.append(_Binary(src, metadata))
                driver.programs.add(src.fn)

            def __call__(self, *args):  # (grid x, y, z, stream, function, metadata, launch metadata, hooks, ...)
                driver.launches[self.name] += 1
                if driver.recorded is not None:
                    driver.recorded.append((self.name, self.index, _describe(args, driver.labels)))
                for hook in args[7:9]:  # enter, exit: called with the launch metadata, as Triton's launchers do
                    if hook is not None:
                        hook(args[6])

        class Utils:
            def get_device_properties(self, device):
                return driver.properties

            def load_binary(self, name, cubin, shared, device):
                driver.binaries[-1].cubin = cubin
                # module and function handles (not None: Triton would load again at every launch),
                # registers, spills (unknown here: see `_inspect`), threads per block
                return name, name, 0, 0, 1024

            def unload_module(self, module):
                pass

        self.launcher_cls, self.utils = Launcher, Utils()

    # the parts of triton.backends.driver.DriverBase that compiling and launching use
    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def run_once(kernel_call, quantiles=None, **kwargs):  # no GPU, no timings: every config ties
            kernel_call()
            return [1.0] * len(quantiles or [None])

        return run_once

    def __enter__(self):
        from triton.runtime.driver import driver

        self._previous = driver._active  # (None: Triton would look for a real GPU on first use)
        driver.set_active(self)
        _forget_chosen_binaries()  # (chosen for another driver)
        return self

    def __exit__(self, *exc):
        from triton.runtime.driver import driver

        # what was compiled or chosen for the stand-in must not be launched on device 0: neither Triton's
        # cache nor kernels.ssd_triton's (its direct launches would go to this no-op launcher)
        _forget_chosen_binaries()
        if self._previous is not None:  # (else stay: compiled programs call unload_module when freed)
            driver._active = self._previous
            for fn in self.programs:
                fn.device_caches.pop(0, None)


def _forget_chosen_binaries():
    """kernels.ssd_triton's tuned configs and the binaries it launches directly (if it was imported; a
    `--baseline` copy of it is only used inside kernels.offline's own stand-in)."""
    ssd_triton = sys.modules.get("kernels.ssd_triton")
    if ssd_triton is not None and hasattr(ssd_triton, "forget_tuning"):
        ssd_triton.forget_tuning()


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _inspect(cuobjdump, cubin):
    """A cubin's resources ({"REG": n, "STACK": bytes, "SHARED": bytes, ...}) and its machine instructions
    without addresses and encodings (two versions of the code whose programs have the same instructions,
    the `sass` hash in the table, run the same on the GPU), from one run of `cuobjdump`, which prints
    the resources first. ({}, []) without cuobjdump."""
    if cuobjdump is None:
        return {}, []
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", "--dump-sass", f.name],
                             capture_output=True, text=True).stdout
    resources, _, code = out.partition("code for")
    return ({k: int(v) for k, v in re.findall(r"\b([A-Z]+):(\d+)\b", resources)},
            re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;", code, flags=re.M))


def _describe(launch_args, labels):
    """A launch as Triton's launcher receives it: grid, stream, function, metadata, launch hooks, then the
    program's arguments; tensors described by dtype, shape, strides, offset, 16-byte alignment and, for
    the inputs of the call, their name (`labels`: address -> name), the launch metadata (a new LazyDict
    each launch) by its contents. A hook that calls nothing (an empty chain of hooks, Triton 3.5+) is
    described as None, as no hook; with no hook, nothing reads the metadata: None too."""
    from triton.compiler.compiler import LazyDict

    def describe(a):
        if isinstance(a, torch.Tensor):
            return (labels.get(a.data_ptr()), str(a.dtype), tuple(a.shape), a.stride(), a.storage_offset(),
                    a.data_ptr() & 15)
        if getattr(a, "calls", None) == []:  # (an empty HookChain)
            return None
        return ("LazyDict", a.get()) if isinstance(a, LazyDict) else a

    described = [describe(a) for a in launch_args]
    if described[7] is None and described[8] is None:  # (grid 0-2, stream, function, packed metadata: 3-5)
        described[6] = None
    return tuple(described)


@contextlib.contextmanager
def _launch_hook(counts, *which):
    """A launch hook that counts its calls by (which, program name) in `counts`, set as each of `which`
    ("launch_enter_hook", "launch_exit_hook") for the duration: added to Triton's chain of hooks where it
    keeps one, else set as the knob. It reads the launch metadata, as a profiler's hook does."""
    import triton

    hooks, set_before = triton.knobs.runtime, {}
    for name in which:
        def hook(metadata, name=name):
            counts[name, "(no metadata)" if metadata is None else metadata.get()["name"]] += 1

        chain = getattr(hooks, name)
        chain.add(hook) if hasattr(chain, "add") else setattr(hooks, name, hook)
        set_before[name] = (chain, hook)
    try:
        yield
    finally:
        for name, (chain, hook) in set_before.items():
            chain.remove(hook) if hasattr(chain, "add") else setattr(hooks, name, chain)


def _hook_calls(recorded, which):
    """The hook calls `_launch_hook(counts, *which)` counts for the launches `recorded` by the stand-in."""
    return collections.Counter((name, program) for program, _, _ in recorded for name in which)


def _misaligned(t):
    """A copy of t at an address 4 bytes past a 16-byte boundary (for 2- and 4-byte dtypes)."""
    moved = torch.empty(t.numel() + 16, dtype=t.dtype)[4 // t.element_size():][: t.numel()].view(t.shape).copy_(t)
    assert moved.data_ptr() & 15 and moved.is_contiguous()
    return moved


@contextlib.contextmanager
def _kept_tensors_moved():
    """A saved-tensor hook that hands back what the forward kept for the backward (the tensors that do not
    require grad, unlike the inputs here) at misaligned addresses, as an offloading hook could."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t if t.requires_grad else _misaligned(t)):
        yield


@contextlib.contextmanager
def _head_splits(n):
    """dB/dC split every group's heads in n programs (n = 1: a value Triton specializes on)."""
    from kernels import ssd_triton

    chosen = ssd_triton._head_splits
    ssd_triton._head_splits = lambda heads_per_group, programs, device: n
    try:
        yield
    finally:
        ssd_triton._head_splits = chosen


def compare_launch_paths(gpu, shape, dtype):
    """The launches of one forward+backward made by `_launch`'s direct path against those Triton's own
    launch path makes for the same call, launch by launch: the same binary, grid, stream, metadata, hooks
    and arguments. Nine calls: the plain one; x at an address that is not 16-byte aligned, for which
    Triton compiles other binaries (checked: else this would not show that the direct path tells them
    apart); an initial state and a loss on the final state too (the programs' other variants); the
    initial state in bf16 (another dtype of an input: other binaries than the fp32 one's, checked); the
    initial state with the final state unused (no ∂L/∂final: other binaries, checked); what the
    forward kept handed back misaligned by a saved-tensor hook, and one dB/dC head split instead of
    `shape`'s 2 (both: other binaries for what the backward's launch plan must tell apart from the plain
    call's, checked); the plain call with a launch-enter hook set, and with only a launch-exit hook (a
    profiler's: the direct path must then build the same metadata and call the hook once per launch,
    checked). Each is made twice directly, with no binary or plan kept from the calls before: its
    launches found by their own keys (which records the call's `Plan`), then taken from that plan
    (checked: no key built but the plans' own). Then all nine one after another, three rounds, keeping
    the binaries and plans of the calls before (the first round goes through Triton, the second finds the
    launches by their keys, the third by the calls' plans): a key that does not tell two of the calls apart
    (an alignment, a dtype, an optional input or ∂L/∂final, the head splits, a kept tensor's alignment)
    shows there as another binary. Last, hooks set after a plan was recorded without them (a profiler
    switched on mid-run) must see every launch of the next call.
    Returns the launches compared; raises AssertionError at the first difference."""
    from kernels import launch, ssd_triton
    from kernels.ssd_triton import SSDChunkScanFn

    inputs = _inputs(shape, dtype)
    batch, _, h, p, n = shape[:5]
    h0 = torch.randn(batch, h, p, n, generator=torch.Generator().manual_seed(1))
    nothing = contextlib.nullcontext
    hooked = collections.Counter()  # launches seen by the hooks of the hook cases, by (hook, program)
    enter, leave = "launch_enter_hook", "launch_exit_hook"
    hook_cases = {"enter hook": (enter,), "exit hook": (leave,)}
    # name: (inputs, context, whether the loss takes the final state, the case whose binaries it must not share)
    cases = {"plain": (inputs, nothing, False, None),
             "misaligned x": ({**inputs, "x": _misaligned(inputs["x"])}, nothing, False, "plain"),
             "initial state": ({**inputs, "h0": h0}, nothing, True, "plain"),
             "bf16 initial state": ({**inputs, "h0": h0.bfloat16()}, nothing, True, "initial state"),
             "final state unused": ({**inputs, "h0": h0}, nothing, False, "initial state"),
             "kept tensors moved": (inputs, _kept_tensors_moved, False, "plain"),
             "1 head split": (inputs, lambda: _head_splits(1), False, "plain"),
             **{name: (inputs, lambda which=which: _launch_hook(hooked, *which), False, None)
                for name, which in hook_cases.items()}}
    used, compared, setting, selector = {}, 0, ssd_triton.DIRECT_LAUNCH, launch.selector
    through_triton = {}  # name -> the launches of the case's call through Triton
    for name, (case, context, use_final, _) in cases.items():
        calls = {}
        for direct in (False, True):
            ssd_triton.DIRECT_LAUNCH = direct  # (on even where this Triton is not known to launch alike)
            ssd_triton._LAUNCHER.binaries.clear()
            ssd_triton._LAUNCHER.plans.clear()
            try:
                with context():
                    _call(SSDChunkScanFn, shape, case, backward=True, use_final=use_final)  # (compiles, keeps them)
                    calls[direct] = []
                    # direct: the launches found by their keys (the call records its plan), then by that plan
                    for _ in range(2 if direct else 1):
                        gpu.recorded, gpu.labels = [], {t.data_ptr(): k for k, t in case.items()}
                        keys = []  # (`selector` calls: what building a key costs)
                        hooked.clear()
                        launch.selector = lambda args, keys=keys: keys.append(1) or selector(args)
                        _call(SSDChunkScanFn, shape, case, backward=True, use_final=use_final)
                        launch.selector = selector
                        calls[direct].append(gpu.recorded)
                        if name in hook_cases:
                            launched = _hook_calls(gpu.recorded, hook_cases[name])
                            assert hooked == launched, f"{name}: the hooks saw {dict(hooked)}, not {dict(launched)}"
                # by the plan, only the plans' keys are built: one for the forward, one for the backward
                assert not direct or len(keys) == 2, f"{name}: the last call built {len(keys)} keys, not 2"
            finally:
                gpu.recorded, ssd_triton.DIRECT_LAUNCH, launch.selector = None, setting, selector
        (through_triton[name],) = calls[False]
        for how, direct in zip(("by their keys", "by the call's plan"), calls[True]):
            compared += _same_launches(direct, through_triton[name], f"{name}, {how}")
        used[name] = [index for _, index, _ in through_triton[name]]
    for name, (*_, other) in cases.items():  # (else a case would not show that the keys tell it apart)
        assert other is None or used[name] != used[other], f"{name}: Triton chose the {other} call's binaries"
    # all the calls one after another, each keeping the binaries and plans of those before
    ssd_triton.DIRECT_LAUNCH = True
    ssd_triton._LAUNCHER.binaries.clear()
    ssd_triton._LAUNCHER.plans.clear()
    try:
        for how in ("through Triton", "by their keys", "by the calls' plans"):
            for name, (case, context, use_final, _) in cases.items():
                with context():
                    gpu.recorded, gpu.labels = [], {t.data_ptr(): k for k, t in case.items()}
                    _call(SSDChunkScanFn, shape, case, backward=True, use_final=use_final)
                compared += _same_launches(gpu.recorded, through_triton[name], f"{name} after the others, {how}")
    finally:
        gpu.recorded, ssd_triton.DIRECT_LAUNCH = None, setting
    # hooks set once the plain call's plan was recorded without them
    ssd_triton.DIRECT_LAUNCH = True
    ssd_triton._LAUNCHER.binaries.clear()
    ssd_triton._LAUNCHER.plans.clear()
    try:
        for _ in range(2):  # (keeps the binaries, then records the plan)
            _call(SSDChunkScanFn, shape, inputs, backward=True)
        gpu.recorded = []
        hooked.clear()
        with _launch_hook(hooked, enter, leave):
            _call(SSDChunkScanFn, shape, inputs, backward=True)
        launched = _hook_calls(gpu.recorded, (enter, leave))
    finally:
        gpu.recorded, ssd_triton.DIRECT_LAUNCH = None, setting
    assert launched and hooked == launched, \
        f"hooks set after a plan was recorded saw {dict(hooked)}, not {dict(launched)}"
    return compared


def _same_launches(direct, through_triton, what):
    """Asserts that the launches `direct` (as the stand-in recorded them) are those of `through_triton`, one by
    one; returns how many."""
    assert len(direct) == len(through_triton), (what, len(direct), len(through_triton))
    for i, (a, b) in enumerate(zip(direct, through_triton)):
        assert a == b, f"{what}, launch {i} ({a[0]}): direct {a} != through Triton {b}"
    return len(direct)


def _inputs(shape, dtype):
    b, l, h, p, n, g, _ = shape
    gen = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(b, l, h, p, generator=gen).to(dtype), dt=torch.rand(b, l, h, generator=gen) * 0.1,
                A=-torch.rand(h, generator=gen) - 1, B=torch.randn(b, l, g, n, generator=gen).to(dtype),
                C=torch.randn(b, l, g, n, generator=gen).to(dtype), D=torch.randn(h, generator=gen))


def _call(scan, shape, inputs, backward, use_final=None):
    """One call of the autograd Function (forward, and backward if asked) on leaves of `inputs`; the loss
    takes the final state too if `use_final` (None: where there is an initial state "h0" in `inputs`)."""
    leaves = {k: v.detach().requires_grad_(backward) for k, v in inputs.items()}
    y, final = scan.apply(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], shape[-1], leaves["D"],
                          leaves.get("h0"))
    if backward:
        outputs = [y, final] if ("h0" in leaves if use_final is None else use_final) else [y]
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


def _call_no_grad(module, shape, inputs):
    """One call of `module.ssd_chunk_scan` under torch.no_grad (module: kernels.ssd_triton or another
    version of it). Its CPU tensors pass the wrapper's CUDA check as under the interpreter; nothing else
    reads that flag once a call through the Function has filled the module's caches."""
    interpret, module.INTERPRET = module.INTERPRET, True
    try:
        with torch.no_grad():
            module.ssd_chunk_scan(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], shape[-1],
                                  D=inputs["D"])
    finally:
        module.INTERPRET = interpret


def compile_all(gpu, shape, dtype):
    """Forward and backward at `shape`, so that every program compiles in every config, for each of its
    uses: an autotuner "benchmarks" all its configs on its first call, but a program with several uses
    (stage 2's, with the flags of the forward and of the backward) runs the others with the config the
    first chose; so the calls are repeated with each config put first in turn. Returns the launches of
    one forward and of one backward."""
    from kernels import ssd_triton
    from kernels.ssd_triton import SSDChunkScanFn

    inputs = _inputs(shape, dtype)
    original = {k: list(k.configs) for k in ssd_triton.autotuned_programs().values()}
    try:
        for i in range(max(len(c) for c in original.values())):
            for k, configs in original.items():  # (ties go to the first config)
                k.configs = configs[i % len(configs):] + configs[: i % len(configs)]
            ssd_triton.forget_tuning()
            _call(SSDChunkScanFn, shape, inputs, backward=True)
    finally:
        for k, configs in original.items():
            k.configs = configs
        ssd_triton.forget_tuning()
    _call(SSDChunkScanFn, shape, inputs, backward=True)  # (the first config chosen again)
    gpu.launches.clear()
    _call(SSDChunkScanFn, shape, inputs, backward=False)
    forward = dict(gpu.launches)
    gpu.launches.clear()
    _call(SSDChunkScanFn, shape, inputs, backward=True)
    backward = {k: v - forward.get(k, 0) for k, v in gpu.launches.items() if v - forward.get(k, 0)}
    return forward, backward


# "forward" and "forward+backward" call SSDChunkScanFn.apply directly; "forward, no grad" goes through the
# ssd_chunk_scan wrapper (its checks, and on these CPU tensors the dt ≥ 0 and A ≤ 0 reductions that a GPU call
# skips: ~15 µs here), so the rows compare versions, not each other. Without the wrapper, the no-grad path
# (`_ssd_forward`) took 45 µs against 65 for SSDChunkScanFn.apply under no_grad (2026-11-28, this VM).
HOST_PARTS = ("forward", "forward, no grad", "forward+backward")


def host_times(modules, shape, dtype, iters, rounds=10):
    """Median µs of the host side of each of `HOST_PARTS` at `shape`, for each version of the kernel
    module in `modules` (name -> module): rounds of `iters` calls, the versions taking turns so that a
    slower moment of the machine hits each alike; the median over rounds of the per-round medians."""
    inputs = _inputs(shape, dtype)
    calls = {}
    for name, module in modules.items():
        fn = module.SSDChunkScanFn
        _call(fn, shape, inputs, backward=True)  # compile first (and fill the module's caches)
        calls[name] = {"forward": lambda fn=fn: _call(fn, shape, inputs, backward=False),
                       "forward, no grad": lambda module=module: _call_no_grad(module, shape, inputs),
                       "forward+backward": lambda fn=fn: _call(fn, shape, inputs, backward=True)}
    per_round = {(name, part): [] for name in modules for part in HOST_PARTS}
    for _ in range(rounds):
        for name in modules:
            for part in HOST_PARTS:
                call, times = calls[name][part], []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
                per_round[name, part].append(statistics.median(times))
    return {name: {part: statistics.median(per_round[name, part]) * 1e6 for part in HOST_PARTS} for name in modules}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.offline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10: 80 (A100), 90 (H100, H200)")
    ap.add_argument("--sms", type=int, default=None, help="streaming multiprocessors (default: that of --arch's card)")
    ap.add_argument("--shared", type=int, default=None, help="shared memory per block in bytes (default: --arch's card)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--host-iters", type=int, default=50, help="calls per round for the host times (0: skip them)")
    ap.add_argument("--host-rounds", type=int, default=10, help="rounds for the host times")
    ap.add_argument("--baseline", default=None,
                    help="another version of kernels/ssd_triton.py to time the host side against, in turns")
    ap.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    if args.host_iters < 0 or args.host_rounds < 1:
        ap.error("--host-iters must be >= 0 and --host-rounds >= 1")
    if args.baseline and not os.path.isfile(args.baseline):
        ap.error(f"--baseline {args.baseline}: no such file")
    if args.baseline and not args.host_iters:
        ap.error("--baseline times the host side: it needs --host-iters > 0")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernels.offline compiles for a GPU: unset TRITON_INTERPRET (it makes Triton interpret instead)")
    import triton
    from triton.runtime.errors import OutOfResources

    dtype = DTYPES[args.dtype]
    cuobjdump = _cuobjdump()
    try:
        gpu = OfflineGPU(args.arch, args.sms, args.shared)
    except ValueError as e:
        sys.exit(f"kernels.offline: {e}")
    with gpu:
        t0 = time.perf_counter()
        try:
            forward, backward = compile_all(gpu, REAL_SHAPE, dtype)
        except OutOfResources as e:  # every config of a program is too large
            for r in (b.row(cuobjdump) for b in gpu.binaries):
                print(f"{r['program']} | {r['config']} | shared {r['shared']} B | {r['note']}")
            sys.exit(f"kernels.offline: {gpu.binaries[-1].program} has no config that fits this card ({e})")
        compile_s = time.perf_counter() - t0
        rows = [b.row(cuobjdump) for b in gpu.binaries]
        from kernels import ssd_triton

        host = None
        if args.host_iters:
            modules = {"this": ssd_triton}
            if args.baseline:
                from kernels.bench import load_variant

                modules["baseline"] = load_variant(args.baseline)
            host = host_times(modules, HOST_SHAPE, dtype, args.host_iters, args.host_rounds)
        off_because = ssd_triton.DIRECT_LAUNCH_OFF_BECAUSE  # (then nothing to compare: all go through Triton)
        try:
            launches_compared = 0 if off_because else compare_launch_paths(gpu, HOST_SHAPE, dtype)
        except AssertionError as e:
            sys.exit(f"kernels.offline: the direct launches differ from Triton's: {e}")
    report = dict(arch=f"sm_{args.arch}", properties=gpu.properties, dtype=args.dtype, shape=REAL_SHAPE,
                  triton=triton.__version__, torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                  compile_s=round(compile_s, 1), binaries=rows, launches=dict(forward=forward, backward=backward),
                  host_shape=HOST_SHAPE, host_us=host, direct_launches_checked=launches_compared)

    print(f"sm_{args.arch} ({gpu.properties['multiprocessor_count']} SMs, {gpu.properties['max_shared_mem']} B shared "
          f"per block), {args.dtype}, shape (b, l, H, P, N, G, Q) = {REAL_SHAPE}; triton {triton.__version__}; "
          f"compiled (or read from Triton's cache) in {compile_s:.0f} s" + ("" if cuobjdump else " (no cuobjdump in the triton wheel: no registers)"))
    print("| program | config | registers | stack B | shared B | instructions | sass | note |\n" + "|---" * 8 + "|")
    for r in rows:
        print(f"| {r['program']} | {r['config']} | {r['regs']} | {r['stack']} | {r['shared']} | {r['instructions']} "
              f"| {r['sass']} | {r['note']} |")
    for name, counts in (("forward", forward), ("backward", backward)):
        print(f"launches per {name}: {sum(counts.values())} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    for name, t in (host or {}).items():
        print(f"host time per call with no-op launches, {name} ({report['cpu']}, shape {HOST_SHAPE}): "
              + ", ".join(f"{part} {t[part]:.0f} µs" for part in HOST_PARTS))
    if off_because:
        print(f"direct launches: off ({off_because}): every launch goes through Triton")
    else:
        print(f"direct launches: {launches_compared} compared with Triton's own launch path (9 forward+backward "
              "calls: plain, x not 16-byte aligned, with an initial state, in bf16, with the final state unused, kept "
              "tensors moved by a saved-tensor hook, 1 head split, a launch-enter hook set, a launch-exit hook only; "
              "each by the launches' keys, then by the call's plan; then all nine in turn, keeping what the others "
              "kept): each the same binary, grid, hooks, metadata and arguments; and hooks set after a "
              "plan was recorded see every launch")
    if host and "baseline" in host:
        print("this / baseline: " + ", ".join(f"{part} {host['this'][part] / host['baseline'][part]:.2f}x"
                                             for part in HOST_PARTS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if any(r["note"].startswith("does not fit") for r in rows):
        print("some configs do not fit the card: the autotuner skips them on a GPU", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()

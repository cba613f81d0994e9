"""How `kernels.ssd_triton` launches its Triton programs: the host side, apart from what they compute.

At batch 1 a forward+backward of the SSD scan is a few hundred µs of GPU work, and the GPU waits for the
host to issue its 12 launches. Each launch through Triton (`program[grid](*args)`, i.e.
`JITFunction.run`) works out again which binary the arguments select (~20 µs plus ~0.6 µs per argument of
host time on a 2-core VM; an autotuned program adds ~30 µs of autotuner bookkeeping). A `Launcher` goes
through Triton only the first time a binary is needed, keeps the binary under everything Triton selects
it by, and then calls it directly, as `JITFunction.run` itself ends by doing (`DIRECT_LAUNCH_OFF_BECAUSE`
says where that is not possible: under the interpreter, or with a Triton that launches otherwise). A
forward or backward call like an earlier one (a `Plan` with the same key) takes that call's binaries and
grids in order and builds no key per launch.

    launcher = Launcher()                      # one per module of programs (its binaries, configs, plans)
    plan = launcher.plan(True, "forward", shapes..., tensors=(x, dt, ...))
    launcher.launch(program, grid, key, plan, *args, **constexprs)   # each of the call's launches
    plan.done()

`kernels.offline` checks the three paths (through Triton, by key, by plan) against each other launch by
launch, and `kernels.bench` requires the same bits from each on a GPU.
"""

import os
import threading

import torch
import triton

try:  # TRITON_INTERPRET=1 (read when this module is imported): programs run in Python on CPU tensors
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton < 3.4 has no knobs
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_BINARIES = 4096  # (the keys hold the integer arguments, seqlen among them: bounded for varying lengths)


def direct_launch_off_because():
    """Why a `Launcher` cannot launch binaries directly with this Triton, or None if it can: Triton's own
    launch must end as `Launcher.launch` repeats it (only that line of `JITFunction.run` is checked, in its
    source; Triton 3.4 to 3.9 have it, and their binary selection, read by hand, uses only what `selector`
    keys on; Triton 3.2 and 3.3 pass other arguments)."""
    if INTERPRET:
        return "under the interpreter there are no binaries"
    try:
        import inspect

        source = "".join(inspect.getsource(triton.runtime.jit.JITFunction.run).split())
    except (AttributeError, OSError, TypeError) as e:
        return f"the source of Triton's JITFunction.run cannot be read ({e})"
    if "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata," \
       "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())" not in source:
        return f"Triton {triton.__version__} launches differently from what Launcher.launch repeats (checked: 3.4 to 3.9)"
    return None


# Why binaries cannot be launched directly with this Triton (None: they can). A module of programs reads
# it once, into its own switch (kernels.ssd_triton.DIRECT_LAUNCH), which it passes to each `Plan`.
DIRECT_LAUNCH_OFF_BECAUSE = direct_launch_off_because()


def selector(args):
    """What of the arguments can make Triton choose another binary: for a tensor its dtype and its
    address modulo 16 (Triton specializes pointers on 16-byte alignment), for anything else its type
    and value (Triton specializes integers on their range and divisibility by 16, which the value
    decides; the type, because True == 1 == 1.0 as dict keys, and Triton compiles each differently)."""
    return [(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else (a.__class__, a) for a in args]


def launch_hooks():
    """Triton's launch hooks (enter, exit) as its launcher takes them, None for a hook that calls nothing:
    Triton 3.5+ keeps them as chains of hooks (empty unless a profiler adds one), where Triton's own launch
    builds each launch's metadata for them and its launcher calls them. Empty, they do nothing, so
    `Launcher.launch` passes None instead, and where both are None builds no metadata (~2 µs per launch here)."""
    hooks = triton.knobs.runtime
    return tuple(None if hook is None or getattr(hook, "calls", None) == [] else hook
                 for hook in (hooks.launch_enter_hook, hooks.launch_exit_hook))


class Binary:
    """A compiled program as `Launcher.launch` launches it: the program it is a binary of, the binary, the
    config it was compiled with (None if not autotuned), the keyword arguments its grid function reads
    (META), and the values of its keyword arguments in the order of the program's parameters (they follow
    the positional ones)."""

    def __init__(self, program, kernel, config, meta, arg_names, n_positional):
        self.program, self.kernel, self.config, self.meta = program, kernel, config, meta
        self.tail = tuple(meta[name] for name in arg_names[n_positional:])


class Plan:
    """The launches of one forward or one backward call. What selects their binaries follows from the
    call's key: the dtype and 16-byte alignment (`selector`) of every tensor the call is given (for the
    SSD scan: the inputs, or None; in the backward also dy, ∂L/∂final and what the forward kept, which
    autograd hands back and a saved-tensor hook may have moved), the shapes, the chunk size, the device
    and, in the backward, the number of head splits of dCB, dC and dB. The buffers the call allocates have
    sizes, hence alignments, that these fix (CUDA allocations start 512-byte aligned), and so do the
    integer arguments; the configs are the autotuners' choices for the shapes. So the binaries one call's
    launches found through their own keys are those of every later call with the same key: the first call
    whose launches all found theirs records them, later calls take them in order, without building a key
    per launch. Not in the key, like the knobs `Launcher.launch` lists: a module's block sizes that are
    not arguments of its calls (kernels.ssd_triton's `_STATE_BLOCK`, `_DC_MIN_BLOCK_T`, `_SUMS_BLOCK`,
    `_SUMS_TILE`); after changing them, call the module's `forget_tuning()`. A plan keeps each launch's
    grid with its binary (the grid follows from the shapes and the config). Also holds, read once per
    call: whether launches are direct, the device, the stream and the launch hooks (`launch_hooks`)."""

    def __init__(self, plans, direct, key):
        self.plans, self.key, self.direct = plans, key, direct
        self.launches = plans.get(key) if direct else None  # [(binary, grid)] in order; None: record them
        self.recorded, self.complete, self.next = [], direct, 0
        if direct:
            self.device = triton.runtime.driver.active.get_current_device()
            self.stream = triton.runtime.driver.active.get_current_stream(self.device)
            self.enter, self.leave = launch_hooks()

    def done(self):
        """The call launched everything: keep what it recorded, if every launch found its binary."""
        if self.launches is None and self.complete:
            if len(self.plans) >= MAX_BINARIES:
                self.plans.clear()
            self.plans[self.key] = self.recorded


class Launcher:
    """The launch state of one module of Triton programs (kernels.ssd_triton, or another version of it
    that kernels.bench loads beside it: each keeps its own): the configs its autotuners chose, the binaries
    it launches directly and the launch plans of its calls."""

    def __init__(self):
        self.chosen = {}  # (autotuned program, key, tensor dtypes) -> the triton.Config its autotuner chose
        self.binaries = {}  # (program, key, device, constexprs, what of the arguments selects one) -> Binary
        self.plans = {}  # the key of a call -> [(Binary, grid)] of its launches, in order (see `Plan`)
        self.first_launch = threading.Lock()

    def plan(self, direct, *key, tensors=()):
        """The `Plan` of a call: `direct` (the module's switch, as it is when the call begins) says whether
        its launches may skip Triton; its key is `key` and the `selector` of `tensors`."""
        return Plan(self.plans, direct, (*key, *selector(tensors)))

    def forget(self):
        """Forget the chosen configs, the binaries and the plans (the module's `forget_tuning`)."""
        self.chosen.clear()
        self.binaries.clear()
        self.plans.clear()

    def launch(self, program, grid, key, plan, *args, **constexprs):
        """program[grid](*args, **constexprs), through Triton's launch path only the first time a binary is
        needed; returns the triton.Config used (None for a program that is not autotuned). `plan`: the
        `Plan` of the call this launch is part of; `key`: what the program's autotuner tunes for (its
        config is kept per `key` and the dtypes of the tensor arguments, as Triton's autotuner keeps it).

        The binary Triton chose is kept under everything Triton chooses it by (`selector`, the constexprs,
        the device; the config that `key` got from the autotuner, which tunes once per key), and later
        launches with the same selector call it directly, as `JITFunction.run` itself ends by doing: same
        binary, grid, stream and arguments, and the launch hooks with their metadata where a hook is set
        (`launch_hooks`; kernels.offline checks this launch by launch).
        What this skips of `run`: its pre-run hooks, the check that globals a program reads have not
        changed since it was compiled (kernels.ssd_triton changes none), and what `run` reads from
        `triton.knobs` at each launch that can select another binary (debug, instrumentation, fpsan casts,
        a stages inspection hook): after changing those, call the module's `forget_tuning()`, which
        forgets the binaries too.
        Building that key costs ~14 µs per launch on a 2-core VM, so a call like an earlier one (same `Plan`
        key) takes the binaries (and grids) that call's launches found, in order, and builds none.
        Grids are 3-tuples (a grid of another length raises after its first launch through Triton, where
        direct launches are on)."""
        if not plan.direct:  # (the module's switch as it was when the call began)
            return self._through_triton(program, grid, key, None, args, constexprs)
        if plan.launches is not None:  # a call like one before: its binaries (and grids) in order
            binary, g = plan.launches[plan.next]
            plan.next += 1
            if binary.program is not program:
                raise RuntimeError(f"kernels.launch: launch plan out of step ({binary.program} for {program}); "
                                   "please report this. kernels.ssd_triton.DIRECT_LAUNCH = False avoids it")
        else:
            where = (program, key, plan.device, *selector(constexprs.values()), *selector(args))
            binary = self.binaries.get(where)
            if binary is None:
                plan.complete = False
                return self._through_triton(program, grid, key, where, args, constexprs)
            g = grid(binary.meta) if callable(grid) else grid  # (a 3-tuple)
            plan.recorded.append((binary, g))
        stream, enter, leave = plan.stream, plan.enter, plan.leave
        kernel, all_args = binary.kernel, args + binary.tail
        # (what Triton's launch does: its launch_metadata returns None where the enter hook is None)
        metadata = kernel.launch_metadata(g, stream, *all_args) if enter is not None or leave is not None else None
        kernel.run(*g, stream, kernel.function, kernel.packed_metadata, metadata, enter, leave, *all_args)
        return binary.config

    def _through_triton(self, program, grid, key, where, args, constexprs):
        """The first launch of `launch` for `where`, which keeps the binary under it (every launch when
        direct launches are off: `where` is None)."""
        with self.first_launch:  # (an autotuner keeps its last choice in an attribute: one thread at a time)
            if isinstance(program, triton.runtime.autotuner.Autotuner):
                # (Triton's autotuner tunes once per its key and the dtypes of all tensor arguments: dt, A
                # and D, or its absence, can differ between calls with the same `key`)
                tuned = (program, key, *(a.dtype if isinstance(a, torch.Tensor) else None for a in args))
                config = self.chosen.get(tuned)
                if config is None:  # the autotuner benchmarks its configs, keeps the fastest and launches it
                    kernel = program[grid](*args, **constexprs)
                    config = self.chosen[tuned] = program.best_config
                else:
                    kernel = program.fn[grid](*args, **constexprs, **config.all_kwargs())
                jit_fn, meta = program.fn, {**constexprs, **config.kwargs}
            else:
                kernel, jit_fn, meta, config = program[grid](*args, **constexprs), program, dict(constexprs), None
        if where is None:  # (nothing kept: Triton launches every time)
            return config
        if len(grid(meta) if callable(grid) else grid) != 3:
            raise ValueError(f"{jit_fn.__name__}: give its grid as 3 numbers (`Launcher.launch` passes them as they are)")
        if hasattr(kernel, "result"):  # (Triton 3.5+ compiling in the background: wait for the binary)
            kernel = kernel.result()
        if kernel is not None:  # (None: a Triton cache hook declined to compile it)
            if len(self.binaries) >= MAX_BINARIES:
                self.binaries.clear()
            self.binaries[where] = Binary(program, kernel, config, meta, jit_fn.arg_names, len(args))
        return config

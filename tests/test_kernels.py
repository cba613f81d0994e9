"""The Triton chunked SSD scan (`kernels/`) against the PyTorch reference (`minimamba/ssd.py`).

The programs run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set below before
Triton is imported), so these tests need Triton but no GPU. The ground truth is the token-by-token
recurrence `ssd_recurrent` in float64, computed from the very inputs the kernel gets (rounded to its
dtype first), so the tolerances measure only the kernel's own arithmetic:

    dtype    tolerance on max|kernel − truth| / max|truth|, for y, the final state and every gradient
    float32  1e-4   (measured: ~1e-7; over 103 random draws of `problems`, ≤ 5e-7, ∂L/∂A ≤ 2.8e-6;
                     ∂L/∂A 1.2e-5 on the @example below, where its parts cancel 70-fold)
    float16  5e-3   (measured: ≤ 8e-4)
    bfloat16 3e-2   (measured: ≤ 7e-3; on CPU the interpreter's dots take fp32 operands, see ssd_triton.py)

`python -m kernels.bench` checks the compiled kernel at full size on a GPU. The interpreter runs every
program in Python, so the shapes here are small and the hypothesis budget modest (about 4 minutes on
2 cores for this file, one of them running `kernels.bench` on CPU tensors).
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernel tests need triton (pip install triton)")
if "kernels.ssd_triton" in sys.modules and not sys.modules["kernels.ssd_triton"].INTERPRET:
    pytest.skip("kernels was imported before this module could set TRITON_INTERPRET=1; run this file alone",
                allow_module_level=True)

import triton  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels import ssd_chunk_scan  # noqa: E402
from kernels import launch as L  # noqa: E402
from kernels import ssd_triton as K  # noqa: E402
from minimamba.ssd import ssd_recurrent  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# random draws per property test: a few in CI (each takes seconds under the interpreter); a campaign sets more,
# MINIMAMBA_KERNEL_DRAWS=250 python -m pytest tests/test_kernels.py -k property (the half-precision test takes half)
DRAWS = int(os.environ.get("MINIMAMBA_KERNEL_DRAWS", "12"))


@pytest.fixture(autouse=True, scope="module")
def _interpreter_without_overflow_checks():
    """The interpreter checks every int32 operation for overflow, in Python, which more than doubles
    the run time of this file; these shapes are far from overflowing, so the check is switched off."""
    try:
        import triton.runtime.interpreter as interp

        old = interp.interpreter_builder.options
        interp.interpreter_builder.options = dataclasses.replace(old, sanitize_overflow=False)
    except (AttributeError, TypeError):  # another Triton version: just run slower
        yield
        return
    yield
    interp.interpreter_builder.options = old


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def make_problem(b, l, h, p, g, n, *, dt_range=(1e-3, 1.0), with_D=True, with_h0=True, seed=0):
    """Random float64 inputs of the SSD contract. dt is log-uniform in dt_range, A in [-8, -0.5]."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    lo, hi = map(torch.log, torch.tensor(dt_range, dtype=torch.float64))
    return dict(
        x=torch.randn(b, l, h, p, **f64),
        dt=torch.exp(lo + (hi - lo) * torch.rand(b, l, h, **f64)),
        A=-torch.exp(torch.empty(h, dtype=torch.float64).uniform_(-0.7, 2.08, generator=gen)),
        B=torch.randn(b, l, g, n, **f64),
        C=torch.randn(b, l, g, n, **f64),
        D=torch.randn(h, **f64) if with_D else None,
        initial_state=torch.randn(b, h, p, n, **f64) if with_h0 else None,
    )


def rel_err(actual, expected):
    """max |actual − expected| / max |expected| (the scale of a tensor, not of each entry)."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _loss_weights(problem, dtype, seed):
    """L = Σ wy·y (+ Σ wf·final). wy is rounded to y's dtype: autograd hands the kernel ∂L/∂y in y's dtype,
    so with exact wy a bf16 test would measure that rounding too, which sums over P can magnify (∂L/∂dt
    erred 6.8e-2 on a bf16 draw, 3.3e-6 against the truth given the ∂L/∂y the kernel received)."""
    b, l, h, p = problem["x"].shape
    n = problem["B"].shape[-1]
    gen = torch.Generator().manual_seed(seed + 1)
    wy = torch.randn(b, l, h, p, dtype=torch.float64, generator=gen).to(dtype).double()
    return wy, torch.randn(b, h, p, n, dtype=torch.float64, generator=gen)


def _kernel_inputs(problem, dtype):
    """What the kernel gets: x, B, C in `dtype`, the rest in float32."""
    return {k: None if v is None else v.to(dtype if k in ("x", "B", "C") else torch.float32)
            for k, v in problem.items()}


def _float64_truth(inputs, wy, wf, use_final):
    """{name: tensor} of y, the final state (if use_final) and the gradient of L of every input, by autograd
    through the float64 recurrence."""
    leaves = {k: None if v is None else v.double().detach().requires_grad_() for k, v in inputs.items()}
    y, final = ssd_recurrent(**leaves)
    ((y * wy).sum() + ((final * wf).sum() if use_final else 0)).backward()
    return {"y": y.detach(), **({"final": final.detach()} if use_final else {}),
            **{"d" + k: v.grad for k, v in leaves.items() if v is not None}}


def run_and_compare(problem, chunk_size, dtype=torch.float32, use_final=True, seed=0):
    """Forward and backward of the kernel and of the float64 recurrence on the same (rounded) inputs;
    returns {name: relative error} for y, the final state and the gradient of every input."""
    kernel_in = _kernel_inputs(problem, dtype)
    wy, wf = _loss_weights(problem, dtype, seed)
    truth = _float64_truth(kernel_in, wy, wf, use_final)
    kernel_in = {k: None if v is None else v.requires_grad_() for k, v in kernel_in.items()}

    args = [kernel_in[k] for k in ("x", "dt", "A", "B", "C")]
    if use_final:
        y, final = ssd_chunk_scan(*args, chunk_size, D=kernel_in["D"], initial_state=kernel_in["initial_state"],
                                  return_final_state=True)
        ((y.double() * wy).sum() + (final.double() * wf).sum()).backward()
    else:
        y = ssd_chunk_scan(*args, chunk_size, D=kernel_in["D"], initial_state=kernel_in["initial_state"])
        (y.double() * wy).sum().backward()

    assert y.dtype == dtype and y.shape == truth["y"].shape
    errs = {"y": rel_err(y, truth["y"])}
    if use_final:
        assert final.dtype == torch.float32
        errs["final"] = rel_err(final, truth["final"])
    for k, v in kernel_in.items():
        if v is not None:
            assert v.grad is not None and v.grad.dtype == v.dtype, f"d{k}"
            errs["d" + k] = rel_err(v.grad, truth["d" + k])
    return errs


ROUNDING_UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def rounding_sensitivity(problem, dtype, use_final=True, seed=0):
    """{name: relative change} of the float64 truth (as `run_and_compare` measures errors) when x, B and C
    move by one rounding unit of `dtype` (relative, a random sign per entry): the error that rounding
    alone causes. Where a quantity is a sum whose terms cancel, it is far above the rounding unit: on a
    seqlen-1 draw, fp16's 4.9e-4 moved ∂L/∂dt by 1.8e-2 (the kernel's fp16 error there: 1.8e-2)."""
    inputs = _kernel_inputs(problem, dtype)
    wy, wf = _loss_weights(problem, dtype, seed)
    truth = _float64_truth(inputs, wy, wf, use_final)
    gen = torch.Generator().manual_seed(seed + 2)
    moved = {k: v.double() * (1 + ROUNDING_UNIT[dtype] * torch.randn(v.shape, dtype=torch.float64, generator=gen).sign())
             if k in ("x", "B", "C") else v for k, v in inputs.items()}
    other = _float64_truth(moved, wy, wf, use_final)
    return {k: rel_err(other[k], truth[k]) for k in truth}


def dA_cancellation(problem, dtype, use_final=True, seed=0):
    """max over heads of Σ |dt_t·G_t| over max |∂L/∂A|, with G_t = ∂L/∂(dt_t·A) (float64, on the rounded inputs):
    ∂L/∂A = Σ_t dt_t·G_t sums one term per token and batch element, and the kernel computes each term from dot
    operands rounded to the input dtype, so its error can be this many rounding units even where every term is
    accurate to one (in fp16, the states and ∂L/∂S_c it stores: docs/kernel-notes.md, "Session 21")."""
    inputs = {k: None if v is None else v.double() for k, v in _kernel_inputs(problem, dtype).items()}
    wy, wf = _loss_weights(problem, dtype, seed)
    dt, A = inputs["dt"], inputs["A"]
    a = (dt * A).requires_grad_()  # (b, l, H): each token's log-decay
    dt_a = a / A  # (b, l, H): = dt, through which only the decays see a
    x = inputs["x"] * (dt / dt_a)[..., None]  # (b, l, H, P): dt_a·x = dt·x, so the input term does not see a
    y, final = ssd_recurrent(x, dt_a, A, inputs["B"], inputs["C"], None, inputs["initial_state"])  # (D·x: no decay)
    ((y * wy).sum() + ((final * wf).sum() if use_final else 0)).backward()
    terms = (dt * a.grad).flatten(0, 1)  # (b·l, H): the terms of ∂L/∂A
    return (terms.abs().sum(0).max() / terms.sum(0).abs().max().clamp_min(1e-300)).item()


def assert_close(errs, dtype, sensitivity=None, allowance=None):
    """Every relative error within the dtype's tolerance, or, where `sensitivity` (`rounding_sensitivity`)
    says that rounding alone moves a quantity further, within 4 times that, or within `allowance` {name: bound}
    where that is larger."""
    bound = {k: max(TOL[dtype], 4 * (sensitivity or {}).get(k, 0.0), (allowance or {}).get(k, 0.0)) for k in errs}
    bad = {k: f"{e:.2e} > {bound[k]:.1e}" for k, e in errs.items() if not e <= bound[k]}  # `not <=` also catches NaN
    assert not bad, f"relative errors above the bound ({dtype}): {bad}; all: " + \
        ", ".join(f"{k} {e:.1e}" for k, e in errs.items())


# --------------------------------------------------------------------------------------------------
# each forward stage against its PyTorch reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Q", [16, 48])  # 48: three steps of the interpreter's 16-position tiles per chunk
def test_forward_stages_match_their_references(Q):
    pb = make_problem(2, 45, 4, 8, 2, 16, seed=3)
    x, dt, A, B, C, h0 = (pb[k].float() for k in ("x", "dt", "A", "B", "C", "initial_state"))
    cs, cs_lo, chunk_states, cb, states, final = K._forward_stages(x, dt, A, B, C, Q, h0, K._plan())
    cs_ref = K.chunk_cumsum_ref(dt, A, Q)
    chunk_states_ref = K.chunk_state_ref(x, dt, B, cs_ref)
    states_ref, final_ref = K.state_passing_ref(chunk_states_ref, cs_ref, h0)
    assert rel_err(cs, cs_ref.double()) < 1e-6
    # cs in two parts (fp32 inputs): hi + lo is the sum of the fp32 products dt·A to ~1e-14, and hi is
    # that sum correctly rounded (see "Decays: cs in two parts")
    dA = torch.nn.functional.pad(dt * A, (0, 0, 0, cs.shape[2] * Q - dt.shape[1])).double()  # (b, nc·Q, H)
    exact = dA.view(2, -1, Q, 4).cumsum(2).permute(0, 3, 1, 2)  # (b, H, nc, Q)
    assert rel_err(cs.double() + cs_lo.double(), exact) < 1e-13
    assert torch.equal(cs, exact.float())
    assert K._forward_stages(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), Q, h0, K._plan())[1] is None  # no lo
    if Q == 16:  # fp16: the entering states are kept as the dots' fp16 operands (half the memory; see ssd_chunk_scan)
        half = K._forward_stages(x.half(), dt, A, B.half(), C.half(), Q, h0, K._plan())
        assert half[4].dtype == torch.float16 and rel_err(half[4], states_ref.double()) < 2e-3
    assert rel_err(chunk_states, chunk_states_ref.double()) < 1e-5
    assert rel_err(cb, K.chunk_cb_ref(C, B, Q).double()) < 1e-6
    assert rel_err(states, states_ref.double()) < 1e-5
    assert rel_err(final, final_ref.double()) < 1e-5


@pytest.mark.parametrize("n_splits,n_parts,dtype,block_r,block_h", [
    (1, 1, torch.float32, 16, 16), (3, 2, torch.bfloat16, 16, 16),  # several row tiles (37 rows, 16 per step)
    (3, 1, torch.float32, 16, 16),  # fp32, 3 splits: the bits of the loop's order (split 0 first)
    (2, 2, torch.float16, K._SUMS_TILE // 16, 16),  # the host's tiles for 5 heads: one step of 128 rows
    (1, 2, None, 16, 16)])  # one split, fp32 B: the program sums the parts alone (grid (1,))
def test_grad_sums_add_the_splits_and_the_parts(n_splits, n_parts, dtype, block_r, block_h):
    """The program that closes the backward: ∂L/∂A, ∂L/∂D as sums over the (batch element, chunk) rows;
    ∂L/∂B, ∂L/∂C as the sum of the splits' partial sums, added in split order like the loop below (so the
    same bits in fp32), cast to B's dtype. 2 × 1040 entries (two tiles of 1024, the second partial), 37
    rows, 5 heads. With dtype None, only program 0 runs and the output is left as it was."""
    b, l, g, n, rows, h = 2, 13, 2, 20, 37, 5
    gen = torch.Generator().manual_seed(n_splits)
    dBC = torch.randn(2, n_splits, b, l, g, n, generator=gen)
    parts = torch.randn(n_parts, rows, h, generator=gen)
    out = torch.full((2, b, l, g, n), float("nan")).to(dtype or torch.float32)
    dAD = torch.full((n_parts, h), float("nan"))
    numel = b * l * g * n
    grid = (1 + 2 * K._cdiv(numel, K._SUMS_BLOCK) if dtype else 1, 1, 1)
    K._launch(K._grad_sums_kernel, grid, None, K._plan(), dBC, out, parts, dAD, numel, n_splits, rows, h,
              n_parts, BLOCK=K._SUMS_BLOCK, BLOCK_R=block_r, BLOCK_H=block_h)
    # (in another order than torch's: within 37 roundings of running sums below 16)
    torch.testing.assert_close(dAD.double(), parts.double().sum(1), rtol=0, atol=37 * 2.0 ** -24 * 16)
    expected = dBC[:, 0].clone()
    for k in range(1, n_splits):
        expected += dBC[:, k]
    if dtype is None:
        assert out.isnan().all()
    elif dtype == torch.float32:
        assert torch.equal(out, expected)
    else:  # (the interpreter casts by truncating; a GPU rounds to nearest: within one ulp of the dtype)
        assert ((out.float() - expected).abs() <= expected.abs() * torch.finfo(dtype).eps).all()


# --------------------------------------------------------------------------------------------------
# the whole scan, forward and backward, against the float64 recurrence
# --------------------------------------------------------------------------------------------------
EDGE_CASES = {
    # name: (batch, seqlen, nheads, headdim, ngroups, dstate, chunk, dt_range, D, h0)
    "seqlen_1": (2, 1, 2, 4, 1, 8, 16, (1e-3, 1.0), True, True),
    "seqlen_below_chunk": (1, 13, 2, 8, 2, 8, 32, (1e-3, 1.0), True, False),
    "seqlen_k_chunks_plus_1": (1, 3 * 16 + 1, 2, 4, 1, 8, 16, (1e-3, 1.0), False, True),
    "seqlen_exact_chunks": (2, 64, 2, 4, 2, 16, 32, (1e-3, 1.0), True, True),
    "ngroups_eq_nheads": (1, 40, 4, 4, 4, 8, 16, (1e-3, 1.0), True, True),
    "chunk_64_headdim_24": (1, 130, 2, 24, 1, 16, 64, (1e-3, 1.0), True, True),
    "chunk_not_power_of_2": (1, 50, 2, 4, 1, 8, 24, (1e-3, 1.0), True, True),
    "large_dt_decays_to_zero": (1, 40, 2, 4, 1, 8, 16, (5.0, 50.0), True, True),
    "tiny_dt": (1, 40, 2, 4, 1, 8, 16, (1e-5, 1e-4), True, True),
}


@pytest.mark.parametrize("case", EDGE_CASES, ids=list(EDGE_CASES))
def test_edge_cases_fp32(case):
    b, l, h, p, g, n, Q, dt_range, with_D, with_h0 = EDGE_CASES[case]
    pb = make_problem(b, l, h, p, g, n, dt_range=dt_range, with_D=with_D, with_h0=with_h0, seed=len(case))
    assert_close(run_and_compare(pb, Q), torch.float32)


_GPU_TILES = [(32, 64), (32, 32), (64, 32), (64, 64)]  # (BLOCK_T, BLOCK_S) of the GPU configs: rows < = > columns


@pytest.mark.parametrize("shift", range(len(_GPU_TILES)))
def test_db_dc_programs_in_the_gpu_tile_shapes(monkeypatch, shift):
    """The interpreter runs each program in one small config. The dCB program's decay gradient depends
    on how its row and column tiles line up with the diagonal, and it writes the dCB tiles that the dC and
    dB programs read in their own tilings: run the three in the tile shapes of their GPU configs (rows < = >
    columns), three different shapes in each run (dCB the shift-th, dC the next, dB the one after: over the
    four runs each program meets every shape, and dC and dB never read dCB in the tiling it was written in),
    with 2 heads per split, a partial last chunk and NaN in every buffer entry that no program writes."""
    for i, program in enumerate(("dcb", "dc", "db")):
        block_t, block_s = _GPU_TILES[(shift + i) % len(_GPU_TILES)]
        monkeypatch.setattr(getattr(K, f"_chunk_scan_bwd_{program}_kernel"), "configs",
                            [triton.Config(dict(BLOCK_T=block_t, BLOCK_S=block_s), num_warps=4, num_stages=2)])
    monkeypatch.setattr(K, "_head_splits", lambda heads_per_group, programs, device: 2)
    monkeypatch.setattr(K, "torch", _TorchWithPoisonedEmpty())
    K.forget_tuning()
    try:
        pb = make_problem(1, 2 * 128 + 37, 4, 8, 1, 16, with_D=True, with_h0=True, seed=3)
        assert_close(run_and_compare(pb, 128), torch.float32)
    finally:
        K.forget_tuning()


# (4, 2, 2): the splits of a group's heads laid out beside the other groups' (dCB's and dB/dC's split offsets)
@pytest.mark.parametrize("nheads,ngroups,splits", [(4, 1, 1), (4, 1, 2), (6, 2, 1), (4, 2, 2)])
def test_heads_summed_in_each_split(monkeypatch, nheads, ngroups, splits):
    """The dCB program sums the score gradients of the heads of each split of a group (dCB) and the dC and
    dB programs read that sum; the split count aims at programs per SM, and the interpreter's one "SM"
    gives one or two heads per split in the other tests: force up to four, and three (an odd number)."""
    monkeypatch.setattr(K, "_head_splits", lambda heads_per_group, programs, device: splits)
    pb = make_problem(2, 2 * 32 + 7, nheads, 8, ngroups, 16, with_D=True, with_h0=True, seed=nheads + splits)
    assert_close(run_and_compare(pb, 32), torch.float32)


def test_head_splits_aim_at_programs_per_sm_up_to_the_cap(monkeypatch):
    """The split counts measured best on an H100 (see `_MAX_HEAD_SPLITS`): 370m's 32 heads in one group,
    132 SMs, 4 row tiles of 64 per 256-token chunk. Every count divides the heads of a group."""
    monkeypatch.setattr(K, "_sm_count", lambda device: 132)
    programs = lambda b, l: 4 * b * (l // 256)  # (as `_ssd_backward` counts them: one split)
    assert K._head_splits(32, programs(1, 2048), None) == 8  # the cap (the target alone: 32)
    assert K._head_splits(32, programs(8, 2048), None) == 4  # the target: 4 × 256 ≥ 4 × 132
    assert K._head_splits(32, programs(64, 2048), None) == 1
    for heads in (1, 3, 7, 12, 24, 80):
        for b in (1, 2, 8):
            d = K._head_splits(heads, programs(b, 2048), None)
            assert heads % d == 0 and 1 <= d <= K._MAX_HEAD_SPLITS, (heads, b, d)
    assert K._head_splits(7, 1, None) == 7  # no divisor reaches the target: the largest under the cap
    assert K._head_splits(12, 1, None) == 6
    # exactly the target (4 programs per SM) is reached: 132 programs × 4 splits on 132 SMs, not 8 splits
    assert K._head_splits(8, 132, None) == 4 and K._head_splits(8, 131, None) == 8


def test_bf16_buffers_as_on_a_gpu(monkeypatch):
    """On a GPU, bf16 inputs make the programs keep the buffers that are only dot operands (the entering
    states, ∂L/∂S_c, dCB) in bf16; the interpreter's dots take fp32 operands (see ssd_triton.py), which
    keeps those buffers fp32: store them in bf16 here too."""
    dot_dtype = K._dot_torch_dtype
    monkeypatch.setattr(K, "_dot_torch_dtype", lambda x: torch.bfloat16 if x.dtype == torch.bfloat16 else dot_dtype(x))
    pb = make_problem(2, 2 * 64 + 9, 4, 16, 1, 32, seed=2)
    assert_close(run_and_compare(pb, 32, dtype=torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_estimate_stand_in_saves_what_the_kernel_saves(dtype):
    """minimamba.training counts activation memory on the meta device with a stand-in for the Triton
    scan (`_ScanStandIn`): it must save the tensors SSDChunkScanFn saves, shape for shape and dtype for
    dtype (the initial state aside: the model passes none)."""
    from minimamba.training import _ScanStandIn

    pb = make_problem(2, 45, 4, 8, 2, 16, seed=7)
    x, B, C = (pb[k].to(dtype).requires_grad_() for k in ("x", "B", "C"))
    dt, A, D = (pb[k].float().requires_grad_() for k in ("dt", "A", "D"))

    def saved(fn):
        out = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: out.append((tuple(t.shape), t.dtype)) or t,
                                                      lambda t: t):
            fn()
        return sorted(out, key=str)

    kernel = saved(lambda: ssd_chunk_scan(x, dt, A, B, C, 16, D=D))
    stand_in = saved(lambda: _ScanStandIn.apply(x, dt, A, B, C, D, 16))
    assert kernel == stand_in
    assert len(kernel) == 6 + 4 - (dtype != torch.float32)  # the inputs; cs, cs_lo (fp32 only), S_c, CB


def test_backward_twice_gives_the_same_gradients():
    """The backward reads what the forward kept (cs, cs_lo, S_c, CB) and must not write to it: a second backward
    through the same graph (retain_graph) gives the same bits."""
    pb = make_problem(2, 45, 4, 8, 2, 16, seed=17)
    leaves = [pb[k].float().clone().requires_grad_() for k in ("x", "dt", "A", "B", "C", "D", "initial_state")]
    y, final = ssd_chunk_scan(*leaves[:5], 16, D=leaves[5], initial_state=leaves[6], return_final_state=True)
    loss = (y * torch.randn_like(y)).sum() + (final * torch.randn_like(final)).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_calls_with_nothing_to_differentiate_skip_autograd(monkeypatch):
    """Under torch.no_grad, or with no input requiring a gradient (inference), the wrapper runs the
    forward without the autograd Function (less host time per call): the same bits as through it."""
    pb = make_problem(2, 45, 4, 8, 2, 16, seed=13)
    inputs = {k: v.float() for k, v in pb.items()}
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
    kwargs = dict(D=inputs["D"], initial_state=inputs["initial_state"], return_final_state=True)
    leaves = [a.clone().requires_grad_() for a in args]
    y_grad, final_grad = ssd_chunk_scan(*leaves, 16, **kwargs)  # through the autograd Function
    assert y_grad.requires_grad

    def no_autograd(*a):
        raise AssertionError("the autograd Function was used with nothing to differentiate")

    monkeypatch.setattr(K.SSDChunkScanFn, "apply", no_autograd)
    with torch.no_grad():
        y, final = ssd_chunk_scan(*leaves, 16, **kwargs)
    assert torch.equal(y, y_grad.detach()) and torch.equal(final, final_grad.detach())
    y, final = ssd_chunk_scan(*args, 16, **kwargs)  # grad mode on, no input requires a gradient
    assert torch.equal(y, y_grad.detach()) and not y.requires_grad
    with pytest.raises(AssertionError, match="nothing to differentiate"):  # (the check above is live)
        ssd_chunk_scan(*leaves, 16, **kwargs)


def _old_style_run(self, *args, grid, warmup, **kwargs):  # how Triton 3.2 and 3.3 end JITFunction.run
    kernel = grid = stream = launch_metadata = non_constexpr_vals = None
    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, launch_metadata,
               self.CompiledKernel.launch_enter_hook, self.CompiledKernel.launch_exit_hook, *non_constexpr_vals)


def test_direct_launches_only_with_a_triton_that_launches_as_they_do(monkeypatch):
    """`Launcher.launch` repeats the end of Triton's JITFunction.run; where that differs (Triton 3.2, 3.3
    pass only the non-constexpr arguments, and other hooks), every launch goes through Triton, and the
    reason is kept (kernels.bench prints it)."""
    monkeypatch.setattr(L, "INTERPRET", False)
    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    if (3, 4) <= version <= (3, 9):  # the versions whose launch and specialization were read
        assert L.direct_launch_off_because() is None
    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", _old_style_run)
    assert "launches differently" in L.direct_launch_off_because()
    assert "no binaries" in K.DIRECT_LAUNCH_OFF_BECAUSE and not K.DIRECT_LAUNCH  # (this file interprets)


class _FakeBinary:
    """A compiled program as `Launcher.launch` calls it: it records its launches."""

    function = packed_metadata = None

    def __init__(self):
        self.runs = []

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid)

    def run(self, *args):  # (grid x, y, z, stream, function, packed metadata, launch metadata, hooks, arguments...)
        self.runs.append(args)


class _FakeProgram:
    """A Triton program as `Launcher` sees one: `program[grid](*args, **constexprs)` compiles a binary (one per
    call: Triton would find it again in its own cache) and launches it; `compiles=False`: as where a cache hook
    declines to compile, it returns None."""

    arg_names = ["x_ptr", "n", "BLOCK"]

    def __init__(self, name, compiles=True):
        self.__name__, self.compiles, self.through_triton = name, compiles, []

    def __getitem__(self, grid):
        def run(*args, **constexprs):
            self.through_triton.append((grid, args, constexprs))
            return _FakeBinary() if self.compiles else None
        return run


class _FakeDriver:  # (what a `Plan` reads of Triton's driver)
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 7


def test_launcher_keeps_bounded_binaries_and_plans_and_refuses_what_it_cannot_repeat(monkeypatch):
    """`Launcher` (kernels/launch.py) with stand-in programs, no GPU: the first launch goes through Triton, the
    next by its key (the binary called with the stream, the grid and the constexprs after the arguments), the
    call after by its plan; a plan whose call launches another program raises; a grid of 2 numbers is refused
    (the binary is called with 3); a binary Triton did not compile is not kept; binaries and plans are
    bounded by MAX_BINARIES (the keys hold the integer arguments: one per sequence length)."""
    monkeypatch.setattr(triton.runtime.driver, "_active", _FakeDriver())
    launcher, program, x = L.Launcher(), _FakeProgram("p"), torch.zeros(4)

    def call(prog, n, grid=(2, 1, 1), key="call"):
        plan = launcher.plan(True, key, n, tensors=(x,))
        launcher.launch(prog, grid, None, plan, x, n, BLOCK=16)
        plan.done()

    call(program, 4)  # through Triton: the binary is kept, the call's plan is not (a launch found none)
    assert len(program.through_triton) == 1 and launcher.plans == {}
    ((binary, _),) = [(b, w) for w, b in launcher.binaries.items()]
    call(program, 4)  # by the launch's key: the call's plan is recorded
    call(program, 4)  # by the plan
    assert len(program.through_triton) == 1 and len(launcher.plans) == 1
    assert binary.kernel.runs == [(2, 1, 1, 7, None, None, None, None, None, x, 4, 16)] * 2
    with pytest.raises(RuntimeError, match="launch plan out of step"):
        call(_FakeProgram("q"), 4)  # (same plan key, another program)
    with pytest.raises(ValueError, match="give its grid as 3 numbers"):
        call(program, 5, grid=(2, 1))
    declined = _FakeProgram("declined", compiles=False)
    for _ in range(2):
        call(declined, 4, key="declined")
    assert len(declined.through_triton) == 2 and not any(b.program is declined for b in launcher.binaries.values())

    monkeypatch.setattr(L, "MAX_BINARIES", 3)
    for n in range(6, 12):  # 6 sequence lengths, each called twice: 6 binaries and 6 plans recorded
        call(program, n)
        call(program, n)
        assert len(launcher.binaries) <= 3 and len(launcher.plans) <= 3
    call(program, 11)  # (the last one kept: by its plan)
    assert program.through_triton[-1][1] == (x, 10 + 1) and len(program.through_triton) == 1 + 1 + 6


def test_only_y_used_and_no_final_state_returned():
    pb = make_problem(2, 37, 2, 4, 2, 8, seed=7)
    assert_close(run_and_compare(pb, 16, use_final=False), torch.float32)


def test_b_and_c_of_another_dtype_are_taken_in_x_dtype():
    """B and C are dot operands next to x: the wrapper rounds them to x's dtype (here fp32 B, C with bf16 x):
    the results of B and C given in bf16, and their gradients those of the rounding (in fp32)."""
    pb = make_problem(1, 20, 2, 4, 1, 8, with_h0=False, seed=29)
    inputs = {k: v.float() for k, v in pb.items() if v is not None}
    inputs["x"] = inputs["x"].bfloat16()
    results = []
    for cast in (lambda t: t, lambda t: t.bfloat16()):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = ssd_chunk_scan(leaves["x"], leaves["dt"], leaves["A"], cast(leaves["B"]), cast(leaves["C"]), 16,
                           D=leaves["D"])
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        results.append([y, *(leaves[k].grad for k in sorted(leaves))])
    y, dA, dB, dC = results[0][:4]
    assert y.dtype == torch.bfloat16 and dB.dtype == dC.dtype == torch.float32
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_only_the_final_state_used_through_a_transposed_view():
    """A loss on the final state alone: autograd hands the backward no ∂L/∂y (None: y gets no gradient) and
    ∂L/∂final as the transposed view the loss read it through (not contiguous). Every gradient against the
    float64 recurrence's; C and D reach only y, so their gradients are zero."""
    pb = make_problem(1, 37, 2, 4, 1, 8, seed=23)
    inputs = _kernel_inputs(pb, torch.float32)
    w = torch.randn(1, 2, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))  # (b, H, N, P)
    truth = {k: v.double().detach().requires_grad_() for k, v in inputs.items()}
    (ssd_recurrent(**truth)[1].transpose(-1, -2) * w).sum().backward()
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    _, final = ssd_chunk_scan(*(leaves[k] for k in ("x", "dt", "A", "B", "C")), 16, D=leaves["D"],
                              initial_state=leaves["initial_state"], return_final_state=True)
    (final.transpose(-1, -2) * w.float()).sum().backward()
    errs = {"d" + k: rel_err(v.grad, truth[k].grad) for k, v in leaves.items() if k not in ("C", "D")}
    assert_close(errs, torch.float32)
    assert torch.equal(leaves["C"].grad, torch.zeros(1, 37, 1, 8)) and torch.equal(leaves["D"].grad, torch.zeros(2))


def test_decays_after_a_reset_token_keep_their_low_part():
    """A token with a huge dt (the state forgotten: dt·A ≈ −1e4 to −2e4) leaves every later cs of its chunk
    near that, where one fp32 number is exact only to 1e-3; the decays between the later tokens (differences
    of two cs, of order 1) are then right only through cs's low part (see "Decays: cs in two parts"). With `_decay`
    ignoring it, or its sign flipped in the forward, dx or dCB program, the largest error was 8e-4 to 3e-3
    (measured: y, dx or ∂L/∂A); with it, ≤ 5e-7. The random draws never reach this (their dt are all of one
    scale), nor did any other test."""
    pb = make_problem(2, 45, 2, 4, 1, 8, seed=4)
    pb["A"] = torch.tensor([-5.0, -3.0], dtype=torch.float64)
    pb["dt"][:, ::16] = 4000.0  # the first token of every chunk of 16
    assert_close(run_and_compare(pb, 16), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    pb = make_problem(2, 45, 4, 8, 2, 16, dt_range=(1e-3, 2.0), seed=11)
    assert_close(run_and_compare(pb, 16, dtype=dtype), dtype)


@st.composite
def problems(draw):
    Q = draw(st.sampled_from([16, 32, 64]))
    h = draw(st.sampled_from([1, 2, 4]))
    shape = dict(
        b=draw(st.integers(1, 2)),
        l=draw(st.integers(1, 4 * Q + 8)),  # up to 264: seqlen < Q, = Q, partial last chunks
        h=h,
        p=draw(st.sampled_from([4, 8, 12, 16])),
        g=draw(st.sampled_from(sorted({1, 2, h} & {d for d in (1, 2, 4) if h % d == 0}))),
        n=draw(st.sampled_from([8, 16, 32])),
    )
    dt_max = draw(st.sampled_from([1e-2, 0.5, 4.0, 20.0]))
    opts = dict(dt_range=(dt_max * 1e-3, dt_max), with_D=draw(st.booleans()), with_h0=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))
    heads_per_group = h // shape["g"]  # split among how many dB/dC programs (see `_head_splits`)
    splits = draw(st.sampled_from([d for d in (1, 2, 4) if heads_per_group % d == 0]))
    return shape, Q, opts, draw(st.booleans()), splits


@settings(max_examples=DRAWS, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
# a draw on which ∂L/∂A erred 1.2e-4 while cs was one fp32 number per token (its four per-chunk parts,
# −0.72, −0.36, 0.16 and 0.94, cancel to 0.013); with cs in two parts 1.2e-5, as the fp32 PyTorch
# reference (see "Decays" in ssd_triton.py)
@example(problem=(dict(b=2, l=59, h=1, p=4, g=1, n=16), 32,
                  dict(dt_range=(5e-4, 0.5), with_D=False, with_h0=False, seed=13494), False, 1))
def test_property_matches_recurrence_fp32(problem):
    assert_close(compare_draw(problem, torch.float32)[1], torch.float32)


def compare_draw(draw, dtype):
    """A draw of `problems()`: its float64 inputs, and `run_and_compare`'s errors on them in `dtype` with the
    drawn number of head splits."""
    shape, Q, opts, use_final, splits = draw
    problem = make_problem(**shape, **opts)
    with pytest.MonkeyPatch.context() as mp:  # (not the fixture: hypothesis runs many examples per test)
        mp.setattr(K, "_head_splits", lambda heads_per_group, programs, device: splits)
        return problem, run_and_compare(problem, Q, dtype=dtype, use_final=use_final, seed=opts["seed"])


SEQLEN_1_DRAW = (dict(b=1, l=1, h=2, p=12, g=2, n=32), 16,
                 dict(dt_range=(1e-5, 0.01), with_D=True, with_h0=True, seed=1062), False, 1)


@settings(max_examples=max(1, DRAWS // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from([torch.bfloat16, torch.float16]))
# a draw where ∂L/∂dt (two entries, each a sum over P·N terms that cancel) erred 6.8e-2 in bf16 while the
# truth took ∂L/∂y unrounded (see `_loss_weights`), and errs 1.8e-2 in fp16 (tolerance 5e-3) because
# moving the inputs by one fp16 rounding unit moves the truth's ∂L/∂dt by as much (`rounding_sensitivity`)
@example(problem=SEQLEN_1_DRAW, dtype=torch.bfloat16)
@example(problem=SEQLEN_1_DRAW, dtype=torch.float16)
# a draw (session 20's campaign, 1 in 295) where every weight exp(cs[s]) of ∂L/∂S_in was below fp16's 2⁻²⁴
# (dt·A = −21.8 at the only token): ∂L/∂h_0 came out 0 against ~9e-10, until the weights went into the dot
# relative to the chunk's first cs (`_chunk_state_kernel`)
@example(problem=(dict(b=1, l=1, h=2, p=12, g=1, n=8), 16,
                  dict(dt_range=(0.02, 20.0), with_D=False, with_h0=True, seed=606), False, 1), dtype=torch.float16)
# a draw (session 21's campaign, 1 in 105) where ∂L/∂A erred 6.1e-3 in fp16 (tolerance 5e-3): its 68 terms cancel
# 13-fold, and each is computed from the fp16 states and ∂L/∂S_c (with them in fp32, 1.8e-7)
@example(problem=(dict(b=1, l=68, h=2, p=4, g=2, n=16), 16,
                  dict(dt_range=(5e-4, 0.5), with_D=False, with_h0=False, seed=2), False, 1), dtype=torch.float16)
def test_property_matches_recurrence_half_precision(problem, dtype):
    """As the fp32 property test, with x, B and C in bf16 or fp16 (the truth takes the same rounded inputs:
    what is measured is the kernel's own rounding, of its dot operands and outputs), fewer draws. Where
    the problem is ill-conditioned (rounding the inputs alone moves a result by more than the tolerance),
    the error may be up to 4 times what rounding alone does; ∂L/∂A, a sum of one term per token whose terms
    the kernel computes from rounded dot operands, may err by 2 rounding units per unit of its cancellation
    (`dA_cancellation`)."""
    inputs, errs = compare_draw(problem, dtype)
    _, _, opts, use_final, _ = problem
    allowance = {"dA": 2 * ROUNDING_UNIT[dtype] * dA_cancellation(inputs, dtype, use_final, seed=opts["seed"])}
    assert_close(errs, dtype, rounding_sensitivity(inputs, dtype, use_final, seed=opts["seed"]), allowance)


def test_rounding_sensitivity_finds_the_ill_conditioned_draw():
    """The allowance of the half-precision property test is only where rounding the inputs alone moves the
    truth by more than the tolerance: on a well-conditioned problem it moves nothing by more than a few
    rounding units; on the seqlen-1 draw it moves ∂L/∂dt by ~36 fp16 units (1.8e-2; ∂L/∂B by 6.2e-3)."""
    well = rounding_sensitivity(make_problem(2, 45, 4, 8, 2, 16, dt_range=(1e-3, 2.0), seed=11), torch.float16)
    assert max(well.values()) < 4 * ROUNDING_UNIT[torch.float16] < TOL[torch.float16] / 2
    shape, _, opts, use_final, _ = SEQLEN_1_DRAW
    ill = rounding_sensitivity(make_problem(**shape, **opts), torch.float16, use_final, seed=opts["seed"])
    assert ill["ddt"] > 30 * ROUNDING_UNIT[torch.float16] and ill["ddt"] > 3 * TOL[torch.float16], ill
    assert ill["dx"] < 4 * ROUNDING_UNIT[torch.float16], ill  # (x's gradient does not depend on x)
    # ∂L/∂A's allowance: its terms cancel 13-fold on session 21's draw, ~2–10-fold on ordinary ones
    assert dA_cancellation(make_problem(1, 68, 2, 4, 2, 16, dt_range=(5e-4, 0.5), with_D=False, with_h0=False, seed=2),
                           torch.float16, use_final=False, seed=2) == pytest.approx(13.12, abs=0.01)
    assert 1 <= dA_cancellation(make_problem(2, 45, 4, 8, 2, 16, dt_range=(1e-3, 2.0), seed=12), torch.float16) < 5


class _TorchWithPoisonedEmpty:
    """`torch`, except that `empty` and `empty_like` return NaN-filled tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


@pytest.mark.parametrize("with_D", [True, False], ids=["D", "no_D"])
def test_no_unwritten_buffer_entry_is_read(monkeypatch, with_D):
    """No buffer is zero-filled: every entry a program reads must have been written by another one.
    With every `torch.empty` buffer full of NaN, a single stray read would show in the results."""
    monkeypatch.setattr(K, "torch", _TorchWithPoisonedEmpty())
    # chunk 64: two row tiles in the dC kernel; seqlen 85: a partial last chunk
    pb = make_problem(2, 64 + 21, 4, 8, 2, 16, with_D=with_D, seed=5)
    assert_close(run_and_compare(pb, 64), torch.float32)


def test_launch_counts():
    """At batch 1 a call costs its launches (host time), not GPU time: the forward is
    4 Triton programs (stage 1 runs inside stage 2's) and nothing else; the backward 8 programs (S_c and
    CB are kept from the forward; the last adds up the partial sums of ∂L/∂A and ∂L/∂D, and those of ∂L/∂B
    and ∂L/∂C over 2 splits of the heads) and nothing else (the inputs are fp32: no cast)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    not_launches = {"empty", "empty_like", "empty_strided", "view", "select", "slice", "detach", "alias",
                    "as_strided", "expand", "unsqueeze", "squeeze", "permute", "t", "lift_fresh"}
    programs, torch_ops = [], []

    class CountOps(TorchDispatchMode):  # the PyTorch operators called outside the Triton programs
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not programs or programs[-1] != "running":
                if func.__name__.split(".")[0] not in not_launches:
                    torch_ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):  # (the interpreter's own PyTorch calls are not counted)
        programs.append("running")
        try:
            return run(self, *args, **kwargs)
        finally:
            programs[-1] = self.fn.__name__

    pb = make_problem(1, 70, 4, 8, 1, 16, with_h0=False)
    inp = {k: v.float().requires_grad_() for k, v in pb.items() if v is not None}
    dy = torch.randn(1, 70, 4, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpretedFunction, "run", counting_run)
        with CountOps():
            y = ssd_chunk_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 32, D=inp["D"])
        forward, programs[:], forward_ops, torch_ops[:] = programs[:], [], torch_ops[:], []
        with CountOps():
            y.backward(dy)
    # (on a CPU `_check` reads the signs of dt and A; on CUDA it does not, so a GPU call makes no PyTorch op)
    sign_check = ["gt.Scalar", "any.default", "_local_scalar_dense.default"] + \
                 ["lt.Scalar", "any.default", "_local_scalar_dense.default"]
    assert len(forward) == 4 and forward_ops == sign_check, (forward, forward_ops)
    assert K._head_splits(4, 3, torch.device("cpu")) == 2
    assert len(programs) == 8 and programs[-1] == "_grad_sums_kernel" and not torch_ops, (programs, torch_ops)


# --------------------------------------------------------------------------------------------------
# the contract's corners
# --------------------------------------------------------------------------------------------------
def _strided(t):
    """t's values in a tensor of other strides: every other entry of a longer one (1-D), or stored with its
    axes in reverse order (column-major); an expanded tensor (a stride 0) is kept as it is."""
    if 0 in t.stride():
        return t
    if t.dim() == 1:
        wide = torch.zeros(2 * t.shape[0], dtype=t.dtype)
        wide[::2] = t
        return wide[::2]
    reverse = tuple(range(t.dim()))[::-1]
    return t.permute(reverse).contiguous().permute(reverse)


def test_inputs_of_any_strides_give_the_results_of_contiguous_ones():
    """Every input may be a view (the programs read contiguous tensors: the wrapper copies), D and the initial
    state too: without their copies, y was off by 1.9 and no other test noticed."""
    pb = {k: v.float() for k, v in make_problem(2, 20, 2, 4, 1, 8).items()}
    pb["B"] = pb["B"][:, :1].expand_as(pb["B"])  # (a stride 0 along the sequence)
    results = []
    for inputs in (pb, {k: _strided(v) for k, v in pb.items()}):
        leaves = {k: v.requires_grad_() for k, v in inputs.items()}
        y, final = ssd_chunk_scan(*(leaves[k] for k in ("x", "dt", "A", "B", "C")), 16, D=leaves["D"],
                                  initial_state=leaves["initial_state"], return_final_state=True)
        (y.sum() + (final * 0.5).sum()).backward()
        results.append([y, final, *(leaves[k].grad for k in sorted(leaves))])
        pb = {k: v.detach() for k, v in pb.items()}
    assert all(not v.is_contiguous() for v in inputs.values())
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_sequence_returns_the_initial_state():
    pb = make_problem(1, 0, 2, 4, 1, 8)
    y, final = ssd_chunk_scan(pb["x"].float(), pb["dt"].float(), pb["A"].float(), pb["B"].float(),
                              pb["C"].float(), 16, initial_state=pb["initial_state"].float(), return_final_state=True)
    assert y.shape == (1, 0, 2, 4) and torch.equal(final, pb["initial_state"].float())
    h0 = pb["initial_state"].float()  # (fp32 already: the final state must still be a copy, as ssd_chunked's)
    _, final = ssd_chunk_scan(pb["x"].float(), pb["dt"].float(), pb["A"].float(), pb["B"].float(),
                              pb["C"].float(), 16, initial_state=h0, return_final_state=True)
    assert final.data_ptr() != h0.data_ptr() and torch.equal(final, h0)
    # no initial state: the zero state, in fp32 whatever x's dtype (as ssd_chunked's)
    y, final = ssd_chunk_scan(*(pb[k].to(torch.bfloat16 if k in ("x", "B", "C") else torch.float32)
                                for k in ("x", "dt", "A", "B", "C")), 16, return_final_state=True)
    assert y.shape == (1, 0, 2, 4) and y.dtype == torch.bfloat16
    assert final.dtype == torch.float32 and torch.equal(final, torch.zeros(1, 2, 4, 8))


def test_a_second_derivative_is_refused_not_silently_zero():
    """The backward is kernels, not differentiable ops: a gradient of the gradients (create_graph=True)
    treated them as constants, so in a loss with other terms (here x³) their part of the second derivative
    was silently missing. It raises instead (once_differentiable)."""
    pb = {k: v.float() for k, v in make_problem(1, 20, 2, 4, 1, 8).items()}
    leaves = [pb[k].clone().requires_grad_() for k in ("x", "dt", "A", "B", "C")]
    loss = ssd_chunk_scan(*leaves, 16).square().sum() + leaves[0].pow(3).sum()
    (gx,) = torch.autograd.grad(loss, leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_bad_inputs_fail_clearly(monkeypatch):
    pb = {k: v.float() for k, v in make_problem(1, 20, 2, 4, 1, 8).items()}
    args = [pb[k] for k in ("x", "dt", "A", "B", "C")]
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        ssd_chunk_scan(args[0].double(), *args[1:], 16)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunk_scan(*args, 0)
    with pytest.raises(ValueError, match="chunk_size"):  # (a bool is an int, but not a chunk size)
        ssd_chunk_scan(*args, True)
    with pytest.raises(ValueError, match="D must be \\(nheads,\\)"):  # (it read D past its end for head 1)
        ssd_chunk_scan(*args, 16, D=torch.ones(1))
    with pytest.raises(TypeError, match="D must be a real floating-point tensor"):  # (was a KeyError: 'complex64')
        ssd_chunk_scan(*args, 16, D=torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="dt must be ≥ 0"):  # (on CPU; the programs would clamp the decays)
        ssd_chunk_scan(args[0], -args[1], *args[2:], 16)
    assert torch.equal(ssd_chunk_scan(*args, np.int64(16)), ssd_chunk_scan(*args, 16))  # (as ssd_chunked takes it)
    with pytest.raises(ValueError, match="B is on meta but x is on cpu"):  # (on a GPU: another device's memory)
        ssd_chunk_scan(*args[:3], args[3].to("meta"), args[4], 16)
    with pytest.raises(ValueError, match="ngroups"):
        ssd_chunk_scan(args[0], args[1], args[2], pb["B"].repeat(1, 1, 3, 1), pb["C"].repeat(1, 1, 3, 1), 16)
    # more (batch element, chunk) pairs than a CUDA grid's 2nd axis holds: refused before any launch
    big = make_problem(2, 32768, 1, 1, 1, 1, with_h0=False)
    with pytest.raises(ValueError, match="batch × chunks = 2 × 32768 exceeds 65535.*larger chunk_size"):
        ssd_chunk_scan(*(big[k].float() for k in ("x", "dt", "A", "B", "C")), 1)
    monkeypatch.setattr(K, "_MAX_GRID_Y", 4)  # (the limit itself is allowed: 2 × 2 chunks run, 2 × 3 do not)
    for l, chunks in ((32, None), (33, 3)):
        args = [big[k].float() if k == "A" else big[k][:, :l].float() for k in ("x", "dt", "A", "B", "C")]
        if chunks is None:
            assert ssd_chunk_scan(*args, 16).shape == (2, 32, 1, 1)
        else:
            with pytest.raises(ValueError, match="batch × chunks = 2 × 3 exceeds 4"):
                ssd_chunk_scan(*args, 16)


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    code = ("import torch; from kernels import ssd_chunk_scan; "
            "ssd_chunk_scan(torch.randn(1, 4, 2, 4), torch.rand(1, 4, 2), -torch.rand(2), "
            "torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), 16)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode != 0 and "needs CUDA tensors" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr


# --------------------------------------------------------------------------------------------------
# the whole model: the "triton" backend gives the "torch" backend's loss and gradients
# --------------------------------------------------------------------------------------------------
def test_model_gradients_triton_backend_equal_torch_backend(caplog):
    from minimamba import Mamba2Config, Mamba2LM

    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=100, d_state=16, headdim=16, ngroups=2, chunk_size=16)
    torch.manual_seed(0)
    ref = Mamba2LM(cfg, backend="torch")
    with torch.no_grad():  # non-trivial D, dt_bias and A
        for layer in ref.layers:
            for prm in (layer.mixer.D, layer.mixer.dt_bias, layer.mixer.A_log):
                prm.add_(0.5 * torch.randn_like(prm))
    tri = Mamba2LM(cfg, backend="triton")
    tri.load_state_dict(ref.state_dict())
    assert tri.scan_backend(torch.device("cpu")) == "triton"

    ids = torch.randint(0, 100, (2, 37))  # 37: three chunks, the last one partial
    losses = []
    for model in (ref, tri):
        with caplog.at_level("INFO", logger="minimamba"):
            logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    # which backend ran, and how the Triton programs were launched, is said
    assert "SSD scan backend = torch (requested)" in caplog.text
    assert ("SSD scan backend = triton (requested; launches: all through Triton (under the interpreter there "
            "are no binaries))") in caplog.text
    grads_ref = dict(ref.named_parameters())
    for name, prm in tri.named_parameters():
        err = rel_err(prm.grad, grads_ref[name].grad.double())
        assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"


# --------------------------------------------------------------------------------------------------
# the GPU benchmark script, on tiny shapes under the interpreter (so that it cannot fail on the GPU
# for a silly reason); mamba_ssm is stood in for by the reference with mamba_ssm's signature
# --------------------------------------------------------------------------------------------------
def test_bench_help_names_the_command_and_lists_the_shapes(capsys):
    """It said `usage: bench.py` and "among the shapes above" with no shapes listed."""
    from kernels import bench

    with pytest.raises(SystemExit) as stop:
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0 and text.startswith("usage: python -m kernels.bench ")
    for shape in bench.REAL_SHAPES + bench.BATCHED_SHAPES + bench.SMOKE_SHAPES + bench.SMOKE_BATCHED_SHAPES:
        assert f"{shape[1]}x{shape[2]}" in text.split("--shape BxL", 1)[1]
    # it called 8x2048 "timed only", and the run checks it (the first batched shape: see
    # test_bench_runs_the_shapes_asked_for_and_fails_only_on_ours)
    first = bench.BATCHED_SHAPES[0]
    assert "timed only" not in text and f"checked too: {first[1]}x{first[2]} unless --shape leaves it out" in text


def test_bench_script_runs_on_cpu(tmp_path, monkeypatch, capsys):
    from kernels import bench
    from minimamba.ssd import ssd_chunked

    def fake_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, initial_states=None):
        return ssd_chunked(x, dt, A, B, C, D=D, initial_state=initial_states, chunk_size=chunk_size)[0]

    monkeypatch.setattr(bench, "load_mamba_ssm", lambda: (fake_mamba_chunk_scan_combined, None))
    # under the interpreter each program has one config, so nothing is benchmarked: stand in for what
    # Triton's autotuner records on a GPU, to check that the bench reports it
    cfg = K._chunk_scan_bwd_dc_kernel.configs[0]
    monkeypatch.setattr(K._chunk_scan_bwd_dc_kernel, "configs_timings", {cfg: [0.25, 0.2, 0.3]}, raising=False)
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-smoke", "--cuda-graphs", "--out", str(out), "--baseline", K.__file__,
                       "--baseline", K.__file__]) == 0
    report = json.loads(out.read_text())
    # checked: the batch-1 shapes (bf16, fp32), then the first batched one; each by this version, then
    # by each --baseline version
    assert [(r["batch"], r["seqlen"], r.get("version")) for r in report["correctness"]] == [
        (b, l, v) for b, l in [(1, 40), (2, 33), (2, 20)] for v in (None, "baseline", "baseline2")]
    assert all(r["ok"] and r["repeat_identical"] for r in report["correctness"])
    assert report["correctness"][0]["mamba_ssm_y_error"] < 1e-2
    assert all("mamba_ssm_y_error" not in r for r in report["correctness"] if "version" in r)
    assert [(r["batch"], r["seqlen"]) for r in report["timings"]] == [(1, 40), (2, 20)]  # batch 1, then batched
    for row in report["timings"]:
        impls = {"torch", "ours", "mamba_ssm", "baseline", "baseline2"}
        assert set(row["fwd_ms"]) == set(row["fwd_bwd_ms"]) == set(row["host_wall_ms"]) == impls
        assert all(v > 0 for t in row["host_wall_ms"].values() for v in t.values())
        assert not row["failures"]
        assert row["fwd_bwd_speedup_vs_torch"] > 0 and row["fwd_bwd_ratio_vs_mamba_ssm"] > 0
        assert "chunk_scan_fwd_kernel" in row["ours_configs"]
        assert row["ours_config_ms"] == {"chunk_scan_bwd_dc_kernel": {str(cfg): 0.25}}
        # --cuda-graphs (on CPU each "replay" is the eager call again: the same bits, for ours and torch)
        assert set(row["graphed_fwd_bwd_ms"]) == {"torch", "ours", "baseline", "baseline2"}
        assert all(v > 0 for v in row["graphed_fwd_bwd_ms"].values())
        assert all(row["graph_replay_identical"].values())
    assert not report["failures"]
    printed = capsys.readouterr().out
    assert "PASS" in printed and "Timings" in printed and "idle GPU" in printed and "FAIL " not in printed
    assert "replayed from a CUDA graph" in printed and "each 'replay' is the eager call" in printed
    assert f"autotuner, chunk_scan_bwd_dc_kernel: {cfg} 0.250 ms" in printed
    assert f"--baseline {K.__file__} as 'baseline2' (median ms" in printed
    assert all(r["fwd_bwd_ratio_vs_baseline"] > 0 and r["fwd_bwd_ratio_vs_baseline2"] > 0 for r in report["timings"])
    assert report["baselines"] == {"baseline": K.__file__, "baseline2": K.__file__}


def test_bench_graph_check_catches_a_replay_that_differs():
    """`graphed_fwd_bwd` compares a replay's gradients with an eager call's: a replay that computes
    nothing (the gradients stay as the capture left them) or computes something else is caught."""
    from kernels import bench
    from minimamba.ssd import ssd_chunked

    def scan(*a, **k):
        return ssd_chunked(*a[:5], chunk_size=a[5], **k)[0]

    inp = bench.make_inputs(1, 20, 2, 4, 8, 1, torch.float32, torch.device("cpu"))
    inp.pop("initial_state")
    dy = torch.randn(1, 20, 2, 4)
    timed = lambda fn: (fn(), 1.0)[1]  # noqa: E731
    assert bench.graphed_fwd_bwd(scan, inp, dy, 8, timed, capture=lambda fn: fn) == (1.0, True)
    assert bench.graphed_fwd_bwd(scan, inp, dy, 8, timed, capture=lambda fn: (lambda: None)) == (1.0, False)

    def other(fn):  # a replay of another computation: the loss's gradient doubled
        def replay():
            dy.mul_(2)
            fn()
        return replay

    assert bench.graphed_fwd_bwd(scan, inp, dy, 8, timed, capture=other) == (1.0, False)


def test_bench_fails_when_ours_cannot_be_graphed(tmp_path, monkeypatch, capsys):
    """--cuda-graphs: a capture of ours that raises (or a replay that differs) makes the run exit 1; the
    torch reference's own failure would only be recorded. --quick cannot go with it (nothing is timed)."""
    from kernels import bench, ssd_chunk_scan

    def graphed(scan, inp, dy, chunk_size, bench_, capture):
        if scan is not ssd_chunk_scan:
            return 1.0, True
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(bench, "graphed_fwd_bwd", graphed)
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-smoke", "--cuda-graphs", "--no-mamba", "--shape", "2x20", "--out", str(out)]) == 1
    (row,) = json.loads(out.read_text())["timings"]
    assert row["failures"] == {"ours graphed": "RuntimeError: operation not permitted when stream is capturing"}
    assert row["graphed_fwd_bwd_ms"] == {"torch": 1.0} and "ours in a CUDA graph failed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench.main(["--cpu-smoke", "--cuda-graphs", "--quick"])
    assert e.value.code == 2 and "cannot go with --quick" in capsys.readouterr().err


def test_bench_shape_option_keeps_only_the_shapes_asked_for(tmp_path, capsys):
    """`--shape BxL` (a short GPU visit: the shapes an A/B is about): only those are checked and timed;
    a shape the run does not have is refused with the list of those it has."""
    from kernels import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-smoke", "--quick", "--no-mamba", "--shape", "2x20", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["batch"], r["seqlen"]) for r in report["correctness"]] == [(2, 20)] and not report["timings"]
    for bad, says in (("3x7", "3x7 is not among this run's shapes (1x40, 2x20, 2x33)"), ("8by20", "give batch x seqlen")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--cpu-smoke", "--quick", "--shape", bad])
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_bench_quick_prints_no_empty_baseline_timing_table(capsys):
    """With --quick (no timings) and --baseline, each baseline's timing header was printed with no row under it."""
    from kernels import bench

    report = dict(correctness=[], timings=[], baselines={"baseline": "old.py"}, mamba_ssm=True, failures=[])
    bench.print_tables(report)
    assert "old.py" not in capsys.readouterr().out


def test_bench_rounds_time_every_implementation_in_turns(tmp_path, capsys, monkeypatch):
    """`--rounds N`: each implementation timed N times, in turns (torch, ours, torch, ours, ...), the
    tables keeping the median of the rounds and the JSON every round's reading; N < 1 is refused."""
    from kernels import bench

    order, time_one = [], bench.time_one
    monkeypatch.setattr(bench, "time_one", lambda scan, *a: order.append(scan) or time_one(scan, *a))
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-smoke", "--no-mamba", "--shape", "2x20", "--rounds", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["timings"]
    assert order == [order[0], order[1]] * 3 and order[0] is not order[1]
    for impl in ("torch", "ours"):
        for kind in ("fwd_ms", "fwd_bwd_ms"):
            readings = row["rounds_ms"][impl][kind]
            assert len(readings) == 3 and all(ms > 0 for ms in readings)
            assert row[kind][impl] == sorted(readings)[1]
    assert "in each round" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench.main(["--cpu-smoke", "--rounds", "0"])
    assert e.value.code == 2 and "--rounds must be at least 1" in capsys.readouterr().err


def test_bench_checks_a_baseline_version_older_than_direct_launches(tmp_path):
    """Versions of kernels/ssd_triton.py before session 5 have no DIRECT_LAUNCH switch: the bench checks
    and times them all the same (here a module with only `ssd_chunk_scan`, as such a version looks to it)."""
    from kernels import bench

    old = tmp_path / "old.py"
    old.write_text("from kernels.ssd_triton import ssd_chunk_scan  # noqa: F401\n")
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-smoke", "--quick", "--no-mamba", "--shape", "2x20", "--baseline", str(old),
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["correctness"]
    assert [(r.get("version"), r["ok"]) for r in rows] == [(None, True), ("baseline", True)]


def test_bench_fails_a_baseline_version_that_computes_something_else(tmp_path, capsys):
    """An A/B keeps the faster version: the bench checks each --baseline version too, and says which
    one is wrong (here a copy of the kernel module whose y is 10% too large)."""
    from kernels import bench

    wrong = tmp_path / "wrong.py"
    wrong.write_text(Path(K.__file__).read_text() + textwrap.dedent("""
        _right = ssd_chunk_scan


        def ssd_chunk_scan(*args, **kwargs):
            y, final = _right(*args, **{**kwargs, "return_final_state": True})
            return (y * 1.1, final) if kwargs.get("return_final_state") else y * 1.1
        """))
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-smoke", "--quick", "--no-mamba", "--shape", "2x20", "--baseline", str(wrong),
                       "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["correctness"]
    assert [(r.get("version"), r["ok"]) for r in rows] == [(None, True), ("baseline", False)]
    assert rows[1]["errors"]["y"] > 0.05 and rows[1]["errors"]["final"] < 3e-2
    assert "FAIL smoke [baseline] b2 l20" in capsys.readouterr().out


def test_bench_host_breakdown_under_the_interpreter(tmp_path, capsys):
    """`--host-breakdown` splits ours' forward+backward host time; under the interpreter there is no
    launcher to time (tests/test_offline.py times the stand-in driver's), the rest is still split."""
    from kernels import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-smoke", "--no-mamba", "--shape", "2x20", "--host-breakdown", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["host_breakdown"]
    assert (row["batch"], row["seqlen"], row["version"]) == (2, 20, "ours")
    assert row["in_launcher"] is None and row["launches"] is None
    assert 0 < row["autograd_floor"] < row["host"] and row["python"] == pytest.approx(row["host"] - row["autograd_floor"])
    assert row["allocations"] > 0 and row["per_allocation"] > 0
    assert "Host time of one forward+backward, split" in capsys.readouterr().out


def _stub_measurements(bench, monkeypatch):
    """bench.check and bench.time_one answering at once (the tests below are about what the bench does
    around them); returns the list of (event, ...) they and bench.retune_ours record."""
    events = []

    def check(shape, device, scan, module=None):
        events.append(("check", shape[1], shape[2]))
        return dict(errors={"y": 0.0}, tolerance=1e-2, repeat_identical=True, ok=True)

    def time_one(scan, inp, dy, chunk_size, bench_, device):
        events.append(("time", scan))
        return dict(fwd_ms=1.0, fwd_bwd_ms=2.0, fwd_host_ms=0.5, fwd_wall_ms=1.0, fwd_bwd_host_ms=1.0, fwd_bwd_wall_ms=2.0)

    monkeypatch.setattr(bench, "check", check)
    monkeypatch.setattr(bench, "time_one", time_one)
    monkeypatch.setattr(bench, "retune_ours", lambda *variants: events.append(("retune",)))
    return events


def test_bench_checks_each_shape_with_the_configs_tuned_for_it(monkeypatch):
    """The autotuners' keys hold no batch or seqlen: a shape checked without forgetting their choices is
    checked with the configs tuned at the shape before (on the H100, 1 × 2048's chunk_cb and dCB configs at
    8 × 2048, where the timings tune and use others). Each shape is checked after a retune, as it is timed."""
    from kernels import bench

    events = _stub_measurements(bench, monkeypatch)
    assert bench.main(["--cpu-smoke", "--quick", "--no-mamba"]) == 0
    assert events == [e for b, l in [(1, 40), (2, 33), (2, 20)] for e in [("retune",), ("check", b, l)]]


def test_bench_exits_1_when_a_version_fails_to_run_where_it_is_timed(tmp_path, monkeypatch, capsys):
    """A version that passes the checks but fails where it is timed (2 × 8192 is timed only) fails the
    run, as a replay that differs does; the torch reference's own failure is only recorded. A phase that
    fails (here the host breakdown) fails the run too, and the tables are still printed."""
    from kernels import bench

    events = _stub_measurements(bench, monkeypatch)
    time_one = bench.time_one
    variant = bench.load_variant(K.__file__, "ssd_triton_baseline")
    monkeypatch.setattr(bench, "load_variant", lambda path, name: variant)

    def fails_for(which):
        def timed(scan, *a):
            if scan is which or (which == "torch" and scan not in (K.ssd_chunk_scan, variant.ssd_chunk_scan)):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return time_one(scan, *a)
        return timed

    args = ["--cpu-smoke", "--no-mamba", "--shape", "2x20", "--baseline", K.__file__, "--out", str(tmp_path / "b.json")]
    monkeypatch.setattr(bench, "time_one", fails_for(variant.ssd_chunk_scan))
    assert bench.main(args) == 1
    (row,) = json.loads((tmp_path / "b.json").read_text())["timings"]
    assert list(row["failures"]) == ["baseline"] and set(row["fwd_ms"]) == {"torch", "ours"}
    monkeypatch.setattr(bench, "time_one", fails_for("torch"))
    assert bench.main(args) == 0
    (row,) = json.loads((tmp_path / "b.json").read_text())["timings"]
    assert list(row["failures"]) == ["torch"]

    def no_launcher(*a, **k):
        raise AttributeError("'CudaDriver' object has no attribute 'launcher_cls'")

    monkeypatch.setattr(bench, "time_one", time_one)
    monkeypatch.setattr(bench, "host_breakdown", no_launcher)
    monkeypatch.setattr(bench, "graphed_fwd_bwd", lambda *a: (1.0, True))
    capsys.readouterr()
    assert bench.main(args + ["--host-breakdown", "--cuda-graphs"]) == 1  # (before: KeyError 'host' in the tables)
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["host_breakdown"] == [] and report["failures"] == [
        "host breakdown smoke b2 seqlen 20: AttributeError: 'CudaDriver' object has no attribute 'launcher_cls'"]
    printed = capsys.readouterr().out
    assert "replayed from a CUDA graph" in printed and "FAILED: host breakdown smoke b2 seqlen 20" in printed
    assert events  # (the stubs ran)


def test_bench_float32_check_fails_tf32_dots():
    """The fp32 check on the GPU is there for the IEEE dots (fp32 operands not rounded to TF32): a scan
    whose dot operands x, B and C are rounded to TF32 (10 mantissa bits; the reference with its
    gradients passed straight through) must fail it. With a tolerance of 1e-3 it passed (errors 3e-4 to
    6e-4, at the 370m fp32 shape as here)."""
    import types

    from kernels import bench
    from minimamba.ssd import ssd_chunked

    class TF32(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            i = t.contiguous().view(torch.int32)
            return ((i + 0x1000) & ~0x1FFF).view(torch.float32)

        @staticmethod
        def backward(ctx, g):
            return g

    def scan(x, dt, A, B, C, chunk_size, D=None, initial_state=None, return_final_state=False):
        y, final = ssd_chunked(TF32.apply(x), dt, A, TF32.apply(B), TF32.apply(C), D=D, initial_state=initial_state,
                               chunk_size=chunk_size)
        return (y, final) if return_final_state else y

    shape = next(s for s in bench.SMOKE_SHAPES if s[8] == torch.float32)
    result = bench.check(shape, torch.device("cpu"), scan, types.SimpleNamespace())
    assert not result["ok"] and min(result["errors"].values()) > 1e-4, result["errors"]


# the bench's arithmetic, checked against numbers worked by hand: stand-ins for the clock, the timer, the
# GPU's synchronize and Triton's launcher make every reading known in advance (nothing here times anything)
class _FakeClock:
    """In place of the `time` module in kernels.bench: a clock that moves only when a test moves it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    time = perf_counter

    def advance_ms(self, ms):
        self.now += ms / 1e3


def _exact_scan(*wrongs):
    """A scan with ssd_chunk_scan's signature that computes in float32 with the reference itself, with
    `wrongs` applied: "y" or "final" scaled by 1 + 1e-3, or an input's name, whose gradient is scaled so;
    "y doubled"; "final detached" (no gradient through the final state)."""
    from minimamba.ssd import ssd_chunked

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g * (1 + 1e-3)

    def scan(x, dt, A, B, C, chunk_size, D=None, initial_state=None, return_final_state=False):
        t = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state)
        t = {k: (ScaleGrad.apply(v) if k in wrongs else v).float() for k, v in t.items()}
        y, final = ssd_chunked(**t, chunk_size=chunk_size)
        y, final = y * (1 + 1e-3 * ("y" in wrongs)), final * (1 + 1e-3 * ("final" in wrongs))
        if "y doubled" in wrongs:
            y = y * 2
        if "final detached" in wrongs:
            final = final.detach()
        return (y, final) if return_final_state else y

    return scan


def test_bench_rel_err_is_the_largest_difference_over_the_largest_reference_value():
    from kernels import bench

    ours, ref = torch.tensor([-3.0, 1.5]), torch.tensor([-4.0, 1.0])  # max|Δ| = 1, max|ref| = 4 (of -4)
    assert bench.rel_err(ours, ref) == 0.25 and bench.rel_err(ours.bfloat16(), ref) == 0.25


def test_bench_check_compares_every_output_and_gradient_with_the_float32_reference():
    """`check` against scans computed by the reference itself: exact in float32 (every error 0; in bf16 y and
    the final state too, the reference being computed in float32 from the same rounded inputs), then wrong
    by 1e-3 in any one output or gradient, or without the gradient through the final state: refused."""
    import types

    from kernels import bench

    fp32 = next(s for s in bench.SMOKE_SHAPES if s[8] == torch.float32)
    bf16 = next(s for s in bench.SMOKE_SHAPES if s[8] == torch.bfloat16)
    cpu, module = torch.device("cpu"), types.SimpleNamespace()
    result = bench.check(fp32, cpu, _exact_scan(), module)
    outputs = {"y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dinitial_state"}
    assert set(result["errors"]) == outputs and set(result["errors"].values()) == {0.0}
    assert result["ok"] and result["repeat_identical"] and result["tolerance"] == 1e-4
    result = bench.check(bf16, cpu, _exact_scan(), module)
    assert result["ok"] and result["errors"]["y"] == result["errors"]["final"] == 0.0
    for wrong in ["y", "final", "x", "dt", "A", "B", "C", "D", "initial_state"]:
        result = bench.check(fp32, cpu, _exact_scan(wrong), module)
        key = wrong if wrong in ("y", "final") else "d" + wrong
        assert not result["ok"] and result["errors"][key] == pytest.approx(1e-3, rel=0.05), (wrong, result["errors"])
    result = bench.check(fp32, cpu, _exact_scan("final detached"), module)
    assert not result["ok"] and result["errors"]["final"] == 0.0, result["errors"]
    assert bench.check(fp32, cpu, _exact_scan("y doubled"), module)["errors"]["y"] == pytest.approx(1.0)  # (not 1/2)


def test_bench_check_launches_through_triton_then_directly_and_compares_the_direct_calls():
    """The checked call goes through Triton (DIRECT_LAUNCH off), the three after it launch directly
    (the switch restored): the first keeps the binaries, the next two (by their keys, by their launch
    plan) must give the checked call's bits, gradients included; the switch is restored after a failure."""
    import types

    from kernels import bench

    shape = next(s for s in bench.SMOKE_SHAPES if s[8] == torch.float32)
    module, exact = types.SimpleNamespace(DIRECT_LAUNCH=True), _exact_scan()

    def scan_differing_at(call, which="B"):
        seen, wrong = [], _exact_scan(which)

        def scan(*a, **k):
            seen.append(module.DIRECT_LAUNCH)
            return (wrong if len(seen) == call else exact)(*a, **k)

        return seen, scan

    seen, scan = scan_differing_at(None)
    result = bench.check(shape, torch.device("cpu"), scan, module)
    assert seen == [False, True, True, True] and module.DIRECT_LAUNCH is True and result["ok"]
    for call, which, identical in [(2, "B", True), (3, "B", False), (4, "B", False), (4, "y", False)]:
        result = bench.check(shape, torch.device("cpu"), scan_differing_at(call, which)[1], module)
        assert result["repeat_identical"] is identical and result["ok"] is identical, (call, which)
    old = types.SimpleNamespace()  # (a version without the switch: one call after the kept one)
    seen, scan = scan_differing_at(3)
    assert bench.check(shape, torch.device("cpu"), scan, old)["repeat_identical"] is False
    assert len(seen) == 3 and not hasattr(old, "DIRECT_LAUNCH")

    def fails(*a, **k):
        raise RuntimeError("out of resources")

    with pytest.raises(RuntimeError):
        bench.check(shape, torch.device("cpu"), fails, module)
    assert module.DIRECT_LAUNCH is True


def test_bench_mamba_y_error_is_against_the_reference_with_d_and_the_initial_state():
    from kernels import bench
    from minimamba.ssd import ssd_chunked

    def mamba(scale):
        def scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None):
            return scale * ssd_chunked(x, dt, A, B, C, D=D, initial_state=initial_states, chunk_size=chunk_size)[0]
        return scan

    shape = next(s for s in bench.SMOKE_SHAPES if s[8] == torch.float32)
    assert bench.mamba_y_error(shape, torch.device("cpu"), mamba(1.0)) == 0.0
    assert bench.mamba_y_error(shape, torch.device("cpu"), mamba(2.0)) == pytest.approx(1.0)


def test_bench_timer_and_host_and_wall_times(monkeypatch):
    """On CPU one call after a warm-up one; on CUDA triton's do_bench, median; host and wall times: medians
    over 20 calls of the time to issue the call, and until the GPU is done (here 5 ms after it is issued;
    `reset`, before each call, untimed, leaves 7 ms of GPU work that must be waited for before)."""
    import triton.testing

    from kernels import bench

    clock, gpu = _FakeClock(), {"pending": 0.0}
    monkeypatch.setattr(bench, "time", clock)
    calls = []
    once = bench.timer(torch.device("cpu"))
    assert once(lambda: calls.append(clock.advance_ms(3))) == pytest.approx(3.0) and len(calls) == 2
    given = {}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: given.update(kw, fn=fn) or 1.5)
    fn, leaves = (lambda: None), [torch.zeros(1)]
    assert bench.timer(torch.device("cuda"))(fn, grad_to_none=leaves) == 1.5
    assert given["fn"] is fn and given["grad_to_none"] is leaves and given["return_mode"] == "median"

    def sync():
        clock.advance_ms(gpu["pending"])
        gpu["pending"] = 0.0

    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    host_ms = iter([7, 19, 3, 12, 1, 20, 5, 16, 9, 14, 2, 18, 6, 11, 4, 17, 8, 13, 10, 15])  # 1..20, shuffled

    def call():  # (its GPU work queued after what is pending)
        clock.advance_ms(next(host_ms))
        gpu["pending"] += 5.0

    def reset():
        resets.append(clock.advance_ms(100))
        gpu["pending"] = 7.0

    resets = []
    assert bench.host_and_wall_ms(call, torch.device("cuda"), reset) == (pytest.approx(11), pytest.approx(16))
    assert len(resets) == 20


def test_bench_time_one_times_the_forward_and_the_forward_backward(monkeypatch):
    """`time_one`: the forward timed without autograd, the forward+backward with the gradients of every
    input set to None (by the timer, and by `reset` for the host and wall times), each under its own name."""
    from kernels import bench

    count = {"fwd": 0, "bwd": 0, "grad": []}

    class Counted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            count["fwd"] += 1
            return x * 2

        @staticmethod
        def backward(ctx, g):
            count["bwd"] += 1
            return g * 2

    def scan(x, dt, A, B, C, chunk_size, D=None):
        count["grad"].append(torch.is_grad_enabled())
        return Counted.apply(x)

    def timed(fn, grad_to_none=None):  # ms = 1 per forward + 1000 per backward of the timed call
        before = count["fwd"], count["bwd"]
        fn()
        given.append(grad_to_none)
        return (count["fwd"] - before[0]) + 1000 * (count["bwd"] - before[1])

    def host_and_wall(fn, device, reset=None):
        resets.append(reset is not None)
        if reset is not None:
            reset()
            assert all(t.grad is None for t in given[-1])
        before = count["bwd"]
        fn()
        return 0.1 + (count["bwd"] - before), 0.2 + (count["bwd"] - before)

    given, resets, shape = [], [], bench.SMOKE_BATCHED_SHAPES[0]
    inp, dy = bench.timing_inputs(shape, torch.device("cpu"))
    monkeypatch.setattr(bench, "host_and_wall_ms", host_and_wall)
    out = bench.time_one(scan, inp, dy, shape[7], timed, torch.device("cpu"))
    assert out == dict(fwd_ms=1, fwd_bwd_ms=1001, fwd_host_ms=0.1, fwd_wall_ms=0.2, fwd_bwd_host_ms=1.1,
                       fwd_bwd_wall_ms=1.2)
    assert count["grad"][:2] == [False, False] and count["grad"][2] is True
    assert given[0] is None and len(given[1]) == 6 and all(t.requires_grad for t in given[1])
    assert resets == [False, True]


def test_bench_graphed_times_the_replay():
    from kernels import bench
    from minimamba.ssd import ssd_chunked

    def scan(*a, **k):
        return ssd_chunked(*a[:5], chunk_size=a[5], **k)[0]

    inp, dy = bench.timing_inputs(bench.SMOKE_BATCHED_SHAPES[0], torch.device("cpu"))
    replays, timed = [], []

    def capture(fn):
        def replay():
            replays.append(1)
            fn()
        return replay

    ms, same = bench.graphed_fwd_bwd(scan, inp, dy, 16, lambda fn: timed.append(fn) or fn() or 2.5, capture)
    assert (ms, same) == (2.5, True) and len(replays) == 2 and timed[0].__name__ == "replay"


def test_bench_host_breakdown_arithmetic(monkeypatch):
    """`host_breakdown` with a stand-in launcher (2 ms a launch, 3 launches a call) and a scan whose calls
    take 10, 40, 20 ms in turn: host the median 20, in the launcher 6, the autograd floor (a stand-in: 5 + 3
    ms) 8, python 20 - 6 - 8; the launcher's __call__ put back after."""
    import itertools
    import types

    from kernels import bench

    clock = _FakeClock()
    monkeypatch.setattr(bench, "time", clock)

    class Launcher:
        def __call__(self, *args):
            clock.advance_ms(2)

    original = Launcher.__call__
    monkeypatch.setattr(type(triton.runtime.driver), "active", types.SimpleNamespace(launcher_cls=Launcher))
    costs = itertools.cycle([10, 40, 20])

    def scan(x, dt, A, B, C, chunk_size, D=None):
        clock.advance_ms(next(costs) - 6)
        for _ in range(3):
            Launcher()()
        torch.empty(3), torch.empty_like(x)
        return x * 1.0

    class NoScan:
        @staticmethod
        def apply(*inputs):
            clock.advance_ms(5)
            return types.SimpleNamespace(backward=lambda dy: clock.advance_ms(3))

    monkeypatch.setattr(bench, "_NoScan", NoScan)
    inp, dy = bench.timing_inputs(bench.SMOKE_BATCHED_SHAPES[0], torch.device("cpu"))
    out = bench.host_breakdown(scan, types.SimpleNamespace(INTERPRET=False), inp, dy, 16, torch.device("cpu"), iters=3)
    assert out == dict(host=pytest.approx(20e3), in_launcher=pytest.approx(6e3), launches=3,
                       autograd_floor=pytest.approx(8e3), allocations=2, per_allocation=0.0,
                       python=pytest.approx(6e3))
    assert Launcher.__call__ is original


def test_bench_counts_allocations_not_other_operations():
    from kernels import bench

    def fn():
        a = torch.empty(2)
        torch.empty_like(a), torch.empty(3, 4), torch.empty_strided((2,), (1,))
        a + 1, a.mul_(2), torch.zeros(3)

    assert bench._count_allocations(fn) == 4


def test_bench_reports_the_autotuners_median_and_retunes_every_version(monkeypatch):
    import copy
    import types

    from kernels import bench

    prog = K._chunk_scan_bwd_dc_kernel
    cfg = prog.configs[0]
    monkeypatch.setattr(prog, "configs_timings", {cfg: [0.25, 0.2, 0.3]}, raising=False)
    monkeypatch.setattr(K._chunk_scan_fwd_kernel, "configs_timings", {cfg: 0.5}, raising=False)
    assert bench.config_timings() == {"chunk_scan_bwd_dc_kernel": {str(cfg): 0.25},
                                      "chunk_scan_fwd_kernel": {str(cfg): 0.5}}
    forgot = []
    monkeypatch.setattr(K, "forget_tuning", lambda: forgot.append("ours"))
    new = types.SimpleNamespace(forget_tuning=lambda: forgot.append("new"))
    old = types.SimpleNamespace(_chunk_scan_bwd_dc_kernel=copy.copy(prog))  # (a version older than forget_tuning)
    old._chunk_scan_bwd_dc_kernel.cache = tuned = {("key",): cfg}
    bench.retune_ours(new, old)
    assert forgot == ["ours", "new"] and tuned == {}


def test_bench_tables_and_json_hold_the_medians_and_ratios_of_the_readings(tmp_path, monkeypatch, capsys):
    """`main` with stand-in measurements whose readings are set by hand (3 rounds; each implementation's
    middle round is its median, its first the smallest, its last the largest): the JSON and the printed
    tables hold the medians, each round's readings, the last round's host and wall times, and the ratios
    torch/ours, mamba_ssm/ours, baseline/ours (mamba_ssm timed into the same row, its y error on ours'
    correctness row only); a CUDA graph replay that differs fails a version (not the torch reference)."""
    from kernels import bench

    _stub_measurements(bench, monkeypatch)
    variant = bench.load_variant(K.__file__, "ssd_triton_baseline")
    monkeypatch.setattr(bench, "load_variant", lambda path, name: variant)

    def mamba(*a, **k):
        raise AssertionError("stubbed: not called")

    monkeypatch.setattr(bench, "load_mamba_ssm", lambda: (mamba, None))
    monkeypatch.setattr(bench, "mamba_y_error", lambda shape, device, m: 0.004 if m is mamba else None)
    readings = {  # impl: (fwd ms of rounds 1, 2, 3; fwd+bwd ms of rounds 1, 2, 3)
        "ours": ([1, 2, 9], [3, 6, 12]), "torch": ([4, 7, 20], [10, 18, 30]),
        "baseline": ([2, 4, 5], [5, 9, 30]), "mamba_ssm": ([1, 3, 8], [2, 12, 13])}
    impl_of = {K.ssd_chunk_scan: "ours", variant.ssd_chunk_scan: "baseline", mamba: "mamba_ssm"}
    rounds = {impl: 0 for impl in readings}

    def time_one(scan, inp, dy, chunk_size, bench_, device):
        impl = impl_of.get(scan, "torch")
        i = rounds[impl]
        rounds[impl] += 1
        return dict(fwd_ms=readings[impl][0][i], fwd_bwd_ms=readings[impl][1][i], fwd_host_ms=i + 0.25,
                    fwd_wall_ms=i + 0.5, fwd_bwd_host_ms=i + 1.25, fwd_bwd_wall_ms=i + 1.5)

    monkeypatch.setattr(bench, "time_one", time_one)
    graphed = {"torch": (6.0, False), "ours": (2.0, True), "baseline": (4.0, False)}
    monkeypatch.setattr(bench, "graphed_fwd_bwd",
                        lambda scan, inp, dy, Q, bench_, capture: graphed[impl_of.get(scan, "torch")])
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-smoke", "--shape", "2x20", "--rounds", "3", "--cuda-graphs", "--baseline", "old.py",
                       "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    (row,) = report["timings"]
    assert row["fwd_ms"] == {"torch": 7, "ours": 2, "baseline": 4, "mamba_ssm": 3}
    assert row["fwd_bwd_ms"] == {"torch": 18, "ours": 6, "baseline": 9, "mamba_ssm": 12}
    assert row["rounds_ms"] == {impl: {"fwd_ms": f, "fwd_bwd_ms": fb} for impl, (f, fb) in readings.items()}
    assert row["host_wall_ms"] == {impl: dict(fwd_host_ms=2.25, fwd_wall_ms=2.5, fwd_bwd_host_ms=3.25,
                                              fwd_bwd_wall_ms=3.5) for impl in readings}
    assert (row["fwd_speedup_vs_torch"], row["fwd_bwd_speedup_vs_torch"]) == (3.5, 3.0)
    assert (row["fwd_ratio_vs_mamba_ssm"], row["fwd_bwd_ratio_vs_mamba_ssm"]) == (1.5, 2.0)
    assert (row["fwd_ratio_vs_baseline"], row["fwd_bwd_ratio_vs_baseline"]) == (2.0, 1.5)
    assert row["graphed_fwd_bwd_ms"] == {"torch": 6.0, "ours": 2.0, "baseline": 4.0}
    assert row["graph_replay_identical"] == {"torch": False, "ours": True, "baseline": False}
    assert row["failures"] == {"baseline graphed": "a CUDA graph replay gave other gradients than the eager call"}
    assert [(r.get("version"), r.get("mamba_ssm_y_error")) for r in report["correctness"]] == [
        (None, 0.004), ("baseline", None)]
    assert report["baselines"] == {"baseline": "old.py"} and not report["failures"]
    lines = capsys.readouterr().out.splitlines()
    table = next(line for line in lines if line.strip().startswith("b2 l20 H2 P8 N16 G1 Q16"))
    assert table.split()[7:] == ("bfloat16 | 7.000 2.000 3.000 | 18.000 6.000 12.000 | 3.5 3.0 | 1.50 2.00").split()
    assert "  b2 l20: fwd 4.000 vs 2.000 (2.00x), f+b 9.000 vs 6.000 (1.50x)" in lines
    assert "  b2 l20 ours       3.000 6.000 12.000" in lines
    assert any(line.split() == "b2 l20 ours | 2.250 2.500 | 3.250 3.500".split() for line in lines)
    assert "  b2 l20: torch 6.000 (not same), ours 2.000, baseline 4.000 (not same)  torch/ours 3.0x" in lines


def test_bench_runs_the_shapes_asked_for_and_fails_only_on_ours(monkeypatch):
    """Checked: the batch-1 shapes and the first batched one; timed: the bf16 batch-1 shapes and every
    batched one (`--shape` keeping those asked for, in either case); each retune forgets the --baseline
    version's configs too; the host breakdown of each version is labelled with it. mamba_ssm failing where
    it is timed is recorded, not a failure of the run."""
    from kernels import bench

    events = _stub_measurements(bench, monkeypatch)
    variant = bench.load_variant(K.__file__, "ssd_triton_baseline")
    monkeypatch.setattr(bench, "load_variant", lambda path, name: variant)
    monkeypatch.setattr(bench, "retune_ours", lambda *variants: events.append(("retune", *variants)))
    timed = dict(fwd_ms=1.0, fwd_bwd_ms=2.0, fwd_host_ms=0.5, fwd_wall_ms=1.0, fwd_bwd_host_ms=1.0, fwd_bwd_wall_ms=2.0)
    monkeypatch.setattr(bench, "time_one", lambda scan, inp, *a: events.append(("time", *inp["x"].shape[:2]))
                        or dict(timed))
    monkeypatch.setattr(bench, "host_breakdown", lambda scan, module, inp, dy, Q, device: events.append(
        ("breakdown", scan is module.ssd_chunk_scan, module, Q)) or dict(
        host=9.0, in_launcher=None, launches=None, autograd_floor=4.0, allocations=24, per_allocation=1.0, python=5.0))
    second, report = ("smoke", 3, 20, 2, 8, 16, 1, 16, torch.bfloat16), {}
    monkeypatch.setattr(bench, "print_tables", report.update)
    monkeypatch.setattr(bench, "SMOKE_BATCHED_SHAPES", bench.SMOKE_BATCHED_SHAPES + [second])

    def run(*args):
        events.clear()
        assert bench.main(["--cpu-smoke", "--no-mamba", "--baseline", "old.py", *args]) == 0
        assert all(e[1:] == (variant,) for e in events if e[0] == "retune")
        return [e for e in events if e[0] in ("check", "time")]

    assert run() == [("check", b, l) for b, l in [(1, 40), (1, 40), (2, 33), (2, 33), (2, 20), (2, 20)]] + [
        ("time", b, l) for b, l in [(1, 40)] * 3 + [(2, 20)] * 3 + [(3, 20)] * 3]  # (torch, ours, baseline)
    assert run("--shape", "1x40", "--quick") == [("check", 1, 40)] * 2
    assert run("--shape", "3X20", "--host-breakdown") == [("check", 3, 20)] * 2 + [("time", 3, 20)] * 3
    assert [e[1:] for e in events if e[0] == "breakdown"] == [(True, K, 16), (True, variant, 16)]
    assert [(r["version"], r["host"]) for r in report["host_breakdown"]] == [("ours", 9.0), ("baseline", 9.0)]

    def mamba(*a, **k):
        raise RuntimeError("mamba_ssm: no kernel image is available")

    monkeypatch.setattr(bench, "load_mamba_ssm", lambda: (mamba, None))
    monkeypatch.setattr(bench, "mamba_y_error", lambda *a: 0.0)
    monkeypatch.setattr(bench, "time_one", lambda scan, *a: mamba() if scan is mamba else dict(timed))
    assert bench.main(["--cpu-smoke", "--shape", "2x20"]) == 0
    (row,) = report["timings"]
    assert row["failures"] == {"mamba_ssm": "RuntimeError: mamba_ssm: no kernel image is available"}

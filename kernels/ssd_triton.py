r"""The chunked SSD scan of Mamba2 in Triton: forward and backward, one program per stage (stages 1
and 2 share one).

Read it next to `minimamba/ssd.py`, whose glossary it uses. For one batch element, head h (of group g)
and chunk c of Q tokens, with t, s the positions inside the chunk, cs the chunk-local cumulative
log-decay and S_in[c] the state entering the chunk, the forward is

    stage 1  cs[t]      = Σ_{k≤t} dt_k·A                                   _chunk_state_kernel (first)
    stage 2  S_c        = Σ_s exp(cs[Q-1] − cs[s])·dt_s · x_s B_sᵀ          _chunk_state_kernel
    stage 3  S_in[c+1]  = exp(cs[Q-1])·S_in[c] + S_c,   S_in[0] = h_0       _state_passing_fwd_kernel
    stage 4  CB[t, s]   = C_t·B_s                                          _chunk_cb_kernel
    stage 5  y_t        = Σ_{s≤t} CB[t,s]·exp(cs[t] − cs[s])·dt_s x_s       _chunk_scan_fwd_kernel
                          + exp(cs[t])·S_in[c] C_t + D·x_t

Against `ssd_chunked`: stage 1 is its `cs` line, stage 2 its step 2, stage 3 its step 3 (S_in[c] is its
`entering[:, c]`, h_c in ssd.py's module docstring, which numbers chunks from 1: chunk c here is its chunk
c+1, entered with h_c, as S_in[0] = h_0), stage 4 the `CB` of
its step 1, and stage 5 the rest of step 1, step 4 and the D skip, fused. In this file h also indexes heads
(Σ_h: a sum over heads; on the host `h` is nheads) and, in the state passes, names the running state, and
matrices of the backward get other letters than the glossary's G (groups) and P (head dimension): Γ, Pre.
The backward differentiates
each stage by hand (the derivation is above the backward programs); it keeps cs, S_c and CB from the
forward and runs stage 3 again (fused into its reverse pass) rather than keep S_in. Stages 1–4 have a
small PyTorch `_ref` next to their kernel that the tests compare them with; the whole scan and every
gradient are compared with autograd through the float64 recurrence `ssd_recurrent` (tests/test_kernels.py).

Launches per call (each costs host time, which is what a batch-1 call spends most of its time on): the
forward 4 Triton programs; the backward 8, the last of which sums what the others left in parts (see
`_ssd_backward`). Every program is launched through `_launch` (kernels/launch.py: the host side, apart
from the math), which goes through Triton (and its autotuner) only the first time a binary is needed and
then calls that binary directly (where `DIRECT_LAUNCH` is on; `DIRECT_LAUNCH_OFF_BECAUSE` says why not,
e.g. under the interpreter); a call like an earlier one takes that call's binaries in order from its
launch plan (`_plan`).

Conventions shared by every program:
  * all tensors are contiguous (the wrapper makes them so), so offsets are computed from the sizes:
      x, y, dy, dx  (batch, seqlen, H, P)     dt, ddt (batch, seqlen, H)     B, C (batch, seqlen, G, N)
      cs and every per-token fp32 buffer (batch, H, nchunks, Q)
      CB (batch, nchunks, G, Q, Q)            states (batch, nchunks, H, P, N)
  * a program that uses `tl.dot` covers the whole head dimension P and state dimension N (padded to
    powers of two ≥ 16, the smallest `tl.dot` tile); its tiles run along the sequence only (the two
    state passes instead tile the flattened P·N state);
  * the last chunk may be partial: positions ≥ seqlen are loaded as 0, in particular dt = 0, so cs
    stays constant after the last token and cs[Q-1] is the chunk's total decay for every chunk;
  * every decay is computed as exp(min(Δ, 0)) (`_decay`, which also takes Δ's low part, see "Decays"
    below): Δ ≤ 0 wherever it is used, and the clamp keeps masked entries of a tile (where Δ can be
    anything) from becoming inf and then inf·0 = NaN;
  * decays, cumulative sums, states and accumulators are fp32; `tl.dot` operands are in the input
    dtype (`DOT_DTYPE`) with fp32 accumulation, and fp32 dots use IEEE precision, not TF32;
  * for fp32 inputs cs is held in two fp32 parts, hi + lo: the buffer `cs` (and the names cs_t, cs_s in
    the programs) holds hi, `cs_lo` (lo_t, lo_s) holds lo, see "Decays" below; for bf16 and fp16 inputs
    `cs_lo` is None: there is no low part.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.launch import DIRECT_LAUNCH_OFF_BECAUSE, INTERPRET, MAX_BINARIES, Launcher
from minimamba.ssd import _check, check_chunk_size


def _autotune(configs, interpreter_config, key=("chunk_size", "headdim", "dstate")):
    """Benchmark `configs` (tile sizes along the sequence, warps, pipeline stages) once per `key` on
    the GPU. Under the interpreter, use `interpreter_config` only: small tiles (16/32) so that the CPU
    tests cross tile boundaries and the causal diagonal falls inside a tile, and no benchmarking."""
    return triton.autotune(configs=[interpreter_config] if INTERPRET else configs, key=list(key))


def _cfg(num_warps=4, num_stages=2, maxnreg=None, **tiles):
    """A config: tiles, warps, pipeline stages, and optionally a cap on registers per thread (fewer
    registers, more programs resident per SM: worth it where a program is latency-bound)."""
    return triton.Config(tiles, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


# This module's launch state (see kernels/launch.py): the configs its autotuners chose, the binaries it
# launches directly and the launch plans of its calls. `DIRECT_LAUNCH = False` sends every launch through
# Triton; `DIRECT_LAUNCH_OFF_BECAUSE` says why launches cannot be direct (None: they can).
_LAUNCHER = Launcher()
_launch = _LAUNCHER.launch
DIRECT_LAUNCH = DIRECT_LAUNCH_OFF_BECAUSE is None


def _plan(*key, tensors=()):
    """The launch plan of one forward or backward call (`kernels.launch.Plan`), keyed by `key` and what of
    `tensors` selects binaries."""
    return _LAUNCHER.plan(DIRECT_LAUNCH, *key, tensors=tensors)


def autotuned_programs(module=None):
    """{name: Autotuner} of the autotuned programs of `module`: this one by default, or another version
    of this file loaded beside it (`kernels.bench --baseline`), even one older than this function."""
    names = vars(module) if module is not None else globals()
    return {name: k for name, k in names.items() if isinstance(k, triton.runtime.autotuner.Autotuner)}


def forget_tuning():
    """Forget every config the autotuners chose, so that the next calls tune again (benchmarks do this
    to tune each timed shape as a training run would tune its own), and the binaries and plans of
    direct launches with them, and the SM count that the head splits are chosen by (kernels.offline's
    stand-ins for a GPU, which call this on entering and leaving, can each name another count)."""
    _LAUNCHER.forget()
    if hasattr(_sm_count, "cache_clear"):  # (a test may have put a plain function in its place)
        _sm_count.cache_clear()
    for k in autotuned_programs().values():
        k.cache.clear()


# ==================================================================================================
# Where a program's chunk starts, in each layout of the conventions above
# ==================================================================================================
@triton.jit
def _chunk_offsets(pid_bc, pid_h, seqlen, nheads, headdim, ngroups, dstate, nchunks, chunk_size):
    """For the program of (batch element, chunk) `pid_bc` and head `pid_h` (of group g): the chunk's
    length (< Q only for the last chunk) and the element offsets where its data starts:
        head_off   x, y, dy, dx     (batch, seqlen, H, P)     at (b, chunk start, h, 0)
        dt_off     dt               (batch, seqlen, H)        at (b, chunk start, h)
        group_off  B, C             (batch, seqlen, G, N)     at (b, chunk start, g, 0)
        tok        cs, per-token    (batch, H, nchunks, Q)    at (b, h, c, 0)
        cb_off     CB               (batch, nchunks, G, Q, Q) at (b, c, g, 0, 0)
        state_off  states           (batch, nchunks, H, P, N) at (b, c, h, 0, 0)
    (int64 where the product can pass 2³¹)."""
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    pid_g = pid_h // (nheads // ngroups)  # the group whose B/C this head reads
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    row0 = pid_b.to(tl.int64) * seqlen + chunk_start  # the chunk's first token, as a row of (batch·seqlen)
    head_off = row0 * nheads * headdim + pid_h * headdim
    dt_off = row0 * nheads + pid_h
    group_off = row0 * ngroups * dstate + pid_g * dstate
    tok = ((pid_b * nheads + pid_h) * nchunks + pid_c) * chunk_size
    cb_off = ((pid_b * nchunks + pid_c) * ngroups + pid_g).to(tl.int64) * chunk_size * chunk_size
    state_off = ((pid_b * nchunks + pid_c) * nheads + pid_h).to(tl.int64) * headdim * dstate
    return chunk_len, head_off, dt_off, group_off, tok, cb_off, state_off


@triton.jit
def _split_offsets(pid_bc, pid_gs, batch, seqlen, nheads, ngroups, dstate, nchunks, chunk_size, n_splits):
    """For the dCB, dC and dB programs of (batch element, chunk) `pid_bc` and (group, split of its heads)
    `pid_gs`: the batch element, the chunk, the split's first head and its number of heads, the chunk's
    length, its first token as a row of (batch·seqlen), and the element offsets where its data starts:
        group_off  B, C    (batch, seqlen, G, N)               at (b, chunk start, g, 0)
        out_off    dB, dC  (n_splits, batch, seqlen, G, N)     at (split, b, chunk start, g, 0)
        cb_off     CB      (batch, nchunks, G, Q, Q)           at (b, c, g, 0, 0)
        dcb_off    dCB     (n_splits, batch, nchunks, G, Q, Q) at (split, b, c, g, 0, 0)
    (int64 where the product can pass 2³¹)."""
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    pid_g, pid_split = pid_gs // n_splits, pid_gs % n_splits
    heads_per_split = nheads // ngroups // n_splits
    first_head = pid_g * (nheads // ngroups) + pid_split * heads_per_split
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    row0 = pid_b.to(tl.int64) * seqlen + chunk_start
    group_off = row0 * ngroups * dstate + pid_g * dstate
    out_off = (pid_split.to(tl.int64) * batch * seqlen + row0) * ngroups * dstate + pid_g * dstate
    bcg = (pid_b * nchunks + pid_c) * ngroups + pid_g  # (batch element, chunk, group) flattened
    cb_off = bcg.to(tl.int64) * chunk_size * chunk_size
    dcb_off = (pid_split.to(tl.int64) * batch * nchunks * ngroups + bcg) * chunk_size * chunk_size
    return pid_b, pid_c, first_head, heads_per_split, chunk_len, row0, group_off, out_off, cb_off, dcb_off


# ==================================================================================================
# Decays: cs in two parts
# ==================================================================================================
# A decay over a few positions, exp(cs[t] − cs[s]), is taken from two cumulative sums over the whole
# chunk. Held in one fp32 number each, cs[t] and cs[s] carry rounding errors of ~|cs|·6e-8 (and more
# from the running sum), which their difference keeps however small it is: 1e-6 relative error in the
# decay for |cs| ≈ 15. The forward hardly notices, but ∂L/∂A is a sum over every token of terms that
# can cancel, and it magnified this 10-fold past the reference's own fp32 error (whose segment sums are
# summed afresh for each (t, s)). So for fp32 inputs cs is kept in two fp32 numbers, hi + lo, summed
# without losing the low bits (`_sum2`): hi[t] − hi[s] is exact to 6e-8 of itself and lo[t] − lo[s]
# supplies the rest. For bf16 and fp16 inputs, whose dot operands round to 4e-3 or 5e-4, there is no
# low part (cs_lo is None, `_load_cs` gives zeros, which the compiler folds away; the binaries are those
# of a single part up to the order of some instructions, see docs/kernel-notes.md, "Precision").
@triton.jit
def _sum2(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo) + (b_hi + b_lo) as hi + lo with |lo| ≤ ulp(hi)/2. The rounding error of
    a_hi + b_hi is recovered exactly (Knuth's two-sum: plain adds, which the compiler may not reorder)
    and joins the low parts. Associative to ~1e-14 of the sum: a combine function for tl.associative_scan.
    (On a GPU, Triton's default FP fusion may contract the product dt·A that feeds the first level of the
    scan into that add, an fma: the sum then holds that product unrounded in one place and rounded in
    another, an error of at most one rounding of one dt·A, ~6e-8 of it.)"""
    s = a_hi + b_hi
    b_virtual = s - a_hi
    err = (a_hi - (s - b_virtual)) + (b_hi - b_virtual)  # a_hi + b_hi = s + err, exactly
    lo = err + a_lo + b_lo
    hi = s + lo
    return hi, lo - (hi - s)


def _inlined(fn):
    """@triton.jit for the small helpers that programs call inside their loops. Under the interpreter
    they run as the plain Python functions they are, inside the calling program (which has set up
    triton.language for the interpreter already): there, each call of a @triton.jit function sets it
    up again, ~0.3 ms, which made the kernel tests 30–40% slower (6% with this)."""
    return fn if INTERPRET else triton.jit(fn)


@_inlined
def _load_cs(cs_ptr, cs_lo_ptr, offs, mask):
    """cs at `offs` as (hi, lo), 0 where `mask` is False (mask None: one entry, always there); lo is 0
    where there is no low part (cs_lo_ptr None)."""
    if mask is None:
        hi = tl.load(cs_ptr + offs)
    else:
        hi = tl.load(cs_ptr + offs, mask=mask, other=0.0)
    if cs_lo_ptr is None:
        lo = tl.zeros_like(hi)
    elif mask is None:
        lo = tl.load(cs_lo_ptr + offs)
    else:
        lo = tl.load(cs_lo_ptr + offs, mask=mask, other=0.0)
    return hi, lo


@_inlined
def _decay(d_hi, d_lo):
    """exp(d) for a log-decay d = d_hi + d_lo ≤ 0 (a difference of two cs, or one cs): exp(min(d_hi, 0))
    · (1 + d_lo). 1 + d_lo is exp(d_lo) to d_lo²/2, and |d_lo| ≤ ulp(|cs|): ≤ 1e-5 and an error ≤ 1e-10
    for |cs| ≤ 100; at |cs| ≈ 2e4 (dt ≈ 20 over a chunk of 64 in the tests) 3e-6, where cs in one fp32
    number would err 1e-3. The clamp keeps masked entries of a tile, where d_hi can be anything, finite
    (see the conventions above)."""
    return tl.exp(tl.minimum(d_hi, 0.0)) * (1.0 + d_lo)


@_inlined
def _chunk_decay(cs_ptr, cs_lo_ptr, bhc, chunk_size):
    """exp(α_c), the decay over a whole chunk (α_c = cs[Q-1]), for the chunk `bhc` = (batch element, head,
    chunk) flattened: what the two state passes carry a state across a chunk with."""
    return _decay(*_load_cs(cs_ptr, cs_lo_ptr, (bhc + 1) * chunk_size - 1, None))


# ==================================================================================================
# Stage 1: the chunk-local cumulative log-decay
# ==================================================================================================
def chunk_cumsum_ref(dt, A, chunk_size):
    """PyTorch reference of stage 1 (computed by stage 2's program, `_chunk_state_kernel` in the
    forward): (batch, seqlen, H) -> cs (batch, H, nchunks, Q)."""
    b, l, h = dt.shape
    nc = _cdiv(l, chunk_size)
    dA = torch.nn.functional.pad(dt.float() * A.float(), (0, 0, 0, nc * chunk_size - l))  # (b, nc·Q, H), dt = 0 past l
    return dA.view(b, nc, chunk_size, h).cumsum(2).permute(0, 3, 1, 2)  # (b, nc, Q, H) -> (b, H, nc, Q)


# ==================================================================================================
# Stage 2 (with stage 1 in the forward): chunk states (and, in the backward, ∂L/∂S_in)
# ==================================================================================================
@_autotune(
    [_cfg(BLOCK_S=64, num_warps=8), _cfg(BLOCK_S=64, num_warps=8, num_stages=3), _cfg(BLOCK_S=32, num_stages=4)],
    _cfg(BLOCK_S=16),
)
@triton.jit
def _chunk_state_kernel(
    u_ptr,  # (batch, seqlen, H, P): x (forward) or dy (backward)
    v_ptr,  # (batch, seqlen, G, N): B (forward) or C (backward)
    dt_ptr,  # (batch, seqlen, H)
    A_ptr,  # (H,), read only in the forward
    cs_ptr, cs_lo_ptr,  # (batch, H, nchunks, Q): written here (the forward) or read (the backward); lo or None
    out_ptr,  # out (batch, nchunks, H, P, N) fp32
    seqlen, nheads, headdim, ngroups, dstate, nchunks, chunk_size,
    TO_CHUNK_END: tl.constexpr,  # which weight w_s (see the docstring); True: the forward, stage 1 first
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,  # ≥ P, ≥ N
    BLOCK_S: tl.constexpr,  # positions per step of the loop over the chunk
):
    """out[c][p, n] = Σ_{s in chunk c} u_s[p] · w_s · v_s[n], one P×N matrix per chunk and head.

    TO_CHUNK_END=True, the forward stage 2 (u = x, v = B): w_s = exp(cs[Q-1] − cs[s])·dt_s, so out is
    S_c, the state the chunk would end in had it started from zero.
    TO_CHUNK_END=False, the backward of stage 5's state term (u = dy, v = C): w_s = exp(cs[s]), so out
    is ∂L/∂S_in[c] through the outputs of chunk c (y_t = exp(cs[t])·S_in[c] C_t + …). Its weights go
    into the dot as exp(cs[s] − cs[0]) ≤ 1, and the sum is multiplied by exp(cs[0]) in fp32 afterwards:
    fp16 operands hold nothing below 2⁻²⁴, and at a fast decay (dt·A = −22 at the first token) every
    exp(cs[s]) of the chunk was below it, and ∂L/∂h_0 was 0 instead of ~1e-9.
    The two are transposes of each other: one carries tokens to the chunk end, the other the chunk
    start to the tokens.
    TO_CHUNK_END=True (the forward) also computes stage 1 first, which has the same grid:
    cs[t] = Σ_{k≤t} dt_k·A over the chunk, in steps of BLOCK_S positions with a running prefix, stored
    for the later stages and read back by the loop below (one launch fewer than a program of its own);
    with a low part, the sums are two-part sums (`_sum2`) and hi and lo are stored.

    Tile: the whole (P, N) matrix; the loop runs over the chunk in steps of BLOCK_S positions, each a
    (P × BLOCK_S)·(BLOCK_S × N) dot. Grid: (batch·nchunks, H).
    """
    pid_bc = tl.program_id(0)  # (batch element, chunk) flattened
    pid_h = tl.program_id(1)  # which head
    chunk_len, head_off, dt_off, group_off, tok, _, state_off = _chunk_offsets(
        pid_bc, pid_h, seqlen, nheads, headdim, ngroups, dstate, nchunks, chunk_size)
    u_ptr += head_off  # every pointer now at (batch element, chunk start, head or group)
    v_ptr += group_off
    dt_ptr += dt_off
    cs_ptr += tok
    if cs_lo_ptr is not None:
        cs_lo_ptr += tok

    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    if TO_CHUNK_END:  # the forward: stage 1 for this chunk and head; positions past the sequence get dt = 0
        A = tl.load(A_ptr + pid_h).to(tl.float32)
        prefix = tl.zeros((), dtype=tl.float32)  # cs at the position before the tile (its high part)
        prefix_lo = tl.zeros((), dtype=tl.float32)
        for s0 in range(0, chunk_size, BLOCK_S):
            s = s0 + offs_s
            dt_s = tl.load(dt_ptr + s * nheads, mask=s < chunk_len, other=0.0).to(tl.float32)
            if cs_lo_ptr is None:
                cs_s = prefix + tl.cumsum(dt_s * A, axis=0)
            else:
                dA = dt_s * A
                cs_s, lo_s = tl.associative_scan((dA, tl.zeros_like(dA)), 0, _sum2)  # a two-part cumsum
                cs_s, lo_s = _sum2(prefix, prefix_lo, cs_s, lo_s)
                tl.store(cs_lo_ptr + s, lo_s, mask=s < chunk_size)
                prefix_lo = tl.sum(tl.where(offs_s == BLOCK_S - 1, lo_s, 0.0), axis=0)
            tl.store(cs_ptr + s, cs_s, mask=s < chunk_size)
            prefix = tl.sum(tl.where(offs_s == BLOCK_S - 1, cs_s, 0.0), axis=0)  # the tile's last cs
        tl.debug_barrier()  # the stores above are read below by other threads of this program
    if TO_CHUNK_END:
        cs_last, lo_last = _load_cs(cs_ptr, cs_lo_ptr, chunk_size - 1, None)
    else:
        cs_first, lo_first = _load_cs(cs_ptr, cs_lo_ptr, 0, None)  # (the largest cs of the chunk)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for s0 in range(0, chunk_len, BLOCK_S):
        s = s0 + offs_s
        s_mask = s < chunk_len
        # u loaded transposed, (P, BLOCK_S), so that the sum over s is a dot
        uT = tl.load(u_ptr + s[None, :] * (nheads * headdim) + offs_p[:, None],
                     mask=(offs_p[:, None] < headdim) & s_mask[None, :], other=0.0)
        v = tl.load(v_ptr + s[:, None] * (ngroups * dstate) + offs_n[None, :],
                    mask=s_mask[:, None] & (offs_n[None, :] < dstate), other=0.0)
        cs_s, lo_s = _load_cs(cs_ptr, cs_lo_ptr, s, s_mask)
        if TO_CHUNK_END:
            dt_s = tl.load(dt_ptr + s * nheads, mask=s_mask, other=0.0).to(tl.float32)
            w = _decay(cs_last - cs_s, lo_last - lo_s) * dt_s
        else:  # exp(cs[s]) = exp(cs[s] − cs[0])·exp(cs[0]), the second factor after the loop (see below)
            w = _decay(cs_s - cs_first, lo_s - lo_first)
        # the weight goes on v in fp32, then both operands are cast for the tensor cores
        acc += tl.dot(uT.to(DOT_DTYPE), (v.to(tl.float32) * w[:, None]).to(DOT_DTYPE),
                      input_precision=DOT_PRECISION)
    if not TO_CHUNK_END:  # (in fp32: in fp16 operands a weight exp(cs[s]) < 2⁻²⁴ was 0, and ∂L/∂h_0 with it)
        acc *= _decay(cs_first, lo_first)
    out_ptr += state_off
    tl.store(out_ptr + offs_p[:, None] * dstate + offs_n[None, :], acc,
             mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate))


def chunk_state_ref(x, dt, B, cs):
    """PyTorch reference of stage 2: the chunk states S_c (batch, nchunks, H, P, N), fp32."""
    b, l, h, p = x.shape
    _, _, nc, Q = cs.shape
    pad = (0, 0, 0, 0, 0, nc * Q - l)
    X = torch.nn.functional.pad(x.float(), pad).view(b, nc, Q, h, p)  # (b, nc, Q, H, P)
    # (b, nc, Q, H, N): each head's copy of its group's B
    Bh = torch.nn.functional.pad(B.float().repeat_interleave(h // B.shape[2], 2), pad).view(b, nc, Q, h, -1)
    dt_c = torch.nn.functional.pad(dt.float(), pad[2:]).view(b, nc, Q, h)  # (b, nc, Q, H)
    w = torch.exp(cs[..., -1:] - cs).permute(0, 2, 3, 1) * dt_c  # (b, nc, Q, H)
    return torch.einsum("bcsh,bcshp,bcshn->bchpn", w, X, Bh)  # (b, nc, H, P, N)


# ==================================================================================================
# Stage 3: the inter-chunk recurrence
# ==================================================================================================
@triton.jit
def _pass_states(chunk_states_ptr, cs_ptr, cs_lo_ptr, states_ptr, h, pid_b, pid_h, offs, mask,
                 nheads, state_size, nchunks, chunk_size):
    """The loop of stage 3 for BLOCK entries of the state, from S_in[0] = h: stores S_in[c] for every
    chunk c and returns S_in[nchunks]. Shared by the forward program and the backward one."""
    bh = pid_b * nheads + pid_h
    for c in range(nchunks):
        idx = ((pid_b * nchunks + c) * nheads + pid_h).to(tl.int64) * state_size + offs
        tl.store(states_ptr + idx, h.to(states_ptr.dtype.element_ty), mask=mask)  # the state entering chunk c
        h = _chunk_decay(cs_ptr, cs_lo_ptr, bh * nchunks + c, chunk_size) * h \
            + tl.load(chunk_states_ptr + idx, mask=mask, other=0.0)
    return h


@triton.jit
def _state_passing_fwd_kernel(
    chunk_states_ptr,  # (batch, nchunks, H, P·N) fp32, S_c from stage 2
    cs_ptr, cs_lo_ptr,  # (batch, H, nchunks, Q); lo or None
    h0_ptr,  # (batch, H, P·N) initial state, or None
    states_ptr,  # out (batch, nchunks, H, P·N): the state entering each chunk, in the dots' operand dtype
    final_ptr,  # out (batch, H, P·N) fp32: the state after the last token
    nheads, state_size, nchunks, chunk_size,
    HAS_INITIAL: tl.constexpr,
    BLOCK: tl.constexpr,  # state entries per program
):
    """S_in[0] = h_0 (or 0);  S_in[c+1] = exp(cs_c[Q-1])·S_in[c] + S_c;  final = S_in[nchunks].

    The only sequential loop of the forward, over the chunks (T/Q steps instead of T), in fp32.
    Tile: BLOCK entries of the flattened P·N state; every entry evolves on its own.
    Grid: (cdiv(P·N, BLOCK), batch, H).
    """
    pid_blk = tl.program_id(0)  # which block of state entries
    pid_b = tl.program_id(1)
    pid_h = tl.program_id(2)
    offs = pid_blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    if HAS_INITIAL:
        h = tl.load(h0_ptr + (pid_b * nheads + pid_h).to(tl.int64) * state_size + offs, mask=mask, other=0.0)
        h = h.to(tl.float32)
    else:
        h = tl.zeros((BLOCK,), dtype=tl.float32)
    h = _pass_states(chunk_states_ptr, cs_ptr, cs_lo_ptr, states_ptr, h, pid_b, pid_h, offs, mask,
                     nheads, state_size, nchunks, chunk_size)
    tl.store(final_ptr + (pid_b * nheads + pid_h).to(tl.int64) * state_size + offs, h, mask=mask)


def state_passing_ref(chunk_states, cs, initial_state=None):
    """PyTorch reference of stage 3: (states entering each chunk, final state), both fp32."""
    h = torch.zeros_like(chunk_states[:, 0]) if initial_state is None else initial_state.float()  # (b, H, P, N)
    entering = []
    for c in range(chunk_states.shape[1]):
        entering.append(h)
        h = torch.exp(cs[:, :, c, -1])[..., None, None] * h + chunk_states[:, c]  # (b, H, 1, 1)·(b, H, P, N)
    return torch.stack(entering, 1), h  # (b, nc, H, P, N), (b, H, P, N)


# ==================================================================================================
# Stage 4: C·Bᵀ inside each chunk
# ==================================================================================================
@_autotune(
    [_cfg(BLOCK_T=64, BLOCK_S=64), _cfg(BLOCK_T=128, BLOCK_S=64, num_warps=8)],
    _cfg(BLOCK_T=32, BLOCK_S=16),
    key=("chunk_size", "dstate"),
)
@triton.jit
def _chunk_cb_kernel(
    C_ptr, B_ptr,  # (batch, seqlen, G, N)
    cb_ptr,  # out (batch, nchunks, G, Q, Q) fp32
    seqlen, ngroups, dstate, nchunks, chunk_size,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,  # ≥ N
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,  # rows t and columns s of the Q×Q matrix
):
    """CB[t, s] = C_t·B_s for one chunk and group: the "attention scores" of the chunk, shared by the
    heads of the group. Positions past the sequence end give 0.

    Tile: BLOCK_T × BLOCK_S entries, one (BLOCK_T × N)·(N × BLOCK_S) dot. Every tile is computed,
    also above the diagonal (cheap, and the readers mask s ≤ t themselves).
    Grid: (cdiv(Q, BLOCK_T)·cdiv(Q, BLOCK_S), batch·nchunks, G).
    """
    pid_ts = tl.program_id(0)  # (row tile, column tile) flattened
    pid_bc = tl.program_id(1)
    pid_g = tl.program_id(2)
    n_s_tiles = tl.cdiv(chunk_size, BLOCK_S)
    pid_t, pid_s = pid_ts // n_s_tiles, pid_ts % n_s_tiles
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    row0 = pid_b.to(tl.int64) * seqlen + chunk_start
    C_ptr += row0 * ngroups * dstate + pid_g * dstate
    B_ptr += row0 * ngroups * dstate + pid_g * dstate

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_n = tl.arange(0, BLOCK_N)
    c = tl.load(C_ptr + offs_t[:, None] * (ngroups * dstate) + offs_n[None, :],
                mask=(offs_t[:, None] < chunk_len) & (offs_n[None, :] < dstate), other=0.0)
    bT = tl.load(B_ptr + offs_s[None, :] * (ngroups * dstate) + offs_n[:, None],  # B transposed, (N, BLOCK_S)
                 mask=(offs_s[None, :] < chunk_len) & (offs_n[:, None] < dstate), other=0.0)
    cb = tl.dot(c.to(DOT_DTYPE), bT.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    cb_ptr += ((pid_b * nchunks + pid_c) * ngroups + pid_g).to(tl.int64) * chunk_size * chunk_size
    tl.store(cb_ptr + offs_t[:, None] * chunk_size + offs_s[None, :], cb,
             mask=(offs_t[:, None] < chunk_size) & (offs_s[None, :] < chunk_size))


def chunk_cb_ref(C, B, chunk_size):
    """PyTorch reference of stage 4: CB (batch, nchunks, G, Q, Q), fp32."""
    b, l, g, n = C.shape
    nc = _cdiv(l, chunk_size)
    pad = (0, 0, 0, 0, 0, nc * chunk_size - l)
    Cc = torch.nn.functional.pad(C.float(), pad).view(b, nc, chunk_size, g, n)  # (b, nc, Q, G, N)
    Bc = torch.nn.functional.pad(B.float(), pad).view(b, nc, chunk_size, g, n)  # (b, nc, Q, G, N)
    return torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)  # (b, nc, G, Q, Q)


# ==================================================================================================
# Stage 5: the outputs
# ==================================================================================================
@_autotune(
    [_cfg(BLOCK_T=64, BLOCK_S=32, num_stages=3), _cfg(BLOCK_T=64, BLOCK_S=64, num_warps=8),
     _cfg(BLOCK_T=128, BLOCK_S=64, num_warps=8), _cfg(BLOCK_T=64, BLOCK_S=64)],
    _cfg(BLOCK_T=32, BLOCK_S=16),
)
@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr,  # (batch, seqlen, H, P)
    dt_ptr,  # (batch, seqlen, H)
    cs_ptr, cs_lo_ptr,  # (batch, H, nchunks, Q) from stage 1; lo or None
    cb_ptr,  # (batch, nchunks, G, Q, Q) from stage 4
    C_ptr,  # (batch, seqlen, G, N)
    states_ptr,  # (batch, nchunks, H, P, N), S_in from stage 3 in the dots' operand dtype
    D_ptr,  # (H,) or None
    y_ptr,  # out (batch, seqlen, H, P), x's dtype
    seqlen, nheads, headdim, ngroups, dstate, nchunks, chunk_size,
    HAS_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,  # ≥ P, ≥ N
    BLOCK_T: tl.constexpr,  # output rows per program
    BLOCK_S: tl.constexpr,  # source positions per step of the causal loop
):
    """y_t = exp(cs[t])·S_in[c] C_t                              (state to output, `Y_off`)
           + Σ_{s≤t} CB[t,s]·exp(cs[t] − cs[s])·dt_s · x_s      (intra-chunk, `Y_diag`)
           + D·x_t

    Tile: BLOCK_T rows t × all P channels. The state term is one (BLOCK_T × N)·(N × P) dot; the
    intra-chunk term loops over the source positions s = 0 … last row of the tile in steps of BLOCK_S
    (causal: tiles right of the diagonal are never visited), each a (BLOCK_T × BLOCK_S)·(BLOCK_S × P)
    dot whose left operand is the masked, decayed score matrix.
    Grid: (cdiv(Q, BLOCK_T), batch·nchunks, H).
    """
    pid_t = tl.program_id(0)  # which tile of rows t
    pid_bc = tl.program_id(1)
    pid_h = tl.program_id(2)
    chunk_len, head_off, dt_off, group_off, tok, cb_off, state_off = _chunk_offsets(
        pid_bc, pid_h, seqlen, nheads, headdim, ngroups, dstate, nchunks, chunk_size)
    x_ptr += head_off
    y_ptr += head_off
    dt_ptr += dt_off
    C_ptr += group_off
    cs_ptr += tok
    if cs_lo_ptr is not None:
        cs_lo_ptr += tok
    cb_ptr += cb_off
    states_ptr += state_off

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t_mask = offs_t < chunk_len
    p_mask = offs_p < headdim
    cs_t, lo_t = _load_cs(cs_ptr, cs_lo_ptr, offs_t, offs_t < chunk_size)

    # state to output: exp(cs[t]) · C_t · S_inᵀ, S_in read transposed as (N, P)
    c = tl.load(C_ptr + offs_t[:, None] * (ngroups * dstate) + offs_n[None, :],
                mask=t_mask[:, None] & (offs_n[None, :] < dstate), other=0.0)
    sT = tl.load(states_ptr + offs_p[None, :] * dstate + offs_n[:, None],
                 mask=p_mask[None, :] & (offs_n[:, None] < dstate), other=0.0)
    acc = tl.dot(c.to(DOT_DTYPE), sT.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    acc *= _decay(cs_t, lo_t)[:, None]

    # intra-chunk: the causal loop over s ≤ t
    s_end = tl.minimum((pid_t + 1) * BLOCK_T, chunk_len)
    for s0 in range(0, s_end, BLOCK_S):
        s = s0 + offs_s
        s_mask = s < chunk_len
        cb = tl.load(cb_ptr + offs_t[:, None] * chunk_size + s[None, :],
                     mask=(offs_t[:, None] < chunk_size) & (s[None, :] < chunk_size), other=0.0)
        cs_s, lo_s = _load_cs(cs_ptr, cs_lo_ptr, s, s_mask)
        dt_s = tl.load(dt_ptr + s * nheads, mask=s_mask, other=0.0).to(tl.float32)
        scores = cb * _decay(cs_t[:, None] - cs_s[None, :], lo_t[:, None] - lo_s[None, :]) * dt_s[None, :]
        scores = tl.where(offs_t[:, None] >= s[None, :], scores, 0.0)  # the causal mask L
        xs = tl.load(x_ptr + s[:, None] * (nheads * headdim) + offs_p[None, :],
                     mask=s_mask[:, None] & p_mask[None, :], other=0.0)
        acc += tl.dot(scores.to(DOT_DTYPE), xs.to(DOT_DTYPE), input_precision=DOT_PRECISION)

    io_mask = t_mask[:, None] & p_mask[None, :]
    if HAS_D:
        xt = tl.load(x_ptr + offs_t[:, None] * (nheads * headdim) + offs_p[None, :], mask=io_mask, other=0.0)
        acc += tl.load(D_ptr + pid_h).to(tl.float32) * xt.to(tl.float32)
    tl.store(y_ptr + offs_t[:, None] * (nheads * headdim) + offs_p[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=io_mask)


# stage 5's reference is `minimamba.ssd.ssd_chunked` itself (its steps 1 and 4 plus D·x).


# ==================================================================================================
# Backward
# ==================================================================================================
# Write u_s = dt_s·x_s, dy = ∂L/∂y and dA_j = dt_j·A. Inside chunk c the forward is
#
#     y_t = Σ_{s≤t} CB[t,s]·exp(cs[t] − cs[s])·u_s + exp(cs[t])·S_in[c] C_t + D·x_t
#     S_c = Σ_s exp(cs[Q-1] − cs[s])·u_s B_sᵀ,   S_in[c+1] = exp(α_c)·S_in[c] + S_c,   α_c = cs[Q-1]
#
# with cs[t] − cs[s] = dA_{s+1} + … + dA_t. Differentiating term by term (program that computes it):
#
#   ∂L/∂S_in[c] from y   = Σ_t exp(cs[t])·dy_t C_tᵀ                          _chunk_state_kernel
#   ∂L/∂S_c, ∂L/∂α_c, ∂L/∂h_0 by a reverse scan over chunks                 _state_passing_bwd_kernel
#   ∂L/∂u_s  = Σ_{t≥s} CB[t,s]·exp(cs[t] − cs[s])·dy_t + exp(cs[Q-1] − cs[s])·∂L/∂S_c B_s
#              → dx = dt·∂L/∂u + D·dy,  ∂L/∂dt (through u) = ⟨∂L/∂u, x⟩         _chunk_scan_bwd_dx_kernel
#   dCB and the intra-chunk part of ∂L/∂dA (below)                          _chunk_scan_bwd_dcb_kernel
#   ∂L/∂C_t  = Σ_h exp(cs[t])·dy_tᵀ S_in[c] + Σ_{s≤t} dCB[t,s]·B_s          _chunk_scan_bwd_dc_kernel
#   ∂L/∂B_s  = Σ_h exp(cs[Q-1] − cs[s])·dt_s·x_sᵀ ∂L/∂S_c
#                                          + Σ_{t≥s} dCB[t,s]·C_t          _chunk_scan_bwd_db_kernel
#              with dCB[t,s] = ∂L/∂CB[t,s] = Σ_h Γ[t,s],  Γ[t,s] = exp(cs[t] − cs[s])·dt_s·(dy_t·x_s), s ≤ t
#              (the heads of a group are cut into splits, `_head_splits`: the dCB program stores each
#              split k's part dCB_k = Σ_{h in split k} Γ; dC and dB multiply it with B and C, and their
#              per-split results are summed last, which makes Σ_k dCB_k = dCB)
#   ∂L/∂dA_j collected from four terms, then ∂L/∂dt and the per-chunk
#            parts of ∂L/∂A (and of ∂L/∂D)                                  _chunk_cumsum_bwd_kernel
#   ∂L/∂A, ∂L/∂D (sums of the parts), ∂L/∂B, ∂L/∂C (sums of the splits)     _grad_sums_kernel
#
# The decay gradient is assembled from terms that each contain only decays ≤ 1: it is never formed
# as a difference of large quantities (such as ⟨y, dy⟩ − dt·∂L/∂dt) followed by a cumulative sum,
# which cancels catastrophically once the decays are strong.


@triton.jit
def _state_passing_bwd_kernel(
    chunk_states_ptr,  # (batch, nchunks, H, P·N) fp32, S_c from stage 2
    cs_ptr, cs_lo_ptr,  # (batch, H, nchunks, Q); lo or None
    h0_ptr,  # (batch, H, P·N) initial state, or None
    dstates_ptr,  # (batch, nchunks, H, P·N) fp32, ∂L/∂S_in[c] through the outputs of chunk c
    dfinal_ptr,  # (batch, H, P·N) ∂L/∂final, or None
    states_ptr,  # out (batch, nchunks, H, P·N) fp32: S_in, stage 3 run again
    states_dot_ptr,  # out (batch, nchunks, H, P·N): S_in in the dots' operand dtype, for the dC kernel
    dchunk_ptr,  # out (batch, nchunks, H, P·N): ∂L/∂S_c in the dots' operand dtype
    dalpha_ptr,  # out (batch, H, nchunks, n_blocks) fp32: this block's part of ∂L/∂α_c
    dh0_ptr,  # out (batch, H, P·N) fp32: ∂L/∂h_0, or None
    nheads, state_size, nchunks, chunk_size,
    HAS_DFINAL: tl.constexpr, HAS_INITIAL: tl.constexpr,
    STATES_DOT_COPY: tl.constexpr,  # False when the operand dtype is fp32: states_dot is states itself
    BLOCK: tl.constexpr,
):
    """Stage 3 forwards (storing S_in[c]), then the recurrence S_in[c+1] = exp(α_c)·S_in[c] + S_c
    backwards. With g = ∂L/∂S_in[c+1] (total, starting from ∂L/∂final), for c = nchunks-1 … 0:

        ∂L/∂S_c = g,    ∂L/∂α_c = exp(α_c)·⟨S_in[c], g⟩,    g ← exp(α_c)·g + ∂L/∂S_in[c] from y,

    and finally ∂L/∂h_0 = g. Tile: BLOCK entries of the flattened state; ∂L/∂α_c is a sum over all
    entries, so each program writes its partial sum and the decay-gradient kernel
    (`_chunk_cumsum_bwd_kernel`) adds them. S_in and ∂L/∂S_c are
    also stored in the dtype the later programs' dots take them in (bf16 for bf16 inputs: half the
    bytes those programs read, and the same values, since they cast before every dot).
    Grid: (n_blocks = cdiv(P·N, BLOCK), batch, H), as in the forward.
    """
    pid_blk = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_h = tl.program_id(2)
    n_blocks = tl.num_programs(0)
    offs = pid_blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    bh = (pid_b * nheads + pid_h).to(tl.int64)
    if HAS_INITIAL:
        h = tl.load(h0_ptr + bh * state_size + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK,), dtype=tl.float32)
    _pass_states(chunk_states_ptr, cs_ptr, cs_lo_ptr, states_ptr, h, pid_b, pid_h, offs, mask,
                 nheads, state_size, nchunks, chunk_size)
    tl.debug_barrier()  # the loop below reads the S_in just stored (by this program only)

    if HAS_DFINAL:
        g = tl.load(dfinal_ptr + bh * state_size + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        idx = ((pid_b * nchunks + c) * nheads + pid_h).to(tl.int64) * state_size + offs
        tl.store(dchunk_ptr + idx, g.to(dchunk_ptr.dtype.element_ty), mask=mask)
        chunk_decay = _chunk_decay(cs_ptr, cs_lo_ptr, bh * nchunks + c, chunk_size)
        s_in = tl.load(states_ptr + idx, mask=mask, other=0.0)
        if STATES_DOT_COPY:
            tl.store(states_dot_ptr + idx, s_in.to(states_dot_ptr.dtype.element_ty), mask=mask)
        tl.store(dalpha_ptr + (bh * nchunks + c) * n_blocks + pid_blk, chunk_decay * tl.sum(s_in * g))
        g = chunk_decay * g + tl.load(dstates_ptr + idx, mask=mask, other=0.0)
    if HAS_INITIAL:
        tl.store(dh0_ptr + bh * state_size + offs, g, mask=mask)


@_autotune(
    [_cfg(BLOCK_S=64, BLOCK_T=32, num_stages=3), _cfg(BLOCK_S=64, BLOCK_T=64, num_warps=8),
     _cfg(BLOCK_S=128, BLOCK_T=64, num_warps=8), _cfg(BLOCK_S=64, BLOCK_T=64)],
    _cfg(BLOCK_S=16, BLOCK_T=32),
)
@triton.jit
def _chunk_scan_bwd_dx_kernel(
    x_ptr, dy_ptr,  # (batch, seqlen, H, P)
    dt_ptr,  # (batch, seqlen, H)
    cs_ptr, cs_lo_ptr,  # (batch, H, nchunks, Q); lo or None
    cb_ptr,  # (batch, nchunks, G, Q, Q)
    B_ptr,  # (batch, seqlen, G, N)
    dchunk_ptr,  # (batch, nchunks, H, P, N), ∂L/∂S_c in the dots' operand dtype
    D_ptr,  # (H,) or None
    dx_ptr,  # out (batch, seqlen, H, P), x's dtype
    ddt_x_ptr,  # out (batch, H, nchunks, Q) fp32: ⟨∂L/∂u_s, x_s⟩, the part of ∂L/∂dt_s through u
    dxy_ptr,  # out (batch, H, nchunks, Q) fp32: ⟨dy_s, x_s⟩; its sum is ∂L/∂D (over a chunk by the
    #   decay-gradient kernel, over chunks by `_grad_sums_kernel`)
    seqlen, nheads, headdim, ngroups, dstate, nchunks, chunk_size,
    HAS_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,  # rows s (the positions whose gradient this program computes)
    BLOCK_T: tl.constexpr,  # output positions t per step of the anti-causal loop
):
    """∂L/∂u_s = exp(cs[Q-1] − cs[s])·∂L/∂S_c B_s + Σ_{t≥s} CB[t,s]·exp(cs[t] − cs[s])·dy_t, then

        dx_s = dt_s·∂L/∂u_s + D·dy_s,    ddt_x_s = ⟨∂L/∂u_s, x_s⟩,    dxy_s = ⟨dy_s, x_s⟩.

    This is stage 5 transposed: the scores are read as CB[t, s] for t ≥ s, and the loop runs from the
    tile's first row to the end of the chunk.
    Tile: BLOCK_S rows s × all P channels (so the sums over p are complete in one program).
    Grid: (cdiv(Q, BLOCK_S), batch·nchunks, H).
    """
    pid_s = tl.program_id(0)
    pid_bc = tl.program_id(1)
    pid_h = tl.program_id(2)
    chunk_len, head_off, dt_off, group_off, tok, cb_off, state_off = _chunk_offsets(
        pid_bc, pid_h, seqlen, nheads, headdim, ngroups, dstate, nchunks, chunk_size)
    x_ptr += head_off
    dy_ptr += head_off
    dx_ptr += head_off
    dt_ptr += dt_off
    B_ptr += group_off
    cs_ptr += tok  # (tok is also the offset of the other per-token buffers)
    if cs_lo_ptr is not None:
        cs_lo_ptr += tok
    cb_ptr += cb_off
    dchunk_ptr += state_off

    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    s_mask = offs_s < chunk_len
    p_mask = offs_p < headdim
    cs_s, lo_s = _load_cs(cs_ptr, cs_lo_ptr, offs_s, offs_s < chunk_size)
    cs_last, lo_last = _load_cs(cs_ptr, cs_lo_ptr, chunk_size - 1, None)

    # through the chunk state: exp(cs[Q-1] − cs[s]) · B_s · (∂L/∂S_c)ᵀ, ∂L/∂S_c read as (N, P)
    b = tl.load(B_ptr + offs_s[:, None] * (ngroups * dstate) + offs_n[None, :],
                mask=s_mask[:, None] & (offs_n[None, :] < dstate), other=0.0)
    dSc_T = tl.load(dchunk_ptr + offs_p[None, :] * dstate + offs_n[:, None],
                    mask=p_mask[None, :] & (offs_n[:, None] < dstate), other=0.0)
    du = tl.dot(b.to(DOT_DTYPE), dSc_T.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    du *= _decay(cs_last - cs_s, lo_last - lo_s)[:, None]

    # intra-chunk, transposed: Σ_{t≥s} CB[t,s]·exp(cs[t] − cs[s]) · dy_t
    for t0 in range(pid_s * BLOCK_S, chunk_len, BLOCK_T):
        t = t0 + offs_t
        t_mask = t < chunk_len
        cbT = tl.load(cb_ptr + t[None, :] * chunk_size + offs_s[:, None],  # (BLOCK_S, BLOCK_T) = CB[t, s]ᵀ
                      mask=(t[None, :] < chunk_size) & (offs_s[:, None] < chunk_size), other=0.0)
        cs_t, lo_t = _load_cs(cs_ptr, cs_lo_ptr, t, t_mask)
        scoresT = cbT * _decay(cs_t[None, :] - cs_s[:, None], lo_t[None, :] - lo_s[:, None])
        scoresT = tl.where(t[None, :] >= offs_s[:, None], scoresT, 0.0)
        dyt = tl.load(dy_ptr + t[:, None] * (nheads * headdim) + offs_p[None, :],
                      mask=t_mask[:, None] & p_mask[None, :], other=0.0)
        du += tl.dot(scoresT.to(DOT_DTYPE), dyt.to(DOT_DTYPE), input_precision=DOT_PRECISION)

    io_mask = s_mask[:, None] & p_mask[None, :]
    io_offs = offs_s[:, None] * (nheads * headdim) + offs_p[None, :]
    xs = tl.load(x_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
    dt_s = tl.load(dt_ptr + offs_s * nheads, mask=s_mask, other=0.0).to(tl.float32)
    dx = du * dt_s[:, None]
    if HAS_D:
        dys = tl.load(dy_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
        dx += tl.load(D_ptr + pid_h).to(tl.float32) * dys
        tl.store(dxy_ptr + tok + offs_s, tl.sum(dys * xs, axis=1), mask=s_mask)
    tl.store(dx_ptr + io_offs, dx.to(dx_ptr.dtype.element_ty), mask=io_mask)
    tl.store(ddt_x_ptr + tok + offs_s, tl.sum(du * xs, axis=1), mask=s_mask)


@_autotune(
    [_cfg(BLOCK_T=32, BLOCK_S=64), _cfg(BLOCK_T=32, BLOCK_S=64, maxnreg=168), _cfg(BLOCK_T=32, BLOCK_S=32),
     _cfg(BLOCK_T=32, BLOCK_S=32, maxnreg=128), _cfg(BLOCK_T=64, BLOCK_S=64),
     _cfg(BLOCK_T=64, BLOCK_S=64, num_warps=8), _cfg(BLOCK_T=64, BLOCK_S=32, num_warps=8)],
    _cfg(BLOCK_T=32, BLOCK_S=16),
)
@triton.jit(do_not_specialize=["batch"])  # (used for one offset: not worth a compile per value)
def _chunk_scan_bwd_dcb_kernel(
    x_ptr, dy_ptr,  # (batch, seqlen, H, P)
    dt_ptr,  # (batch, seqlen, H)
    cs_ptr, cs_lo_ptr,  # (batch, H, nchunks, Q); lo or None
    cb_ptr,  # (batch, nchunks, G, Q, Q)
    dcb_ptr,  # out (n_splits, batch, nchunks, G, Q, Q) in the dots' operand dtype: dCB below, for s ≤ t
    dA_diag_ptr,  # out (batch, H, nchunks, n_t_tiles, Q) fp32 (room for ≥ n_t_tiles): see below (not zeroed)
    row_prefix_ptr,  # scratch (batch, H, nchunks, Q) fp32: each head's running row prefix between steps
    batch, seqlen, nheads, headdim, ngroups, dstate, nchunks, chunk_size, n_splits,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_T: tl.constexpr,  # rows t (the host reads the chosen value: the decay-gradient kernel needs it)
    BLOCK_S: tl.constexpr,  # positions s per step of the causal loop
):
    """dCB_k[t,s] = Σ_{heads h of split k} Γ[t,s]   (s ≤ t; the heads of a group share CB, and
                                                   ∂L/∂CB = Σ_k dCB_k over the group's splits)
        Γ[t,s]     = exp(cs[t] − cs[s])·dt_s · (dy_t·x_s)        (head h's score gradient)
    stored for the dC and dB programs (∂L/∂C_t ∋ Σ_s dCB[t,s]·B_s, ∂L/∂B_s ∋ Σ_t dCB[t,s]·C_t), and, per
    head, the intra-chunk decay gradient, which needs exactly these tiles:
        M[t,s] = Γ[t,s]·CB[t,s] = ∂L/∂(cs[t] − cs[s]), and cs[t] − cs[s] = dA_{s+1} + … + dA_t, so
        ∂L/∂dA_j = Σ_{t≥j} Σ_{s<j} M[t,s].
    For the rows t of this tile: with a running prefix sum along each row, Pre[t,s] = Σ_{s'≤s} M[t,s'],
    the program adds Σ_{t>s} Pre[t,s] to j = s + 1. Each step loops over the heads, so each head's running
    prefix waits in `row_prefix` until the next step. Every term is a product of decays ≤ 1; nothing
    cancels. The partial sums of the row tiles go to separate slices of dA_diag, added in the
    decay-gradient kernel. The slice of row tile k is written for 1 ≤ j ≤ min((k+1)·BLOCK_T, chunk_len) (beyond, no
    s < j ≤ t exists), and read only there.

    (This program holds no (rows × N) tile: the products with B and C are the dC and dB programs'. Its
    tiles are what limit its registers now: 138 in its 32×32 config against 250 when dC was part of it; the
    H100 chose 64×64, 4 warps, at 255 registers and 24 B spilled, at 8 × 2048, see docs/kernel-notes.md,
    session 10.)

    Tile: BLOCK_T rows t × steps of BLOCK_S positions s ≤ t, each looping over the heads of the split.
    Grid: (n_t_tiles = cdiv(Q, BLOCK_T), batch·nchunks, G·n_splits).
    """
    pid_t = tl.program_id(0)
    n_t_tiles = tl.num_programs(0)
    pid_b, pid_c, first_head, heads_per_split, chunk_len, row0, _, _, cb_off, dcb_off = \
        _split_offsets(tl.program_id(1), tl.program_id(2), batch, seqlen, nheads, ngroups, dstate, nchunks,
                       chunk_size, n_splits)
    cb_ptr += cb_off
    dcb_ptr += dcb_off

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, BLOCK_P)
    t_mask = offs_t < chunk_len
    p_mask = offs_p < headdim
    s_end = tl.minimum((pid_t + 1) * BLOCK_T, chunk_len)

    for s0 in range(0, s_end, BLOCK_S):
        s = s0 + offs_s
        s_mask = s < chunk_len
        cb = tl.load(cb_ptr + offs_t[:, None] * chunk_size + s[None, :],
                     mask=(offs_t[:, None] < chunk_size) & (s[None, :] < chunk_size), other=0.0)
        dcb = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        for i in range(heads_per_split):
            h = first_head + i
            bhc = ((pid_b * nheads + h) * nchunks + pid_c).to(tl.int64)  # (dA_diag passes 2³¹ entries first)
            tok = bhc * chunk_size
            diag = (bhc * n_t_tiles + pid_t) * chunk_size  # this row tile's slice of dA_diag
            cs_t, lo_t = _load_cs(cs_ptr, cs_lo_ptr, tok + offs_t, offs_t < chunk_size)
            head_off = row0 * nheads * headdim + h * headdim  # (b, chunk start, h, 0) in x and dy
            dyt = tl.load(dy_ptr + head_off + offs_t[:, None] * (nheads * headdim) + offs_p[None, :],
                          mask=t_mask[:, None] & p_mask[None, :], other=0.0)
            xsT = tl.load(x_ptr + head_off + s[None, :] * (nheads * headdim) + offs_p[:, None],  # (P, BLOCK_S)
                          mask=p_mask[:, None] & s_mask[None, :], other=0.0)
            cs_s, lo_s = _load_cs(cs_ptr, cs_lo_ptr, tok + s, s_mask)
            dt_s = tl.load(dt_ptr + row0 * nheads + h + s * nheads, mask=s_mask, other=0.0).to(tl.float32)
            g = tl.dot(dyt.to(DOT_DTYPE), xsT.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # (BLOCK_T, BLOCK_S)
            g *= _decay(cs_t[:, None] - cs_s[None, :], lo_t[:, None] - lo_s[None, :]) * dt_s[None, :]
            g = tl.where(offs_t[:, None] >= s[None, :], g, 0.0)  # Γ[t, s]
            dcb += g

            m = g * cb
            row_prefix = tl.load(row_prefix_ptr + tok + offs_t,  # Σ_{s' < s0} M[t, s'] (0 at the first step)
                                 mask=(offs_t < chunk_size) & (s0 > 0), other=0.0)
            prefix = row_prefix[:, None] + tl.cumsum(m, axis=1)  # Pre[t, s]: (BLOCK_T, BLOCK_S)
            dA_j = tl.sum(tl.where(offs_t[:, None] > s[None, :], prefix, 0.0), axis=0)  # (BLOCK_S,): j = s + 1
            tl.store(dA_diag_ptr + diag + s + 1, dA_j, mask=s + 1 < chunk_size)
            row_prefix += tl.sum(m, axis=1)  # (BLOCK_T,)
            tl.debug_barrier()  # (the threads that read an entry of row_prefix may not be those that write it:
            tl.store(row_prefix_ptr + tok + offs_t, row_prefix, mask=offs_t < chunk_size)  # all read first)
        tl.debug_barrier()  # (the next step reads the row prefixes just stored, perhaps from other threads)
        tl.store(dcb_ptr + offs_t[:, None] * chunk_size + s[None, :], dcb.to(dcb_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & (s[None, :] <= offs_t[:, None]))  # (the readers read s ≤ t only)


@_autotune(
    [_cfg(BLOCK_T=32, BLOCK_S=64), _cfg(BLOCK_T=32, BLOCK_S=32), _cfg(BLOCK_T=32, BLOCK_S=64, num_warps=8),
     _cfg(BLOCK_T=64, BLOCK_S=32, num_warps=8), _cfg(BLOCK_T=64, BLOCK_S=64, num_warps=8),
     _cfg(BLOCK_T=64, BLOCK_S=32, num_stages=3), _cfg(BLOCK_T=64, BLOCK_S=64), _cfg(BLOCK_T=64, BLOCK_S=32)],
    _cfg(BLOCK_T=16, BLOCK_S=32),
)
@triton.jit(do_not_specialize=["batch"])  # (used for one offset: not worth a compile per value)
def _chunk_scan_bwd_dc_kernel(
    dy_ptr,  # (batch, seqlen, H, P)
    cs_ptr, cs_lo_ptr,  # (batch, H, nchunks, Q); lo or None
    B_ptr, C_ptr,  # (batch, seqlen, G, N)
    states_ptr,  # (batch, nchunks, H, P, N), S_in in the dots' operand dtype
    dcb_ptr,  # (n_splits, batch, nchunks, G, Q, Q): dCB of this split's heads, from the dCB program (s ≤ t)
    dC_ptr,  # out (n_splits, batch, seqlen, G, N) fp32: ∂L/∂C summed over this split's heads
    dA_off_ptr,  # out (batch, H, nchunks, Q) fp32: r_t = ∂L/∂cs[t] through the state term
    batch, seqlen, nheads, headdim, ngroups, dstate, nchunks, chunk_size, n_splits,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,  # rows t
    BLOCK_S: tl.constexpr,  # positions s per step of the causal loop
):
    """∂L/∂C_t = Σ_{heads h of the group} dc_t  +  Σ_{s≤t} dCB[t,s]·B_s   where
        dc_t     = exp(cs[t]) · dy_tᵀ S_in[c]                   (C_t reads the entering state of head h)
        dCB[t,s] = ∂L/∂CB[t,s] (C_t is a query of CB[t, s] = C_t·B_s): this split's part dCB_k (dCB program)
    (each program sums the heads of its split of the group: its ∂L/∂C is a partial sum, and
    `_grad_sums_kernel` adds the splits')

    The same state term differentiated with respect to its decay exp(cs[t]) gives, per head,
    r_t = ⟨dc_t, C_t⟩ = ∂L/∂cs[t] through exp(cs[t]) (a cumulative sum of dA_j for j ≤ t, in the
    decay-gradient kernel).

    Tile: BLOCK_T rows t × all N: a loop over the heads of the split (through the entering states),
    then over s ≤ t (through CB): the dB program's mirror image.
    Grid: (cdiv(Q, BLOCK_T), batch·nchunks, G·n_splits), the splits as in the dCB program.
    """
    pid_t = tl.program_id(0)
    pid_b, pid_c, first_head, heads_per_split, chunk_len, row0, group_off, out_off, _, dcb_off = \
        _split_offsets(tl.program_id(1), tl.program_id(2), batch, seqlen, nheads, ngroups, dstate, nchunks,
                       chunk_size, n_splits)
    B_ptr += group_off
    C_ptr += group_off
    dC_ptr += out_off
    dcb_ptr += dcb_off

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t_mask = offs_t < chunk_len
    p_mask = offs_p < headdim
    n_mask = offs_n < dstate
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)

    # through the entering states, head by head
    for i in range(heads_per_split):
        h = first_head + i
        tok = ((pid_b * nheads + h) * nchunks + pid_c).to(tl.int64) * chunk_size  # this head's per-token buffers
        cs_t, lo_t = _load_cs(cs_ptr, cs_lo_ptr, tok + offs_t, offs_t < chunk_size)
        dyt = tl.load(dy_ptr + row0 * nheads * headdim + h * headdim
                      + offs_t[:, None] * (nheads * headdim) + offs_p[None, :],
                      mask=t_mask[:, None] & p_mask[None, :], other=0.0)
        s_in = tl.load(states_ptr + ((pid_b * nchunks + pid_c) * nheads + h).to(tl.int64) * headdim * dstate
                       + offs_p[:, None] * dstate + offs_n[None, :],
                       mask=p_mask[:, None] & n_mask[None, :], other=0.0)
        dc = tl.dot(dyt.to(DOT_DTYPE), s_in.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # (BLOCK_T, N)
        dc *= _decay(cs_t, lo_t)[:, None]
        c = tl.load(C_ptr + offs_t[:, None] * (ngroups * dstate) + offs_n[None, :],  # (reloaded per head)
                    mask=t_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        # (rows past the sequence end hold r = 0: the decay-gradient kernel sums over the whole chunk)
        tl.store(dA_off_ptr + tok + offs_t, tl.sum(dc * c, axis=1), mask=offs_t < chunk_size)
        acc += dc

    # through CB[t, s] for s ≤ t
    for s0 in range(0, tl.minimum((pid_t + 1) * BLOCK_T, chunk_len), BLOCK_S):
        s = s0 + offs_s
        s_mask = s < chunk_len
        dcb = tl.load(dcb_ptr + offs_t[:, None] * chunk_size + s[None, :],  # (BLOCK_T, BLOCK_S)
                      mask=t_mask[:, None] & (s[None, :] <= offs_t[:, None]), other=0.0)
        b = tl.load(B_ptr + s[:, None] * (ngroups * dstate) + offs_n[None, :],
                    mask=s_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(dcb.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # (BLOCK_T, N)

    tl.store(dC_ptr + offs_t[:, None] * (ngroups * dstate) + offs_n[None, :], acc,
             mask=t_mask[:, None] & n_mask[None, :])


@_autotune(
    [_cfg(BLOCK_S=32, BLOCK_T=64), _cfg(BLOCK_S=32, BLOCK_T=32), _cfg(BLOCK_S=32, BLOCK_T=64, num_warps=8),
     _cfg(BLOCK_S=64, BLOCK_T=32, num_warps=8), _cfg(BLOCK_S=64, BLOCK_T=64, num_warps=8),
     _cfg(BLOCK_S=32, BLOCK_T=64, num_stages=3), _cfg(BLOCK_S=64, BLOCK_T=64), _cfg(BLOCK_S=64, BLOCK_T=32)],
    _cfg(BLOCK_S=32, BLOCK_T=16),
)
@triton.jit(do_not_specialize=["batch"])  # (used for one offset: not worth a compile per value)
def _chunk_scan_bwd_db_kernel(
    x_ptr,  # (batch, seqlen, H, P)
    dt_ptr,  # (batch, seqlen, H)
    cs_ptr, cs_lo_ptr,  # (batch, H, nchunks, Q); lo or None
    B_ptr, C_ptr,  # (batch, seqlen, G, N)
    dchunk_ptr,  # (batch, nchunks, H, P, N), ∂L/∂S_c in the dots' operand dtype
    dcb_ptr,  # (n_splits, batch, nchunks, G, Q, Q): dCB of this split's heads, from the dCB program (s ≤ t)
    dB_ptr,  # out (n_splits, batch, seqlen, G, N) fp32: ∂L/∂B summed over this split's heads
    dA_state_ptr,  # out (batch, H, nchunks, Q) fp32: q_s stored at s + 1 (entry 0 is never written)
    batch, seqlen, nheads, headdim, ngroups, dstate, nchunks, chunk_size, n_splits,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,  # rows s
    BLOCK_T: tl.constexpr,  # positions t per step of the anti-causal loop
):
    """∂L/∂B_s = Σ_{heads h of the group} db_s  +  Σ_{t≥s} dCB[t,s]·C_t   where
        db_s     = exp(cs[Q-1] − cs[s])·dt_s · x_sᵀ ∂L/∂S_c     (B_s writes into the chunk state of head h)
        dCB[t,s] = ∂L/∂CB[t,s] (B_s is a key of CB[t, s] = C_t·B_s): this split's part dCB_k (dCB program)

    The same chunk-state term differentiated with respect to the decay exp(cs[Q-1] − cs[s]) =
    exp(dA_{s+1} + … + dA_{Q-1}) gives q_s = ⟨db_s, B_s⟩ for every dA_j with j > s; it is stored at
    s + 1 so that an inclusive cumulative sum in the decay-gradient kernel yields Σ_{s<j} q_s (that
    kernel reads entry 0 as 0, and entries past the sequence end not at all: the buffer is not zeroed, which would cost
    a launch).

    Tile: BLOCK_S rows s × all N: a loop over the heads of (a split of) the group (through the chunk
    states), then over t ≥ s (through CB). The heads of a group are shared among `n_splits` programs so
    that there are enough programs when G is small; `_grad_sums_kernel` adds their partial sums.
    Grid: (cdiv(Q, BLOCK_S), batch·nchunks, G·n_splits), the splits as in the dCB program.
    """
    pid_s = tl.program_id(0)
    pid_b, pid_c, first_head, heads_per_split, chunk_len, row0, group_off, out_off, _, dcb_off = \
        _split_offsets(tl.program_id(1), tl.program_id(2), batch, seqlen, nheads, ngroups, dstate, nchunks,
                       chunk_size, n_splits)
    B_ptr += group_off
    C_ptr += group_off
    dB_ptr += out_off
    dcb_ptr += dcb_off

    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    s_mask = offs_s < chunk_len
    p_mask = offs_p < headdim
    n_mask = offs_n < dstate
    acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)

    # through the chunk states, head by head
    for i in range(heads_per_split):
        h = first_head + i
        tok = ((pid_b * nheads + h) * nchunks + pid_c).to(tl.int64) * chunk_size  # this head's per-token buffers
        cs_s, lo_s = _load_cs(cs_ptr, cs_lo_ptr, tok + offs_s, offs_s < chunk_size)
        cs_last, lo_last = _load_cs(cs_ptr, cs_lo_ptr, tok + chunk_size - 1, None)
        dt_s = tl.load(dt_ptr + row0 * nheads + h + offs_s * nheads, mask=s_mask, other=0.0).to(tl.float32)
        xs = tl.load(x_ptr + row0 * nheads * headdim + h * headdim
                     + offs_s[:, None] * (nheads * headdim) + offs_p[None, :],
                     mask=s_mask[:, None] & p_mask[None, :], other=0.0)
        dSc = tl.load(dchunk_ptr + ((pid_b * nchunks + pid_c) * nheads + h).to(tl.int64) * headdim * dstate
                      + offs_p[:, None] * dstate + offs_n[None, :],
                      mask=p_mask[:, None] & n_mask[None, :], other=0.0)
        db = tl.dot(xs.to(DOT_DTYPE), dSc.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # (BLOCK_S, N)
        db *= (_decay(cs_last - cs_s, lo_last - lo_s) * dt_s)[:, None]
        b = tl.load(B_ptr + offs_s[:, None] * (ngroups * dstate) + offs_n[None, :],  # (reloaded per head, from
                    mask=s_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)  # cache: fewer registers)
        tl.store(dA_state_ptr + tok + offs_s + 1, tl.sum(db * b, axis=1), mask=offs_s + 1 < chunk_len)
        acc += db

    # through CB[t, s] for t ≥ s
    for t0 in range(pid_s * BLOCK_S, chunk_len, BLOCK_T):
        t = t0 + offs_t
        t_mask = t < chunk_len
        dcbT = tl.load(dcb_ptr + t[None, :] * chunk_size + offs_s[:, None],  # (BLOCK_S, BLOCK_T) = dCB[t, s]ᵀ
                       mask=t_mask[None, :] & (t[None, :] >= offs_s[:, None]), other=0.0)
        c = tl.load(C_ptr + t[:, None] * (ngroups * dstate) + offs_n[None, :],
                    mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(dcbT.to(DOT_DTYPE), c.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # (BLOCK_S, N)

    tl.store(dB_ptr + offs_s[:, None] * (ngroups * dstate) + offs_n[None, :], acc,
             mask=s_mask[:, None] & n_mask[None, :])


@triton.jit
def _chunk_cumsum_bwd_kernel(
    dt_ptr,  # (batch, seqlen, H)
    A_ptr,  # (H,)
    ddt_x_ptr,  # (batch, H, nchunks, Q): ⟨∂L/∂u, x⟩ from the dx kernel
    dxy_ptr,  # (batch, H, nchunks, Q): ⟨dy, x⟩ from the dx kernel (used only with HAS_D)
    dA_state_ptr,  # (batch, H, nchunks, Q): q_s stored at s + 1, from the dB kernel
    dA_off_ptr,  # (batch, H, nchunks, Q): r_t, from the dC kernel
    dA_diag_ptr,  # (batch, H, nchunks, n_t_tiles, Q), from the dCB kernel
    dalpha_ptr,  # (batch, H, nchunks, n_blocks), from the state-passing backward
    ddt_ptr,  # out (batch, seqlen, H) fp32: ∂L/∂dt
    dA_part_ptr,  # out (batch, nchunks, H) fp32: this chunk's part of ∂L/∂A
    dD_part_ptr,  # out (batch, nchunks, H) fp32: this chunk's part of ∂L/∂D
    seqlen, nheads, nchunks, chunk_size, n_t_tiles, n_blocks,
    HAS_D: tl.constexpr,
    DC_BLOCK_T: tl.constexpr,  # rows per program of the dCB kernel: which entries of dA_diag it wrote
    BLOCK_Q: tl.constexpr,
):
    """Collects ∂L/∂dA_j for the positions j of one chunk and head, then ∂L/∂dt and ∂L/∂A:

        ∂L/∂dA_j = Σ_{t≥j} Σ_{s<j} M[t,s]     (intra-chunk decays, summed over the row tiles)
                 + Σ_{s<j} q_s                (decays to the chunk end in S_c: an inclusive cumsum
                                               of q stored shifted by one)
                 + Σ_{t≥j} r_t + ∂L/∂α_c      (exp(cs[t]) of the state term, and the chunk's total
                                               decay α_c = cs[Q-1] ∋ dA_j: a reverse cumsum)
        ∂L/∂dt_j = ⟨∂L/∂u_j, x_j⟩ + A·∂L/∂dA_j,     ∂L/∂A += Σ_j dt_j·∂L/∂dA_j,     ∂L/∂D += Σ_j ⟨dy_j, x_j⟩.

    Tile: the BLOCK_Q positions of the chunk. Grid: (nchunks, batch, H).
    """
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_h = tl.program_id(2)
    offs_t = tl.arange(0, BLOCK_Q)
    pos = pid_c * chunk_size + offs_t
    in_chunk = offs_t < chunk_size
    valid = in_chunk & (pos < seqlen)
    bhc = ((pid_b * nheads + pid_h) * nchunks + pid_c).to(tl.int64)  # (as in the dCB program)
    tok = bhc * chunk_size

    # (only the entries the dCB, dC and dB kernels wrote are read: their buffers are not zeroed; the
    # positions past the sequence end, where nothing is written, do not reach ∂L/∂dt and ∂L/∂A)
    ddA = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for k in range(n_t_tiles):
        ddA += tl.load(dA_diag_ptr + (bhc * n_t_tiles + k) * chunk_size + offs_t,
                       mask=valid & (offs_t >= 1) & (offs_t <= (k + 1) * DC_BLOCK_T), other=0.0)
    ddA += tl.cumsum(tl.load(dA_state_ptr + tok + offs_t, mask=valid & (offs_t >= 1), other=0.0), axis=0)
    dalpha = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for k in range(n_blocks):
        dalpha += tl.load(dalpha_ptr + bhc * n_blocks + k)
    r = tl.load(dA_off_ptr + tok + offs_t, mask=in_chunk, other=0.0)
    r += tl.where(offs_t == chunk_size - 1, dalpha, 0.0)  # α_c enters at the chunk's last position
    ddA += tl.cumsum(r, axis=0, reverse=True)

    dt = tl.load(dt_ptr + (pid_b * seqlen + pos) * nheads + pid_h, mask=valid, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + pid_h).to(tl.float32)
    ddt = tl.load(ddt_x_ptr + tok + offs_t, mask=valid, other=0.0) + A * ddA
    tl.store(ddt_ptr + (pid_b * seqlen + pos) * nheads + pid_h, ddt, mask=valid)
    part = (pid_b * nchunks + pid_c) * nheads + pid_h
    tl.store(dA_part_ptr + part, tl.sum(tl.where(valid, ddA * dt, 0.0)))
    if HAS_D:
        tl.store(dD_part_ptr + part, tl.sum(tl.load(dxy_ptr + tok + offs_t, mask=valid, other=0.0)))


@triton.jit
def _grad_sums_kernel(
    dBC_ptr,  # (2, n_splits, numel) fp32: the dB and dC programs' partial sums, one per split of the heads
    dBC_out_ptr,  # out (2, numel) in B's dtype: ∂L/∂B, ∂L/∂C
    parts_ptr,  # (n_parts, rows, H) fp32: the parts of ∂L/∂A (and ∂L/∂D) of each (batch element, chunk)
    dAD_ptr,  # out (n_parts, H) fp32: ∂L/∂A (and ∂L/∂D)
    numel, n_splits, rows, nheads, n_parts,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The sums that close the backward, in one launch instead of three PyTorch calls (host time):
        ∂L/∂A[h] = Σ_{batch element, chunk} parts[0, ·, h],  ∂L/∂D[h] likewise with parts[1]
        ∂L/∂B = Σ_splits (the dB program's partial sums),  ∂L/∂C likewise       (in B's dtype)
    Each sum runs in a fixed order: the same inputs give the same bits.

    Tile: program 0 all of ∂L/∂A and ∂L/∂D, BLOCK_R rows (of batch·nchunks) at a time, so that it starts
    first, beside the others; each other program BLOCK entries of ∂L/∂B or ∂L/∂C.
    Grid: (1 + 2·cdiv(numel, BLOCK),), or (1,) where there is nothing to add or cast (one split and fp32 B:
    the host keeps the dB/dC programs' output as it is).
    """
    pid = tl.program_id(0)
    if pid == 0:
        offs_r = tl.arange(0, BLOCK_R)
        offs_h = tl.arange(0, BLOCK_H)
        h_mask = offs_h < nheads
        for i in range(n_parts):
            acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
            for r0 in range(0, rows, BLOCK_R):
                r = r0 + offs_r
                acc += tl.load(parts_ptr + (i * rows + r[:, None]) * nheads + offs_h[None, :],
                               mask=(r[:, None] < rows) & h_mask[None, :], other=0.0)
            tl.store(dAD_ptr + i * nheads + offs_h, tl.sum(acc, axis=0), mask=h_mask)
    else:  # a tile of ∂L/∂B (which = 0) or of ∂L/∂C
        n_blocks = tl.cdiv(numel, BLOCK)
        which = (pid - 1) // n_blocks
        offs = ((pid - 1) % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(n_splits):
            acc += tl.load(dBC_ptr + (which * n_splits + k).to(tl.int64) * numel + offs, mask=mask, other=0.0)
        tl.store(dBC_out_ptr + which.to(tl.int64) * numel + offs, acc.to(dBC_out_ptr.dtype.element_ty), mask=mask)


# ==================================================================================================
# Host side: launches, the autograd Function, the public entry point
# ==================================================================================================
_STATE_BLOCK = 256  # state entries per program in the two state-passing kernels
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's 2nd axis, which enumerates (batch element, chunk) pairs
_DC_MIN_BLOCK_T = 32  # the smallest row tile among the dCB program's configs: it sizes dA_diag
_SUMS_BLOCK = 1024  # entries of ∂L/∂B or ∂L/∂C per program of `_grad_sums_kernel`
_SUMS_TILE = 2048  # (rows × heads) fp32 entries per step of its ∂L/∂A, ∂L/∂D sums (46 registers at 32 heads)


# Host-side arithmetic is plain Python: triton.cdiv and triton.next_power_of_2 are constexpr functions
# that cost ~5 µs of host time per call outside a kernel (a forward+backward made ~37 such calls).
def _cdiv(a, b):
    return -(-a // b)


def _pow2(n):
    """The tile covering n: the next power of two, at least 16 (the smallest `tl.dot` dimension)."""
    return max(16, 1 << (n - 1).bit_length())


def _dot_args(x, dstate, headdim=None):
    """The constexprs every dot-using program gets: operand dtype, precision, and P/N tile sizes (no N
    tile where dstate is None)."""
    return _dot_args_for(x.dtype, dstate, headdim)


@functools.cache
def _dot_args_for(dtype, dstate, headdim):
    if dtype == torch.float32:
        dot_dtype, precision = tl.float32, "ieee"  # exact fp32 products, not TF32
    elif dtype == torch.float16:
        dot_dtype, precision = tl.float16, "tf32"  # (the precision only matters for fp32 operands)
    else:  # bfloat16. Triton 3.9's interpreter multiplies the raw bits of bf16 dot operands, so on CPU
        # the dots take fp32 operands; loads, casts and stores are still exercised in bf16.
        dot_dtype, precision = (tl.float32 if INTERPRET else tl.bfloat16), "tf32"
    args = dict(DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)
    if dstate is not None:
        args["BLOCK_N"] = _pow2(dstate)
    if headdim is not None:
        args["BLOCK_P"] = _pow2(headdim)
    return args  # (shared between calls: read only)


def _dot_torch_dtype(x):
    """The torch dtype of `_dot_args(x, ...)["DOT_DTYPE"]`: buffers that are only ever dot operands
    (the entering states, ∂L/∂S_c, dCB) are stored in it."""
    return _dot_torch_dtype_for(x.dtype)


@functools.cache
def _dot_torch_dtype_for(dtype):
    return {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}[
        _dot_args_for(dtype, 16, None)["DOT_DTYPE"]]


@functools.cache
def _sm_count(device):
    """Streaming multiprocessors of the GPU that runs the programs (1 under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if INTERPRET:
        return 1
    # CPU tensors without the interpreter: only under kernels.offline's stand-in for a GPU
    return triton.runtime.driver.active.utils.get_device_properties(0)["multiprocessor_count"]


# How `_head_splits` splits the heads of a group between the dCB, dC and dB programs. Each split writes its
# own dCB (Q×Q per chunk and group, in the dots' dtype), which dC and dB multiply with B and C, and fp32
# partial sums of dB and dC that a reduction reads again: fewer splits, less of all three, but fewer
# programs. It aims for `_DBC_PROGRAMS_PER_SM` programs per SM, with at most `_MAX_HEAD_SPLITS` splits.
# Measured on an H100 (370m layer, 32 heads in one group; forward+backward replayed from a CUDA graph,
# ms, session 10, all in one run):
#     splits               1      2      4      8      16     32
#     batch 1 × 2048       —      —    0.273  0.252  0.271  0.327     (chosen: 8; without the cap, 32)
#     batch 8 × 2048     1.522  1.483  1.444  1.524    —      —       (chosen: 4)
# At batch 1 × 2048, 32 splits of one head wrote 67 MB of partial sums and 34 MB of dCB.
_DBC_PROGRAMS_PER_SM = 4
_MAX_HEAD_SPLITS = 8


def _head_splits(heads_per_group, programs, device):
    """Into how many programs the dCB/dC/dB kernels split the heads of a group (`programs`: how many there
    are with one split): the smallest divisor of heads_per_group giving `_DBC_PROGRAMS_PER_SM` programs per
    SM, or failing that the largest divisor up to `_MAX_HEAD_SPLITS`."""
    return _head_splits_for(heads_per_group, programs, _sm_count(device), _DBC_PROGRAMS_PER_SM, _MAX_HEAD_SPLITS)


@functools.lru_cache(maxsize=MAX_BINARIES)  # (~10 µs of host time per backward otherwise)
def _head_splits_for(heads_per_group, programs, sms, programs_per_sm, max_splits):
    divisors = [d for d in range(1, min(heads_per_group, max_splits) + 1) if heads_per_group % d == 0]
    return next((d for d in divisors if programs * d >= programs_per_sm * sms), divisors[-1])


def _chunk_state(u, v, dt, A, cs, cs_lo, chunk_size, to_chunk_end, plan):
    """Stage 2's program: Σ_s w_s·u_s v_sᵀ per chunk and head, fp32 (b, nc, H, P, N), with
    w_s = exp(cs[Q-1] − cs[s])·dt_s (to_chunk_end, u = x, v = B: the chunk states S_c, in the forward,
    which first fills cs and cs_lo (b, H, nc, Q) with stage 1) or w_s = exp(cs[s]) (u = dy, v = C:
    ∂L/∂S_in[c] through the outputs of chunk c, in the backward, which reads them)."""
    b, l, h, p = u.shape
    g, n = v.shape[2:]
    nc = _cdiv(l, chunk_size)
    out = torch.empty(b, nc, h, p, n, device=u.device, dtype=torch.float32)  # (b, nc, H, P, N)
    _launch(_chunk_state_kernel, (b * nc, h, 1), (chunk_size, p, n, u.dtype), plan, u, v, dt, A, cs, cs_lo, out,
            l, h, p, g, n, nc, chunk_size, TO_CHUNK_END=to_chunk_end, **_dot_args(u, n, p))
    return out


def _chunk_cb(C, B, chunk_size, x, plan):
    """Stage 4's program: CB (b, nc, G, Q, Q) fp32, with x's dtype for the dot operands."""
    b, l, g, n = B.shape
    Q = chunk_size
    nc = _cdiv(l, Q)
    cb = torch.empty(b, nc, g, Q, Q, device=B.device, dtype=torch.float32)  # (b, nc, G, Q, Q)
    grid = lambda META: (_cdiv(Q, META["BLOCK_T"]) * _cdiv(Q, META["BLOCK_S"]), b * nc, g)
    _launch(_chunk_cb_kernel, grid, (Q, x.shape[-1], n, x.dtype), plan, C, B, cb, l, g, n, nc, Q,
            **_dot_args(x, n))
    return cb


def _forward_stages(x, dt, A, B, C, chunk_size, initial_state, plan):
    """Stages 1–4 of the forward (the backward runs stage 3 again, fused into its own reverse pass).
    Returns cs and cs_lo (b, H, nc, Q; cs_lo None unless x is fp32), the chunk states S_c (b, nc, H, P, N,
    fp32), CB (b, nc, G, Q, Q), the entering states (b, nc, H, P, N, in the dots' operand dtype) and the
    final state (fp32)."""
    b, l, h, p = x.shape
    n = B.shape[3]
    Q = chunk_size
    nc = _cdiv(l, Q)
    f32 = dict(device=x.device, dtype=torch.float32)

    cs = torch.empty(b, h, nc, Q, **f32)  # (b, H, nc, Q): stage 1, written by stage 2's program
    cs_lo = torch.empty_like(cs) if x.dtype == torch.float32 else None  # (b, H, nc, Q), see "Decays: cs in two parts"
    chunk_states = _chunk_state(x, B, dt, A, cs, cs_lo, Q, to_chunk_end=True, plan=plan)  # S_c (b, nc, H, P, N)

    # the entering states are only dot operands of stage 5: stored in that dtype
    states = torch.empty(b, nc, h, p, n, device=x.device, dtype=_dot_torch_dtype(x))  # S_in (b, nc, H, P, N)
    final = torch.empty(b, h, p, n, **f32)  # (b, H, P, N)
    _launch(_state_passing_fwd_kernel, (_cdiv(p * n, _STATE_BLOCK), b, h), None, plan,
            chunk_states, cs, cs_lo, initial_state, states, final, h, p * n, nc, Q,
            HAS_INITIAL=initial_state is not None, BLOCK=_STATE_BLOCK, num_warps=2)
    return cs, cs_lo, chunk_states, _chunk_cb(C, B, Q, x, plan), states, final


def _ssd_forward(x, dt, A, B, C, chunk_size, D, initial_state):
    """All five stages (four programs): returns y (b, l, H, P) in x's dtype, the final state (b, H, P, N) in fp32, and
    what the backward keeps: (cs, cs_lo, S_c, CB), see `_forward_stages`."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nc = _cdiv(l, chunk_size)
    plan = _plan("forward", chunk_size, x.shape, B.shape, x.device, tensors=(x, dt, A, B, C, D, initial_state))
    cs, cs_lo, chunk_states, cb, states, final = _forward_stages(x, dt, A, B, C, chunk_size, initial_state, plan)
    y = torch.empty_like(x)  # (b, l, H, P)
    grid = lambda META: (_cdiv(chunk_size, META["BLOCK_T"]), b * nc, h)
    _launch(_chunk_scan_fwd_kernel, grid, (chunk_size, p, n, x.dtype), plan, x, dt, cs, cs_lo, cb, C, states, D,
            y, l, h, p, g, n, nc, chunk_size, HAS_D=D is not None, **_dot_args(x, n, p))
    plan.done()
    return y, final, (cs, cs_lo, chunk_states, cb)


def _ssd_backward(dy, dfinal, x, dt, A, B, C, kept, chunk_size, D, initial_state):
    """The gradients (dx, ddt, dA, dB, dC, dD, dh0) of L given dy = ∂L/∂y and dfinal = ∂L/∂final
    (either may be None: no gradient flows from there), and kept = (cs, cs_lo, S_c, CB) from the forward. See
    the derivation above the backward kernels.

    Launches: ∂L/∂S_in (stage 2's program), stage 3 fused with its backward, dx, dCB, dC, dB, the decay
    gradient, and the closing sums (`_grad_sums_kernel`). No buffer is zero-filled (but dy, where y gets
    no gradient): every kernel writes all the entries that are read."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    Q = chunk_size
    nc = _cdiv(l, Q)
    device = x.device
    f32 = dict(device=device, dtype=torch.float32)
    dy = torch.zeros_like(x) if dy is None else _as(dy, x.dtype).contiguous()  # (b, l, H, P)
    dfinal = None if dfinal is None else dfinal.contiguous()
    dots = _dot_args(x, n, p)
    key = (Q, p, n, x.dtype)  # what the autotuned configs are chosen for (see `_launch`)
    n_splits = _head_splits(h // g, _cdiv(Q, 64) * b * nc * g, device)  # (dCB, dC and dB, below)
    plan = _plan("backward", Q, n_splits, x.shape, B.shape, device,
                 tensors=(dy, dfinal, x, dt, A, B, C, D, initial_state, *kept))

    # ∂L/∂S_in[c] through the outputs of chunk c: stage 2's program with the other weight
    cs, cs_lo, chunk_states, cb = kept
    dstates = _chunk_state(dy, C, dt, A, cs, cs_lo, Q, to_chunk_end=False, plan=plan)  # (b, nc, H, P, N)

    # stage 3 again (S_in), then the reverse scan over chunks: ∂L/∂S_c, ∂L/∂α_c (partial sums), ∂L/∂h_0;
    # S_in and ∂L/∂S_c are read by the later programs only as dot operands: stored in that dtype too
    n_blocks = _cdiv(p * n, _STATE_BLOCK)
    dot_dtype = _dot_torch_dtype(x)
    states = torch.empty_like(chunk_states)  # S_in (b, nc, H, P, N) fp32
    states_dot = states if dot_dtype == torch.float32 else torch.empty_like(states, dtype=dot_dtype)  # its dot copy
    dchunk = torch.empty_like(chunk_states, dtype=dot_dtype)  # ∂L/∂S_c (b, nc, H, P, N)
    dalpha = torch.empty(b, h, nc, n_blocks, **f32)  # (b, H, nc, n_blocks): each state block's part of ∂L/∂α_c
    dh0 = torch.empty(b, h, p, n, **f32) if initial_state is not None else None  # (b, H, P, N)
    _launch(_state_passing_bwd_kernel, (n_blocks, b, h), None, plan,
            chunk_states, cs, cs_lo, initial_state, dstates, dfinal, states, states_dot, dchunk, dalpha, dh0,
            h, p * n, nc, Q, HAS_DFINAL=dfinal is not None, HAS_INITIAL=initial_state is not None,
            STATES_DOT_COPY=states_dot is not states, BLOCK=_STATE_BLOCK, num_warps=2)

    # dx, and the parts of ∂L/∂dt (through u = dt·x) and ∂L/∂D of every token
    dx = torch.empty_like(x)  # (b, l, H, P)
    ddt_x = torch.empty(b, h, nc, Q, **f32)  # (b, H, nc, Q)
    dxy = torch.empty(b, h, nc, Q, **f32) if D is not None else None  # (b, H, nc, Q)
    grid = lambda META: (_cdiv(Q, META["BLOCK_S"]), b * nc, h)
    _launch(_chunk_scan_bwd_dx_kernel, grid, key, plan, x, dy, dt, cs, cs_lo, cb, B, dchunk, D, dx, ddt_x, dxy,
            l, h, p, g, n, nc, Q, HAS_D=D is not None, **dots)

    # ∂L/∂CB summed over the heads of each of n_splits splits of a group (dcb) with the intra-chunk
    # decay gradient; then dC and dB (one buffer, summed over the splits by the last program), each a
    # partial sum over the heads of a split, reading dcb
    dcb = torch.empty(n_splits, b, nc, g, Q, Q, device=device, dtype=dot_dtype)  # (n_splits, b, nc, G, Q, Q)
    # a Q-slice per row tile of the dCB program: allocated for the most row tiles (the smallest BLOCK_T); the
    # programs use its first b·H·nc·n_t_tiles·Q entries as a dense (b, H, nc, n_t_tiles, Q) array, with
    # n_t_tiles = ⌈Q/BLOCK_T⌉ for the BLOCK_T the dCB program ran with (so not dA_diag[:, :, :, :n_t_tiles])
    dA_diag = torch.empty(b, h, nc, _cdiv(Q, _DC_MIN_BLOCK_T), Q, **f32)
    row_prefix = torch.empty(b, h, nc, Q, **f32)  # (b, H, nc, Q): the dCB program's scratch
    grid = lambda META: (_cdiv(Q, META["BLOCK_T"]), b * nc, g * n_splits)
    dcb_config = _launch(_chunk_scan_bwd_dcb_kernel, grid, key, plan, x, dy, dt, cs, cs_lo, cb, dcb, dA_diag,
                         row_prefix, b, l, h, p, g, n, nc, Q, n_splits,
                         **_dot_args(x, None, p))  # (no tile spans N)
    dc_block_t = dcb_config.kwargs["BLOCK_T"]  # the row tile the dCB program ran with
    dBC = torch.empty(2, n_splits, b, l, g, n, **f32)  # (2, n_splits, b, l, G, N): [0] ∂L/∂B, [1] ∂L/∂C parts
    dA_off = torch.empty(b, h, nc, Q, **f32)  # (b, H, nc, Q)
    _launch(_chunk_scan_bwd_dc_kernel, grid, key, plan, dy, cs, cs_lo, B, C, states_dot, dcb, dBC[1], dA_off,
            b, l, h, p, g, n, nc, Q, n_splits, **dots)
    dA_state = torch.empty(b, h, nc, Q, **f32)  # (b, H, nc, Q)
    grid = lambda META: (_cdiv(Q, META["BLOCK_S"]), b * nc, g * n_splits)
    _launch(_chunk_scan_bwd_db_kernel, grid, key, plan, x, dt, cs, cs_lo, B, C, dchunk, dcb, dBC[0], dA_state,
            b, l, h, p, g, n, nc, Q, n_splits, **dots)

    # the decay gradient, then ∂L/∂dt, and the per-chunk parts of ∂L/∂A and ∂L/∂D (one buffer)
    ddt = torch.empty(b, l, h, **f32)  # (b, l, H)
    parts = torch.empty(2 if D is not None else 1, b, nc, h, **f32)  # (1 or 2, b, nc, H): ∂L/∂A, ∂L/∂D parts
    _launch(_chunk_cumsum_bwd_kernel, (nc, b, h), None, plan, dt, A, ddt_x, dxy, dA_state, dA_off, dA_diag, dalpha,
            ddt, parts[0], parts[-1], l, h, nc, Q, _cdiv(Q, dc_block_t), n_blocks,
            HAS_D=D is not None, DC_BLOCK_T=dc_block_t, BLOCK_Q=_pow2(Q))

    # the sums over batch elements and chunks (∂L/∂A, ∂L/∂D) and over the splits (∂L/∂B, ∂L/∂C; not with
    # one split and fp32 B: the dB/dC programs' output is then ∂L/∂B, ∂L/∂C as it is)
    dAD = torch.empty(parts.shape[0], h, **f32)  # (1 or 2, H): ∂L/∂A, ∂L/∂D
    numel = b * l * g * n
    add = n_splits > 1 or B.dtype != torch.float32
    # (2, b, l, G, N): ∂L/∂B, ∂L/∂C
    dBC_out = torch.empty(2, b, l, g, n, device=device, dtype=B.dtype) if add else dBC[:, 0]
    block_h = _pow2(h)
    _launch(_grad_sums_kernel, (1 + 2 * _cdiv(numel, _SUMS_BLOCK) if add else 1, 1, 1), None, plan, dBC, dBC_out,
            parts, dAD, numel, n_splits, b * nc, h, parts.shape[0],
            BLOCK=_SUMS_BLOCK, BLOCK_R=max(1, _SUMS_TILE // block_h), BLOCK_H=block_h)
    plan.done()
    return (dx, _as(ddt, dt.dtype), _as(dAD[0], A.dtype), dBC_out[0], dBC_out[1],  # dA (H,), dB, dC (b, l, G, N)
            _as(dAD[1], D.dtype) if D is not None else None,  # dD (H,)
            _as(dh0, initial_state.dtype) if initial_state is not None else None)


def _as(t, dtype):
    """t in `dtype`: t itself where it already is (a dtype comparison costs less host time than the
    dispatcher call of a `.to` that returns t)."""
    return t if t.dtype == dtype else t.to(dtype)


def _on_device_of(t):
    """Triton launches on the current CUDA device: make it the one holding the tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class SSDChunkScanFn(torch.autograd.Function):
    """Forward: the five stages (four programs). Backward: stage 3 again, then the backward programs.
    Saved for the backward besides the inputs: cs (4 bytes per token and head, 1/32 of x at P = 64 in
    bf16; 8 for fp32 inputs, with its low part), the chunk states S_c (fp32, P·N·4/Q bytes per token and
    head: as large as x in bf16 at N = 128, Q = 256) and CB (G·Q·4 bytes per token: a quarter of x at the
    370m shapes). Recomputing S_c and CB instead would save that memory for one more pass over x and B,
    and one over C and B (~80 µs of 1.7 ms at 8 × 2048 on an H100, by session 7's profile); the entering
    states S_in are recomputed (keeping them in fp32 would cost another x's worth, for an estimated ~40 µs)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, initial_state):
        with _on_device_of(x):
            y, final, kept = _ssd_forward(x, dt, A, B, C, chunk_size, D, initial_state)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, *kept)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)  # an unused output gives None, not a tensor of zeros
        return y, final

    @staticmethod
    @once_differentiable  # (the gradients are computed by kernels, not by differentiable ops)
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, initial_state, *kept = ctx.saved_tensors
        with _on_device_of(x):
            dx, ddt, dA, dB, dC, dD, dh0 = _ssd_backward(dy, dfinal, x, dt, A, B, C, kept, ctx.chunk_size, D,
                                                         initial_state)
        return dx, ddt, dA, dB, dC, None, dD, dh0


def ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, initial_state=None, return_final_state=False):
    """The chunked SSD scan in Triton, differentiable: the contract of `minimamba.ssd.ssd_chunked`.

    x (b, l, H, P) in fp32, bf16 or fp16; dt (b, l, H) positive; A (H,) negative; B, C (b, l, G, N)
    with G dividing H; D (H,) or None; initial_state (b, H, P, N) or None. Any seqlen and chunk size.
    Returns y (b, l, H, P) in x's dtype, and the final state (b, H, P, N) in fp32 if `return_final_state`.
    Tensors must be on CUDA, or on CPU with TRITON_INTERPRET=1 set before importing this module. Shapes and
    dtypes are checked as `ssd_chunked` checks them; the signs of dt and A only on a CPU (on a GPU that would
    wait for it): the programs compute every decay exp(cs[t] − cs[s]) (or exp(cs[t])) as exp(min(·, 0)) ≤ 1.
    In fp16 the entering states are stored in fp16 (dot operands, as mamba_ssm does): an entry beyond
    65,504 makes y inf from there on.
    """
    b, l, h, p, g, n = _check(x, dt, A, B, C, D, initial_state)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"ssd_chunk_scan supports float32, bfloat16 and float16 inputs, got {x.dtype}")
    chunk_size = check_chunk_size(chunk_size)  # (a Python int: plan keys and Triton's specialization take it)
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError(
            f"the Triton SSD kernel needs CUDA tensors, got {x.device.type}. To run it on CPU (slowly, for "
            "tests), set TRITON_INTERPRET=1 before importing `kernels`; or use minimamba.ssd.ssd_chunked.")
    if b * _cdiv(l, chunk_size) > _MAX_GRID_Y:
        raise ValueError(f"batch × chunks = {b} × {_cdiv(l, chunk_size)} exceeds {_MAX_GRID_Y}, the most "
                         "programs a CUDA grid has along the axis that enumerates them: use a larger chunk_size "
                         "or call with fewer sequences at a time")
    if l == 0:
        final = (x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None  # (b, H, P, N)
                 else initial_state.to(torch.float32, copy=True))  # (a copy, as ssd_chunked's: not an alias)
        y = x.new_empty(b, 0, h, p)  # (b, 0, H, P)
        return (y, final) if return_final_state else y
    # B and C are dot operands next to x: same dtype; every program assumes contiguous tensors
    B, C = _as(B, x.dtype), _as(C, x.dtype)
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    D = D.contiguous() if D is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None
    inputs = (x, dt, A, B, C, D, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, final = SSDChunkScanFn.apply(x, dt, A, B, C, chunk_size, D, initial_state)
    else:  # nothing to differentiate (inference, torch.no_grad): the forward without autograd's bookkeeping
        with _on_device_of(x):  # (~20 µs less host time per call on a 2-core VM, a fifth of a forward's)
            y, final, _ = _ssd_forward(x, dt, A, B, C, chunk_size, D, initial_state)
    return (y, final) if return_final_state else y

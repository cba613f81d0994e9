r"""The SSD (state space duality) layer of Mamba2, in three equivalent forms.

Glossary (the names of the Mamba2 paper, used in every function and einsum string of the project)

    x    (batch, seqlen, H, P)   the input of the scan: P channels for each of H heads
    dt   (batch, seqlen, H)      the step size Δ of each token and head, ≥ 0 (the model computes
                                 dt = softplus(dt_raw + dt_bias) > 0; dt = 0 pads a partial chunk)
    A    (H,)                    one scalar ≤ 0 per head (the model's −exp(A_log) < 0); exp(dt·A) ∈ (0, 1] is
                                 the decay (1 where dt = 0)
    B    (batch, seqlen, G, N)   the "input matrix": how a token writes into the state
    C    (batch, seqlen, G, N)   the "output matrix": how a token reads from the state
    D    (H,)                    optional skip connection, y += D·x
    h    (batch, H, P, N)        the hidden state of each head: a P×N matrix (ssd_step's `h`; in the code of
                                 the other functions `h` is the number of heads H, and in ssd_quadratic's
                                 einsum strings the head axis, t and s a target and a source position)
    H, P, N, G                   heads, head dimension, state size, groups (G divides H; head
                                 number i reads B and C of group i // (H/G))
    Q                            the chunk length of the chunked algorithm; nc = ⌈seqlen/Q⌉ chunks
                                 (the axis c in ssd_chunked's shape comments and einsum strings)
    R                            H/G, the heads of a group (they share its B and C)
    L                            the causal decay mask L[t, s] = exp(dt_{s+1}A + … + dt_t A) for s ≤ t, 0 for
                                 s > t: (T, T) in the quadratic form, (Q, Q) in each chunk ("1-semiseparable":
                                 every block of it below the diagonal has rank 1, which is what chunking uses)
    cs                           the cumulative log-decay cs_t = Σ_{k≤t} dt_k·A, inclusive of t: from the
                                 sequence start in the derivation below and ssd_quadratic, restarted at each
                                 chunk in ssd_chunked and the Triton kernel (t = 0 … Q−1 there)
    b, l                         batch and seqlen in shape comments (in ssd_chunked's einsum strings l is
                                 a position inside a chunk, of which there are Q)

The recurrence (what the layer *is*; tokens t = 1 … T and chunks c = 1 … nc in these formulas, 0-based in the code)

    h_t = exp(dt_t·A) · h_{t-1} + dt_t · x_t B_tᵀ          (P×N, one scalar decay per head and step)
    y_t = h_t C_t + D·x_t                                   (P,)

Unrolling it from h_0 gives, with cs_t = Σ_{k≤t} dt_k·A the cumulative log-decay,

    y_t = Σ_{s≤t} exp(cs_t − cs_s) · (C_t·B_s) · dt_s x_s  +  exp(cs_t) · h_0 C_t  +  D·x_t

which is the quadratic, attention-like form Y = (L ∘ C Bᵀ) · (dt·X): "queries" C, "keys" B, "values"
dt·x, and a causal decay mask L instead of a softmax. Over T = seqlen tokens, the recurrent form costs
O(T·P·N) work but is sequential; the quadratic form is parallel but costs O(T²). The chunked algorithm
uses each where it is best: split the sequence into chunks of Q tokens, use the quadratic form *inside*
each chunk (a Q×Q matmul, fast on any hardware) and the recurrence *between* chunks (T/Q steps instead
of T).
From here cs restarts at each chunk: cs_t sums dt_k·A over the chunk's positions k ≤ t, and cs_last is its
value at the chunk's last position (the chunk's whole decay). For t in chunk c, split the sum over s ≤ t above
into the s of chunk c (step 1) and the s before it: for an earlier s, the decay from s to t (exp(cs_t − cs_s) in
the unrolled sum, cs counted from the sequence start) is exp(cs_t) (the decay from the chunk's start to t) times
the decay from s to the chunk's start, and those terms with the h_0 term add up to h_{c−1} C_t, the state
entering the chunk read by C_t. So each chunk contributes through its end state, and
every token reads the state entering its chunk:

    1. intra-chunk output     Y_diag[t] = Σ_{s≤t in chunk} L[t,s] (C_t·B_s) dt_s x_s
    2. chunk states           S_c       = Σ_{s in chunk} exp(cs_last − cs_s) dt_s x_s B_sᵀ
    3. inter-chunk recurrence h_c       = exp(cs_last of chunk c) · h_{c−1} + S_c
    4. state to output        Y_off[t]  = exp(cs_t) · h_{c−1} C_t

    y = Y_diag + Y_off + D·x

All three functions below have one contract,

    f(x, dt, A, B, C, D=None, initial_state=None, ...) -> (y, final_state)

and return y in x's dtype and final_state (batch, H, P, N) in float32 (float64 for float64 inputs).
They compute in float32 at least, whatever the input dtype, because the decays exp(cs_t − cs_s)
lose all precision in half precision. The tests check that the three agree; the Triton kernel in
`kernels/` is tested against them.
"""

import operator

import torch
import torch.nn.functional as F


def _check(x, dt, A, B, C, D, initial_state):
    """Validate the SSD contract: real floating-point tensors (D and initial_state may be None) on x's
    device, of the shapes below, and on a CPU dt ≥ 0 and A ≤ 0 (dt = softplus(·), A = −exp(A_log): decays
    exp(dt·A) ≤ 1); on a GPU the signs are not checked (reading them would wait for the GPU at every call).
    Return (batch, seqlen, H, P, G, N)."""
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("initial_state", initial_state)):
        optional = name in ("D", "initial_state")
        if t is None and optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor{' or None' if optional else ''}, got {type(t).__name__} "
                            f"{t!r:.40}" + (" (chunk_size is a keyword argument)" if name == "D" else ""))
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a real floating-point tensor, got {t.dtype}")
        if t.device != x.device:  # (a Triton program would read another device's memory as if it were x's)
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: give the scan all its inputs on one "
                             f"device (e.g. {name}.to(x.device))")
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"B must be (batch={b}, seqlen={l}, ngroups, dstate), got {tuple(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if g < 1 or h % g:
        raise ValueError(f"ngroups={g} (B's third axis) must be at least 1 and divide nheads={h}")
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (batch, seqlen, nheads)={(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (nheads,)={(h,)}, got {tuple(A.shape)}")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must be (nheads,)={(h,)}, got {tuple(D.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(
            f"initial_state must be (batch, nheads, headdim, dstate)={(b, h, p, n)}, "
            f"got {tuple(initial_state.shape)}"
        )
    if x.device.type == "cpu":  # (not on a GPU, nor on the "meta" device, which holds no values)
        if (A > 0).any():
            raise ValueError(f"A must be ≤ 0 (A = −exp(A_log)), got {A.max().item():.4g} for a head: its decay "
                             "exp(dt·A) would grow")
        if (dt < 0).any():
            raise ValueError(f"dt must be ≥ 0 (dt = softplus(·)), got {dt.min().item():.4g}: its decay exp(dt·A) "
                             "would grow")
    return b, l, h, p, g, n


def check_chunk_size(chunk_size):
    """chunk_size as a Python int ≥ 1 (a NumPy integer or a 0-dim integer tensor too), else a ValueError. A
    bool is refused: True == 1, but Triton compiles a bool argument otherwise than an int."""
    try:
        if isinstance(chunk_size, bool):
            raise TypeError
        Q = operator.index(chunk_size)
    except TypeError:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}") from None
    if Q < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return Q


def _compute_dtype(x):
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs (the test oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def heads_per_group(B, nheads):
    """Expand B or C from (batch, seqlen, G, N) to one copy per head: (batch, seqlen, H, N)."""
    return B.repeat_interleave(nheads // B.shape[2], dim=2)  # (batch, seqlen, H, N)


def segsum(a):
    """Segment sums of a along its last axis: out[..., t, s] = a[s+1] + … + a[t] for s ≤ t, else -inf.

    exp(segsum(dt·A)) is the decay mask L. Computed as a cumulative sum of a masked copy, so that no
    two large cumulative sums are subtracted (cs_t − cs_s would cancel catastrophically once cs is
    large and the difference small).
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # (..., T, T): a[..., k, s] = a_k
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)  # (T, T)
    a = a.masked_fill(~strictly_lower, 0)  # keep a_k only for k > s
    out = torch.cumsum(a, dim=-2)  # (..., T, T): Σ_{s<k≤t} a_k
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))  # (T, T)
    return out.masked_fill(~causal, float("-inf"))  # (..., T, T)


def ssd_step(h, x, dt, A, B, C, D=None, out=None):
    """One step of the recurrence, the O(1) decode step: h ← exp(dt·A)·h + dt·x Bᵀ, y = h C + D·x.

    h (batch, H, P, N), x (batch, H, P), dt (batch, H), A (H,), B and C (batch, G, N), D (H,) or None.
    Returns y (batch, H, P) in x's dtype and the new h (h's dtype). With `out` (a float32 or float64 tensor
    shaped like h, e.g. h itself), the new state is written there: decoding then touches the state
    (N·P numbers per head) three times per token instead of about eight, which matters once the model is
    small enough that the state is a sizeable part of the bytes read per token.
    """
    cdt = torch.promote_types(_compute_dtype(x), h.dtype)
    b, nheads, p = x.shape
    g, n = B.shape[1:]
    # The R = H/G heads of a group share B and C, so their states stack into one (R·P)×N matrix per group:
    # the update is one outer product and the read-out one matrix-vector product per group.
    rp = nheads // g * p  # R·P rows of a group's stacked state (computed: at batch 0 a -1 in view() is undefined)
    decay = torch.exp(dt.to(cdt) * A.to(cdt))  # (batch, H)
    decay = decay.repeat_interleave(p, dim=1).view(b, g, rp, 1)  # (batch, G, R·P, 1): each head's rows
    xdt = (dt.to(cdt)[..., None] * x.to(cdt)).view(b, g, rp, 1)  # (batch, G, R·P, 1)
    hg = h.to(cdt).view(b, g, rp, n)  # (batch, G, R·P, N)
    out = out.view(b, g, rp, n) if out is not None else None  # (batch, G, R·P, N)
    h_new = torch.addcmul(decay * hg, xdt, B.to(cdt)[:, :, None, :], out=out)  # (batch, G, R·P, N)
    y = (h_new @ C.to(cdt)[..., None]).view(b, nheads, p)  # (batch, H, P)
    if D is not None:
        y = y + D.to(cdt)[:, None] * x.to(cdt)  # D as (H, 1), broadcast over batch and P
    return y.to(x.dtype), h_new.view(b, nheads, p, n).to(h.dtype)  # (batch, H, P), (batch, H, P, N)


def ssd_recurrent(x, dt, A, B, C, D=None, initial_state=None):
    """The recurrence, one token at a time. O(seqlen) sequential steps: the ground truth, not fast."""
    b, l, h, p, g, n = _check(x, dt, A, B, C, D, initial_state)
    cdt = _compute_dtype(x)
    state = x.new_zeros(b, h, p, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)  # (batch, H, P, N)
    ys = []
    for t in range(l):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)  # (batch, H, P), (batch, H, P, N)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)  # (batch, seqlen, H, P)
    return y, state


def ssd_quadratic(x, dt, A, B, C, D=None, initial_state=None):
    """The dual, attention-like form over the whole sequence: Y = (L ∘ C Bᵀ)·(dt·X). O(seqlen²)."""
    b, l, h, p, g, n = _check(x, dt, A, B, C, D, initial_state)
    cdt = _compute_dtype(x)
    xf, dt, A = x.to(cdt), dt.to(cdt), A.to(cdt)
    B = heads_per_group(B, h).to(cdt)  # (b, l, H, N)
    C = heads_per_group(C, h).to(cdt)  # (b, l, H, N)
    dA = (dt * A).transpose(1, 2)  # (b, H, l)
    L = torch.exp(segsum(dA))  # (b, H, l, l), zero above the diagonal
    scores = torch.einsum("bthn,bshn->bhts", C, B) * L  # (b, H, l, l): [t, s] target t, source s
    y = torch.einsum("bhts,bsh,bshp->bthp", scores, dt, xf)  # (b, l, H, P)

    cs = torch.cumsum(dA, dim=-1)  # (b, H, l) cumulative log-decay from the start
    decay_to_end = torch.exp(cs[..., -1:] - cs) if l else cs  # (b, H, l); ≤ 1, cs is decreasing
    final = torch.einsum("bhs,bsh,bshp,bshn->bhpn", decay_to_end, dt, xf, B)  # (b, H, P, N)
    if initial_state is not None:
        h0 = initial_state.to(cdt)
        y = y + torch.einsum("bht,bthn,bhpn->bthp", torch.exp(cs), C, h0)  # (b, l, H, P)
        total = cs[..., -1] if l else cs.new_zeros(cs.shape[:-1])  # (b, H): log-decay of the whole sequence
        final = final + torch.exp(total)[..., None, None] * h0  # (b, H, 1, 1) · (b, H, P, N)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xf  # D as (H, 1), broadcast over b, l and P
    return y.to(x.dtype), final


def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """The chunked SSD algorithm (Mamba2 paper, Listing 1), for any seqlen (0 included).

    The result does not depend on chunk_size (up to rounding): it only trades the O(Q²) work of the
    intra-chunk matmuls against the number of sequential inter-chunk steps. A ragged last chunk is
    handled by padding with dt = 0: a padded token has decay exp(0) = 1 and writes dt·x = 0, so it
    changes neither the outputs nor the final state.
    """
    b, l, h, p, g, n = _check(x, dt, A, B, C, D, initial_state)
    chunk_size = check_chunk_size(chunk_size)
    cdt = _compute_dtype(x)
    if l == 0:  # nothing to scan: no outputs, and the state passes through unchanged
        # final (b, H, P, N): zeros, or a copy of h_0
        final = x.new_zeros(b, h, p, n, dtype=cdt) if initial_state is None else initial_state.to(cdt, copy=True)
        return x.new_zeros(b, 0, h, p), final  # (b, 0, H, P), (b, H, P, N)
    Q = chunk_size
    pad = (-l) % Q
    nc = (l + pad) // Q  # number of chunks: the axis c of the shape comments and einsums below
    r = h // g  # heads per group

    def chunks(t):  # (b, l, ...) -> (b, nc, Q, ...), padded with zeros
        t = t.to(cdt)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))  # (b, nc·Q, ...)
        return t.reshape(b, nc, Q, *t.shape[2:])  # (b, nc, Q, ...)

    X = chunks(x).view(b, nc, Q, g, r, p)  # (b, c, Q, G, R, P): head = group·R + r
    dt_c = chunks(dt).view(b, nc, Q, g, r)  # (b, c, Q, G, R)
    Bc, Cc = chunks(B), chunks(C)  # (b, c, Q, G, N)
    dA = (dt_c * A.to(cdt).view(g, r)).permute(0, 1, 3, 4, 2)  # (b, c, G, R, Q)
    cs = torch.cumsum(dA, dim=-1)  # (b, c, G, R, Q) log-decay from the chunk start
    Xdt = X * dt_c[..., None]  # (b, c, Q, G, R, P) the discretised input dt·x

    # einsum letters: c chunk, l and s a target and a source position inside a chunk (Q values each; l is
    # not seqlen here), g group, r head of the group; b, p, n as in the glossary
    # 1. intra-chunk output (the diagonal blocks): a masked "attention" inside each chunk
    L = torch.exp(segsum(dA))  # (b, c, G, R, Q, Q)
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # (b, c, G, Q, Q), shared by the heads of a group
    Y_diag = torch.einsum("bcgrls,bcsgrp->bclgrp", L * CB[:, :, :, None], Xdt)  # (b, c, Q, G, R, P)

    # 2. the state each chunk would end in if it started from zero (the B terms)
    decay_to_end = torch.exp(cs[..., -1:] - cs).permute(0, 1, 4, 2, 3)  # (b, c, Q, G, R), ≤ 1
    S = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bc, Xdt * decay_to_end[..., None])  # (b, c, G, R, P, N)

    # 3. inter-chunk recurrence (the A terms): the recurrent form again, one step per chunk
    chunk_decay = torch.exp(cs[..., -1])[..., None, None]  # (b, c, G, R, 1, 1): decay across a whole chunk
    # h_c (b, G, R, P, N): the running state between chunks, h_0 at the start
    h_c = x.new_zeros(b, g, r, p, n, dtype=cdt) if initial_state is None else initial_state.to(cdt).view(b, g, r, p, n)
    entering = []  # the state entering each chunk
    for c in range(nc):
        entering.append(h_c)
        h_c = chunk_decay[:, c] * h_c + S[:, c]  # (b, G, R, P, N)
    entering, final = torch.stack(entering, dim=1), h_c  # (b, c, G, R, P, N) and (b, G, R, P, N)

    # 4. state to output (the C terms): each token reads the state entering its chunk
    Y_off = torch.einsum("bclgn,bcgrpn,bcgrl->bclgrp", Cc, entering, torch.exp(cs))  # (b, c, Q, G, R, P)

    y = (Y_diag + Y_off).reshape(b, nc * Q, h, p)[:, :l]  # (b, l, H, P)
    if D is not None:
        y = y + D.to(cdt)[:, None] * x.to(cdt)  # D as (H, 1), broadcast over b, l and P
    return y.to(x.dtype), final.reshape(b, h, p, n)  # (b, l, H, P), (b, H, P, N)

"""The three SSD forms agree (recurrent = quadratic = chunked), in float64, on random problems."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimamba.ssd import segsum, ssd_chunked, ssd_quadratic, ssd_recurrent, ssd_step


def make_problem(seed, batch, seqlen, nheads, headdim, ngroups, dstate, dt_scale=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, nheads, headdim, generator=g, dtype=dtype)
    dt = torch.rand(batch, seqlen, nheads, generator=g, dtype=dtype) * dt_scale + 1e-4
    A = -(torch.rand(nheads, generator=g, dtype=dtype) * 8 + 0.05)
    B = torch.randn(batch, seqlen, ngroups, dstate, generator=g, dtype=dtype)
    C = torch.randn(batch, seqlen, ngroups, dstate, generator=g, dtype=dtype)
    D = torch.randn(nheads, generator=g, dtype=dtype)
    h0 = torch.randn(batch, nheads, headdim, dstate, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, h0


def assert_close(a, b, tol, what):
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"{what}: max |Δ| = {err:.3g} > {tol:g} × {scale:.3g}"


problems = st.fixed_dictionaries(
    dict(
        seed=st.integers(0, 2**31 - 1),
        batch=st.integers(1, 2),
        seqlen=st.integers(1, 70),
        nheads_per_group=st.integers(1, 3),
        ngroups=st.integers(1, 3),
        headdim=st.integers(1, 6),
        dstate=st.integers(1, 6),
        chunk_size=st.sampled_from([1, 2, 3, 8, 16, 64]),
        dt_scale=st.sampled_from([1e-3, 0.5, 5.0]),
        use_D=st.booleans(),
        use_h0=st.booleans(),
    )
)


@settings(max_examples=60, deadline=None)
@given(problems)
def test_three_forms_agree(p):
    nheads = p["nheads_per_group"] * p["ngroups"]
    x, dt, A, B, C, D, h0 = make_problem(
        p["seed"], p["batch"], p["seqlen"], nheads, p["headdim"], p["ngroups"], p["dstate"], p["dt_scale"]
    )
    D = D if p["use_D"] else None
    h0 = h0 if p["use_h0"] else None
    y_rec, h_rec = ssd_recurrent(x, dt, A, B, C, D, h0)
    y_quad, h_quad = ssd_quadratic(x, dt, A, B, C, D, h0)
    y_chunk, h_chunk = ssd_chunked(x, dt, A, B, C, D, h0, chunk_size=p["chunk_size"])
    assert y_rec.shape == x.shape and h_rec.shape == (p["batch"], nheads, p["headdim"], p["dstate"])
    for name, y, h in (("quadratic", y_quad, h_quad), ("chunked", y_chunk, h_chunk)):
        assert_close(y, y_rec, 1e-10, f"{name} y")
        assert_close(h, h_rec, 1e-10, f"{name} final state")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), seqlen=st.integers(2, 60), split=st.data(), chunk=st.sampled_from([4, 16, 64]))
def test_two_pieces_with_state_handover_equal_one_run(seed, seqlen, split, chunk):
    t = split.draw(st.integers(1, seqlen - 1))
    x, dt, A, B, C, D, h0 = make_problem(seed, 2, seqlen, 4, 3, 2, 5)
    y_full, h_full = ssd_chunked(x, dt, A, B, C, D, h0, chunk_size=chunk)
    y1, h1 = ssd_chunked(x[:, :t], dt[:, :t], A, B[:, :t], C[:, :t], D, h0, chunk_size=chunk)
    y2, h2 = ssd_chunked(x[:, t:], dt[:, t:], A, B[:, t:], C[:, t:], D, h1, chunk_size=chunk)
    assert_close(torch.cat([y1, y2], 1), y_full, 1e-10, "y")
    assert_close(h2, h_full, 1e-10, "final state")


def test_result_does_not_depend_on_chunk_size():
    x, dt, A, B, C, D, h0 = make_problem(0, 2, 300, 4, 8, 1, 16)
    ref, ref_h = ssd_chunked(x, dt, A, B, C, D, h0, chunk_size=256)
    for q in (1, 7, 32, 100, 512):
        y, h = ssd_chunked(x, dt, A, B, C, D, h0, chunk_size=q)
        assert_close(y, ref, 1e-10, f"chunk {q}")
        assert_close(h, ref_h, 1e-10, f"chunk {q} state")


def test_float32_chunked_is_close_to_float64_truth_with_large_decays():
    # dt up to 50 with A up to -8: log-decays of hundreds per token; nothing may overflow or cancel
    x, dt, A, B, C, D, h0 = make_problem(1, 1, 200, 4, 8, 2, 16, dt_scale=50.0)
    y64, h64 = ssd_recurrent(x, dt, A, B, C, D, h0)
    f = lambda t: t.float()
    y32, h32 = ssd_chunked(f(x), f(dt), f(A), f(B), f(C), f(D), f(h0), chunk_size=64)
    assert y32.dtype == torch.float32 and torch.isfinite(y32).all()
    assert_close(y32.double(), y64, 1e-5, "y")
    assert_close(h32.double(), h64, 1e-5, "state")


def test_half_precision_inputs_compute_in_float32():
    x, dt, A, B, C, D, _ = make_problem(2, 1, 40, 2, 4, 1, 8)
    y64, _ = ssd_recurrent(x, dt, A, B, C, D)
    bf = lambda t: t.to(torch.bfloat16)
    y, h = ssd_chunked(bf(x), dt.float(), A.float(), bf(B), bf(C), D.float(), chunk_size=16)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert_close(y.double(), y64, 3e-2, "bf16 y")


def test_gradients_of_chunked_match_recurrent():
    x, dt, A, B, C, D, h0 = make_problem(3, 2, 23, 4, 3, 2, 5)
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, h0)]
    y, h = ssd_chunked(*inputs, chunk_size=8)
    (y.square().sum() + h.square().sum()).backward()
    grads = [t.grad.clone() for t in inputs]
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, h0)]
    y, h = ssd_recurrent(*inputs)
    (y.square().sum() + h.square().sum()).backward()
    for name, g1, t in zip("x dt A B C D h0".split(), grads, inputs):
        assert_close(g1, t.grad, 1e-9, f"d{name}")


def test_segsum_is_the_log_of_the_decay_mask():
    a = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    s = segsum(a)
    expected = torch.tensor([[0, -float("inf"), -float("inf")], [-2, 0, -float("inf")], [-5, -3, 0]],
                            dtype=torch.float64)
    assert torch.equal(s, expected)


def test_step_is_one_token_of_the_recurrence():
    """ssd_step against the equations written out head by head (ssd_recurrent is a loop over ssd_step, so
    comparing the two, as this test did, could not fail), and with `out=` writing the state in place."""
    x, dt, A, B, C, D, h0 = make_problem(4, 2, 1, 6, 3, 2, 5)  # 6 heads in 2 groups: heads 0-2 read group 0
    x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
    want_y, want_h = torch.empty_like(x), torch.empty_like(h0)
    for b in range(2):
        for head in range(6):
            g = head // 3
            decay = torch.exp(dt[b, head] * A[head])
            want_h[b, head] = decay * h0[b, head] + dt[b, head] * torch.outer(x[b, head], B[b, g])
            want_y[b, head] = want_h[b, head] @ C[b, g] + D[head] * x[b, head]
    y1, h1 = ssd_step(h0, x, dt, A, B, C, D)
    assert_close(y1, want_y, 1e-12, "y")
    assert_close(h1, want_h, 1e-12, "state")
    state = h0.clone()
    y2, h2 = ssd_step(state, x, dt, A, B, C, D, out=state)
    assert torch.equal(y2, y1) and torch.equal(h2, h1) and torch.equal(state, h1)  # written in place
    y3, _ = ssd_step(h0, x, dt, A, B, C)  # no D: no skip connection
    assert_close(y3, want_y - D[:, None] * x, 1e-12, "y without D")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.update(A=p["A"][:-1]), "A must be"),
        (lambda p: p.update(dt=p["dt"][..., :-1]), "dt must be"),
        (lambda p: p.update(C=p["C"][:, :-1]), "C must have"),
        (lambda p: p.update(x=p["x"][0]), "x must be"),
        (lambda p: p.update(initial_state=p["initial_state"][:, :, :-1]), "initial_state must be"),
        (lambda p: p.update(initial_state=p["initial_state"][..., :-1]), "initial_state must be"),  # (dstate)
        (lambda p: p.update(B=p["B"].flatten(2), C=p["C"].flatten(2)), "B must be"),  # (3-D, batch and seqlen right)
        (lambda p: p.update(D=p["D"][:1]), "D must be \\(nheads,\\)"),  # (one D broadcast to every head)
        (lambda p: p.update(B=p["B"][:, :-1]), "B must be \\(batch=1, seqlen=6, ngroups, dstate\\), got \\(1, 5, "),
        (lambda p: p.update(B=p["B"][0]), "B must be"),
    ],
)
def test_bad_shapes_are_named(change, message):
    x, dt, A, B, C, D, h0 = make_problem(5, 1, 6, 4, 3, 2, 5)
    p = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=h0)
    change(p)
    with pytest.raises(ValueError, match=message):
        ssd_chunked(**p, chunk_size=4)


def test_ngroups_must_divide_nheads():
    x, dt, A, B, C, D, _ = make_problem(6, 1, 6, 3, 3, 1, 5)
    B2 = torch.randn(1, 6, 2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="ngroups=2 \\(B's third axis\\) must be at least 1 and divide nheads=3"):
        ssd_chunked(x, dt, A, B2, B2, D, chunk_size=4)
    with pytest.raises(ValueError, match="ngroups=0"):  # (was a ZeroDivisionError)
        ssd_chunked(x, dt, A, B2[:, :, :0], B2[:, :, :0], D, chunk_size=4)


def test_values_and_types_outside_the_contract_are_refused():
    """Integer or complex tensors (an integer x gave a truncated integer y), a chunk size given where D
    goes, growing decays (dt < 0 or A > 0: the Triton kernel clamps them, the reference did not, and
    neither said so); chunk sizes that are integers of another type are taken."""
    x, dt, A, B, C, D, h0 = make_problem(5, 1, 6, 4, 3, 2, 5)
    ok = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=h0)
    for change, error, message in [
        (dict(x=x.to(torch.int64)), TypeError, "x must be a real floating-point tensor, got torch.int64"),
        (dict(D=D.to(torch.complex128)), TypeError, "D must be a real floating-point tensor"),
        (dict(initial_state=h0.to(torch.complex128)), TypeError, "initial_state must be a real floating-point"),
        (dict(D=16), TypeError, "D must be a tensor or None, got int 16 \\(chunk_size is a keyword argument\\)"),
        (dict(A=A.abs()), ValueError, "A must be ≤ 0 \\(A = −exp\\(A_log\\)\\)"),
        (dict(A=torch.cat([A[:-1], A.new_full((1,), 1e-3)])), ValueError, "A must be ≤ 0"),  # (one head, barely)
        (dict(dt=-dt), ValueError, "dt must be ≥ 0 \\(dt = softplus"),
        # ("meta" stands in for a GPU: one input on another device than x)
        (dict(dt=dt.to("meta")), ValueError, "dt is on meta but x is on cpu: .* \\(e.g. dt.to\\(x.device\\)\\)"),
        (dict(D=D.to("meta")), ValueError, "D is on meta but x is on cpu"),
        (dict(initial_state=h0.to("meta")), ValueError, "initial_state is on meta but x is on cpu"),
        (dict(x=x.to("meta")), ValueError, "dt is on cpu but x is on meta"),
    ]:
        for f in (ssd_recurrent, ssd_quadratic, lambda **kw: ssd_chunked(**kw, chunk_size=4)):
            with pytest.raises(error, match=message):
                f(**{**ok, **change})
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            ssd_chunked(**ok, chunk_size=bad)
    y, _ = ssd_chunked(**ok, chunk_size=4)
    assert torch.equal(ssd_chunked(**ok, chunk_size=np.int64(4))[0], y)
    assert torch.equal(ssd_chunked(**ok, chunk_size=torch.tensor(4))[0], y)
    assert torch.equal(ssd_chunked(**{**ok, "A": torch.zeros_like(A), "dt": torch.zeros_like(dt)}, chunk_size=4)[0],
                       ssd_recurrent(**{**ok, "A": torch.zeros_like(A), "dt": torch.zeros_like(dt)})[0])  # (0: allowed)


@pytest.mark.parametrize("use_h0", [True, False])
def test_an_empty_sequence_leaves_the_state_as_it_was(use_h0):
    x, dt, A, B, C, D, h0 = make_problem(7, 2, 0, 4, 3, 2, 5)  # seqlen 0
    h0 = torch.randn(2, 4, 3, 5, dtype=torch.float64) if use_h0 else None
    for f in (ssd_recurrent, ssd_quadratic, lambda *a: ssd_chunked(*a, chunk_size=4)):
        y, h = f(x, dt, A, B, C, D, h0)
        assert y.shape == (2, 0, 4, 3) and y.dtype == x.dtype
        assert torch.equal(h, h0 if use_h0 else torch.zeros(2, 4, 3, 5, dtype=torch.float64))
    h0 = h0.float() if use_h0 else None  # (float32 as the result: a copy is not made by the cast alone)
    y, h = ssd_chunked(x.float(), dt.float(), A.float(), B.float(), C.float(), D.float(), h0, chunk_size=4)
    assert h.dtype == torch.float32 and (h0 is None or h.data_ptr() != h0.data_ptr())  # a new tensor, float32

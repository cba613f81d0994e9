"""minimamba.training and train.py on CPU: schedules, parameter groups, EMA, perplexity, exact resume
(in-process, after SIGKILL, after SIGTERM), NaN stop, DDP/FSDP on gloo vs one process, and bad inputs.

Everything runs a 2-layer, 32-wide model with a 256-token vocabulary on synthetic token files, so
a training step takes milliseconds and the whole file a minute or so on 2 cores.
"""

import datetime
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from minimamba.config import Mamba2Config
from minimamba.evaluate import domain_perplexity, load_heldout, perplexity
from minimamba.hub import from_pretrained, save_pretrained
from minimamba.model import Mamba2LM
from minimamba.training import (
    EMA, Dist, SetupError, TrainConfig, TrainingDiverged, activation_bytes, estimate, lr_factor, param_groups,
    read_log, resolve, run_as_script, schedule_steps, schedule_text, tokens_text, train, train_step)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def small_config():
    return Mamba2Config(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, headdim=16, chunk_size=16)


def small_model(seed=0):
    model = Mamba2LM(small_config(), backend="torch")
    model.reset_parameters(seed=seed)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three domains of learnable synthetic text: each a noisy cycle through its own range of ids."""
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    for i, name in enumerate(("pubmed", "c4", "wikipedia")):
        (root / name).mkdir()
        for split, n in (("train", 6000), ("heldout", 1000)):
            tokens = 2 + 80 * i + (np.arange(n) * (i + 1)) % 60
            noise = rng.random(n) < 0.2
            tokens[noise] = rng.integers(2, VOCAB, noise.sum())
            tokens[rng.random(n) < 0.02] = 0  # EOS between "documents"
            tokens.astype(np.uint16).tofile(root / name / f"{split}.bin")
    return root


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("init")
    save_pretrained(small_model(), path)
    return path


def config(data, init_dir, out, **kw):
    base = TrainConfig(init=str(init_dir), data=str(data), seq_len=16, batch_size=2, grad_accum=2, max_steps=6,
                       lr=3e-3, llrd=0.9, ema=0.9, eval_every=0, eval_windows=4, save_every=2, keep=10,
                       out=str(out), device="cpu", backend="torch", progress=False)
    return replace(base, **kw)


def losses(out):
    return {r["step"]: r["loss"] for r in read_log(Path(out) / "log.jsonl") if "loss" in r}


def state(out, step):
    return torch.load(Path(out) / f"step-{step:06d}" / "training_state.pt", weights_only=True)


def assert_same_state(a, b):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["sampler"] == b["sampler"]


def run_script(args, env=None, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def script_args(cfg):
    """train.py flags for a TrainConfig made by `config`."""
    return ["--init", cfg.init, "--data", cfg.data, "--seq-len", cfg.seq_len, "--batch-size", cfg.batch_size,
            "--grad-accum", cfg.grad_accum, "--max-steps", cfg.max_steps, "--lr", cfg.lr, "--llrd", cfg.llrd,
            "--ema", cfg.ema, "--eval-every", cfg.eval_every, "--eval-windows", cfg.eval_windows,
            "--save-every", cfg.save_every, "--keep", cfg.keep, "--out", cfg.out, "--device", "cpu",
            "--backend", "torch", "--no-progress"]


def wait_for_step(out, step, proc, timeout=120):
    log = Path(out) / "log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early: {proc.communicate()}")
        if log.exists() and any(r.get("step", 0) >= step and "loss" in r for r in read_log(log)):
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"train.py did not reach step {step} in {timeout} s")


# ----------------------------------------------------------------------------------------------------------
# Pure functions


def test_wsd_schedule_shape():
    total, warmup, decay = 100, 10, 25
    f = [lr_factor(s, total, warmup, "wsd", decay, 0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0  # linear warmup, the first step already moves
    assert all(x == 1.0 for x in f[10:75])  # stable
    assert all(a > b for a, b in zip(f[74:], f[75:]))  # decaying
    assert f[-1] == pytest.approx(0.1)  # to min_ratio at the last step
    assert f[87] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 13 / 25)))


def test_cosine_and_constant_schedules():
    f = [lr_factor(s, 50, 5, "cosine", 0, 0.0) for s in range(50)]
    assert f[4] == 1.0 and f[-1] == pytest.approx(0.0) and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[27] == pytest.approx(0.5 * (1 + math.cos(math.pi * 23 / 45)))
    assert [lr_factor(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(5, 10, 0, "linear")


def test_the_defaults_are_the_recipe(fake_gpu):
    """`python train.py --scale S` with no other flag runs issue 5's recipe (../shared/reference/biomamba-recipe.md):
    the public checkpoint, 80/10/10 by tokens, 1024-token sequences, 256 of them per step, AdamW (0.9, 0.95) with
    weight decay 0.1, peak LR 5e-6 with layer-wise decay 0.95, WSD, EMA 0.999, clipping 1.0, bf16 on a GPU and the
    Triton scan there. (No test read these defaults: any of them could change unnoticed.)"""
    from minimamba.sampler import parse_mix
    from minimamba.training import resolve_autocast

    d = TrainConfig()
    assert (d.init, parse_mix(d.mix), d.seq_len, d.tokens_per_step, d.grad_accum) == \
        ("pretrained", {"pubmed": 0.8, "c4": 0.1, "wikipedia": 0.1}, 1024, 256 * 1024, None)
    assert (d.beta1, d.beta2, d.weight_decay, d.lr, d.llrd, d.schedule, d.ema, d.grad_clip) == \
        (0.9, 0.95, 0.1, 5e-6, 0.95, "wsd", 0.999, 1.0)
    assert (d.dtype, d.backend) == ("auto", "auto")
    fake_gpu((9, 0), "NVIDIA H100 80GB HBM3")  # (the recipe's card)
    assert resolve_autocast(d.dtype, torch.device("cuda")) == torch.bfloat16
    assert resolve_autocast(d.dtype, torch.device("cpu")) is None
    assert Mamba2LM(small_config(), backend=d.backend).scan_backend("cuda") == "triton"


def test_help_shows_a_default_once():
    """argparse's defaults formatter wrote "(default: None)" after a help that says its default in words."""
    import argparse

    from minimamba.training import HelpFormatter

    p = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    p.add_argument("--a", default=None, help="where (default: $X if set, else here)")
    p.add_argument("--b", default=5, help="how many")
    p.add_argument("--c", default=None, help="off unless given")  # (a None default with no words: said nothing)
    text = " ".join(p.format_help().split())
    assert "--a A where (default: $X if set, else here) --b B how many (default: 5) --c C off unless given" in text
    assert "None" not in text


def test_flops_per_token_counts_every_matmul_weight_and_the_scan_by_chunk():
    """6 FLOPs per weight of every matrix product the model runs (counted from its nn.Linear modules, the tied
    head included), plus the chunked scan's forward counted per chunk (a Q×Q product per group for CB, per head
    for the intra-chunk output, a Q×P×N product per head for the chunk state and for the state's read-out)
    and divided by Q; the backward twice the forward, once more with activation checkpointing."""
    from torch import nn

    from minimamba.training import flops_per_token

    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, headdim=16, chunk_size=16, ngroups=2)
    model = Mamba2LM(cfg)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # (the head is one)
    assert model.lm_head.weight is model.embedding.weight and weights == (
        2 * (32 * cfg.in_proj_dim + 64 * 32) + 32 * cfg.padded_vocab_size)
    Q, G, H, P, N = 16, 2, cfg.nheads, 16, 8
    macs_per_chunk = G * Q * Q * N + H * Q * Q * P + 2 * H * Q * P * N  # per layer
    forward = 2 * weights + cfg.n_layer * 2 * macs_per_chunk // Q
    assert flops_per_token(cfg) == 3 * forward
    assert flops_per_token(cfg, grad_ckpt=True) == 4 * forward


def test_schedule_steps_fractions_and_counts():
    assert schedule_steps(TrainConfig(warmup=0.1, decay=0.25), 6000) == (600, 1500)
    assert schedule_steps(TrainConfig(warmup=50, schedule="cosine"), 6000) == (50, 0)


@pytest.mark.parametrize("schedule, max_steps, warmup", [("wsd", 6000, 0.1), ("wsd", 20, 0.1), ("wsd", 3, 0.1),
                                                          ("cosine", 200, 12), ("cosine", 9, 0.0),
                                                          ("constant", 50, 0.1)])
def test_the_schedule_in_words_counts_the_steps_lr_factor_gives(schedule, max_steps, warmup):
    """The summary said "decay 0 steps to 0.0×" for a cosine run (decay counts wsd's final steps only);
    the words now count what lr_factor does: the steps below the peak at the start, the steps at it, and
    the steps after warmup where it falls, to the factor of the last step."""
    cfg = TrainConfig(schedule=schedule, warmup=warmup, min_lr_ratio=0.1)
    w, d = schedule_steps(cfg, max_steps)
    f = [lr_factor(s, max_steps, w, schedule, d, 0.1) for s in range(max_steps)]
    rising = f.index(1.0) + 1 if f[0] < 1 < max_steps and f[1] > f[0] else 0  # (warmup rises to 1, at its last step)
    at_peak = sum(x == 1.0 for x in f[rising:])
    falling = max_steps - rising - at_peak
    text = schedule_text(schedule, w, d, max_steps, 0.1)
    assert text.startswith(f"warmup {rising:,} steps, then " if rising else "no warmup, ")
    if falling == 0:
        assert text.endswith("constant") or text.endswith("constant (--decay gives no decay steps)")
    elif schedule == "wsd":
        assert f[-1] == pytest.approx(0.1) and text.endswith(
            (f"constant for {at_peak:,}, then " if at_peak else "") + f"a cosine decay to 0.1× the peak over the "
            f"last {falling:,}")
    else:
        assert f[-1] == pytest.approx(0.1) and text.endswith(f"a cosine decay to 0.1× the peak over "
                                                             + (f"the {falling:,} steps after warmup" if rising else
                                                                f"all {falling:,} steps"))
    if (schedule, max_steps) == ("wsd", 6000):  # (by hand)
        assert text == "warmup 600 steps, then constant for 3,900, then a cosine decay to 0.1× the peak over the last 1,500"


def test_token_counts_read_well_at_every_scale():
    """A 20-step tiny run printed "= 1.02e-05B tokens"."""
    assert [tokens_text(n) for n in (0, 10_240, 999_999, 1_000_000, 1_500_000, 999_999_999, 1_572_864_000,
                                              2.5e12)] == \
        ["0", "10,240", "1M", "1M", "1.5M", "1B", "1.57B", "2.5T"]


def test_param_groups_weight_decay_and_layerwise_lr():
    model = small_model()
    groups = param_groups(model, weight_decay=0.1, llrd=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_param) == len(names) == sum(len(g["params"]) for g in groups)  # each parameter once
    for name, p in names.items():
        g = by_param[id(p)]
        leaf = name.split(".")[-2:]
        no_decay = leaf[-1] in ("A_log", "D", "dt_bias", "bias") or "norm" in leaf or "norm_f" in name
        assert g["weight_decay"] == (0.0 if no_decay else 0.1), name
        if name.startswith("layers."):
            assert g["lr_scale"] == 0.5 ** (1 - int(name.split(".")[1])), name
        else:  # tied embedding (= output head) and final norm: the peak LR
            assert g["lr_scale"] == 1.0, name
    assert by_param[id(names["embedding.weight"])]["weight_decay"] == 0.1
    untied = Mamba2LM(small_config().replace(tie_embeddings=False))
    g = {id(p): g for g in param_groups(untied, 0.1, 0.5) for p in g["params"]}
    assert g[id(untied.embedding.weight)]["lr_scale"] == 0.5  # an untied input embedding: the lowest layer's
    assert g[id(untied.lm_head.weight)]["lr_scale"] == 1.0


def sgd_update(rows, micro_batch, grad_clip=0.0):
    """(loss, grad norm, the update) of one train_step of small_model with SGD at lr 1 (the update is minus
    the gradient it applied: averaged over the micro-batches, then clipped)."""
    model = small_model(seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    loss, norm, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), rows, micro_batch, grad_clip, Dist())
    return loss, norm, torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])


def test_accumulated_micro_batches_make_the_step_of_one_batch_and_clipping_bounds_it():
    rows = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(0))
    loss, norm, update = sgd_update(rows, micro_batch=8)
    for micro_batch in (4, 2, 1):  # (each micro-batch's loss is its mean: the step averages them)
        l, n, u = sgd_update(rows, micro_batch)
        assert l == pytest.approx(loss, rel=1e-6) and n == pytest.approx(norm, rel=1e-5), micro_batch
        assert torch.allclose(u, update, rtol=1e-4, atol=1e-7), micro_batch
    assert torch.linalg.vector_norm(update).item() == pytest.approx(norm, rel=1e-5)
    clipped_loss, clipped_norm, clipped = sgd_update(rows, micro_batch=4, grad_clip=norm / 10)
    assert clipped_norm == pytest.approx(norm, rel=1e-5)  # (reported before clipping)
    assert torch.linalg.vector_norm(clipped).item() == pytest.approx(norm / 10, rel=1e-4)
    assert (clipped * 10 - update).abs().max().item() <= 1e-4 * update.abs().max().item()  # a tenth as long


def test_each_group_steps_with_its_layerwise_share_of_the_scheduled_lr(data, init_dir, tmp_path, monkeypatch):
    from minimamba import training

    seen = []
    step = training.train_step

    def recording(model, optimizer, *args, **kwargs):
        seen.append({g["name"]: (g["lr"], g["lr_scale"]) for g in optimizer.param_groups})
        return step(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(training, "train_step", recording)
    cfg = config(data, init_dir, tmp_path / "run", max_steps=4, llrd=0.5, eval_at_start=False)
    train(cfg)
    logged = [r["lr"] for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert len(seen) == len(logged) == 4 and len(set(logged)) > 1  # (the schedule moves)
    for groups, lr in zip(seen, logged):
        assert {scale for _, scale in groups.values()} == {0.5, 1.0}  # 2 layers at llrd 0.5
        for name, (group_lr, scale) in groups.items():
            assert group_lr == pytest.approx(lr * scale, rel=1e-12), name


def test_ema_update_and_exact_swap():
    model = small_model()
    ema = EMA(model, 0.75)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        assert torch.allclose(ema.shadow[n], before[n] + 0.25)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_in(model):
        assert torch.allclose(model.norm_f.weight, before["norm_f.weight"] + 0.25)
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())


def test_perplexity_pools_every_target_token_whatever_the_batch_size():
    """Against a loop over each window and position: exp of the mean over all scored tokens of −log p(next
    token) (the targets are the windows shifted by one; 7 windows, so batches of 3 and 8 are ragged)."""
    model = small_model(seed=1).eval()
    windows = torch.randint(0, VOCAB, (7, 17), generator=torch.Generator().manual_seed(0))
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            log_p = torch.log_softmax(model(window[None, :-1])[0].double(), dim=-1)  # (16, Vp)
            for t in range(16):
                nll -= log_p[t, window[t + 1]].item()
                count += 1
    for batch_size in (1, 3, 8, 100):
        got = perplexity(model, windows, batch_size=batch_size)
        assert got["tokens"] == count == 7 * 16
        assert got["loss"] == pytest.approx(nll / count, rel=1e-6) and got["ppl"] == pytest.approx(math.exp(nll / count),
                                                                                                    rel=1e-5)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, 64)

    windows = torch.randint(0, 64, (5, 9))
    res = perplexity(Uniform(), windows, batch_size=2)
    assert res["ppl"] == pytest.approx(64) and res["tokens"] == 40


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_memory_estimate_counts_what_the_triton_scan_keeps(monkeypatch, dtype):
    """The Triton scan keeps cs (with its low part for fp32 inputs), the chunk states S_c and CB (fp32)
    besides its inputs: the estimate counts exactly those bytes per layer on top of a stand-in that
    keeps only the inputs."""
    from minimamba import training

    cfg = small_config()
    seq_len = 40  # 3 chunks of 16, the last one partial
    with_kept = activation_bytes(cfg, seq_len, backend="triton", dtype=dtype)

    class InputsOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, dt, A, B, C, D, chunk_size):
            ctx.save_for_backward(x, dt, A, B, C, D)
            b, _, h, p = x.shape
            return torch.empty_like(x), x.new_empty(b, h, p, B.shape[-1], dtype=torch.float32)

        @staticmethod
        def backward(ctx, dy, dfinal):
            return (None,) * 7

    monkeypatch.setattr(training, "_ScanStandIn", InputsOnly)
    inputs_only = activation_bytes(cfg, seq_len, backend="triton", dtype=dtype)
    H, P, N, G, Q = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups, cfg.chunk_size
    nc = math.ceil(seq_len / Q)
    cs_parts = 2 if dtype == torch.float32 else 1
    kept_per_layer = 4 * (cs_parts * H * nc * Q + nc * H * P * N + nc * G * Q * Q)  # cs (+ lo), S_c, CB
    assert with_kept - inputs_only == cfg.n_layer * kept_per_layer


def test_memory_estimate_counts_saved_tensors():
    cfg = small_config()
    full = activation_bytes(cfg, 64)
    assert activation_bytes(cfg, 64, grad_ckpt=True) < full
    assert activation_bytes(cfg, 64, backend="triton") < full  # the kernel keeps its inputs, S_c and CB
    # saved activations grow by the same bytes per 64 tokens (4 whole chunks), beside a few per sequence
    per_64 = activation_bytes(cfg, 128) - full
    assert activation_bytes(cfg, 192) - activation_bytes(cfg, 128) == per_64 and 0 <= full - per_64 < 0.01 * full
    # with checkpointing (the docstring's account): each block's input in fp32, one block's activations
    # while it is recomputed, and the logits' (bf16 logits, fp32 log-softmax)
    logits = 64 * cfg.padded_vocab_size * (2 + 4)
    assert activation_bytes(cfg, 64, grad_ckpt=True) == pytest.approx(
        cfg.n_layer * 64 * cfg.d_model * 4 + (full - logits) / cfg.n_layer + logits)
    est = estimate(cfg, micro_batch=4, seq_len=64, rows_per_step=8)
    n = small_model().num_params()
    assert est["params"] == n
    assert est["static_bytes"] == n * 22  # fp32 weights 4, grads 4, AdamW moments 8, EMA 4, bf16 copies 2
    assert estimate(cfg, 4, 64, 8, ema=False)["static_bytes"] == n * 18
    assert estimate(cfg, 4, 64, 8, world_size=2, fsdp=True)["static_bytes"] == n * 11  # (sharded)
    # a float32 run (a CPU, an older GPU, --dtype float32): no bf16 weight copies, float32 activations and logits
    f32 = estimate(cfg, 4, 64, 8, dtype=torch.float32)
    assert f32["static_bytes"] == n * 20 and f32["activation_bytes"] == 4 * activation_bytes(cfg, 64, dtype=torch.float32)
    assert f32["activation_bytes"] > est["activation_bytes"]
    assert activation_bytes(cfg, 64, grad_ckpt=True, dtype=torch.float32) - activation_bytes(cfg, 64, grad_ckpt=True) \
        > 64 * cfg.padded_vocab_size * 2  # (the logits alone: 2 more bytes each)
    assert est["activation_bytes"] == 4 * full  # per sequence × micro-batch
    # peak: 10% over the static bytes, the activations and the logits' fp32 gradient of a micro-batch
    assert est["peak_bytes"] == pytest.approx(1.1 * (n * 22 + 4 * full + 4 * 64 * cfg.padded_vocab_size * 4))


# ----------------------------------------------------------------------------------------------------------
# Runs


def test_training_learns_logs_and_saves_loadable_checkpoints(data, init_dir, tmp_path, capsys):
    cfg = config(data, init_dir, tmp_path / "run", max_steps=8, eval_every=4, keep=1)
    result = train(cfg)
    # before the first step (issue 5): parameters, tokens per step, an estimate of memory and of time per step
    summary = capsys.readouterr().out.split("step 0:")[0]
    n = small_model().num_params()
    assert f"model: a custom config ({n / 1e6:.1f}M parameters, 2 layers, d_model 32, vocab {VOCAB})" in summary
    assert "batch: 2 sequences × 2 micro-batches × 1 process(es) = 4 sequences × 16 tokens = 64 tokens per step" \
        in summary
    assert re.search(r"estimate: ~\d+\.\d GiB per process \(weights\+grads\+AdamW\+EMA \d+\.\d GiB, activations "
                     r"\d+\.\d GiB per micro-batch\); [\d.e+]+ FLOPs per step\n +~[\d.e+-]+ s per step", summary)
    assert result["step"] == 8 and result["stopped_by"] is None
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000008"]  # --keep 1
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000008"
    records = read_log(tmp_path / "run" / "log.jsonl")
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["eval"]["pubmed"]["ppl"] < evals[0]["eval"]["pubmed"]["ppl"]
    assert evals[-1]["token_shares"] == pytest.approx({"pubmed": 0.8, "c4": 0.1, "wikipedia": 0.1}, abs=0.02)
    try:
        import matplotlib  # noqa: F401  (an optional extra: the plot is written only when it is installed)

        assert (tmp_path / "run" / "training.png").stat().st_size > 0
    except ImportError:
        pass
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["resolved"]["tokens_per_step"] == 4 * 16 and saved["lr"] == 3e-3
    # the checkpoint directory is a from_pretrained directory holding the EMA weights, and those are evaluated
    model = from_pretrained(tmp_path / "run" / "step-000008")
    heldout = load_heldout(cfg.data, ["pubmed", "c4", "wikipedia"], cfg.seq_len, cfg.eval_windows)
    ppl = {d: v["ppl"] for d, v in domain_perplexity(model, heldout).items()}
    assert ppl == pytest.approx({d: v["ppl"] for d, v in evals[-1]["eval"].items()}, rel=1e-6)
    st = state(tmp_path / "run", 8)
    assert torch.equal(model.embedding.weight, st["ema"]["embedding.weight"])
    assert not torch.equal(st["ema"]["embedding.weight"], st["model"]["embedding.weight"])
    with pytest.raises(SetupError, match="already holds a run"):
        train(cfg)


def test_resuming_from_an_earlier_checkpoint_replaces_the_later_ones(data, init_dir, tmp_path, capsys):
    """Resumed from step 2 of a run that went on to 6, with another LR: its step-4 and step-6 checkpoints
    replace the first run's (which hold other weights) as it reaches them, and `latest` follows."""
    cfg = config(data, init_dir, tmp_path / "run", max_steps=6, save_every=2, keep=3)
    train(cfg)
    summary = capsys.readouterr().out  # (its schedule and length: 6 steps of 2 x 2 sequences of 16 tokens)
    assert ("; no warmup, then constant" not in summary and "; warmup 1 step, then constant for 3, then a cosine decay "
            "to 0.1× the peak over the last 2; 6 steps = 384 tokens;" in summary)
    first = state(tmp_path / "run", 6)
    train(replace(cfg, resume=str(tmp_path / "run" / "step-000002"), lr=cfg.lr * 3))
    assert "also holds step-000004, step-000006" in capsys.readouterr().out
    second = state(tmp_path / "run", 6)
    assert not torch.equal(first["model"]["embedding.weight"], second["model"]["embedding.weight"])
    assert second["config"]["lr"] == cfg.lr * 3
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000006"
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000002", "step-000004", "step-000006"]
    assert not list((tmp_path / "run").glob(".step-*"))


def test_resume_is_exact(data, init_dir, tmp_path):
    whole = config(data, init_dir, tmp_path / "whole")
    train(whole)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "whole" / "step-000002", part / "step-000002")
    train(replace(whole, out=str(part), resume=str(part / "step-000002")))
    assert losses(part) == {s: v for s, v in losses(tmp_path / "whole").items() if s > 2}
    assert_same_state(state(part, 6), state(tmp_path / "whole", 6))
    tokens = [{r["step"]: r["tokens"] for r in read_log(out / "log.jsonl") if "loss" in r} for out in (part, tmp_path / "whole")]
    assert tokens[0] == {s: t for s, t in tokens[1].items() if s > 2}  # (the tokens seen are restored too)
    assert state(part, 6)["tokens_seen"] == 6 * 4 * 16
    assert [r["step"] for r in read_log(part / "log.jsonl") if "eval" in r] == [6]  # (not at the start of a resume)
    # "time" is the training time so far: the checkpoint's, then each step's (its tokens / its tokens per second)
    elapsed = state(part, 2)["elapsed"]
    for r in (r for r in read_log(part / "log.jsonl") if "loss" in r):
        elapsed += 4 * 16 / r["tok_per_s"]
        assert r["time"] == pytest.approx(elapsed, rel=1e-9), r["step"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_run(data, init_dir, tmp_path):
    whole = config(data, init_dir, tmp_path / "whole", max_steps=8)
    train(whole)
    killed = replace(whole, out=str(tmp_path / "killed"))
    proc = run_script(script_args(killed))
    wait_for_step(killed.out, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = (tmp_path / "killed" / "latest").read_text().strip()
    assert last in ("step-000004", "step-000006")
    train(replace(killed, resume="latest"))
    assert losses(killed.out) == losses(whole.out)  # the log of the steps redone was replaced
    assert_same_state(state(killed.out, 8), state(whole.out, 8))


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits(data, init_dir, tmp_path):
    cfg = config(data, init_dir, tmp_path / "run", max_steps=200, save_every=1000)
    proc = run_script(script_args(cfg))
    wait_for_step(cfg.out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err
    step = max(losses(cfg.out))
    assert (tmp_path / "run" / "latest").read_text().strip() == f"step-{step:06d}" and step < 200
    assert state(cfg.out, step)["step"] == step

    # a second signal stops at once: one line, 128 + its number (signals of two kinds, sent back to back,
    # reach the process's handler as two calls, in the order of their numbers; two of one kind may arrive
    # as one)
    again = replace(cfg, out=str(tmp_path / "again"))
    proc = run_script(script_args(again))
    wait_for_step(again.out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    second = signal.Signals(proc.returncode - 128)
    assert second in (signal.SIGINT, signal.SIGTERM), err
    assert f"stopped at once by {second.name}: the step in progress was not saved" in err and "Traceback" not in err


def test_sigint_writes_a_checkpoint_after_the_step_and_stops(data, init_dir, tmp_path, capsys):
    """Issue 5: SIGINT (Ctrl-C), as SIGTERM above, finishes the step, writes a checkpoint and stops; only SIGTERM's
    first signal was tested (in a subprocess). Here the model sends it to this process in its 5th training forward
    (step 3's first micro-batch of 2)."""
    cfg = config(data, init_dir, tmp_path / "run", max_steps=50, save_every=1000)
    model = from_pretrained(cfg.init, backend="torch")
    calls = {"n": 0}

    def hook(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 5:
                os.kill(os.getpid(), signal.SIGINT)

    def not_caught(signum, frame):  # (the test's own handler: a SIGINT train() does not catch fails the test alone)
        raise AssertionError("SIGINT reached the handler outside train()")

    model.register_forward_hook(hook)
    before = signal.signal(signal.SIGINT, not_caught)
    try:
        result = train(cfg, model=model)
        assert signal.getsignal(signal.SIGINT) is not_caught  # the handler before the run is given back
    finally:
        signal.signal(signal.SIGINT, before)
    assert result["stopped_by"] == "SIGINT" and result["step"] == 3
    assert "SIGINT received: finishing this step, then writing a checkpoint" in capsys.readouterr().err
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000003"
    assert state(cfg.out, 3)["step"] == 3 and max(losses(cfg.out)) == 3


def test_a_stop_at_once_says_resume_only_where_out_holds_a_checkpoint(tmp_path, capsys):
    """A second Ctrl-C before any checkpoint was written must not send the user to --resume, which would
    answer 'no checkpoint in OUT; start without --resume'."""
    def stopped():
        raise KeyboardInterrupt

    for has_checkpoint in (False, True):
        out = tmp_path / str(has_checkpoint)
        out.mkdir()
        if has_checkpoint:
            (out / "latest").write_text("step-000010\n")
        with pytest.raises(SystemExit) as stop:
            run_as_script(stopped, out=str(out))
        assert stop.value.code == 128 + signal.SIGINT
        err = capsys.readouterr().err
        assert "stopped at once by SIGINT: the step in progress was not saved" in err
        if has_checkpoint:
            assert "continue with --resume" in err
        else:
            assert f"no checkpoint was written in {out}: run the same command again" in err and "--resume" not in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, init_dir, tmp_path, nan_after):
    model = from_pretrained(init_dir, backend="torch")
    nan_after(model, 6)  # from step 4 on (2 micro-batches per step)
    cfg = config(data, init_dir, tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4.*last good checkpoint is .*step-000002"):
        train(cfg, model=model)
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000002"]
    last = read_log(tmp_path / "run" / "log.jsonl")[-1]
    assert last["step"] == 4 and last["error"].startswith("the loss is nan")  # (the step that diverged)


def test_resume_applies_changed_optimizer_settings_and_keeps_the_moments(data, init_dir, tmp_path, capsys,
                                                                         no_speed_probe):
    """--beta1/--beta2/--weight-decay/--llrd changed on resume take effect (the note, train_config.json and
    the optimizer agree); the AdamW moments and step counts come from the checkpoint. --weight-decay 0
    keeps the same parameter groups, so a run can be resumed with it."""
    whole = config(data, init_dir, tmp_path / "whole", max_steps=4, eval_at_start=False)
    train(whole)
    hours_whole = float(re.search(r"-> ~(\S+) h for the run \(", capsys.readouterr().out).group(1))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "whole" / "step-000002", part / "step-000002")
    changed = dict(beta1=0.5, beta2=0.8, weight_decay=0.0, llrd=0.5)
    train(replace(whole, out=str(part), resume=str(part / "step-000002"), **changed))
    printed = capsys.readouterr().out
    assert "beta1, beta2, llrd, weight_decay: applied to the restored optimizer" in printed
    assert re.search(r"\nfirst step: \d+\.\d\d s \(later steps", printed)  # (the first step of this run, step 3)
    # the time estimate of a resumed run is for the steps it has left, not for all of them
    hours_left = float(re.search(r"-> ~(\S+) h for the 2 steps left \(", printed).group(1))
    assert hours_left == pytest.approx(hours_whole / 2, rel=0.05)  # (2 of the 4 steps; the same speed probe)
    assert {k: json.loads((part / "train_config.json").read_text())[k] for k in changed} == changed
    a, b = losses(tmp_path / "whole"), losses(part)
    assert b[3] == a[3] and b[4] != a[4]  # step 3 runs on step 2's weights; its update already differs
    saved = state(part, 4)["optimizer"]
    expected = param_groups(small_model(), 0.0, 0.5)
    assert [g["name"] for g in saved["param_groups"]] == [g["name"] for g in expected]
    for g, e in zip(saved["param_groups"], expected):
        assert tuple(g["betas"]) == (0.5, 0.8) and g["weight_decay"] == 0.0 and g["lr_scale"] == e["lr_scale"]
    assert all(s["step"] == 4 for s in saved["state"].values())  # the moments went on from step 2, not reset


def test_a_kill_in_the_middle_of_a_save_loses_nothing_and_latest_names_the_newest_run(data, init_dir, tmp_path,
                                                                                     monkeypatch, capsys,
                                                                                     no_speed_probe):
    """Resumed from step 2 of a run that went on to step 6, a kill after the new step-4 was committed (OUT/latest
    names it) and before it took its name leaves no step-4: the next start puts the new, complete one in
    place, and `--resume latest` goes on from it, not from the first run's step 6. The same when OUT/latest
    still names step 6 (as an older minimamba, which wrote it after the renames, left it), and when the kill
    came before the old step-4 was moved aside."""
    from minimamba.training import latest_checkpoint, readable_checkpoint, recover_interrupted_save

    cfg = config(data, init_dir, tmp_path / "run", max_steps=6, eval_at_start=False)
    train(cfg)
    real_replace = os.replace

    def killed_before_the_second_rename(src, dst):
        if Path(src).name == ".step-000004.tmp":
            raise KeyboardInterrupt("SIGKILL")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_second_rename)
    second = replace(cfg, resume=str(tmp_path / "run" / "step-000002"), lr=cfg.lr * 3)
    with pytest.raises(KeyboardInterrupt):
        train(second)
    monkeypatch.setattr(os, "replace", real_replace)
    out = tmp_path / "run"
    assert not (out / "step-000004").exists() and (out / "latest").read_text().strip() == "step-000004"
    assert (out / ".step-000004.old").is_dir() and (out / ".step-000004.tmp").is_dir()
    assert latest_checkpoint(out) == out / "step-000004" and readable_checkpoint(out / "step-000004").name == \
        ".step-000004.tmp"
    (out / "latest").write_text("step-000006\n")  # (what an older minimamba left)
    assert latest_checkpoint(out) == out / "step-000004"
    train(replace(second, resume="latest", max_steps=5))  # finds step-4, the second run's, and goes on
    assert ("put the complete new checkpoint .step-000004.tmp in place; " + str(out / "latest") + " names it"
            in capsys.readouterr().err)
    assert state(out, 5)["config"]["lr"] == cfg.lr * 3 and not list(out.glob(".step-*"))
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]  # (the log kept the records up to step 4, the step resumed from)
    # a kill after the commit and before the old step directory was moved aside: the new one replaces it
    shutil.copytree(out / "step-000005", out / ".step-000006.tmp")
    (out / "latest").write_text("step-000006\n")
    assert readable_checkpoint(out / "step-000006").name == ".step-000006.tmp"
    assert recover_interrupted_save(out) == [out / "step-000006"] and state(out, 6)["step"] == 5
    assert (out / "latest").read_text() == "step-000006\n" and not list(out.glob(".step-*"))
    # a .tmp without training_state.pt is not a finished checkpoint: then the old one is put back
    os.rename(out / "step-000004", out / ".step-000004.old")
    (out / ".step-000004.tmp").mkdir()
    train(replace(second, resume=str(out / "step-000004"), max_steps=5))
    assert "put .step-000004.old back" in capsys.readouterr().err and not list(out.glob(".step-*"))


def test_nan_names_the_checkpoint_this_run_resumed_from(data, init_dir, tmp_path, no_speed_probe):
    """Not OUT/latest: resumed from step 2 of a run that reached 4 (or into another OUT), the step that
    diverges starts from step 2's weights, so that checkpoint is not called good: resuming from it computes
    the same step again. The one before it is named where one is kept."""
    cfg = config(data, init_dir, tmp_path / "run", max_steps=4, eval_at_start=False)
    train(cfg)

    def nan_model():
        model = from_pretrained(init_dir, backend="torch")
        model.register_forward_hook(lambda m, i, o: o * float("nan") if m.training else None)
        return model

    first = tmp_path / "run" / "step-000002"
    same_weights = f"at step 3.*the last checkpoint, {first}, holds the weights this step started from"
    with pytest.raises(TrainingDiverged, match=same_weights + ".*no earlier checkpoint is kept"):
        train(replace(cfg, resume=str(first)), model=nan_model())
    assert (tmp_path / "run" / "latest").read_text() == "step-000002\n"  # (the log went back to step 2 too)
    with pytest.raises(TrainingDiverged, match=same_weights):
        train(replace(cfg, resume=str(first), out=str(tmp_path / "other")), model=nan_model())
    every = replace(cfg, out=str(tmp_path / "every"), save_every=1, max_steps=3)
    train(every)
    before = tmp_path / "every" / "step-000001"
    with pytest.raises(TrainingDiverged, match=f"the last checkpoint before it is {before}: lower --lr and resume "
                                               f"from that one with --resume {before}"):
        train(replace(every, resume=str(tmp_path / "every" / "step-000002")), model=nan_model())


def test_a_huge_finite_loss_gives_an_infinite_perplexity(data, init_dir, tmp_path):
    """exp(loss) overflows a float above ~709.8 nats: the perplexity is inf, and the run goes on. log.jsonl
    stays JSON (null, not Infinity, which JSON readers other than Python's refuse), and the log reader and
    the plot take the null."""
    class Confident(torch.nn.Module):
        def forward(self, ids):  # all the mass on id 0, by a margin of 1e4 nats
            logits = torch.zeros(*ids.shape, 64)
            logits[..., 0] = 1e4
            return logits

    res = perplexity(Confident(), torch.randint(1, 64, (3, 9)))
    assert res["loss"] == pytest.approx(1e4) and res["ppl"] == math.inf
    model = from_pretrained(init_dir, backend="torch")
    model.register_forward_hook(lambda m, i, o: None if m.training else o * 1e5)  # evaluation only
    result = train(config(data, init_dir, tmp_path / "run", max_steps=1), model=model)
    assert result["eval"]["pubmed"]["ppl"] == math.inf and 709 < result["eval"]["pubmed"]["loss"] < math.inf
    log = tmp_path / "run" / "log.jsonl"

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    records = [json.loads(line, parse_constant=strict) for line in log.read_text().splitlines()]
    assert [r["eval"]["c4"]["ppl"] for r in records if "eval" in r] == [None] * 2 == [
        r["eval"]["c4"]["ppl"] for r in read_log(log) if "eval" in r]
    assert all(r["eval"]["c4"]["loss"] > 709 for r in records if "eval" in r)
    from minimamba.training import plot_log

    drawn = plot_log(log, tmp_path / "plot.png")  # (the null is a gap in the curve)
    try:
        import matplotlib  # noqa: F401  (an optional extra: without it plot_log draws nothing and says so)
    except ImportError:
        assert drawn is False
    else:
        assert drawn is True and (tmp_path / "plot.png").stat().st_size > 0


def test_a_log_changed_by_hand_is_still_plotted(tmp_path):
    """plot_log runs after every evaluation of a run: a record whose numbers are not numbers (a log.jsonl edited
    by hand before a resume keeps such records) raised a TypeError there, which ended the training run."""
    pytest.importorskip("matplotlib", reason="plot_log draws with matplotlib, an optional extra")
    from minimamba.training import plot_log

    log = tmp_path / "log.jsonl"
    records = [{"step": 1, "tokens": 100, "loss": 3.0}, {"step": 2, "tokens": 200, "loss": "x"},
               {"step": 3, "tokens": "300", "loss": 2.0}, {"step": 4, "tokens": 400, "loss": True},
               {"step": 4, "tokens": 400, "eval": {"c4": {"ppl": 20.0}, "pubmed": "high"}},
               {"step": 5, "tokens": 500, "eval": {"c4": {"ppl": "?"}, "pubmed": {"ppl": 9.0}}},
               {"step": 6, "tokens": 600, "eval": [1, 2]}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_log(log, tmp_path / "plot.png") is True and (tmp_path / "plot.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------
# Distributed: 2 processes on gloo against one process with the same global batch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, cfg, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # (train's setup_distributed keeps a group that exists: this one gives up on a collective after 2 minutes
    # instead of 30, so processes that fall out of step fail the test instead of hanging it)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    model = from_pretrained(cfg.init, backend="torch")
    train(cfg, model=model)
    torch.save({n: p.detach() for n, p in model.state_dict().items()}, Path(cfg.out) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(data, init_dir, tmp_path, fsdp):
    # (3 held-out windows per domain: 2 for one process and 1 for the other where they split them, as DDP does;
    # under FSDP every process must score all 3, its forward gathering the weights from both)
    from minimamba.tokenizer import load_tokenizer
    from tests.test_tokenizer import tiny_tokenizer_json

    # the data's tokenizer known (meta.json), so that the main process reports bits per byte: over the bytes of
    # every window, not of its own share of them
    tokens, tokenizer = tmp_path / "tokens", tmp_path / "tokenizer.json"
    shutil.copytree(data, tokens)
    tokenizer.write_text(json.dumps(tiny_tokenizer_json()), encoding="utf-8")
    for domain in ("pubmed", "c4", "wikipedia"):
        (tokens / domain / "meta.json").write_text(json.dumps({"tokenizer": {
            "name": str(tokenizer), "vocab_size": VOCAB, "eos_id": 0,
            "vocabulary_sha256": load_tokenizer(tokenizer).vocabulary_sha256()}, "splits": {}}))
    single = config(tokens, init_dir, tmp_path / "single", batch_size=2, grad_accum=2, max_steps=4, eval_every=2,
                    eval_windows=3)
    train(single)
    multi = replace(single, out=str(tmp_path / "multi"), batch_size=1, fsdp=fsdp)
    (tmp_path / "multi").mkdir()
    torch.multiprocessing.spawn(_worker, args=(multi, _free_port()), nprocs=2)
    a, b = (torch.load(tmp_path / "multi" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    if not fsdp:  # DDP: every process holds the whole model, and they must stay identical
        assert all(torch.equal(a[k], b[k]) for k in a)
    one, two = losses(single.out), losses(multi.out)
    assert one.keys() == two.keys() and all(one[s] == pytest.approx(two[s], rel=1e-5) for s in one)
    norms = [{r["step"]: r["grad_norm"] for r in read_log(Path(c.out) / "log.jsonl") if "loss" in r}
             for c in (single, multi)]
    assert all(norms[0][s] == pytest.approx(norms[1][s], rel=1e-4) for s in norms[0])  # not summed over ranks
    s1, s2 = state(single.out, 4), state(multi.out, 4)
    for k in s1["model"]:
        assert torch.allclose(s1["model"][k], s2["model"][k], atol=1e-5), k
    evals = [r["eval"] for r in read_log(Path(multi.out) / "log.jsonl") if "eval" in r]
    evals1 = [r["eval"] for r in read_log(Path(single.out) / "log.jsonl") if "eval" in r]
    assert evals[-1]["c4"]["ppl"] == pytest.approx(evals1[-1]["c4"]["ppl"], rel=1e-4)
    assert evals[-1]["c4"]["bpb"] == pytest.approx(evals1[-1]["c4"]["bpb"], rel=1e-4)


@pytest.mark.slow
def test_fsdp_resumes_a_checkpoint_of_one_process_exactly(data, init_dir, tmp_path):
    """A checkpoint of one process (or DDP) keys its optimizer moments by index, FSDP's loader by name: it
    failed with KeyError 'state.0.step' before."""
    single = config(data, init_dir, tmp_path / "single", batch_size=2, grad_accum=2, max_steps=4, save_every=2)
    train(single)
    shutil.copytree(tmp_path / "single", tmp_path / "multi")
    multi = replace(single, out=str(tmp_path / "multi"), batch_size=1, fsdp=True,
                    resume=str(tmp_path / "multi" / "step-000002"))
    torch.multiprocessing.spawn(_worker, args=(multi, _free_port()), nprocs=2)
    one, two = losses(single.out), losses(multi.out)
    assert one.keys() == two.keys() == {1, 2, 3, 4} and all(one[s] == pytest.approx(two[s], rel=1e-5) for s in one)
    s1, s2 = state(single.out, 4), state(multi.out, 4)
    for part in ("model", "ema"):
        for k in s1[part]:
            assert torch.allclose(s1[part][k], s2[part][k], atol=1e-5), (part, k)


def _worker_in_own_dir(rank, cfg, port, base):
    os.chdir(base / f"node{rank}")  # (each process its own disk: --out is relative)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(cfg, model=from_pretrained(cfg.init, backend="torch"))


@pytest.mark.slow
def test_processes_that_see_out_differently_do_not_wait_for_each_other(data, init_dir, tmp_path):
    """OUT on each node's own disk, made on the first node only (or an NFS cache behind): process 0 decides
    whether OUT exists for every process, so all make the same collective calls (they hung before)."""
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    (tmp_path / "node0" / "run").mkdir()  # only process 0 sees an (empty) OUT
    cfg = replace(config(data, init_dir, "run", max_steps=2, batch_size=1), out="run")
    processes = torch.multiprocessing.spawn(_worker_in_own_dir, args=(cfg, _free_port(), tmp_path), nprocs=2,
                                            join=False)
    deadline = time.monotonic() + 120  # (~10 s when they do not hang)
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail("the two processes hung: one made a collective call the other did not")
    assert (tmp_path / "node0" / "run" / "step-000002").is_dir()


# ----------------------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_data_dir_names_the_path_and_the_prepare_command(init_dir, tmp_path):
    cfg = config(tmp_path / "no-data", init_dir, tmp_path / "run")
    with pytest.raises(SetupError, match=r"(?s)no-data does not exist.*python -m minimamba.data prepare"):
        train(cfg)



def test_domains_prepared_with_different_tokenizers_are_refused(init_dir, tmp_path):
    """Two domains whose meta.json names tokenizers that read some id as other text (one merge differs, the
    vocabulary size and EOS are the same): refused before the model is built, naming both folders, also once the
    tokenizer files are gone; the same tokenizer.json in two places passes. Every pair is compared: a domain
    whose tokenizer is known only by its size does not let two others that differ pass."""
    from minimamba.data import DataError, check_one_tokenizer, prepare
    from minimamba.tokenizer import load_tokenizer
    from tests.test_tokenizer import tiny_tokenizer_json, tiny_tokenizer_json_with_other_text

    spec, other = tiny_tokenizer_json(), tiny_tokenizer_json_with_other_text()
    for name, tokenizer_spec in (("a", spec), ("b", json.loads(json.dumps(spec))), ("c", other)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(tokenizer_spec, indent=len(name)))
    raw = tmp_path / "doc.txt"
    raw.write_text("\n\n".join(f"he ate {i} tea at the hat" for i in range(400)), encoding="utf-8")
    for domain, made_with in (("pubmed", "a"), ("c4", "b"), ("wikipedia", "c")):
        prepare(domain, [raw], load_tokenizer(tmp_path / made_with), tmp_path / "tok", heldout_fraction=0.2)
    check_one_tokenizer(tmp_path / "tok", ["pubmed", "c4"])  # (a copy of the same tokenizer)
    with pytest.raises(SetupError, match=rf"{tmp_path}/tok/pubmed and {tmp_path}/tok/wikipedia were prepared with "
                                         rf"different tokenizers \({tmp_path}/a/tokenizer.json, "
                                         rf"{tmp_path}/c/tokenizer.json\): a model would read one's ids as the "
                                         "other's text. Prepare them with the same --tokenizer"):
        train(config(tmp_path / "tok", init_dir, tmp_path / "run", mix="pubmed=0.5,wikipedia=0.5"))
    assert not (tmp_path / "run" / "step-000002").exists()
    (tmp_path / "c" / "tokenizer.json").unlink()  # (each meta.json keeps what its ids stand for)
    with pytest.raises(DataError, match="pubmed and .*/wikipedia were prepared with different tokenizers"):
        check_one_tokenizer(tmp_path / "tok", ["pubmed", "c4", "wikipedia"])
    # an older meta.json for pubmed, whose tokenizer.json is gone: it compares with the others by size only, but
    # c4 and wikipedia, whose fingerprints are known, are still compared with each other
    meta = json.loads((tmp_path / "tok" / "pubmed" / "meta.json").read_text())
    del meta["tokenizer"]["vocabulary_sha256"]
    (tmp_path / "tok" / "pubmed" / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "a" / "tokenizer.json").unlink()
    check_one_tokenizer(tmp_path / "tok", ["pubmed", "c4"])
    with pytest.raises(DataError, match="c4 and .*/wikipedia were prepared with different tokenizers"):
        check_one_tokenizer(tmp_path / "tok", ["pubmed", "c4", "wikipedia"])

def test_unknown_domain_in_mix(data, init_dir, tmp_path):
    with pytest.raises(SetupError, match=r"(?s)domain\(s\) pubmd .*Domains found there: c4, pubmed, wikipedia"):
        train(config(data, init_dir, tmp_path / "run", mix="pubmd=0.8,c4=0.2"))
    with pytest.raises(SetupError, match="NAME=SHARE"):
        train(config(data, init_dir, tmp_path / "run", mix="pubmed"))


def test_resume_errors(data, init_dir, tmp_path, capsys):
    with pytest.raises(SetupError, match="no checkpoint in"):
        train(config(data, init_dir, tmp_path / "run", resume="latest"))
    cfg = config(data, init_dir, tmp_path / "run", max_steps=2)
    train(cfg)
    with pytest.raises(SetupError, match="cannot resume exactly"):
        train(replace(cfg, resume="latest", max_steps=4, mix="pubmed=0.5,c4=0.5"))
    step_2 = tmp_path / "run" / "step-000002"
    for max_steps in (2, 1):  # (a finished run, or one past the new --max-steps: nothing is rewritten)
        written = (tmp_path / "run" / "train_config.json").read_bytes()
        with pytest.raises(SetupError, match=f"{step_2} is at step 2, and --max-steps is {max_steps}: nothing to "
                                             "train. Pass a --max-steps above 2"):
            train(replace(cfg, resume="latest", max_steps=max_steps))
        assert (tmp_path / "run" / "train_config.json").read_bytes() == written
    with pytest.raises(SetupError, match="no such checkpoint directory"):
        train(replace(cfg, resume=str(tmp_path / "nope"), max_steps=4))
    with pytest.raises(SetupError, match=f"is a run's output folder, not one of its checkpoints: continue its "
                                         f"latest with --out {tmp_path / 'run'} --resume"):
        train(replace(cfg, resume=str(tmp_path / "run"), max_steps=4))
    other = replace(cfg, out=str(tmp_path / "other"), max_steps=1)
    train(other)
    before = sorted(p.name for p in (tmp_path / "other").iterdir())
    with pytest.raises(SetupError, match=f"already holds a run \\(step-000001\\), and {step_2} is a checkpoint of "
                                         "another run"):
        train(replace(other, resume=str(step_2), max_steps=4))  # (it deleted other's checkpoints, mixed the logs)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == before
    capsys.readouterr()
    train(replace(cfg, resume=str(step_2), out=str(tmp_path / "branch"), max_steps=3, init="scratch"))
    out = capsys.readouterr().out  # (into a new OUT: allowed; the --init change is noted as unused)
    assert f"init {cfg.init} -> scratch" in out and "--init is not used: the weights are the checkpoint's" in out
    assert "note: with --ema 0.9, the EMA weights, which are evaluated and saved, will still be 90% the weights " \
           "this run starts from after its 1 steps; for a run this short pass --ema 0" in out

    # a log line cut short by a kill is dropped on resume, with a note; the run goes on
    out = tmp_path / "run"
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert read_log(out / "log.jsonl")[-1]["step"] <= 2  # (a cut last line is left out when reading)
    train(replace(cfg, resume="latest", max_steps=3))
    assert max(r["step"] for r in read_log(out / "log.jsonl") if "loss" in r) == 3
    assert "log.jsonl: dropped line(s) [" in capsys.readouterr().err

    # a damaged or foreign training state, and a `latest` that names a deleted checkpoint
    ckpt = out / (out / "latest").read_text().strip()
    good = (ckpt / "training_state.pt").read_bytes()
    (ckpt / "training_state.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(SetupError, match="cannot be read .* resume from another checkpoint"):
        train(replace(cfg, resume="latest", max_steps=4))
    torch.save({"format": 2}, ckpt / "training_state.pt")
    with pytest.raises(SetupError, match="not a training state of format 1 \\(found 2\\)"):
        train(replace(cfg, resume="latest", max_steps=4))
    shutil.rmtree(ckpt)
    for resume in ("latest", None):  # resuming, or starting over in the same --out
        with pytest.raises(SetupError, match=f"names {ckpt.name}, which holds no training_state.pt"):
            train(replace(cfg, resume=resume, max_steps=4))


def test_checkpoints_that_do_not_fit_the_model_are_setup_errors(data, init_dir, tmp_path, no_speed_probe):
    """An --init directory whose config.json does not describe its weights, and a training_state.pt of
    another model size or with other optimizer groups: errors that say what differs and what to pass."""
    bad_init = tmp_path / "bad-init"
    shutil.copytree(init_dir, bad_init)
    c = json.loads((bad_init / "config.json").read_text())
    (bad_init / "config.json").write_text(json.dumps({**c, "d_model": 64}))
    with pytest.raises(SetupError, match=r"(?s)--init .*bad-init: checkpoint .* does not match its config.json"
                                         r".*wrong shape for embedding.weight.*Pass a checkpoint directory"):
        train(config(data, bad_init, tmp_path / "run0"))

    cfg = config(data, init_dir, tmp_path / "run", max_steps=2, eval_at_start=False)
    train(cfg)
    path = tmp_path / "run" / "step-000002" / "training_state.pt"
    good = torch.load(path, weights_only=True)
    wide = Mamba2LM(small_config().replace(d_model=64), backend="torch").state_dict()
    torch.save({**good, "model": wide}, path)
    with pytest.raises(SetupError, match=r"(?s)step-000002/training_state.pt does not fit the model \(d_model=32.*"
                                         r"raw weights differ:.*wrong shape for embedding.weight: checkpoint "
                                         r"\(256, 64\), model \(256, 32\).*resume from a checkpoint directory as "
                                         r"train.py wrote it"):
        train(replace(cfg, resume="latest", max_steps=3))
    optimizer = {**good["optimizer"], "param_groups": good["optimizer"]["param_groups"][1:]}
    torch.save({**good, "optimizer": optimizer}, path)
    with pytest.raises(SetupError, match=r"its optimizer has parameter groups of \[\d"):
        train(replace(cfg, resume="latest", max_steps=3))


@pytest.fixture(scope="module")
def wd0_run(data, init_dir, tmp_path_factory):
    """A --weight-decay 0 run of 4 steps with checkpoints at steps 2 and 4: (its TrainConfig, its OUT)."""
    cfg = config(data, init_dir, tmp_path_factory.mktemp("wd0") / "run", max_steps=4, weight_decay=0.0,
                 eval_at_start=False)
    torch.set_num_threads(1)
    try:
        from minimamba import training

        probe, training.matmul_flops = training.matmul_flops, lambda device, dtype=None: 1e11
        train(cfg)
    finally:
        training.matmul_flops = probe
    return cfg, Path(cfg.out)


def _copy_of_step_2(wd0_run, tmp_path):
    """OUT (tmp_path/run) holding a copy of the --weight-decay 0 run's step-000002, and its TrainConfig."""
    cfg, whole = wd0_run
    out = tmp_path / "run"
    shutil.copytree(whole / "step-000002", out / "step-000002")
    return replace(cfg, out=str(out), resume=str(out / "step-000002")), out / "step-000002"


def test_an_optimizer_state_with_the_older_merged_groups_resumes_exactly(wd0_run, tmp_path, capsys, no_speed_probe):
    """Before commit afc376d, --weight-decay 0 put a layer's decay and no-decay parameters in one group (the
    groups were keyed by the weight decay). Such a state, built here from this version's step 2, resumes
    exactly as the run went on: its moments are mapped onto the new groups parameter by parameter."""
    cfg, ckpt = _copy_of_step_2(wd0_run, tmp_path)
    st = torch.load(ckpt / "training_state.pt", weights_only=True)
    model = small_model()
    name_of = {id(p): n for n, p in model.named_parameters()}
    new_order = [name_of[id(p)] for g in param_groups(model, 0.0, cfg.llrd) for p in g["params"]]
    merged = {}  # the old layout: one group per layer (and one "top"), the parameters in the model's order
    for name, _ in model.named_parameters():
        merged.setdefault(".".join(name.split(".")[:2]) if name.startswith("layers.") else "top", []).append(name)
    old_order = [n for names in merged.values() for n in names]
    assert old_order != new_order
    moments = {new_order[i]: v for i, v in st["optimizer"]["state"].items()}
    settings = {k: v for k, v in st["optimizer"]["param_groups"][0].items() if k != "params"}
    st["optimizer"] = {
        "state": {old_order.index(n): moments[n] for n in old_order},
        "param_groups": [{**settings, "weight_decay": 0.0, "name": f"{where} (no decay)",
                          "params": [old_order.index(n) for n in names]} for where, names in merged.items()]}
    torch.save(st, ckpt / "training_state.pt")
    train(cfg)
    assert "optimizer state has the parameter groups of a --weight-decay 0 run" in capsys.readouterr().err
    whole = Path(wd0_run[0].out)
    assert losses(ckpt.parent) == {s: v for s, v in losses(whole).items() if s > 2}
    a, b = state(ckpt.parent, 4), state(whole, 4)
    assert_same_state(a, b)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i, moments in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][i][k], v) for k, v in moments.items()), new_order[i]


def _config_json(ckpt, change):
    path = ckpt / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _training_state(ckpt, change):
    path = ckpt / "training_state.pt"
    st = torch.load(path, weights_only=True)
    change(st)
    torch.save(st, path)


def _moments_of_another_shape(st):
    for moments in st["optimizer"]["state"].values():
        moments["exp_avg"] = torch.zeros(moments["exp_avg"].numel() + 1)


@pytest.mark.parametrize("damage, message", [
    (lambda c: _config_json(c, lambda d: []), "config.json: a Mamba2 config.json is one JSON object"),
    (lambda c: _config_json(c, lambda d: {**d, "n_layer": "2"}), "n_layer must be an integer, got '2'"),
    (lambda c: _config_json(c, lambda d: {**d, "ssm_cfg": {**d["ssm_cfg"], "A_init_range": 1}}),
     "config.json: ssm_cfg.A_init_range must be [min, max], got 1"),
    (lambda c: _training_state(c, lambda st: st.pop("optimizer")),
     "training_state.pt is not a whole training state: 'optimizer' is missing"),
    (lambda c: _training_state(c, _moments_of_another_shape),
     "optimizer moments do not fit the parameters they belong to:\n  exp_avg of embedding.weight: checkpoint "
     "(8193,), model (256, 32)"),
], ids=["config-list", "config-string-size", "config-range-not-a-pair", "state-without-optimizer",
        "moments-of-other-shapes"])
def test_train_py_exits_2_for_a_damaged_checkpoint(wd0_run, tmp_path, monkeypatch, capsys, damage, message):
    """A config.json or training_state.pt that is not what train.py wrote: one "error:" line, exit status 2."""
    import runpy

    cfg, ckpt = _copy_of_step_2(wd0_run, tmp_path)
    damage(ckpt)
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, script_args(cfg)), "--resume", str(ckpt)])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_a_second_run_in_an_out_that_a_run_holds_is_refused_and_changes_nothing(data, init_dir, tmp_path,
                                                                                monkeypatch, no_speed_probe):
    """A live run holds OUT/.lock: a second train.py --out OUT (fresh or --resume) is refused before it reads or
    tidies anything (the live run's .step-N.tmp in progress stays). Where there is no flock (Windows), a
    second fresh run is still refused before the tidying. And a run holds the lock while it trains."""
    from minimamba import training

    out = tmp_path / "run"
    (out / "step-000002").mkdir(parents=True)  # a live run's OUT, in the middle of saving step 4
    (out / "step-000002" / "training_state.pt").write_bytes(b"weights")
    (out / "latest").write_text("step-000002\n")
    (out / ".step-000004.tmp").mkdir()
    (out / ".step-000004.tmp" / "config.json").write_text("{}")

    def snapshot():
        return sorted((str(p.relative_to(out)), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))

    live = training.lock_out(out)
    before = snapshot()
    try:
        for resume in (None, "latest"):
            with pytest.raises(SetupError, match=rf"{out} is in use by another training run \(process "
                                                 rf"{os.getpid()} on .* holds {out / '.lock'}\)"):
                train(config(data, init_dir, out, resume=resume))
            assert snapshot() == before
    finally:
        os.close(live)
    monkeypatch.setattr(training, "lock_out", lambda out: None)
    with pytest.raises(SetupError, match="already holds a run"):
        train(config(data, init_dir, out))
    assert snapshot() == before
    monkeypatch.undo()

    refused = []
    model = from_pretrained(init_dir, backend="torch")

    def second_run(module, inputs, output):
        with pytest.raises(SetupError, match="in use by another training run") as e:
            training.lock_out(tmp_path / "other")
        refused.append(str(e.value))

    model.register_forward_hook(second_run)
    train(config(data, init_dir, tmp_path / "other", max_steps=1, eval_at_start=False), model=model)
    assert refused and f"process {os.getpid()}" in refused[0]
    os.close(training.lock_out(tmp_path / "other"))  # (released at the end)


def test_init_of_a_missing_local_path_says_no_such_directory(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MINIMAMBA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SetupError, match=r"--init runs/missing: there is no local directory .*runs/missing, so it "
                                         r"was taken as a Hub repo id.*could not download the checkpoint runs/missing"):
        train(config(data, "runs/missing", tmp_path / "run"))


def test_train_py_exits_2_with_one_message_for_bad_settings_and_checkpoints(data, init_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """train.py's main, run in this process (runpy) for each case: exit status 2 and one "error:" line."""
    import runpy

    bad_init = tmp_path / "bad-init"
    shutil.copytree(init_dir, bad_init)
    c = json.loads((bad_init / "config.json").read_text())
    (bad_init / "config.json").write_text(json.dumps({**c, "n_layer": 3}))
    base = script_args(config(data, init_dir, tmp_path / "run"))
    for extra, message in [(["--grad-clip", "nan"], "error: --grad-clip must be a finite number, got nan"),
                           (["--warmup", "nan"], "error: --warmup must be a finite number, got nan"),
                           (["--tokens", "inf"], "error: --tokens must be a finite number, got inf"),
                           (["--init", bad_init], "has 2 blocks (layers.0 to layers.1), but its config.json says "
                                                  "n_layer=3: the weights and the config come from")]:
        monkeypatch.setattr(sys, "argv", ["train.py", *map(str, base + extra)])
        with pytest.raises(SystemExit) as exit:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_read_log_refuses_a_damaged_line_before_the_last(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line\\(s\\) \\[2\\] are not JSON"):
        read_log(log)


@pytest.mark.parametrize("change, message", [
    (dict(eval_batch_size=-2), "--eval-batch-size must be >= 1, got -2"),
    (dict(tokens_per_step=4096), "--grad-accum 2 makes 64 tokens per step \\(32 per micro-batch on all processes\\) "
                                 "but --tokens-per-step asks for 4,096: give one of the two"),
    (dict(save_every=-1), "--save-every must be >= 0, got -1"),
    (dict(eval_every=-1), "--eval-every must be >= 0"),
    (dict(min_lr_ratio=-1.0), "--min-lr-ratio must be in \\[0, 1\\]"),
    (dict(weight_decay=-1.0), "--weight-decay must be >= 0"),
    (dict(lr=-1.0), "--lr must be >= 0"),
    (dict(beta1=1.5), "--beta1 must be in \\[0, 1\\]"),
    (dict(grad_clip=math.nan), "--grad-clip must be a finite number, got nan"),
    (dict(warmup=math.nan), "--warmup must be a finite number, got nan"),
    (dict(lr=math.inf), "--lr must be a finite number, got inf"),
    (dict(seed=-1), "--seed must be >= 0, got -1"),
    (dict(ema=1.0), "--ema must be in \\[0, 1\\), got 1.0"),  # (1 would never move from the start)
    (dict(llrd=1.5), "--llrd must be in \\[0, 1\\], got 1.5"),
    (dict(decay=1.5), "--decay must be in \\[0, 1\\], got 1.5"),
    (dict(beta2=1.5), "--beta2 must be in \\[0, 1\\], got 1.5"),
    (dict(keep=0), "--keep must be >= 1, got 0"),
    (dict(grad_accum=0), "--grad-accum must be >= 1, got 0"),
    (dict(fsdp=True), "launch with torchrun"),
    (dict(backend="triton"), "runs on CUDA only"),
    (dict(device="gpu"), "unknown --device 'gpu'"),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, dict) else None)
def test_bad_settings_are_refused_before_anything_is_written(data, init_dir, tmp_path, change, message):
    with pytest.raises(SetupError, match=message):
        train(replace(config(data, init_dir, tmp_path / "run"), **change))
    assert not (tmp_path / "run").exists()


def test_tokens_per_step_sets_the_micro_batches_unless_grad_accum_does(data, init_dir, tmp_path):
    """batch 2 × seq_len 16 = 32 tokens per micro-batch (one process): --tokens-per-step T takes ⌈T / 32⌉
    micro-batches; --grad-accum sets them itself, and with a --tokens-per-step it must agree with (the
    refusal: test_bad_settings_are_refused_before_anything_is_written)."""
    cpu = Dist(device=torch.device("cpu"))
    for grad_accum, tokens, want in ((None, 32, 1), (None, 33, 2), (None, 64, 2), (None, 1, 1), (None, 1000, 32),
                                     (3, TrainConfig.tokens_per_step, 3), (3, 96, 3)):
        r = resolve(replace(config(data, init_dir, tmp_path / "run"), grad_accum=grad_accum, tokens_per_step=tokens),
                    cpu)
        assert (r.grad_accum, r.rows_per_step, r.tokens_per_step) == (want, 2 * want, 32 * want), (grad_accum, tokens)


def test_eval_windows_zero_means_all(data, init_dir, tmp_path):
    cfg = replace(config(data, init_dir, tmp_path / "run"), eval_windows=0)
    assert resolve(cfg, Dist(device=torch.device("cpu"))).eval_windows is None


def test_scale_without_public_checkpoint(data, tmp_path):
    with pytest.raises(SetupError, match="no public checkpoint for scale 'tiny'.*--init scratch"):
        train(TrainConfig(scale="tiny", data=str(data), out=str(tmp_path / "run"), device="cpu"))


@pytest.mark.slow
def test_offline_pretrained_init_fails_fast_with_one_message(data, tmp_path):
    """No internet: train.py names what it tried to download and how to use local files, then exits 2."""
    start = time.time()
    proc = run_script(["--scale", "130m", "--data", data, "--out", tmp_path / "run", "--device", "cpu"],
                      env={"HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}",  # nothing listens there
                           "MINIMAMBA_CACHE": str(tmp_path / "cache")})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert time.time() - start < 60
    assert "could not download the checkpoint state-spaces/mamba2-130m" in err
    assert "--init /path/to/it" in err and "--init scratch" in err and "Traceback" not in err


def test_checkpoints_carry_the_datas_tokenizer_json(data, init_dir, tmp_path, capsys):
    """eval.py reads a model folder's own tokenizer.json: each checkpoint holds a copy of the tokenizer that
    meta.json says prepared the data (offline, eval.py of a train.py checkpoint needed --tokenizer), and the
    held-out evaluation reports bits per byte from it; where it cannot be read, or is no longer the tokenizer
    that prepared the data, a note says so and the run goes on without both."""
    from minimamba.tokenizer import load_tokenizer
    from tests.test_tokenizer import tiny_tokenizer_json

    tokens = tmp_path / "tokens"
    shutil.copytree(data, tokens)
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    tokenizer.parent.mkdir()
    tokenizer.write_text(json.dumps(tiny_tokenizer_json()), encoding="utf-8")
    loaded = load_tokenizer(tokenizer)

    def prepared_with(name, sha):
        for domain in ("pubmed", "c4", "wikipedia"):  # (vocab_size: the model's, which the ids are below)
            (tokens / domain / "meta.json").write_text(json.dumps({"tokenizer": {
                "name": name, "vocab_size": VOCAB, "eos_id": 0, "vocabulary_sha256": sha}, "splits": {}}))

    prepared_with(str(tokenizer), loaded.vocabulary_sha256())
    result = train(config(tokens, init_dir, tmp_path / "run", max_steps=2, save_every=2, eval_windows=16))
    copy = Path(result["checkpoint"]) / "tokenizer.json"
    assert copy.read_bytes() == tokenizer.read_bytes()
    assert load_tokenizer(copy.parent).encode("the") == loaded.encode("the")
    # bits per byte: the summed NLL over the bytes the scored tokens spell (each window's first is not scored)
    lengths = np.array(loaded.byte_lengths())  # (V,)
    for domain, scores in result["eval"].items():
        targets = load_heldout(tokens, [domain], 16, 16)[domain][:, 1:].numpy()  # (16, 16): the eval windows'
        n_bytes = int(lengths[targets].sum())
        # (ids 0 and 1 are the tiny tokenizer's special tokens, which spell no byte; those below 256 one byte)
        assert scores["tokens"] == targets.size and n_bytes == (targets >= 2).sum() < targets.size
        assert scores["bpb"] == pytest.approx(scores["loss"] * scores["tokens"] / (math.log(2) * n_bytes), rel=1e-12)
    assert re.search(r"step 2: held-out perplexity \(EMA weights\) pubmed [\d.]+ \([\d.]+ bits/byte\)  c4 ",
                     capsys.readouterr().out)
    # a path that is not there (moved since prepare)
    prepared_with(str(tmp_path / "gone.json"), loaded.vocabulary_sha256())
    result = train(config(tokens, init_dir, tmp_path / "run2", max_steps=2, save_every=2))
    assert not (Path(result["checkpoint"]) / "tokenizer.json").exists()
    assert all("bpb" not in scores for scores in result["eval"].values())
    err = capsys.readouterr().err
    assert "note: the checkpoints will hold no tokenizer.json and the held-out evaluation reports no bits per " \
           "byte: the data's tokenizer" in err
    assert f"no file {tmp_path / 'gone.json'}" in err and "give eval.py --tokenizer" in err
    # the file there, but changed since prepare (another vocabulary): not copied, no bits per byte
    prepared_with(str(tokenizer), "0" * 64)
    result = train(config(tokens, init_dir, tmp_path / "run3", max_steps=2, save_every=2))
    assert not (Path(result["checkpoint"]) / "tokenizer.json").exists()
    assert all("bpb" not in scores for scores in result["eval"].values())
    err = capsys.readouterr().err
    assert f"{tokenizer}: {tokenizer} is not the tokenizer that prepared the data (it changed since `prepare`: put " \
           "back the file that prepared it, or prepare the data again with this one)" in err
    assert "give eval.py --tokenizer (the tokenizer that prepared the data)" in err


def test_the_datas_tokenizer_is_found_by_the_file_prepare_recorded(tmp_path, monkeypatch, capsys):
    """`prepare` given a relative tokenizer path records its name as given: a run started from another folder
    found no such file, and the checkpoints went without tokenizer.json with no note at all (a name without
    "/" was taken for a tokenizer that is no file). meta.json now records the file's absolute path too; a
    tokenizer that is no file records null, and only that goes without a note. (That the file found is copied
    into each checkpoint: the test above.)"""
    from minimamba.data import prepare, read_meta
    from minimamba.training import data_tokenizer
    from tests.test_data import ByteTokenizer
    from tests.test_tokenizer import tiny_tokenizer_json, tiny_tokenizer_json_with_other_text

    (tmp_path / "prep").mkdir()
    tokenizer = tmp_path / "prep" / "tok.json"
    tokenizer.write_text(json.dumps(tiny_tokenizer_json()), encoding="utf-8")
    texts = tmp_path / "docs.txt"
    texts.write_text("the cat sat on the mat\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "prep")
    prepare("c4", [texts], "tok.json", tmp_path / "tokens")
    info = read_meta(tmp_path / "tokens", "c4")["tokenizer"]
    assert info["name"] == "tok.json" and info["file"] == str(tokenizer)
    monkeypatch.chdir(tmp_path)  # (no tok.json here: the name alone finds nothing)
    capsys.readouterr()  # (prepare's progress)
    assert data_tokenizer(tmp_path / "tokens", "c4").path == tokenizer
    assert capsys.readouterr().err == ""
    # the file gone too: a note that names what was tried
    tokenizer.unlink()
    assert data_tokenizer(tmp_path / "tokens", "c4") is None
    err = capsys.readouterr().err
    assert err.startswith("note: the checkpoints will hold no tokenizer.json and the held-out evaluation reports no "
                          "bits per byte: the data's tokenizer 'tok.json'")
    assert f"{tokenizer}: no file {tokenizer}; tok.json: no file tok.json" in err and "eval.py --tokenizer" in err
    # the name still there (the recorded file moved): the name is the fallback
    tokenizer.write_text(json.dumps(tiny_tokenizer_json()), encoding="utf-8")
    meta = json.loads((tmp_path / "tokens" / "c4" / "meta.json").read_text())
    meta["tokenizer"]["file"] = str(tmp_path / "moved.json")
    (tmp_path / "tokens" / "c4" / "meta.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path / "prep")
    assert data_tokenizer(tmp_path / "tokens", "c4").path == Path("tok.json")
    # the recorded file there but changed since prepare (one id another text), the name the one that prepared
    # it: the name's (not the changed file, whose byte lengths would count other bytes), without a note
    (tmp_path / "moved.json").write_text(json.dumps(tiny_tokenizer_json_with_other_text()), encoding="utf-8")
    capsys.readouterr()
    assert data_tokenizer(tmp_path / "tokens", "c4").path == Path("tok.json")
    assert capsys.readouterr().err == ""
    # a tokenizer that is no file: null, no tokenizer.json and nothing to say
    prepare("pubmed", [texts], ByteTokenizer(), tmp_path / "tokens")
    assert read_meta(tmp_path / "tokens", "pubmed")["tokenizer"]["file"] is None
    capsys.readouterr()
    assert data_tokenizer(tmp_path / "tokens", "pubmed") is None
    assert capsys.readouterr().err == ""


def test_token_ids_beyond_the_models_vocabulary_are_refused_before_anything_is_written(data, init_dir, tmp_path):
    """Token files with ids the model has no embedding for failed at the first step with an IndexError
    (on CUDA a device-side assert): refused at setup, naming the domain and where the ids come from —
    the largest id of a file without meta.json, or the tokenizer that meta.json names."""
    bad = tmp_path / "tokens"
    shutil.copytree(data, bad)
    ids = np.fromfile(bad / "c4" / "train.bin", dtype=np.uint16)
    ids[123] = 299
    ids.tofile(bad / "c4" / "train.bin")
    with pytest.raises(SetupError, match=rf"{bad / 'c4'}: its train.bin holds ids up to 299, but the model has a "
                                         r"vocabulary of 256 ids; prepare the data with the model's tokenizer"):
        train(config(bad, init_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    (bad / "wikipedia" / "meta.json").write_text(json.dumps(
        {"tokenizer": {"name": "gpt-neox-20b", "vocab_size": 50277, "eos_id": 0}, "splits": {}}))
    with pytest.raises(SetupError, match=r"wikipedia: it was prepared with gpt-neox-20b, 50277 ids \(meta.json\), "
                                         r"but the model has a vocabulary of 256 ids.*vocab_size is at least 50277"):
        train(config(bad, init_dir, tmp_path / "run", mix="wikipedia=1"))
    # held-out files are checked for the evaluated domains
    ids = np.fromfile(data / "pubmed" / "heldout.bin", dtype=np.uint16)
    ids[0] = 256
    ids.tofile(bad / "pubmed" / "heldout.bin")
    with pytest.raises(SetupError, match=r"pubmed: its heldout.bin holds ids up to 256"):
        train(config(bad, init_dir, tmp_path / "run", mix="pubmed=1"))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# What a mutation audit of minimamba/training.py found untested (docs/training-audit.md): each test below
# failed on a changed copy of the code that every test above passed


def test_warmup_of_one_is_one_step_and_the_decay_leaves_the_warmup_alone():
    """--warmup is a fraction of the steps below 1, a number of steps from 1 on (1 is one step, not all of them);
    wsd's decay takes at most the steps after warmup; a decay over every step after warmup has no constant part."""
    assert schedule_steps(TrainConfig(warmup=1), 100) == (1, 25)
    assert schedule_steps(TrainConfig(warmup=0.5), 100) == (50, 25)
    assert schedule_steps(TrainConfig(warmup=8, decay=0.5), 10) == (8, 2)  # (not 5: 8 + 5 > 10)
    assert schedule_steps(TrainConfig(warmup=0, decay=1.0), 4) == (0, 4)
    assert schedule_text("wsd", 0, 4, 4, 0.1) == "no warmup, a cosine decay to 0.1× the peak over the last 4"
    assert schedule_text("wsd", 2, 3, 5, 0.5) == "warmup 2 steps, then a cosine decay to 0.5× the peak over the last 3"


def test_resolve_derives_the_batch_and_the_length_by_hand():
    """grad_accum from --tokens-per-step rounds up (per pass: batch × processes), --tokens sets max_steps
    (rounded up) over --max-steps, and --eval-batch-size is used when given."""
    cfg = TrainConfig(seq_len=16, batch_size=2, grad_accum=None, tokens_per_step=100, tokens=1000, max_steps=6000,
                      eval_batch_size=5)
    r = resolve(cfg, Dist(world_size=2))  # 2 rows per process, 4 per pass: ceil(100 / 16 / 4) = 2 passes
    assert (r.grad_accum, r.rows_per_step, r.tokens_per_step, r.max_steps) == (2, 8, 128, 8)  # ceil(1000 / 128)
    assert r.eval_batch_size == 5 and resolve(replace(cfg, eval_batch_size=None), Dist()).eval_batch_size == 2
    assert resolve(replace(cfg, tokens=None), Dist()).max_steps == 6000


def test_a_step_whose_gradient_is_not_finite_changes_no_weight():
    """A finite loss with an infinite gradient is divergence too; neither it nor a NaN loss moves a weight
    or leaves a gradient behind."""
    for poison in ("gradient", "loss"):
        model = small_model()
        if poison == "gradient":
            model.norm_f.weight.register_hook(lambda g: g * math.inf)
        else:
            model.register_forward_hook(lambda m, i, o: o * math.nan)
        before = [p.detach().clone() for p in model.parameters()]
        rows = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
        with pytest.raises(TrainingDiverged, match="the gradient norm is inf" if poison == "gradient" else
                           "the loss is nan"):
            train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), rows, 2, 1.0, Dist())
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), poison
        assert all(p.grad is None for p in model.parameters()), poison


def test_the_loop_steps_at_the_scheduled_lr_and_updates_the_ema_once_a_step(data, init_dir, tmp_path, capsys):
    """6 steps, warmup round(0.6) = 1, wsd decay round(1.5) = 2, min 0.1: the LR of steps 1..6 is the peak
    × [1, 1, 1, 1, 0.1 + 0.9·(1 + cos(π/2))/2, 0.1] (by hand); after each step ema ← 0.9·ema + 0.1·w, from
    the --init weights (read from the checkpoints of every step); the summary's lowest-layer LR is 0.9×."""
    cfg = config(data, init_dir, tmp_path / "run", save_every=1, eval_at_start=False)
    train(cfg)
    factors = [1, 1, 1, 1, 0.55, 0.1]
    logged = [r["lr"] for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert logged == pytest.approx([3e-3 * f for f in factors], rel=1e-12)
    assert "peak lr 0.003 (lowest layer 0.0027)" in capsys.readouterr().out
    before = {n: p.detach() for n, p in from_pretrained(init_dir, backend="torch").named_parameters()}
    for step in range(1, 7):
        st = state(tmp_path / "run", step)
        for n, e in before.items():
            assert torch.allclose(st["ema"][n], 0.9 * e + 0.1 * st["model"][n], rtol=0, atol=1e-6), (step, n)
        assert max((st["ema"][n] - e).abs().max().item() for n, e in before.items()) > 1e-4  # (it moves)
        before = st["ema"]


def test_a_save_is_written_flushed_committed_then_renamed(tmp_path, monkeypatch):
    """The module docstring's protocol, step by step: the weights into .step-N.tmp, training_state.pt last
    (atomically), then OUT/latest names step-N (the commit), then the rename and a flush of OUT; over a step-N
    of an earlier run, that one is moved aside first and deleted after."""
    from minimamba import training

    events = []
    real_replace, real_atomic, real_text, real_fsync = os.replace, training.atomic_write, \
        training.write_text_atomically, training.fsync_dir

    def rel(p):
        return str(Path(p).relative_to(tmp_path))

    def atomic(path, write):
        events.append(("write", rel(path), sorted(p.name for p in Path(path).parent.iterdir()
                                                  if not p.name.startswith("."))))
        real_atomic(path, write)

    def text(path, t):
        events.append(("text", rel(path), t))
        real_text(path, t)

    def replace_(src, dst):
        if re.fullmatch(r"\.?step-\d+(\.tmp|\.old)?", Path(src).name):  # (not the atomic writes' own renames)
            events.append(("replace", rel(src), rel(dst)))
        real_replace(src, dst)

    def fsync(path):
        events.append(("fsync", rel(path)))
        return real_fsync(path)

    monkeypatch.setattr(training, "atomic_write", atomic)
    monkeypatch.setattr(training, "write_text_atomically", text)
    monkeypatch.setattr(training, "fsync_dir", fsync)
    monkeypatch.setattr(os, "replace", replace_)

    class Sampler:
        def state_dict(self):
            return {"position": 7}

    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters())
    from minimamba.training import save_checkpoint

    save_checkpoint(tmp_path, 3, model, optimizer, EMA(model, 0.5), Sampler(), {}, Dist())
    assert events == [("write", ".step-000003.tmp/training_state.pt", ["config.json", "pytorch_model.bin"]),
                      ("text", "latest", "step-000003\n"),
                      ("replace", ".step-000003.tmp", "step-000003"), ("fsync", ".")]
    events.clear()
    save_checkpoint(tmp_path, 3, model, optimizer, None, Sampler(), {}, Dist())  # (over the step-3 of before)
    assert events[:2] == [("write", ".step-000003.tmp/training_state.pt", ["config.json", "pytorch_model.bin"]),
                          ("text", "latest", "step-000003\n")]
    assert events[2:] == [("replace", "step-000003", ".step-000003.old"), ("replace", ".step-000003.tmp", "step-000003"),
                          ("fsync", ".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003"]
    assert torch.load(tmp_path / "step-000003" / "training_state.pt", weights_only=True)["sampler"] == {"position": 7}


def test_keep_leaves_the_later_steps_of_the_run_resumed_from(data, init_dir, tmp_path, no_speed_probe):
    """--keep counts this run's checkpoints: resumed from step 4 of a run that reached 6, a --keep 1 run that
    saves step 5 deletes step 4, not the other run's step 6 (replaced only when this run reaches it)."""
    cfg = config(data, init_dir, tmp_path / "run", keep=2, eval_at_start=False)
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000004", "step-000006"]
    train(replace(cfg, resume=str(tmp_path / "run" / "step-000004"), max_steps=5, keep=1))
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000005", "step-000006"]


def test_recovery_names_the_recovered_step_and_leaves_a_finished_replacement_alone(tmp_path):
    """A save killed after it moved the old step-4 aside and before it renamed its complete .tmp, with
    OUT/latest naming step 6 (an older minimamba wrote it after the renames): the .tmp's bytes become step-4
    and OUT/latest names it. A .step-N.old beside its step-N (a kill after both renames, before the old one
    was deleted) is not a save to recover: step-N stays."""
    from minimamba.training import interrupted_saves, latest_checkpoint, recover_interrupted_save

    out = tmp_path / "run"
    for name, content in (("step-000006", b"six"), (".step-000004.tmp", b"new four"), (".step-000004.old", b"old four"),
                          ("step-000002", b"two"), (".step-000002.old", b"older two")):
        (out / name).mkdir(parents=True)
        (out / name / "training_state.pt").write_bytes(content)
    (out / "latest").write_text("step-000006\n")
    assert interrupted_saves(out) == {out / "step-000004": out / ".step-000004.tmp"}
    assert latest_checkpoint(out) == out / "step-000004"
    assert recover_interrupted_save(out) == [out / "step-000004"]
    assert (out / "latest").read_text() == "step-000004\n"
    assert (out / "step-000004" / "training_state.pt").read_bytes() == b"new four"
    assert (out / "step-000002" / "training_state.pt").read_bytes() == b"two"
    assert sorted(p.name for p in out.iterdir()) == [".step-000002.old", "latest", "step-000002", "step-000004",
                                                     "step-000006"]
    recover_interrupted_save(out, tidy=True)  # (what a run starting in OUT does: the leftover goes)
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step-000002", "step-000004", "step-000006"]


def test_the_lock_file_names_only_its_holder(tmp_path):
    """A lock file left by an earlier run (its text too) names the process that holds it now."""
    from minimamba.training import lock_out

    (tmp_path / ".lock").write_text("99999999 a-host-of-long-ago and more\n")
    fd = lock_out(tmp_path)
    try:
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    finally:
        os.close(fd)


def _whole_state(**change):
    """A training state with every part train.py writes (empty where it may be), changed by `change`."""
    st = {"format": 1, "step": 0, "tokens_seen": 0, "elapsed": 0.0, "model": {}, "optimizer": {"state": {},
          "param_groups": []}, "ema": None, "sampler": {}, "rng": {"torch": torch.get_rng_state(), "cuda": []},
          "config": {}}
    return {**st, **change}


@pytest.mark.parametrize("change, problem", [
    ({}, None),  # (ema None: a run without EMA)
    ({"ema": []}, "'ema' is a list, not dict or None"),
    ({"rng": {"torch": torch.get_rng_state()}}, "'rng' lacks the torch RNG state tensor or the list of CUDA ones"),
    ({"rng": {"torch": [1], "cuda": []}}, "'rng' lacks the torch RNG state tensor"),
    ({"optimizer": {"state": [], "param_groups": []}}, "the optimizer has no 'state' dict"),
    ({"optimizer": {"state": {}, "param_groups": [{"lr": 1}]}}, "the optimizer's 'param_groups' is not a list of"),
], ids=["whole", "ema-list", "rng-no-cuda", "rng-torch-list", "optimizer-state-list", "groups-without-params"])
def test_a_training_state_missing_a_part_is_refused_naming_it(tmp_path, change, problem):
    from minimamba.training import load_training_state

    torch.save(_whole_state(**change), tmp_path / "training_state.pt")
    if problem is None:
        assert load_training_state(tmp_path)["ema"] is None
    else:
        with pytest.raises(SetupError, match=r"is not a whole training state: .*" + re.escape(problem)):
            load_training_state(tmp_path)


def test_a_run_without_ema_resumes_without_it_only(data, init_dir, tmp_path, no_speed_probe):
    cfg = config(data, init_dir, tmp_path / "run", ema=0.0, max_steps=2, eval_at_start=False)
    train(cfg)
    assert state(tmp_path / "run", 2)["ema"] is None
    with pytest.raises(SetupError, match=r"trained without EMA \(--ema 0\).*resume with --ema 0"):
        train(replace(cfg, resume="latest", max_steps=3, ema=0.5))
    assert train(replace(cfg, resume="latest", max_steps=3))["step"] == 3


def test_a_new_run_starts_a_new_log(data, init_dir, tmp_path, no_speed_probe):
    """An OUT with a log.jsonl and no checkpoint (a run stopped before its first save): a new run's log
    holds its own records only. (Its length is given as --tokens 64, one step of 64 tokens, over --max-steps 6:
    train_config.json records the steps that run.)"""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 5, "tokens": 320, "loss": 9.0}\n')
    train(config(data, init_dir, out, tokens=64, eval_at_start=False))
    assert json.loads((out / "train_config.json").read_text())["resolved"]["max_steps"] == 1
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 1]  # (the step's record and the last evaluation)
    assert losses(out)[1] != 9.0


def test_a_record_whose_step_is_not_a_number_is_damage(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": "2"}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"line\(s\) \[2\] are not JSON records"):
        read_log(log)


def test_an_ema_state_of_other_names_is_refused():
    """EMA.load_state_dict takes the state of the same parameters only: one missing or one more is a ValueError."""
    model = small_model()
    whole = EMA(model, 0.5).state_dict()
    for other in ({k: v for k, v in whole.items() if k != "D" and not k.endswith(".D")},
                  {**whole, "layers.9.mixer.D": torch.zeros(2)}):
        with pytest.raises(ValueError, match="EMA state does not match the model"):
            EMA(model, 0.5).load_state_dict(other)


def test_a_batch_without_a_target_token_is_a_value_error():
    """Every label IGNORE (fine-tuning rows whose prompt fills them): the mean over no token is refused, naming it."""
    from minimamba.training import IGNORE

    model = small_model()
    rows = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="the batch has no target token"):
        train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), rows, 2, 1.0, Dist(),
                   labels=torch.full_like(rows, IGNORE))


def test_init_scratch_draws_the_weights_of_seed():
    """--init scratch: the random weights of --seed (another seed, other weights; the same, the same)."""
    from minimamba.training import build_model

    one, again, other = (build_model(TrainConfig(init="scratch", scale="tiny", seed=s, backend="torch")).state_dict()
                         for s in (1, 1, 2))
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not torch.equal(one["layers.0.mixer.in_proj.weight"], other["layers.0.mixer.in_proj.weight"])


def test_a_damaged_latest_is_refused_naming_it(data, init_dir, tmp_path):
    """OUT/latest that holds no step name: --resume and a new run in that OUT are refused (not taken for an OUT
    without checkpoints, which a new run would start over in), and the error names the checkpoints there."""
    out = tmp_path / "run"
    (out / "step-000002").mkdir(parents=True)
    (out / "step-000002" / "training_state.pt").write_bytes(b"")
    (out / "latest").write_bytes(b"\x00\x00\x00")
    for resume in ("latest", None):
        with pytest.raises(SetupError, match=r"holds b'\\x00\\x00\\x00': it is damaged.*echo step-000002 > "):
            train(config(data, init_dir, out, resume=resume))
    assert sorted(p.name for p in out.iterdir()) == [".lock", "latest", "step-000002"]


def test_a_diverged_run_exits_1_with_one_line(capsys):
    from minimamba.training import TrainingDiverged

    def diverged():
        raise TrainingDiverged("the loss is nan at step 3")

    with pytest.raises(SystemExit) as stop:
        run_as_script(diverged)
    assert stop.value.code == 1 and capsys.readouterr().err == "error: training diverged: the loss is nan at step 3\n"


def test_a_training_state_with_weights_the_model_lacks_is_refused(wd0_run, tmp_path, no_speed_probe):
    cfg, ckpt = _copy_of_step_2(wd0_run, tmp_path)
    _training_state(ckpt, lambda st: st["model"].update({"extra.weight": torch.zeros(3)}))
    with pytest.raises(SetupError, match=r"its raw weights differ:\n  unexpected key extra.weight \(3,\)"):
        train(cfg)

"""minimamba.finetune and sft.py on CPU: the loss mask against a per-example loop, accumulation of
micro-batches with different token counts, the epoch order, exact resume across an epoch boundary,
early stopping and OUT/best, NaN stop, bad inputs.

A 2-layer, 32-wide model and a byte tokenizer (id = UTF-8 byte, EOS = 256), so a step takes milliseconds.
"""

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minimamba.config import Mamba2Config
from minimamba.finetune import (
    EpochOrder, SFTConfig, collate, encode_pair, encode_pairs, finetune, validation_loss)
from minimamba.hub import from_pretrained
from minimamba.model import Mamba2LM
from minimamba.training import IGNORE, Dist, SetupError, TrainingDiverged, read_log, train_step

ROOT = Path(__file__).resolve().parents[1]
EOS = 256
pytestmark = pytest.mark.usefixtures("one_thread", "no_speed_probe", "no_plot")  # (conftest.py; no_plot below)


@pytest.fixture
def no_plot(monkeypatch):
    """No training.png: drawing it after every evaluation (test_training.py tests it) would take most of these
    runs' time."""
    import minimamba.training

    monkeypatch.setattr(minimamba.training, "plot_log", lambda *args: None)


class ByteTokenizer:
    eos_id = EOS

    def encode(self, text):
        return list(text.encode("utf-8"))


def small_model(seed=0):
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=EOS + 1, d_state=8, headdim=16, chunk_size=16),
                     backend="torch")
    model.reset_parameters(seed=seed)
    return model


def pairs(n, seed=0):
    """n (prompt, response) pairs of varied lengths: "what is k?" -> a word for k."""
    g = torch.Generator().manual_seed(seed)
    words = ["yes", "no", "maybe", "the left ventricle", "aspirin 81 mg daily", "x"]
    out = []
    for i in range(n):
        k = int(torch.randint(0, len(words), (1,), generator=g))
        out.append((f"Question {i}: what is item {k}?" + " context" * int(torch.randint(0, 4, (1,), generator=g)),
                    " " + words[k]))
    return out


def config(out, **kw):
    base = SFTConfig(init="scratch", max_len=48, batch_size=2, grad_accum=2, epochs=3, lr=3e-3, eval_every=2,
                     save_every=3, keep=10, patience=0, out=str(out), device="cpu", backend="torch", progress=False)
    return replace(base, **kw)


def run(cfg, train_pairs, val_pairs=None, model=None):
    return finetune(cfg, train_pairs, val_pairs, model=model if model is not None else small_model(),
                    tokenizer=ByteTokenizer())


# ----------------------------------------------------------------------------------------------------------
# Rows, mask, loss


def test_rows_mask_the_prompt_and_padding_and_cut_the_prompt_on_the_left():
    assert encode_pair([1, 2, 3], [4, 5], 9, max_len=10) == ([1, 2, 3, 4, 5, 9], 3, False, False)
    assert encode_pair([1, 2, 3], [4, 5], 9, max_len=5) == ([2, 3, 4, 5, 9], 2, True, False)  # prompt loses its left
    # a response too long by itself: one prompt token, the response cut at the right, no EOS
    assert encode_pair([1, 2], [4, 5, 6, 7], 9, max_len=4) == ([2, 4, 5, 6], 1, True, True)
    inputs, labels = collate([([1, 2, 3, 4, 5, 9], 3), ([2, 4, 5, 6], 1)], pad_id=0)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [2, 4, 5, 0, 0]]
    assert labels.tolist() == [[IGNORE, IGNORE, 4, 5, 9], [4, 5, 6, IGNORE, IGNORE]]


def reference_loss(model, examples, max_len):
    """The mean NLL over all response tokens, one example at a time, written independently of finetune:
    the whole sequence prompt + response + EOS, its last max_len tokens, scored on its last len(response)+1."""
    total, count = 0.0, 0
    for prompt, response in examples:
        p, r = list(prompt.encode()), list(response.encode()) + [EOS]
        if len(r) > max_len - 1:  # (the response alone does not fit: one prompt token, r cut, no EOS)
            p, r = p[-1:], r[: max_len - 1]
        full = torch.tensor((p + r)[-max_len:])  # (T,)
        logits = model(full[None, :-1])[0]  # (T-1, V)
        total += F.cross_entropy(logits[-len(r):], full[-len(r):], reduction="sum").item()
        count += len(r)
    return total / count, count


def test_masked_loss_equals_a_loop_over_examples_with_truncation_and_padding():
    model = small_model(seed=1)
    examples = pairs(7) + [("a long prompt " * 10, " a short answer"), ("a prompt", " r" + "e" * 36),
                           ("q", " a response longer than max_len " * 3)]
    max_len = 40
    rows, cuts = encode_pairs(ByteTokenizer(), examples, max_len)
    prompt_cut = sum(len(p.encode()) + len(r.encode()) + 1 > max_len for p, r in examples[:-1])  # (last: 1 token)
    # ("a prompt": 8 tokens, of which the 38 + EOS of its response leave room for 1)
    assert cuts == {"prompt_cut": prompt_cut, "prompt_to_one_token": 1, "response_cut": 1}
    assert 2 < prompt_cut < len(examples) - 1 and rows[-2][1] == 1
    expected, count = reference_loss(model, examples, max_len)
    inputs, labels = collate(rows, EOS)
    loss, _, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), inputs, 3, 0.0, Dist(), labels=labels)
    assert loss == pytest.approx(expected, rel=1e-5)
    res = validation_loss(model, {"a": rows[:4], "b": rows[4:]}, 2, EOS, torch.device("cpu"))
    assert res["all"]["loss"] == pytest.approx(expected, rel=1e-5) and res["all"]["tokens"] == count
    assert res["a"]["loss"] == pytest.approx(reference_loss(model, examples[:4], max_len)[0], rel=1e-5)


def sgd_update(inputs, labels, micro_batch):
    model = small_model(seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    loss, _, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), inputs, micro_batch, 0.0, Dist(),
                            labels=labels)
    return loss, torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])


def test_accumulating_micro_batches_with_different_token_counts_gives_the_gradient_of_one_batch():
    examples = [("prompt one", " y"), ("p", " a much longer response with many tokens in it"), ("two", " no"),
                ("a prompt", " maybe so")]
    inputs, labels = collate(encode_pairs(ByteTokenizer(), examples, 64)[0], EOS)
    counts = (labels != IGNORE).sum(1).tolist()
    assert max(counts) > 10 * min(counts)  # (micro-batches of 1 differ a lot in their token counts)
    loss, whole = sgd_update(inputs, labels, micro_batch=4)
    for micro_batch in (1, 2, 3):
        l, u = sgd_update(inputs, labels, micro_batch)
        assert l == pytest.approx(loss, rel=1e-6)
        assert torch.allclose(u, whole, rtol=1e-4, atol=1e-7), micro_batch
    # the gradient is that of the mean over all response tokens of the batch, not the mean of per-row means
    def gradient(loss_of):
        model = small_model(seed=2)
        loss_of(model(inputs).flatten(0, 1), labels.flatten()).backward()  # logits (4·l, V), labels (4·l,)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    one_mean = gradient(lambda x, y: F.cross_entropy(x, y, ignore_index=IGNORE))
    assert torch.allclose(one_mean, whole, rtol=1e-4, atol=1e-6)
    per_row = lambda x, y: F.cross_entropy(x, y, ignore_index=IGNORE, reduction="none").view(4, -1).sum(1)
    row_means = gradient(lambda x, y: (per_row(x, y) / torch.tensor(counts)).mean())
    assert not torch.allclose(row_means, whole, rtol=1e-2, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# The data order


def test_epoch_order_visits_each_pair_once_or_by_share_and_splits_the_batch_between_ranks():
    plain = EpochOrder({"a": 5, "b": 6}, None, rows_per_step=4, seed=0)
    assert plain.steps_per_epoch == 2
    assert sorted(plain.epoch(0)) == sorted([("a", i) for i in range(5)] + [("b", i) for i in range(6)])
    assert plain.epoch(1) != EpochOrder({"a": 5, "b": 6}, None, 4, seed=0).epoch(0)  # a fresh order each epoch
    # the steps walk through each epoch's order 4 rows at a time (its last 11 - 8 = 3 rows unused), then the
    # next epoch's (the rank checks below alone passed with every epoch re-reading epoch 0's order)
    order = EpochOrder({"a": 5, "b": 6}, None, 4, seed=0)
    e0, e1, e2 = plain.epoch(0), plain.epoch(1), plain.epoch(2)
    assert [order.next_rows()[0] for _ in range(5)] == [e0[0:4], e0[4:8], e1[0:4], e1[4:8], e2[0:4]]
    mixed = EpochOrder({"small": 2, "large": 10}, {"small": 0.25, "large": 0.75}, rows_per_step=3, seed=0)
    rows = mixed.epoch(0)
    small = sorted(i for t, i in rows if t == "small")
    large = [i for t, i in rows if t == "large"]
    assert len(small) == 3 and set(small) == {0, 1}  # repeated: both once, and one of them again
    assert len(large) == 9 == len(set(large))  # subsampled without replacement
    ranks = [EpochOrder({"a": 5, "b": 6}, None, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):  # (across the epoch boundary after step 2)
        chosen, mine = plain.next_rows()
        parts = [o.next_rows()[1] for o in ranks]
        assert sorted(parts[0] + parts[1]) == sorted(chosen) and len(parts[0]) == 2
        assert parts == [chosen[0::2], chosen[1::2]]  # as documented: rank r keeps rows r, r + 2, ...


# ----------------------------------------------------------------------------------------------------------
# Runs


def states(out, step):
    return torch.load(Path(out) / f"step-{step:06d}" / "training_state.pt", weights_only=True)


def test_resume_is_exact_across_an_epoch_boundary(tmp_path):
    train_pairs = {"qa": pairs(9), "other": pairs(5, seed=1)}  # 14 pairs, 4 per step: 3 steps per epoch
    val = pairs(3, seed=2)
    whole = config(tmp_path / "whole", epochs=2)  # 6 steps; checkpoint at 3 (end of epoch 0) and 6
    result = run(whole, train_pairs, val)
    assert result["step"] == 6
    resumed = replace(whole, out=str(tmp_path / "part"))
    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "whole" / "step-000003", tmp_path / "part" / "step-000003")
    result = run(replace(resumed, resume=str(tmp_path / "part" / "step-000003")), train_pairs, val)
    a, b = states(tmp_path / "whole", 6), states(tmp_path / "part", 6)
    for part in ("model",):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    for k, s in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][k][n]) for n, v in s.items())
    assert a["sampler"] == b["sampler"] and a["early_stopping"] == b["early_stopping"]
    logs = [{r["step"]: r["loss"] for r in read_log(Path(o) / "log.jsonl") if "loss" in r}
            for o in (whole.out, resumed.out)]
    assert logs[1] == {s: v for s, v in logs[0].items() if s > 3} and len(logs[0]) == 6
    best = json_best(resumed.out)
    assert result["best_step"] == best["step"] and result["best_loss"] == pytest.approx(best["val_loss"])


def json_best(out):
    import json

    return json.loads((Path(out) / "best" / "best.json").read_text())


def test_early_stopping_keeps_the_best_weights_and_resumes_its_count(tmp_path):
    # the validation pairs contradict the training pairs: training makes the validation loss worse
    train_pairs = [(f"Is item {i} red?", " yes") for i in range(8)]
    val = [(f"Is item {i} red?", " no") for i in range(8, 12)]
    cfg = config(tmp_path / "run", epochs=20, eval_every=1, save_every=1, patience=2, lr=3e-2, warmup=0,
                 schedule="constant")
    result = run(cfg, train_pairs, val)
    assert result["stopped_early"] and result["step"] == result["best_step"] + cfg.patience < 40
    rows = encode_pairs(ByteTokenizer(), val, cfg.max_len)[0]
    best = validation_loss(from_pretrained(result["best"], backend="torch"), {"val": rows}, 4, EOS, torch.device("cpu"))
    assert best["all"]["loss"] == pytest.approx(result["best_loss"], rel=1e-6)
    assert json_best(cfg.out)["step"] == result["best_step"]
    evals = [r["eval"]["all"]["loss"] for r in read_log(Path(cfg.out) / "log.jsonl") if "eval" in r]  # steps 0, 1, …
    assert min(evals) == evals[result["best_step"]] and len(evals) == result["step"] + 1
    with pytest.raises(SetupError, match="stopped early.*nothing to train"):
        run(replace(cfg, resume="latest"), train_pairs, val)
    # resumed just after an evaluation that was not lower (1 of the 3 of patience used): the same stop
    after_one_bad = tmp_path / "run" / f"step-{result['best_step'] + 1:06d}"
    assert states(cfg.out, result["best_step"] + 1)["early_stopping"]["bad_evals"] == 1
    again = run(replace(cfg, resume=str(after_one_bad)), train_pairs, val)
    assert {k: again[k] for k in ("step", "best_step", "best_loss", "stopped_early")} == {
        k: result[k] for k in ("step", "best_step", "best_loss", "stopped_early")}
    assert states(cfg.out, again["step"])["early_stopping"]["bad_evals"] == cfg.patience


def test_the_start_counts_so_best_holds_the_initial_weights_when_training_only_hurts(tmp_path):
    model = small_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(tmp_path / "run", eval_every=1, patience=1, lr=0.3, warmup=0, schedule="constant")
    result = run(cfg, pairs(8), pairs(4, seed=2), model=model)  # (lr 0.3: the first step already hurts)
    evals = [r["eval"]["all"]["loss"] for r in read_log(Path(cfg.out) / "log.jsonl") if "eval" in r]
    assert evals[1] > evals[0] and result["best_step"] == 0 and result["step"] == 1 and result["stopped_early"]
    assert json_best(cfg.out)["step"] == 0 and json_best(cfg.out)["val_loss"] == pytest.approx(evals[0])
    saved = from_pretrained(result["best"], backend="torch").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in initial.items())


def test_a_run_whose_last_evaluation_uses_up_the_patience_did_not_stop_early(tmp_path):
    cfg = config(tmp_path / "run", epochs=1, eval_every=1, eval_at_start=False, patience=1, lr=0.3, warmup=0,
                 schedule="constant")
    train_pairs = [(f"Is item {i} red?", " yes") for i in range(8)]  # (contradicted by the validation pairs)
    result = run(cfg, train_pairs, [(f"Is item {i} red?", " no") for i in range(8, 12)])  # 2 steps, 2 evaluations
    evals = [r["eval"]["all"]["loss"] for r in read_log(Path(cfg.out) / "log.jsonl") if "eval" in r]
    assert evals[1] > evals[0] and result["best_step"] == 1  # (the patience of 1 is used up at step 2)
    assert result["step"] == 2 and not result["stopped_early"]


def test_nan_loss_stops_and_no_checkpoint_holds_nan_weights(tmp_path, nan_after):
    model = small_model()
    nan_after(model, 8)  # from step 5 on (2 micro-batches per step)
    cfg = config(tmp_path / "run", save_every=2)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*step-000004"):
        run(cfg, pairs(12), pairs(2, seed=5), model=model)
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000004"
    for saved in [*(tmp_path / "run").glob("step-*"), tmp_path / "run" / "best"]:
        weights = from_pretrained(saved, backend="torch").state_dict()
        assert all(torch.isfinite(v).all() for v in weights.values()), saved


@pytest.mark.parametrize("train_pairs, val_pairs, message", [
    ([("a prompt", "")], None, r"example 0: the response is empty"),
    ([("a prompt", " ok"), (b"bytes", " ok")], None, r"example 1: the prompt is a bytes, not a str"),
    ([("a prompt", " ok"), ("p", 3)], None, r"example 1: the response is a int, not a str"),
    ([("p", " ok"), "just a string"], None, r"example 1 is a str, not a \(prompt, response\) pair"),
    ([], None, r"no examples"),
    ([("p", " ok")], None, r"1 example\(s\): too few to hold out --val-fraction"),
    ([("p", " ok")] * 3, [("v", " ok")], r"3 training pairs are fewer than one step's 4"),
    ([("p", " ok")] * 8, [("v", " ")], r"validation pairs 'val': example 0: the response is empty"),
])
def test_bad_pairs_are_refused_with_the_example_named(tmp_path, train_pairs, val_pairs, message):
    with pytest.raises(SetupError, match=message):
        run(config(tmp_path / "run"), train_pairs, val_pairs)
    assert not (tmp_path / "run").exists()  # (refused before anything is written)


def test_examples_per_step_sets_the_micro_batches_unless_grad_accum_does():
    """batch 2 (one process): --examples-per-step E takes ⌈E / 2⌉ micro-batches; --grad-accum sets them
    itself, and with an --examples-per-step other than the default it must agree with it."""
    from minimamba.finetune import Finetuning, SFTConfig

    for grad_accum, examples, want in ((None, 1, 1), (None, 2, 1), (None, 7, 4), (None, 32, 16),
                                       (3, SFTConfig.examples_per_step, 3), (3, 6, 3)):
        job = Finetuning(config("unused", grad_accum=grad_accum, examples_per_step=examples), {"t": pairs(8)},
                         tokenizer=ByteTokenizer())
        assert (job.resolve(Dist()).grad_accum, job.r.rows_per_step) == (want, 2 * want), (grad_accum, examples)
    job = Finetuning(config("unused", grad_accum=3, examples_per_step=8), {"t": pairs(8)}, tokenizer=ByteTokenizer())
    with pytest.raises(SetupError, match="--grad-accum 3 makes 6 examples per step \\(2 per micro-batch on all "
                                         "processes\\) but --examples-per-step asks for 8: give one of the two"):
        job.resolve(Dist())


def test_a_mix_must_name_the_tasks(tmp_path):
    with pytest.raises(SetupError, match="--mix names a, c but the tasks are a, b"):
        run(config(tmp_path / "run", mix="a=0.5,c=0.5"), {"a": pairs(8), "b": pairs(8)})


def test_sft_py_exits_2_with_one_line_for_a_bad_setting(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--epochs", "0", "--device", "cpu", "--out",
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --epochs must be >= 1, got 0"


def test_sft_py_help_says_where_the_task_data_are_read_by_default(monkeypatch, capsys):
    """It said "(default: $MINIMAMBA_TASK_DATA) (default: None)"; with the variable unset, tasks are read from
    data/tasks in the current directory (tasks.default_data_dir), and the help must say so."""
    import runpy

    from minimamba.tasks import default_data_dir

    monkeypatch.setattr(sys, "argv", ["sft.py", "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "sft.py"), run_name="__main__")
    text = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    assert ("--task-data TASK_DATA task data directory (default: $MINIMAMBA_TASK_DATA if set, else data/tasks in "
            "the current directory) --limit") in text
    monkeypatch.delenv("MINIMAMBA_TASK_DATA", raising=False)
    assert default_data_dir() == Path("data/tasks")
    monkeypatch.setenv("MINIMAMBA_TASK_DATA", "/somewhere")
    assert default_data_dir() == Path("/somewhere")


# ----------------------------------------------------------------------------------------------------------
# OUT/best after resume, EMA, NaN; checkpoints of the other script; the tokenizer in OUT/best


def best_loss_of(folder, val, max_len=48):
    rows = encode_pairs(ByteTokenizer(), val, max_len)[0]
    return validation_loss(from_pretrained(folder, backend="torch"), {"v": rows}, 4, EOS, torch.device("cpu"))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """8 steps with EMA 0.5, evaluated and saved every 2 steps: (config, train pairs, val pairs, result)."""
    import minimamba.training

    out = tmp_path_factory.mktemp("ema") / "run"
    cfg, tp, vp = config(out, epochs=2, eval_every=2, save_every=2, ema=0.5), pairs(16), pairs(4, seed=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(minimamba.training, "plot_log", lambda *args: None)
        return cfg, tp, vp, run(cfg, tp, vp)


def test_best_holds_the_ema_weights_that_were_evaluated(ema_run):
    cfg, _, vp, result = ema_run
    assert result["best_step"] == json_best(cfg.out)["step"] > 0
    assert best_loss_of(result["best"], vp)["all"]["loss"] == pytest.approx(json_best(cfg.out)["val_loss"], rel=1e-6)
    assert json_best(cfg.out)["val_loss"] == result["best_loss"]


def test_resuming_an_earlier_step_puts_that_branch_s_best_in_out_best(ema_run, tmp_path, monkeypatch):
    from minimamba.finetune import Finetuning

    cfg, tp, vp, first = ema_run
    out = tmp_path / "run"
    shutil.copytree(cfg.out, out)  # (a run that went on to step 8, and whose OUT/best is of a later step)
    branch = states(out, 4)["early_stopping"]
    assert first["best_step"] > branch["step"] == 4
    resumed = Finetuning.resumed

    def keep_a_copy(job, *args):  # OUT/best as the resumed run starts training
        resumed(job, *args)
        shutil.copytree(out / "best", tmp_path / "best")

    monkeypatch.setattr(Finetuning, "resumed", keep_a_copy)
    result = run(replace(cfg, out=str(out), resume=str(out / "step-000004")), tp, vp)
    assert json_best(tmp_path)["step"] == 4  # (tmp_path/"best": saved again from the restored EMA weights)
    assert best_loss_of(tmp_path / "best", vp)["all"]["loss"] == pytest.approx(branch["loss"], rel=1e-6)
    assert best_loss_of(out / "best", vp)["all"]["loss"] == pytest.approx(result["best_loss"], rel=1e-6)
    assert json_best(out)["step"] == result["best_step"]


def test_mending_out_best_copies_the_branch_s_best_checkpoint_or_sets_the_stray_one_aside(ema_run, tmp_path):
    from minimamba.finetune import _mend_best

    cfg, _, vp, first = ema_run
    out = tmp_path / "run"
    shutil.copytree(cfg.out, out)
    best_of_4 = states(out, 4)["early_stopping"]  # resumed from step 6 of a branch whose best was at step 4
    assert first["best_step"] == json_best(out)["step"] == 8 and best_of_4["step"] == 4
    assert _mend_best(out, best_of_4, 6) == 2  # copied from OUT/step-000004
    assert json_best(out)["step"] == 4 and not (out / "best.abandoned").exists()
    assert best_loss_of(out / "best", vp)["all"]["loss"] == pytest.approx(best_of_4["loss"], rel=1e-6)
    assert _mend_best(out, best_of_4, 6) == 0  # (now it matches)
    info_4 = (out / "best" / "best.json").read_text()
    # a kill between save_best's renames left the best in OUT/.best.old: put back
    os.replace(out / "best", out / ".best.old")
    assert _mend_best(out, best_of_4, 6) == 0 and json_best(out)["step"] == 4
    # no checkpoint of the best's step: the stray OUT/best is set aside, not claimed
    best_of_2 = states(out, 2)["early_stopping"]
    shutil.rmtree(out / "step-000002")
    assert _mend_best(out, best_of_2, 6) == 3
    assert not (out / "best").exists() and (out / "best.abandoned" / "best.json").read_text() == info_4


def test_a_checkpoint_of_the_other_script_is_refused_with_the_way_to_use_it(ema_run, tmp_path):
    from minimamba.training import TrainConfig, train

    cfg, tp, vp, _ = ema_run
    sft_ckpt = Path(cfg.out) / "step-000002"
    assert states(cfg.out, 2)["job"] == "sft"
    with pytest.raises(SetupError, match=r"checkpoint of sft\.py.*this is train\.py.*--init .*step-000002"):
        train(TrainConfig(init="scratch", out=str(tmp_path / "cpt"), resume=str(sft_ckpt), device="cpu",
                          backend="torch", progress=False))
    # a train.py checkpoint (as an older one was: no "job", no early-stopping state)
    shutil.copytree(sft_ckpt, tmp_path / "cpt" / "step-000002")
    state = states(tmp_path / "cpt", 2)
    del state["job"], state["early_stopping"]
    torch.save(state, tmp_path / "cpt" / "step-000002" / "training_state.pt")
    with pytest.raises(SetupError, match=r"checkpoint of train\.py.*this is sft\.py.*--init .*step-000002"):
        run(replace(cfg, out=str(tmp_path / "sft"), resume=str(tmp_path / "cpt" / "step-000002")), tp, vp)


@pytest.mark.parametrize("nan_eval", [0, 1])  # the evaluation at step 0, or the first after it (step 2)
def test_a_nan_validation_loss_is_never_the_best(tmp_path, nan_eval):
    model, calls = small_model(), {"n": 0}

    def hook(module, inputs, output):  # NaN logits in the 2 eval batches (of 2 pairs) of evaluation `nan_eval`
        if not module.training:
            calls["n"] += 1
            if calls["n"] in (2 * nan_eval + 1, 2 * nan_eval + 2):
                return output * float("nan")

    model.register_forward_hook(hook)
    cfg = config(tmp_path / "run", epochs=1, eval_every=2, patience=3, eval_batch_size=2)
    result = run(cfg, pairs(16), pairs(4, seed=2), model=model)
    evals = {r["step"]: r["eval"]["all"]["loss"] for r in read_log(Path(cfg.out) / "log.jsonl") if "eval" in r}
    assert evals[2 * nan_eval] is None and len(evals) == 3  # (NaN is written as null)
    finite = {s: v for s, v in evals.items() if v is not None}
    assert result["best_loss"] == min(finite.values()) and result["best_step"] == min(finite, key=finite.get)
    assert json_best(cfg.out)["step"] == result["best_step"]


def test_a_task_s_validation_split_depends_on_its_name_and_not_on_the_other_tasks():
    from minimamba.finetune import Finetuning

    def held_out(train_pairs):
        job = Finetuning(config("unused", val_fraction=0.25), train_pairs, tokenizer=ByteTokenizer())
        job.resolve(Dist())
        job.check_data()
        assert {t: len(rows) for t, rows in job.train_rows.items()} == {t: len(p) - len(p) // 4 for t, p in
                                                                         train_pairs.items()}
        for t, p in train_pairs.items():  # the training rows are the pairs not held out (none in both)
            everything = sorted(tokens for tokens, _ in encode_pairs(ByteTokenizer(), p, 48)[0])
            assert sorted(tokens for tokens, _ in job.train_rows[t] + job.val_rows[t]) == everything, t
        return {t: [tokens for tokens, _ in rows] for t, rows in job.val_rows.items()}

    same = pairs(16)
    alone, together = held_out({"a": same}), held_out({"a": same, "b": same, "c": pairs(8, seed=3)})
    assert alone["a"] == together["a"] and len(alone["a"]) == 4
    assert together["a"] != together["b"]  # (the same pairs, another task: another split)


def test_out_best_holds_the_tokenizer_file_the_run_was_given(tmp_path):
    import json

    from test_tokenizer import tiny_tokenizer_json

    from minimamba.tokenizer import load_tokenizer

    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(json.dumps(tiny_tokenizer_json()), encoding="utf-8")
    tokenizer = load_tokenizer(path)
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=tokenizer.vocab_size, d_state=8, headdim=16,
                                  chunk_size=16), backend="torch")
    model.reset_parameters(seed=0)
    cfg = config(tmp_path / "run", epochs=1, tokenizer=str(path.parent))
    result = finetune(cfg, pairs(8), pairs(2, seed=2), model=model)  # (no tokenizer: --tokenizer is read)
    assert (Path(result["best"]) / "tokenizer.json").read_bytes() == path.read_bytes()
    assert json_best(cfg.out)["tokenizer"] == str(path.parent)


def test_without_tokenizer_the_init_checkpoints_own_tokenizer_json_is_used(tmp_path):
    """sft.py --init OUT/step-N (a train.py checkpoint, which carries the tokenizer.json its data were made
    with) and no --tokenizer: the rows are made with that file, as eval.py would read them, not with the
    Hub's gpt-neox-20b (offline an error, with another tokenizer other ids)."""
    import json

    from test_tokenizer import tiny_tokenizer_json

    from minimamba.tokenizer import load_tokenizer

    init = tmp_path / "cpt" / "step-000010"
    init.mkdir(parents=True)
    (init / "tokenizer.json").write_text(json.dumps(tiny_tokenizer_json()), encoding="utf-8")
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=load_tokenizer(init).vocab_size, d_state=8,
                                  headdim=16, chunk_size=16), backend="torch")
    model.reset_parameters(seed=0)
    cfg = config(tmp_path / "run", epochs=1, init=str(init))  # (--tokenizer not given)
    assert cfg.tokenizer is None
    result = finetune(cfg, pairs(8), pairs(2, seed=2), model=model)
    assert (Path(result["best"]) / "tokenizer.json").read_bytes() == (init / "tokenizer.json").read_bytes()
    assert json_best(cfg.out)["tokenizer"] == str(init / "tokenizer.json")


@pytest.mark.parametrize("change, message", [
    (dict(tasks="pubmedqa,pubmedqa"), r"--tasks names pubmedqa more than once"),
    (dict(mix="a=1,b=0"), r"--mix gives b a share of 0"),
    (dict(mix="a=1,a=1"), r"task 'a' appears twice in --mix"),
    (dict(val_fraction=0), r"no validation pairs: --val-fraction is 0; pass a --val-fraction above 0"),
])
def test_task_and_mix_mistakes_are_named(tmp_path, change, message):
    train_pairs = None if "tasks" in change else {"a": pairs(8), "b": pairs(8)}
    with pytest.raises(SetupError, match=message):
        finetune(config(tmp_path / "run", **change), train_pairs, model=small_model(), tokenizer=ByteTokenizer())


# ----------------------------------------------------------------------------------------------------------
# What a mutation audit found untested (each test names the change it catches)


def test_max_len_below_2_is_refused_and_padding_uses_the_pad_id():
    """max_len 1 would leave no room for a prompt token: prompt_ids[-0:] is the whole prompt (it passed with
    the check at < 1). The padding of the inputs is pad_id (it passed with 0: the test's pad_id was 0)."""
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        encode_pair([1, 2, 3], [4], 9, max_len=1)
    inputs, labels = collate([([1, 2, 3, 9], 2), ([4, 5], 1)], pad_id=7)
    assert inputs.tolist() == [[1, 2, 3], [4, 7, 7]] and labels.tolist() == [[IGNORE, 3, 9], [5, IGNORE, IGNORE]]


def test_mix_quotas_are_rounded_by_largest_remainders():
    """N = 10 rows, shares .255/.265/.48: exactly 2.55, 2.65, 4.8 rows; the floors 2, 2, 4 leave 2 rows, which
    go to the largest remainders (c's .8, b's .65): 2, 3, 5. (Rounding each first gives 3, 3, 5 = 11 rows;
    the smallest remainders first gives 3, 3, 4.)"""
    order = EpochOrder({"a": 3, "b": 3, "c": 4}, {"a": 0.255, "b": 0.265, "c": 0.48}, rows_per_step=2, seed=0)
    assert order.quotas() == {"a": 2, "b": 3, "c": 5}
    tasks = [t for t, _ in order.epoch(0)]
    assert {t: tasks.count(t) for t in "abc"} == {"a": 2, "b": 3, "c": 5}


def test_the_validation_share_is_rounded_to_the_nearest_pair_and_at_least_one():
    from minimamba.finetune import split_validation

    examples = pairs(14)
    train, val = split_validation(examples, 0.25, 0, "t")  # 0.25 · 14 = 3.5 pairs: round() gives 4
    assert len(val) == 4 and len(train) == 10 and sorted(train + val) == sorted(examples)
    assert len(split_validation(pairs(16), 0.01, 0, "t")[1]) == 1  # (0.16 of a pair: still one)


def test_the_epoch_order_refuses_to_resume_with_other_settings():
    sizes, shares = {"a": 5, "b": 6}, {"a": 0.5, "b": 0.5}
    first = EpochOrder(sizes, shares, 4, seed=0)
    for _ in range(3):
        first.next_rows()
    for kw, what in [(dict(shares={"a": 0.25, "b": 0.75}), "shares"), (dict(shares=None), "shares"),
                     (dict(seed=1), "seed"), (dict(sizes={"a": 5, "b": 7}), "sizes"),
                     (dict(rows_per_step=2), "rows_per_step")]:
        args = {"sizes": sizes, "shares": shares, "rows_per_step": 4, "seed": 0, **kw}
        with pytest.raises(ValueError, match=f"cannot resume exactly.*{what}: checkpoint"):
            EpochOrder(**args).load_state_dict(first.state_dict())
    again = EpochOrder(sizes, shares, 4, seed=0)
    again.load_state_dict(first.state_dict())
    assert again.next_rows() == first.next_rows()


def test_resuming_with_the_tasks_in_another_order_is_refused_and_the_same_mix_written_otherwise_is_exact():
    """The rows of an epoch are drawn task by task, so --tasks b,a gives other batches than a,b: it was accepted
    ({"a": 5, "b": 6} == {"b": 6, "a": 5}) and the resumed run trained on other batches than the uninterrupted
    one. --mix a=7,b=3 is a=0.7,b=0.3 in other words (shares that differ in the last bit): it was refused."""
    from minimamba.sampler import parse_mix

    first = EpochOrder({"a": 5, "b": 6}, None, 4, seed=0)
    first.next_rows()
    swapped = EpochOrder({"b": 6, "a": 5}, None, 4, seed=0)
    with pytest.raises(ValueError, match="cannot resume exactly.*the order of the tasks: checkpoint a, b vs now b, a"):
        swapped.load_state_dict(first.state_dict())
    sizes = {"a": 10, "b": 10, "c": 10}
    decimals, integers = parse_mix("a=0.7,b=0.2,c=0.1", what="task"), parse_mix("a=7,b=2,c=1", what="task")
    assert decimals != integers
    whole = EpochOrder(sizes, decimals, 4, seed=0)
    batches = [whole.next_rows() for _ in range(12)]  # (across epochs: 7 steps per epoch)
    stopped = EpochOrder(sizes, decimals, 4, seed=0)
    for _ in range(5):
        stopped.next_rows()
    resumed = EpochOrder(sizes, integers, 4, seed=0)
    resumed.load_state_dict(stopped.state_dict())
    assert [resumed.next_rows() for _ in range(7)] == batches[5:] and resumed.shares == decimals


def job_for(cfg, train_pairs, dist=None, val_pairs=None):
    from minimamba.finetune import Finetuning

    job = Finetuning(cfg, train_pairs, val_pairs, tokenizer=ByteTokenizer())
    job.resolve(dist or Dist())
    return job


def test_default_grad_accum_rounds_up_to_reach_examples_per_step_and_ids_beyond_the_vocabulary_are_refused():
    """--examples-per-step 5 with 2 pairs per micro-batch: 3 micro-batches (6 pairs), never fewer than asked.
    The byte tokenizer's EOS is id 256: a model of 256 ids cannot read it."""
    from types import SimpleNamespace

    r = job_for(config("unused", grad_accum=None, examples_per_step=5, batch_size=2), pairs(8)).r
    assert (r.grad_accum, r.rows_per_step) == (3, 6)
    job = job_for(config("unused"), pairs(8), val_pairs=pairs(2, seed=1))
    job.check_data()
    with pytest.raises(Exception, match="the tokenizer gives id 256, but the model has a vocabulary of 256 ids"):
        job.load_data(SimpleNamespace(config=SimpleNamespace(vocab_size=256)))
    job.load_data(SimpleNamespace(config=SimpleNamespace(vocab_size=257)))


def test_an_equal_validation_loss_is_not_a_new_best(tmp_path, monkeypatch):
    """Only a *lower* loss moves OUT/best: an equal one counts against the patience (with <=, the best's step
    moved to each later evaluation of the same loss, and the run never stopped early)."""
    import minimamba.finetune as finetune_module
    from minimamba.finetune import SFTPlan

    saved = []
    monkeypatch.setattr(finetune_module, "save_best", lambda out, model, ema, dist, info, tok=None: saved.append(info))
    job = job_for(config(tmp_path, patience=2), pairs(8))
    job.r = SFTPlan(1, 4, None, 2, None, max_steps=100)
    stops = [job.after_eval(step, {"all": {"loss": loss}}, None, None)
             for step, loss in ((0, 1.5), (2, 1.5), (4, 1.5))]
    assert stops == [False, False, True] and [info["step"] for info in saved] == [0]
    assert job.best["step"] == 0 and job.best["bad_evals"] == 2


def test_ranks_score_disjoint_slices_and_report_the_global_batch_s_tokens():
    """Two processes: each scores every other validation row (their sums add up to the one-process loss),
    and each reports the input tokens of the whole step's rows, not of its own half (they are logged as the
    tokens seen)."""
    from types import SimpleNamespace

    model, rows = small_model(), encode_pairs(ByteTokenizer(), pairs(7), 48)[0]
    whole = validation_loss(model, {"t": rows}, 2, EOS, torch.device("cpu"))["all"]
    parts = [validation_loss(model, {"t": rows}, 2, EOS, torch.device("cpu"),
                             dist=SimpleNamespace(rank=r, world_size=2, enabled=False, device=torch.device("cpu")))
             ["all"] for r in range(2)]
    assert parts[0]["tokens"] + parts[1]["tokens"] == whole["tokens"]
    assert (parts[0]["loss"] * parts[0]["tokens"] + parts[1]["loss"] * parts[1]["tokens"]) / whole["tokens"] == \
        pytest.approx(whole["loss"], rel=1e-6)

    jobs = [job_for(config("unused"), pairs(12), dist=Dist(rank=r, world_size=2), val_pairs=pairs(2, seed=1))
            for r in range(2)]
    for job in jobs:
        job.check_data()
        job.load_data(SimpleNamespace(config=SimpleNamespace(vocab_size=EOS + 1)))
    for _ in range(2):
        (_, lab0, tok0), (_, lab1, tok1) = jobs[0].next_batch(), jobs[1].next_batch()
        # a row's inputs end where its labels do (the response, then EOS, are targets up to the end)
        lengths = [int(torch.nonzero(row != IGNORE).max()) + 1 for row in torch.cat([lab0, lab1])]
        assert len(lengths) == 8 and tok0 == tok1 == sum(lengths)


def test_the_seed_chooses_both_the_validation_pairs_and_the_order_of_the_training_rows():
    jobs = {seed: job_for(config("unused", seed=seed), {"a": pairs(20)}) for seed in (1, 2)}
    for job in jobs.values():
        job.check_data()
    assert jobs[1].val_rows["a"] != jobs[2].val_rows["a"]  # (it was seeded by the task alone: the same split)
    assert jobs[1].order.epoch(0) != jobs[2].order.epoch(0)
    again = job_for(config("unused", seed=1), {"a": pairs(20)})
    again.check_data()
    assert again.val_rows["a"] == jobs[1].val_rows["a"] and again.order.epoch(0) == jobs[1].order.epoch(0)


def test_mending_out_best_from_best_old_sets_a_stray_best_aside_and_a_checkpoint_without_weights_is_not_used(
        ema_run, tmp_path):
    from minimamba.finetune import _mend_best

    cfg = ema_run[0]
    out = tmp_path / "run"
    shutil.copytree(cfg.out, out)
    best_of_4 = states(out, 4)["early_stopping"]
    assert json_best(out)["step"] == 8 and best_of_4["step"] == 4
    assert _mend_best(out, best_of_4, 6) == 2  # (OUT/best is now step 4's, copied from its checkpoint)
    # as if killed between the renames of a later save: OUT/.best.old holds step 4's best, OUT/best step 8's
    os.replace(out / "best", out / ".best.old")
    shutil.copytree(Path(cfg.out) / "best", out / "best")  # (step 8's)
    assert _mend_best(out, best_of_4, 6) == 0
    assert json_best(out)["step"] == 4 and (out / "best.abandoned" / "best.json").is_file()
    assert not (out / ".best.old").exists()
    # step 2's checkpoint without its weights: not copied from (it would fail half-way), the stray set aside
    (out / "step-000002" / "pytorch_model.bin").unlink()
    assert _mend_best(out, states(out, 2)["early_stopping"], 6) == 3 and not (out / "best").exists()


def test_sft_pairs_of_the_mimic_tasks_stop_reading_at_the_limit(tmp_path):
    """sft.py --tasks mimic_completion,mimic_discharge --limit N: N pairs of each, the eval prompt then " " + the
    reference, from the train patients' notes; a damaged note after the first N is not read."""
    from minimamba.finetune import load_task_pairs
    from minimamba.tasks import patient_split
    from tests.test_tasks import mimic_note, write_mimic

    train = [s for s in map(str, range(500, 600)) if patient_split(s) == "train"]
    rows = [(f"{s}-DS-1", s, mimic_note(s)) for s in train[:3]] + [(f"{train[3]}-DS-1", train[3], " ")]
    write_mimic(tmp_path / "clinical/mimic-iv-note/discharge.csv.gz", rows)
    pairs = load_task_pairs(["mimic_completion", "mimic_discharge"], tmp_path, 3)
    assert [len(p) for p in pairs.values()] == [3, 3]
    prompt, response = pairs["mimic_discharge"][0]
    assert prompt.startswith("Based on the following clinical information, write the discharge summary")
    assert response.startswith(" Brief Hospital Course:\n") and prompt.endswith("\n\nDischarge Summary:")
    completion_prompt, rest = pairs["mimic_completion"][0]
    note = mimic_note(train[0]).strip()
    assert completion_prompt.removeprefix("Continue the following clinical note.\n\n") + rest == note


def test_sft_sample_draws_the_pairs_at_random_and_refuses_a_limit_too(tmp_path):
    """--sample N: the N items of each task that eval.py --sample N would draw from the train split (ids hashing
    lowest), not the first N; given with --limit, a setup error naming both."""
    from minimamba.finetune import SFTConfig, finetune, load_task_pairs
    from minimamba.tasks import load_task, patient_split, sft_example
    from minimamba.training import SetupError
    from tests.test_tasks import mimic_note, write_mimic

    train = [s for s in map(str, range(700, 800)) if patient_split(s) == "train"]
    write_mimic(tmp_path / "clinical/mimic-iv-note/discharge.csv.gz", [(f"{s}-DS-1", s, mimic_note(s)) for s in train])
    pairs = load_task_pairs(["mimic_discharge"], tmp_path, None, sample=4)["mimic_discharge"]
    drawn = load_task("mimic_discharge", "train", tmp_path, sample=4)
    assert pairs == [sft_example("mimic_discharge", item) for item in drawn]
    assert pairs != load_task_pairs(["mimic_discharge"], tmp_path, 4)["mimic_discharge"]  # (not the first four)
    with pytest.raises(SetupError, match="give --limit .* or --sample .*, not both"):
        finetune(SFTConfig(tasks="mimic_discharge", task_data=str(tmp_path), limit=4, sample=4, init="scratch",
                           scale="tiny", device="cpu", out=str(tmp_path / "run")))


def test_a_resumed_run_refuses_other_pairs_of_the_same_sizes(tmp_path, capsys):
    """--limit 8, then --resume with --sample 8: as many pairs (the epoch order's sizes agree), other ones; refused,
    naming the tasks and what to do, where it trained on them before; so are other task files, and the same pairs
    cut by another --max-len (the fingerprint is of the rows' token ids). The same settings resume; a checkpoint
    without the fingerprint (an older minimamba's) resumes with a note."""
    from minimamba.tasks import patient_split
    from tests.test_tasks import mimic_note, write_mimic

    train = [s for s in map(str, range(700, 800)) if patient_split(s) == "train"]
    write_mimic(tmp_path / "clinical/mimic-iv-note/discharge.csv.gz", [(f"{s}-DS-1", s, mimic_note(s)) for s in train])
    base = config(tmp_path / "run", tasks="mimic_completion", task_data=str(tmp_path), limit=8, max_len=1024,
                  val_fraction=0.25, epochs=1, batch_size=2, grad_accum=1, save_every=1, eval_every=100)

    def sft(cfg):
        return finetune(cfg, model=small_model(), tokenizer=ByteTokenizer())

    assert sft(base)["step"] == 3  # (8 pairs: 6 to train on, 2 per step)
    for other in (dict(limit=None, sample=8), dict(task_data=str(tmp_path / "copy"))):
        if "task_data" in other:  # (the same notes but the first, in another folder: as many pairs, others)
            write_mimic(tmp_path / "copy/clinical/mimic-iv-note/discharge.csv.gz",
                        [(f"{s}-DS-1", s, mimic_note(s)) for s in train[1:]])
        with pytest.raises(SetupError, match=r"the train rows of mimic_completion, val rows of mimic_completion "
                                             r"differ from the checkpoint's .*Resume with the checkpoint's settings"):
            sft(replace(base, resume="latest", epochs=2, **other))
    # the same pairs made into other rows: a --max-len that cuts them (the notes are ~800 bytes, a byte a token)
    with pytest.raises(SetupError, match=r"the train rows of mimic_completion, val rows of mimic_completion differ"):
        sft(replace(base, resume="latest", epochs=2, max_len=256))
    assert sft(replace(base, resume="latest", epochs=2))["step"] == 6
    state = states(base.out, 6)
    assert set(state["rows_sha256"]) == {"train", "val"}
    del state["rows_sha256"]
    torch.save(state, Path(base.out) / "step-000006" / "training_state.pt")
    capsys.readouterr()
    assert sft(replace(base, resume="latest", epochs=3))["step"] == 9
    assert "note: the checkpoint holds no fingerprint of its rows" in capsys.readouterr().out

"""Supervised fine-tuning (SFT): the second step of the BioMamba recipe, on (prompt, response) pairs.

    python sft.py --init runs/cpt/step-006000 --tasks pubmedqa,bioasq --mix pubmedqa=0.35,bioasq=0.65

A task (`minimamba.tasks`, the same prompts eval.py scores) gives (prompt, response) pairs. Each pair
becomes one row of tokens (no packing):

    prompt tokens  p1 … pm   response tokens  r1 … rk  EOS          the row: m + k + 1 ≤ max_len tokens
    inputs         p1 … pm   r1 … rk                                 (the row without its last token)
    labels         -  …  r1  r2 … rk  EOS                            (- = IGNORE: no loss there)

so the model learns to write the response, and to stop after it, and is never trained to predict the
prompt. The prompt and the response are encoded separately and joined, so the response's tokens are
exactly the continuation eval.py scores after the prompt. Rows are right-padded to the longest row of
the step, the padding labelled IGNORE; for a causal, recurrent model right padding is exact: the
positions before it never see it.

Too long (more than max_len tokens): tokens are dropped from the LEFT of the prompt, so what stays is
its end, the part next to the response; the response is never cut for the prompt. The left cut keeps
the prompt's closing words ("...Answer:", "Assessment and Plan:") and the context nearest them, but it
drops first what a template puts at the start: in the QA prompts that is the instruction and then the
question (QA_TEMPLATE puts the question before the context), so a --max-len too small for the context
trains on answers to questions the row no longer holds (at --max-len 256, about two thirds of PubMedQA's
training prompts and 43% of BioASQ's lose their whole question; at the recipe's 1024, none). A response that
does not fit by itself (with one prompt token before it) is cut at the right, without its EOS (it does
not end there). The cuts are counted and printed: prompts cut, prompts cut down to a single token
(the response is then learnt with almost no prompt: raise --max-len), and responses cut.

The loss of a step is the mean over every response token of the global batch (all micro-batches and
processes; `minimamba.training.train_step`): a long response weighs more than a short one, exactly as
in one big batch, whatever the micro-batching. The validation loss is the same mean over the
held-out pairs' response tokens (reported per task and for all, with its exp as "ppl").

Which pairs a step trains on (`EpochOrder`). An epoch has as many rows as the tasks have training
pairs together (N). Without --mix each pair is seen once per epoch; with --mix NAME=SHARE,… task t
fills share_t·N of the epoch's rows (rounded by largest remainders, so that they add up to N): all of
its pairs once per full pass it fits, and a random subset, drawn anew each epoch, for the rest (so a
small task is repeated, a large one subsampled).
The epoch's rows are shuffled and cut into steps of G rows (the effective batch); the N mod G rows
left at the end of an epoch are not used in that epoch (a different few each epoch). Every choice is
drawn from numpy generators seeded with (seed, epoch), so the order is a function of the step alone
and a resumed run sees exactly the batches of the uninterrupted one, across epoch boundaries too.

Validation. Pairs passed as `val_pairs`, else a share --val-fraction of each task's training pairs,
held out with a generator seeded with (seed, task) and never trained on (the test split is never
read). Evaluated every --eval-every steps (and at the start and end); the weights with the lowest
finite validation loss, the start's included, are written to OUT/best/ (config.json + pytorch_model.bin,
what from_pretrained and eval.py read, the run's tokenizer.json, and best.json with their step, loss
and --tokenizer); after --patience evaluations in a row without a lower loss the run stops early (a
NaN/inf loss counts as one without). The checkpoints OUT/step-N/ and --resume are those of train.py
(`minimamba.training`); the early-stopping state is part of them, and a resumed run makes OUT/best
agree with it (`Finetuning.resumed`). They also hold a sha256 of each task's training and validation rows
(`rows_sha256`: the token ids): a resumed run whose rows differ (another --limit or --sample, --limit N for
--sample N, another --task-data, --max-len or tokenizer, task files changed since) is refused, not trained on
other rows in the same order.

Defaults are the recipe's (§3.3-3.4 of the notes): full fine-tuning (one learning rate for every
layer: --llrd 1), AdamW (0.9, 0.999) with weight decay 0.01 on the matrices, cosine schedule to 0 after
a linear warmup over 10% of the steps, gradient norm clipped at 1, 32 pairs per step, 3 epochs, eval
every 50 steps, patience 5, seed 42, bf16 autocast on a GPU that has it (compute capability 8.0 and newer)
and float32 elsewhere, no EMA.
"""

import hashlib
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minimamba.data import DataError
from minimamba.evaluate import loss_summary
from minimamba.sampler import parse_mix
from minimamba.tokenizer import checkpoint_tokenizer
from minimamba.training import (
    IGNORE, SetupError, Weights, all_reduce_sum, check_settings, checkpoint_name, full_tensor, micro_batches, run,
    schedule_steps, unwrap)
from minimamba.files import fsync_dir, is_json_number, parse_json, write_json_atomically

# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class SFTConfig:
    # model
    scale: str | None = None  # 130m … 2.7b (public checkpoints) or tiny micro mini (CPU)
    init: str = "pretrained"  # "pretrained" (state-spaces/mamba2-<scale>), "scratch", or a checkpoint dir / Hub id
    backend: str = "auto"  # SSD scan: auto (triton on CUDA, torch otherwise), torch, triton
    grad_ckpt: bool = False  # activation checkpointing
    tokenizer: str | None = None  # a Hub repo id or a tokenizer.json; None: --init's own, else DEFAULT_TOKENIZER
    # data
    tasks: str = "pubmedqa,bioasq"  # comma-separated task names of minimamba.tasks
    mix: str | None = None  # each task's share of an epoch's rows, NAME=SHARE,...; None: every pair once per epoch
    task_data: str | None = None  # the task data directory (None: $MINIMAMBA_TASK_DATA if set, else data/tasks)
    limit: int | None = None  # at most this many items of each task, the first ones (a quick run)
    sample: int | None = None  # this many items of each task drawn at random (minimamba.tasks.drawn); not with limit
    val_fraction: float = 0.1  # share of each task's training pairs held out for the validation loss
    max_len: int = 1024  # tokens per row (prompt + response + EOS) at most
    batch_size: int = 8  # rows per micro-batch, per process
    grad_accum: int | None = None  # micro-batches per step; None: from examples_per_step
    examples_per_step: int = 32  # the effective batch (all processes), used when grad_accum is None
    # optimization
    lr: float = 2e-5  # peak learning rate
    llrd: float = 1.0  # layer-wise LR decay (1: the same LR for every layer, full fine-tuning)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    schedule: str = "cosine"  # cosine, wsd or constant
    warmup: float = 0.1  # warmup: a fraction of the steps if < 1, else a number of steps
    decay: float = 0.25  # wsd only: fraction of the steps in the final decay
    min_lr_ratio: float = 0.0  # the LR at the end, as a fraction of the peak
    epochs: int = 3
    ema: float = 0.0  # EMA decay of the weights evaluated and saved (0: none, the recipe's SFT)
    seed: int = 42  # the data order, the validation split, and --init scratch
    # evaluation, checkpoints
    eval_every: int = 50  # validation loss every N steps (and at the end); 0: only at the end
    eval_at_start: bool = True  # also before the first step
    eval_batch_size: int | None = None  # default: batch_size
    patience: int = 5  # stop after this many evaluations in a row without a lower validation loss (0: never)
    save_every: int = 50  # checkpoint (for --resume) every N steps, and at the end and on SIGINT/SIGTERM
    keep: int = 1  # step checkpoints to keep (OUT/best is kept besides)
    out: str = "runs/sft"
    resume: str | None = None  # "latest" or a checkpoint directory
    # hardware
    device: str = "auto"
    dtype: str = "auto"  # auto (bfloat16 autocast on a GPU that has it, else float32), bfloat16, float32
    fsdp: bool = False
    progress: bool = True


# ----------------------------------------------------------------------------------------------------------
# Pairs -> rows


def check_pairs(pairs, where):
    """Refuse what cannot be trained on, naming the pair: not a (str, str), an empty prompt or response."""
    if not pairs:
        raise DataError(f"{where}: no examples")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise DataError(f"{where}: example {i} is a {type(pair).__name__}, not a (prompt, response) pair")
        for name, text in zip(("prompt", "response"), pair):
            if not isinstance(text, str):
                raise DataError(f"{where}: example {i}: the {name} is a {type(text).__name__}, not a str")
            if not text.strip():
                raise DataError(f"{where}: example {i}: the {name} is empty; every example needs a prompt to "
                                f"answer and a response to learn (drop the example, or fix the task's {name})")


def encode_pair(prompt_ids, response_ids, eos_id, max_len):
    """One row: (tokens, start, prompt_cut, response_cut); tokens[start:] are the trained-on targets.

    tokens = the prompt's last tokens + the response + EOS, at most max_len of them (see the module
    docstring: the prompt loses tokens on its left; a response too long by itself is cut at its
    right, without EOS, after one prompt token)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (a prompt token and a response token), got {max_len}")
    response = [*response_ids, eos_id]
    response_cut = len(response) > max_len - 1
    if response_cut:
        response = response[: max_len - 1]  # (the EOS is the first to go)
    keep = max_len - len(response)  # prompt tokens that fit, >= 1
    prompt = prompt_ids[-keep:]
    return prompt + response, len(prompt), len(prompt_ids) > keep, response_cut


def collate(rows, pad_id):
    """Right-padded (inputs, labels), both LongTensor (b, l) with l the longest row's length - 1, from
    rows of (tokens, start): inputs = tokens[:-1], labels = tokens[1:] with IGNORE before the response
    (label i is the target of input i) and on the padding."""
    width = max(len(tokens) for tokens, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (b, l)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (b, l)
    for i, (tokens, start) in enumerate(rows):
        n = len(tokens) - 1
        inputs[i, :n] = torch.tensor(tokens[:-1])  # (len(tokens) - 1,) into row i
        labels[i, start - 1 : n] = torch.tensor(tokens[start:])  # the target of input start-1 is tokens[start]
    return inputs, labels


CUTS = ("prompt_cut", "prompt_to_one_token", "response_cut")  # what encode_pairs counts


def encode_pairs(tokenizer, pairs, max_len):
    """[(tokens, start)] of `pairs` and the counts {"prompt_cut", "prompt_to_one_token", "response_cut"}:
    prompts cut on the left, those of them left with a single token, responses cut at the right."""
    def encode(texts):  # (minimamba's Tokenizer encodes in threads; a tokenizer with only .encode works too)
        if hasattr(tokenizer, "encode_batch"):
            return tokenizer.encode_batch(texts)
        return [tokenizer.encode(t) for t in texts]

    prompts, responses = encode([p for p, _ in pairs]), encode([r for _, r in pairs])
    rows, cuts = [], dict.fromkeys(CUTS, 0)
    for p, r in zip(prompts, responses):
        tokens, start, prompt_cut, response_cut = encode_pair(p, r, tokenizer.eos_id, max_len)
        rows.append((tokens, start))
        cuts["prompt_cut"] += prompt_cut
        cuts["prompt_to_one_token"] += prompt_cut and start == 1
        cuts["response_cut"] += response_cut
    return rows, cuts


def split_validation(pairs, fraction, seed, task):
    """(train, val): round(fraction·n) pairs of `pairs` (at least one when fraction > 0) held out, chosen
    by a generator seeded with (seed, task) so the split does not depend on the other tasks."""
    if fraction <= 0:
        return list(pairs), []
    n_val = max(1, round(fraction * len(pairs)))
    if n_val >= len(pairs):
        raise DataError(f"task {task!r} has {len(pairs)} example(s): too few to hold out --val-fraction "
                        f"{fraction} for validation and train on the rest; give more data or pass val pairs")
    order = np.random.default_rng([seed, zlib.crc32(task.encode())]).permutation(len(pairs))  # (len(pairs),)
    held = set(order[:n_val].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def rows_sha256(rows) -> str:
    """A fingerprint of the rows [(tokens, start)] of `encode_pairs`, in order: what a resumed run checks its own
    against (the pairs, the tokenizer and --max-len all shape them)."""
    h = hashlib.sha256()
    for tokens, start in rows:
        h.update(np.asarray([len(tokens), start, *tokens], dtype=np.int64).tobytes())
    return h.hexdigest()


def load_task_pairs(names, data_dir, limit, split="train", sample=None):
    """{task: [(prompt, response)]} of the tasks' `split`, through minimamba.tasks (`limit`: the first N items of
    each, `sample`: N drawn at random)."""
    from minimamba.tasks import TaskDataError, default_data_dir, load_task, sft_example

    pairs = {}
    for name in names:
        try:
            items = load_task(name, split, data_dir, limit, sample)
        except TaskDataError as e:  # (a missing file, an unknown task or split: the message says what to do)
            raise DataError(str(e)) from None
        if not items:
            raise DataError(f"task {name!r} has no {split} examples in {data_dir or default_data_dir()} (all filtered "
                            "out); check the task data directory (--task-data or $MINIMAMBA_TASK_DATA)")
        pairs[name] = [sft_example(name, item) for item in items]
    return pairs


def _by_task(pairs, default_name):
    """{task: pairs} from a dict of them, or from one list (then one task named `default_name`)."""
    if pairs is None:
        return None
    if isinstance(pairs, dict):
        return {str(k): list(v) for k, v in pairs.items()}
    return {default_name: list(pairs)}


# ----------------------------------------------------------------------------------------------------------
# The data order


class EpochOrder:
    """Which (task, pair index) rows each step trains on; see the module docstring. Checkpointed as the
    run's "sampler" (state_dict / load_state_dict).

    sizes: {task: training pairs}; shares: {task: share of an epoch's rows} or None (each pair once).
    rows_per_step G: the global batch (G here is not the groups of heads); this process keeps rows rank,
    rank + world_size, … of each step.
    """

    def __init__(self, sizes, shares, rows_per_step, seed, rank=0, world_size=1):
        self.sizes, self.shares, self.rows_per_step = dict(sizes), shares and dict(shares), rows_per_step
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch_rows = sum(self.sizes.values())  # N (here: rows per epoch, not the state size)
        self.steps_per_epoch = self.epoch_rows // rows_per_step
        self.step = 0
        self._epoch = (None, None)  # (epoch, its rows)

    def quotas(self):
        """Rows of each task in an epoch: its pairs, or its share of N (largest remainders, so they sum to N)."""
        if self.shares is None:
            return dict(self.sizes)
        exact = {t: self.shares.get(t, 0.0) * self.epoch_rows for t in self.sizes}
        counts = {t: int(math.floor(x)) for t, x in exact.items()}
        for t in sorted(exact, key=lambda t: counts[t] - exact[t])[: self.epoch_rows - sum(counts.values())]:
            counts[t] += 1
        return counts

    def epoch(self, e):
        """The rows of epoch e in order: a list of N (task, index)."""
        if self._epoch[0] != e:
            rng = np.random.default_rng([self.seed, e])
            rows = []
            for task, quota in self.quotas().items():
                n = self.sizes[task]
                picks = [*range(n)] * (quota // n) + rng.choice(n, quota % n, replace=False).tolist()
                rows += [(task, i) for i in picks]
            self._epoch = (e, [rows[i] for i in rng.permutation(len(rows))])
        return self._epoch[1]

    def next_rows(self):
        """(the global batch of the next step, this process's rows of it), lists of (task, index)."""
        e, k = divmod(self.step, self.steps_per_epoch)
        G = self.rows_per_step
        chosen = self.epoch(e)[k * G : (k + 1) * G]  # G = rows_per_step (task, index) pairs
        self.step += 1
        return chosen, chosen[self.rank :: self.world_size]

    def describe(self):
        q = self.quotas()
        return ", ".join(f"{t} {self.sizes[t]:,} training pairs ({q[t] / self.epoch_rows:.0%} of an epoch's rows)"
                         for t in self.sizes)

    def state_dict(self):
        return {"kind": "sft", "step": self.step, "seed": self.seed, "sizes": self.sizes, "shares": self.shares,
                "rows_per_step": self.rows_per_step}

    def load_state_dict(self, state):
        mine = {"kind": "sft", "seed": self.seed, "sizes": self.sizes, "rows_per_step": self.rows_per_step}
        changed = [f"{k}: checkpoint {state.get(k)} vs now {v}" for k, v in mine.items() if state.get(k) != v]
        # (the order of the tasks matters too: an epoch's rows are drawn task by task, then shuffled; two dicts
        # of the same sizes in another order are equal)
        if state.get("sizes") == self.sizes and list(state["sizes"]) != list(self.sizes):
            changed.append(f"the order of the tasks: checkpoint {', '.join(state['sizes'])} vs now "
                           f"{', '.join(self.sizes)}")
        then = state.get("shares")
        if (then is None) != (self.shares is None) or (then is not None and (
                set(then) != set(self.shares) or any(abs(then[t] - self.shares[t]) > 1e-12 for t in self.shares))):
            changed.append(f"shares: checkpoint {then} vs now {self.shares}")
        if changed:
            raise ValueError("cannot resume exactly: the order of the pairs depends on the tasks (and their order) "
                             "and their sizes, --mix, --seed and the effective batch, and these differ from the "
                             "checkpoint's (" + "; ".join(changed) + "). Resume with the same values and data.")
        self.step = int(state["step"])
        if self.shares is not None:  # the checkpoint's own: the same --mix written otherwise (7,2,1 for
            # 0.7,0.2,0.1) differs in the last bit, which can move a row between tasks in `quotas`
            self.shares = {t: float(then[t]) for t in self.shares}


# ----------------------------------------------------------------------------------------------------------
# The job: what `minimamba.training._train` asks of a run (see training.Pretraining)


@dataclass
class SFTPlan:
    """Values derived from an SFTConfig, the data and the number of processes (what `_train` reads)."""

    grad_accum: int
    rows_per_step: int  # pairs per optimizer step, all processes (the effective batch)
    autocast_dtype: torch.dtype | None
    eval_batch_size: int
    shares: dict | None
    max_steps: int = 0  # known once the data is read (check_data)
    steps_per_epoch: int = 0
    warmup_steps: int = 0
    decay_steps: int = 0


class Finetuning:
    """A fine-tuning run, as `minimamba.training.run` drives it (the methods are those of
    training.Pretraining, whose docstring says when each is called)."""

    kind = "sft"  # stored in the checkpoints: train.py's --resume refuses them (training.check_job_kind)
    config_file = "sft_config.json"
    finished = ("its {max_steps} steps (--epochs) are done: nothing to train. Pass more --epochs (over {step} "
                "steps in all) to train on")

    def __init__(self, cfg, train_pairs=None, val_pairs=None, tokenizer=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self._given = (_by_task(train_pairs, "train"), _by_task(val_pairs, "val"))
        self.best = {"loss": None, "step": None, "bad_evals": 0, "stopped_early": False, "eval": None}
        self.best_missing = False  # OUT/best does not hold the best's weights (see resumed)
        self.tokenizer_source = self.tokenizer_file = None  # (known when --tokenizer is read, not given)
        self.seq_len = cfg.max_len

    def resolve(self, dist):
        cfg = self.cfg
        amp = check_settings(cfg, dist, {
            "max_len": (2, None), "examples_per_step": (1, None), "val_fraction": (0, 0.9), "epochs": (1, None),
            "patience": (0, None), "limit": (1, None), "sample": (1, None)})
        if cfg.limit is not None and cfg.sample is not None:
            raise SetupError("give --limit (the first N items of each task) or --sample (N drawn at random), not both")
        shares = None
        if cfg.mix:
            try:
                shares = parse_mix(cfg.mix, what="task")
            except ValueError as e:
                raise SetupError(str(e)) from None
        per_pass = cfg.batch_size * dist.world_size
        grad_accum = micro_batches(cfg.grad_accum, cfg.examples_per_step, SFTConfig.examples_per_step, per_pass,
                                   "examples", "--examples-per-step")
        self.dist = dist
        self.r = SFTPlan(grad_accum, per_pass * grad_accum, amp, cfg.eval_batch_size or cfg.batch_size, shares)
        return self.r

    def check_data(self):
        """Read the pairs, hold out the validation share, tokenize, and work out the number of steps."""
        cfg, r = self.cfg, self.r
        given_train, given_val = self._given
        names = [t.strip() for t in cfg.tasks.split(",") if t.strip()] if given_train is None else list(given_train)
        if not names:
            raise DataError("--tasks names no task; e.g. --tasks pubmedqa,bioasq")
        if twice := sorted({t for t in names if names.count(t) > 1}):
            raise DataError(f"--tasks names {', '.join(twice)} more than once; name each task once (--mix sets "
                            "how often its pairs are seen)")
        pairs = (given_train if given_train is not None else
                 load_task_pairs(names, cfg.task_data, cfg.limit, sample=cfg.sample))
        for task, p in pairs.items():
            check_pairs(p, f"task {task!r}")
        if given_val is not None:
            for task, p in given_val.items():
                check_pairs(p, f"validation pairs {task!r}")
            train, val = pairs, given_val
        else:
            split = {t: split_validation(p, cfg.val_fraction, cfg.seed, t) for t, p in pairs.items()}
            train, val = {t: a for t, (a, _) in split.items()}, {t: b for t, (_, b) in split.items() if b}
        if not val:
            raise DataError("no validation pairs: --val-fraction is 0; pass a --val-fraction above 0, e.g. 0.1 (from "
                            "Python, finetune(..., val_pairs=...) gives them instead)")
        named = {part.partition("=")[0].strip() for part in cfg.mix.split(",")} if r.shares is not None else set()
        zero = [t for t in train if t in named and t not in r.shares]  # (parse_mix drops a share of 0)
        if zero:
            raise DataError(f"--mix gives {', '.join(zero)} a share of 0, so none of its training pairs would be "
                            "used: drop it from --tasks, or give it a share above 0")
        if r.shares is not None and set(r.shares) != set(train):
            raise DataError(f"--mix names {', '.join(r.shares)} but the tasks are {', '.join(train)}; give a share "
                            "to each task and to no other")
        if self.tokenizer is None:
            from minimamba.tokenizer import load_tokenizer

            source = cfg.tokenizer or checkpoint_tokenizer(cfg.init)
            try:
                self.tokenizer = load_tokenizer(source)
                self.tokenizer_file = self.tokenizer.path  # (copied into OUT/best, for eval.py)
            except Exception as e:  # (a download, a missing or unsupported file: its own message says which)
                raise SetupError(f"--tokenizer {source}: {e}") from None
            self.tokenizer_source = source
        self.cuts = dict.fromkeys(CUTS, 0)
        self.train_rows, self.val_rows = {}, {}
        for rows, part in ((self.train_rows, train), (self.val_rows, val)):
            for task, p in part.items():
                rows[task], cuts = encode_pairs(self.tokenizer, p, cfg.max_len)
                for k in cuts:
                    self.cuts[k] += cuts[k]
        # what a resumed run must find again (load_state_dict)
        self.rows_sha256 = {part: {t: rows_sha256(r) for t, r in rows.items()}
                            for part, rows in (("train", self.train_rows), ("val", self.val_rows))}
        self.order = EpochOrder({t: len(v) for t, v in self.train_rows.items()}, r.shares, r.rows_per_step,
                                cfg.seed, self.dist.rank, self.dist.world_size)
        if self.order.steps_per_epoch == 0:
            raise DataError(f"{self.order.epoch_rows} training pairs are fewer than one step's {r.rows_per_step} "
                            "(--batch-size × --grad-accum × processes); lower those or give more data")
        r.steps_per_epoch = self.order.steps_per_epoch
        r.max_steps = cfg.epochs * r.steps_per_epoch
        r.warmup_steps, r.decay_steps = schedule_steps(cfg, r.max_steps)

    def load_data(self, raw):
        top = max(max(tokens) for rows in (*self.train_rows.values(), *self.val_rows.values()) for tokens, _ in rows)
        if top >= raw.config.vocab_size:
            raise DataError(f"the tokenizer gives id {top}, but the model has a vocabulary of "
                            f"{raw.config.vocab_size} ids; fine-tune a model made for this tokenizer (--tokenizer)")
        self.pad_id = self.tokenizer.eos_id  # (any id: padding is never a target, and comes after the row)
        return self.order

    def state_dict(self):
        return {"early_stopping": dict(self.best), "rows_sha256": self.rows_sha256}

    def load_state_dict(self, state):
        if "early_stopping" not in state:  # (train.py's checkpoints are refused before: check_job_kind)
            raise ValueError("the checkpoint says it is sft.py's but holds no early-stopping state, which sft.py "
                             "writes in every checkpoint: it is damaged; resume from another one")
        then, now = state.get("rows_sha256"), self.rows_sha256
        if then is None:  # (a checkpoint of a minimamba before the rows were fingerprinted)
            if self.dist.is_main:
                print("note: the checkpoint holds no fingerprint of its rows (written by an older minimamba), so "
                      "they cannot be checked: resume with the --tasks, --limit/--sample, --val-fraction, --max-len, "
                      "tokenizer and task files it was trained with", flush=True)
        elif then != now:
            differ = [f"{part} rows of {t}" for part in ("train", "val")
                      for t in sorted({*then.get(part, {}), *now[part]}) if then.get(part, {}).get(t) != now[part].get(t)]
            raise ValueError(f"the {', '.join(differ)} differ from the checkpoint's (another --limit or --sample, "
                             "--limit N for --sample N, another --task-data, --val-fraction, --max-len or tokenizer, "
                             "or task files changed since), so this run would train on other rows than the one it "
                             "continues. Resume with the checkpoint's settings (OUT/sft_config.json) and task files, "
                             "or start a new run in another --out")
        self.best = {"eval": None, **state["early_stopping"]}  # (a checkpoint before "eval" was kept has none)
        if self.best["stopped_early"]:
            raise ValueError(f"this run stopped early, after {self.best['bad_evals']} evaluations without a lower "
                             f"validation loss (the best, {self.best['loss']:.4f} at step {self.best['step']}, is in "
                             f"{Path(self.cfg.out) / 'best'}): nothing to train")

    def describe(self):
        cfg, r = self.cfg, self.r
        batch = (f"{cfg.batch_size} pairs × {r.grad_accum} micro-batches × {self.dist.world_size} process(es) = "
                 f"{r.rows_per_step} pairs per step, each a row of at most {cfg.max_len} tokens, right-padded")
        val = sum(len(v) for v in self.val_rows.values())
        c = self.cuts
        data = (f"{self.order.describe()}; {val} validation pairs; {c['prompt_cut']} prompt(s) cut on the left "
                f"({c['prompt_to_one_token']} of them to a single token), {c['response_cut']} response(s) cut at "
                f"{cfg.max_len} tokens")
        if c["prompt_cut"]:
            data += (f"\nnote: a prompt cut on the left loses its start (the QA prompts: the instruction, then the "
                     f"question); {c['prompt_cut']} of {sum(map(len, self.train_rows.values())) + val} training and validation prompts are cut at "
                     f"--max-len {cfg.max_len}: raise --max-len to keep them whole")
        return batch, data, f" = {cfg.epochs} epoch(s) of {r.steps_per_epoch}"

    def resolved(self):
        return {"shares": self.order.quotas(), "steps_per_epoch": self.r.steps_per_epoch,
                "train_pairs": self.order.sizes, "val_pairs": {t: len(v) for t, v in self.val_rows.items()},
                **self.cuts}

    def next_batch(self):
        chosen, mine = self.order.next_rows()
        inputs, labels = collate([self.train_rows[t][i] for t, i in mine], self.pad_id)
        tokens = sum(len(self.train_rows[t][i][0]) - 1 for t, i in chosen)  # (inputs of the global batch)
        return inputs, labels, tokens

    @torch.no_grad()
    def evaluate(self, model, step):
        res = validation_loss(model, self.val_rows, self.r.eval_batch_size, self.pad_id, self.dist.device,
                              self.r.autocast_dtype, self.dist if not self.cfg.fsdp else None)
        numbers = "  ".join(f"{t} {v['loss']:.4f}" for t, v in res.items())
        return {"eval": res}, "validation loss", numbers

    def after_eval(self, step, result, model, ema):
        """Keep the weights of the lowest validation loss in OUT/best; True after --patience evaluations
        in a row without one."""
        loss, best = result["all"]["loss"], self.best
        if math.isfinite(loss) and (best["loss"] is None or loss < best["loss"]):  # (NaN/inf: a bad evaluation)
            best.update(loss=loss, step=step, bad_evals=0, eval=result)
            save_best(Path(self.cfg.out), model, ema, self.dist, self._best_info(), self.tokenizer_file)
            self.best_missing = False
        else:
            best["bad_evals"] += 1
        # (the last step's evaluation ends the run anyway: not an early stop, whatever the count)
        best["stopped_early"] = bool(self.cfg.patience and best["bad_evals"] >= self.cfg.patience
                                     and step < self.r.max_steps)
        if best["stopped_early"] and self.dist.is_main:
            print(f"early stop: no lower validation loss in {best['bad_evals']} evaluations; the best, "
                  f"{best['loss']:.4f} at step {best['step']}, is in {Path(self.cfg.out) / 'best'}", flush=True)
        return best["stopped_early"]

    def _best_info(self):
        """best.json: the step, the validation loss (and per task), and the tokenizer the rows were made with."""
        return {"step": self.best["step"], "val_loss": self.best["loss"], "eval": self.best.get("eval"),
                "tokenizer": self.tokenizer_source}

    def resumed(self, step, model, ema):
        """Make OUT/best the best of the run as resumed. Resuming from an earlier step goes back on the
        steps after it, and OUT/best may hold weights of those (a lower loss the abandoned run reached
        later), or a save that a kill cut short left the previous best in OUT/.best.old. The early-stopping
        state says which step and loss OUT/best must hold: the weights of that step are the restored
        ones (step == resumed step), or those of the checkpoint OUT/step-N of that step; where neither is
        there, the stray OUT/best is set aside as OUT/best.abandoned and no OUT/best is claimed until the
        next lower validation loss."""
        out, want, dist = Path(self.cfg.out), self.best, self.dist
        code = 0.0
        if dist.is_main:
            code = float(_mend_best(out, want, step))
        if dist.enabled:
            code = all_reduce_sum([code], dist)[0]
        if code == 1:  # the weights restored are the best's: saved again (every process: FSDP gathers)
            save_best(out, model, ema, dist, self._best_info(), self.tokenizer_file)
        self.best_missing = code == 3

    def result(self):
        best = Path(self.cfg.out) / "best"
        have = self.best["step"] is not None and not self.best_missing
        return {"best": str(best) if have else None, "best_step": self.best["step"],
                "best_loss": self.best["loss"], "stopped_early": self.best["stopped_early"]}


@torch.no_grad()
def validation_loss(model, rows_by_task, batch_size, pad_id, device, autocast_dtype=None, dist=None):
    """{task: {"loss", "ppl", "tokens"}} and "all": the mean NLL over the response tokens of each task's
    rows (and of all of them), pooled over tokens as in `minimamba.evaluate`. Under torch.distributed
    (`dist`), each process scores a slice of the rows and the sums are added up."""
    was_training = model.training
    model.eval()
    sums = {}
    for task, rows in rows_by_task.items():
        if dist is not None and dist.world_size > 1:
            rows = rows[dist.rank :: dist.world_size]
        nll, count = 0.0, 0
        for i in range(0, len(rows), batch_size):
            inputs, labels = collate(rows[i : i + batch_size], pad_id)  # (b, l), (b, l)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(inputs.to(device))  # (b, l, Vp)
            labels = labels.to(device)
            # logits (b·l, Vp) against the labels (b·l,), summed to (): IGNORE (prompt, padding) takes no loss
            nll += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                   reduction="sum").item()
            count += (labels != IGNORE).sum().item()
        sums[task] = all_reduce_sum([nll, count], dist) if dist is not None else [nll, count]
    model.train(was_training)
    res = {"all": loss_summary(sum(s[0] for s in sums.values()), int(sum(s[1] for s in sums.values())))}
    res.update({t: loss_summary(s[0], int(s[1])) for t, s in sums.items()})
    return res


def save_best(out, model, ema, dist, info, tokenizer=None):
    """OUT/best/: the weights evaluated (the EMA's if on) in the save_pretrained layout, best.json (`info`)
    and a copy of the tokenizer.json file `tokenizer` (eval.py reads a model directory's own). Every
    process must call it (FSDP gathers). Written as OUT/.best.tmp, then swapped in (`_swap_best`)."""
    raw = unwrap(model)
    weights = ema.state_dict() if ema is not None else {k: full_tensor(v).detach().cpu()
                                                         for k, v in raw.state_dict().items()}
    if dist.is_main:
        from minimamba.hub import save_pretrained

        _swap_best(Path(out), lambda tmp: save_pretrained(Weights(raw.config, {k: v.float() for k, v in
                                                                               weights.items()}), tmp),
                   info, tokenizer)


def _swap_best(out, write_weights, info, tokenizer=None):
    """Fill OUT/.best.tmp (write_weights(tmp), best.json, tokenizer.json) and swap it in for OUT/best. A kill
    before the swap leaves the previous OUT/best; one between its two renames leaves the previous best
    as OUT/.best.old and no OUT/best (the next --resume puts it back: `_mend_best`)."""
    tmp, final, old = out / ".best.tmp", out / "best", out / ".best.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    write_json_atomically(tmp / "best.json", info)  # (an infinite perplexity as null)
    fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def _best_json(folder):
    """(step, val_loss) that folder/best.json names, or None (also where they are not an int and a number:
    a damaged file, whose folder is then not taken for any evaluation's best)."""
    info = _read_info(folder)
    step, loss = info.get("step"), info.get("val_loss")
    if type(step) is not int or not is_json_number(loss):
        return None
    return step, loss


def _mend_best(out, best, step):
    """Process 0 of `Finetuning.resumed`: put the weights of the best evaluation of the state resumed from
    (best["step"], best["loss"], at or before `step`) in OUT/best, and say what was done. Returns 0 (OUT/best
    holds them, or there is no best yet and no OUT/best), 1 (the caller saves the restored weights), 2
    (copied from OUT/step-N), or 3 (they are kept nowhere: a stray OUT/best was set aside)."""
    final, old, aside = out / "best", out / ".best.old", out / "best.abandoned"
    want = None if best["step"] is None else (best["step"], best["loss"])
    if want is not None and _best_json(final) == want:
        return 0
    if want is not None and _best_json(old) == want:  # (a kill between save_best's two renames)
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(old, final)
        fsync_dir(out)
        print(f"note: {final} is back from {old} (a save of a later best was cut short)", flush=True)
        return 0
    stray = _best_json(final)
    what = (f"{final} held the weights of step {stray[0]} (validation loss {stray[1]:.4f}), " if stray else
            f"{final} is not this run's best, " if final.exists() else f"there is no {final}, ")
    if want is None:
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            print(f"note: {what}which the run resumed from step {step} has not evaluated; set aside as {aside}",
                  flush=True)
        return 0
    if want[0] == step:
        print(f"note: {what}not the best of the run resumed from step {step} (step {want[0]}, validation loss "
              f"{want[1]:.4f}): saved again from the checkpoint's weights", flush=True)
        return 1
    ckpt = out / checkpoint_name(want[0])
    if (ckpt / "pytorch_model.bin").is_file() and (ckpt / "config.json").is_file():
        tokenizer = final / "tokenizer.json" if (final / "tokenizer.json").is_file() else None
        info = {"step": want[0], "val_loss": want[1], "eval": best.get("eval"),
                "tokenizer": None if tokenizer is None else _read_info(final).get("tokenizer")}
        if tokenizer is not None:  # (read before OUT/best is replaced)
            shutil.copyfile(tokenizer, out / ".best.tokenizer.json")
            tokenizer = out / ".best.tokenizer.json"

        def copy(tmp):
            for name in ("config.json", "pytorch_model.bin"):
                shutil.copyfile(ckpt / name, tmp / name)

        _swap_best(out, copy, info, tokenizer)
        if tokenizer is not None:
            tokenizer.unlink()
        print(f"note: {what}not the best of the run resumed from step {step} (step {want[0]}, validation loss "
              f"{want[1]:.4f}): copied from {ckpt}", flush=True)
        return 2
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        fsync_dir(out)
    print(f"note: {what}not the best of the run resumed from step {step} (step {want[0]}, validation loss "
          f"{want[1]:.4f}), and no checkpoint of step {want[0]} is kept to take it from"
          f"{f'; {final} is set aside as {aside}' if aside.exists() else ''}. {final} is written again at the "
          "next lower validation loss (keep more checkpoints with --keep to avoid this)", flush=True)
    return 3


def _read_info(folder):
    """folder/best.json as a dict ({} where it is missing, unreadable or not an object)."""
    try:
        info = parse_json((folder / "best.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # (missing, not UTF-8, not JSON, nested too deeply)
        return {}
    return info if isinstance(info, dict) else {}


def finetune(cfg: SFTConfig, train_pairs=None, val_pairs=None, model=None, tokenizer=None):
    """Fine-tune as `cfg` says; returns {"step", "checkpoint", "eval", "stopped_by", "best", "best_step",
    "best_loss", "stopped_early"}.

    train_pairs / val_pairs (optional): [(prompt, response)] or {task: [(prompt, response)]} instead of
    reading --tasks through minimamba.tasks; `model` and `tokenizer` (optional, for tests) replace the
    ones --init and --tokenizer name.
    """
    return run(Finetuning(cfg, train_pairs, val_pairs, tokenizer), model)

"""Training: the loop, checkpoints and resume that train.py (continued pretraining) and sft.py
(supervised fine-tuning) share. What differs between the two is a "job" (`Pretraining` here,
`minimamba.finetune.Finetuning`): its data, its evaluation and what it does after one.

A run, top to bottom (`run` -> `_train`; pretraining's data and evaluation named, fine-tuning's in finetune.py):
  1. set up torch.distributed when launched by torchrun (DDP, or FSDP with --fsdp), else one process;
  2. check the data and the model source before anything slow, and fail with one message if needed;
  3. build the model (the public checkpoint of --scale, random weights, or a local checkpoint);
  4. AdamW over parameter groups with layer-wise LR decay and no weight decay where it does not belong;
  5. the data order (pretraining: the mixture sampler, `minimamba.sampler`) and the evaluation data
     (pretraining: the fixed held-out windows, `minimamba.evaluate`);
  6. resume from the latest checkpoint if asked (weights, optimizer, EMA, data order, RNG, step, the
     job's own state), refusing a checkpoint of the other job;
  7. print the resolved configuration with parameters, tokens per step and a memory/time estimate;
  8. the loop: one optimizer step (micro-batches, clipping, NaN check), EMA update, log, an evaluation
     every --eval-every steps (and at the start and end; the job's `after_eval` may end the run early),
     checkpoint every --save-every steps and on SIGINT/SIGTERM.

Choices, with the reason for each:
  * Precision. The weights, gradients, AdamW moments and EMA stay in float32 ("master weights");
    on GPU the forward and backward run under bf16 autocast. Pure bf16 weights would not do: bf16
    has 8 significant bits, so an update of lr·(update) ≈ 5e-6 relative to a weight is rounded away.
  * Parameter groups. Weight decay 0.1 on the matrices (in_proj, out_proj, conv1d weight and the
    embedding); none on A_log, D, dt_bias, the norm weights and biases (decaying A_log or dt_bias
    towards 0 would change the SSM's time scales, not regularise it).
  * Layer-wise LR decay (llrd): layer l of L gets lr·llrd^(L−1−l), so the last layer learns at the
    peak LR and the first at lr·0.95^(L−1) (≈0.090× for 48 layers): continued pretraining moves the
    lower, more general layers less. The final norm and the embedding get the peak LR: the embedding
    is tied to the output head, the top of the network (this is what the recipe's authors do with
    all non-layer parameters). An untied input embedding would get the lowest layer's factor.
  * Schedules are pure functions of the step (`lr_factor`), so resume needs no scheduler state.
    "wsd" (the recipe): linear warmup, constant, then a cosine decay to min_lr_ratio over the last
    --decay fraction of the steps (warmup 10%, stable 65%, decay 25% by default, as in the authors'
    code). "cosine": warmup, then cosine to min_lr_ratio. "constant": warmup, then constant.
  * EMA: after every step ema ← d·ema + (1−d)·w, kept in float32. Evaluation and the saved
    `pytorch_model.bin` use the EMA weights; the raw weights live in training_state.pt for resuming.

The checkpoint of step s is a directory OUT/step-{s:06d}/ holding
    config.json, pytorch_model.bin   the EMA weights in the save_pretrained layout (from_pretrained reads it)
    tokenizer.json                   the tokenizer the data were prepared with (eval.py reads it), where it is a file
    training_state.pt                raw weights, optimizer, EMA, sampler, RNG, step, resolved config
It is written as OUT/.step-{s:06d}.tmp/ (training_state.pt last, so a .tmp holding one is complete) and
flushed to the disk; then OUT/latest (a one-line text file naming it) is replaced atomically, which
commits the save, and the .tmp is renamed into place; `--resume` reads OUT/latest. Older step directories
beyond --keep are deleted afterwards. A step directory left by an earlier run (one this run resumed from
before it) is moved to OUT/.step-{s:06d}.old before the new one takes its name. A kill after the commit
and before the renames are done is finished by the next run in OUT, which puts the complete new
checkpoint in place (`recover_interrupted_save`); a kill before the commit leaves the last one. So, once a
run has a checkpoint, a kill at any moment leaves one that OUT/latest names: that run's newest committed
one, never a step of a run it went back on (a run resumed from an earlier step of OUT points OUT/latest at
that step when it starts, as its log.jsonl goes back there too). The recovery, and the deletion of what
killed saves left, happen only once every setup check has passed, in a run that is going to write to OUT;
until then a start reads OUT and changes nothing in it.

One run at a time writes to an OUT: a run holds an exclusive lock on OUT/.lock (flock, which also names
its process id) from its first look at OUT to its end, and a second run in the same OUT is refused
(exit 2) before it reads or changes anything there. The lock goes with the process, so a killed run
leaves none behind. Where flock does not exist (Windows) or the filesystem refuses it (some network
filesystems), nothing guards against a second run: do not start two in one OUT there.

On resume, settings that do not change the data order may change: the LR schedule, --grad-clip, and
the optimizer's --beta1, --beta2, --weight-decay and --llrd (applied to the restored optimizer, whose
moments are kept); --ema may change to another decay or to 0 (off), but a run trained without EMA
cannot turn it on (its EMA would have no past). A training state that does not fit the model is refused
with what differs. An optimizer state written before the groups were keyed by decay/no-decay (a
--weight-decay 0 run of an older minimamba, whose groups merged the two) is mapped onto this version's
groups, parameter by parameter, with its moments unchanged.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minimamba.config import PUBLIC_SCALES, SCALES, Mamba2Config
from minimamba.data import DataError, check_one_tokenizer, check_prepared_with, ids_needed, read_meta
from minimamba.evaluate import domain_perplexity, load_heldout
from minimamba.files import atomic_write, fsync_dir, is_json_number, json_line, parse_json, write_text_atomically
from minimamba.model import Mamba2LM, gpu_too_old
from minimamba.sampler import MixtureSampler, check_domains, parse_mix

# ----------------------------------------------------------------------------------------------------------
# Configuration: every knob of a run, with the BioMamba recipe as the default.


@dataclass
class TrainConfig:
    # model
    scale: str | None = None  # 130m 370m 780m 1.3b 2.7b (public checkpoints) or tiny micro mini (CPU)
    init: str = "pretrained"  # "pretrained" (state-spaces/mamba2-<scale>), "scratch", or a checkpoint dir / Hub id
    backend: str = "auto"  # SSD scan: auto (triton on CUDA, torch otherwise), torch, triton
    grad_ckpt: bool = False  # activation checkpointing: recompute each block in the backward pass
    # data
    data: str = "data/tokens"  # DIR with DIR/<domain>/{train,heldout}.bin from `python -m minimamba.data prepare`
    mix: str = "pubmed=0.8,c4=0.1,wikipedia=0.1"  # token shares of the domains
    seq_len: int = 1024  # tokens per training sequence
    batch_size: int = 8  # sequences per micro-batch, per process
    grad_accum: int | None = None  # micro-batches per step; None: from tokens_per_step
    tokens_per_step: int = 256 * 1024  # target tokens per optimizer step (all processes), used when grad_accum is None
    # optimization
    lr: float = 5e-6  # peak learning rate of the top layer
    llrd: float = 0.95  # layer-wise LR decay: layer l of L gets lr·llrd^(L-1-l)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    schedule: str = "wsd"  # wsd, cosine or constant
    warmup: float = 0.1  # warmup: a fraction of max_steps if < 1, else a number of steps
    decay: float = 0.25  # wsd: fraction of the steps in the final cosine decay
    min_lr_ratio: float = 0.1  # the LR at the end of the decay, as a fraction of the peak
    max_steps: int | None = 6000  # optimizer steps (the recipe: ~6,000 at 256 sequences per step)
    tokens: int | None = None  # total training tokens; sets max_steps when given
    ema: float = 0.999  # EMA decay of the weights used for eval and saving (0: no EMA)
    seed: int = 42
    # evaluation, logging, checkpoints
    eval_every: int = 500  # held-out perplexity every N steps (and at the end); 0: only at the end
    eval_at_start: bool = True  # also evaluate before the first step (the "before" numbers)
    eval_domains: str | None = None  # comma-separated domains to evaluate (default: those of the mix)
    eval_windows: int | None = 100  # held-out windows of seq_len tokens per domain (0 or None: all)
    eval_batch_size: int | None = None  # default: batch_size
    save_every: int = 1000  # checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)
    keep: int = 1  # how many step checkpoints to keep
    out: str = "runs/cpt"  # output directory: checkpoints, log.jsonl, train_config.json, plot
    resume: str | None = None  # "latest" (OUT/latest) or a checkpoint directory
    # hardware
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    dtype: str = "auto"  # compute dtype: auto (bfloat16 autocast on a GPU that has it, else float32), bfloat16, float32
    fsdp: bool = False  # shard weights, gradients and optimizer state across processes (FSDP2) instead of DDP
    progress: bool = True  # show the tqdm bar


class SetupError(RuntimeError):
    """A problem found before training starts; the message says what was tried and what to do."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm is NaN/inf; the weights of that step were not updated."""


# ----------------------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def resolve_device(device="auto"):
    """The torch.device a --device names (auto: cuda where torch sees a GPU, else cpu); SetupError for a
    name torch does not know, or cuda without a GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SetupError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    return dev


def resolve_autocast(dtype, device):
    """The autocast dtype a --dtype names on `device` (None: float32): auto = bfloat16 on a GPU that computes in
    it (compute capability 8.0 or newer, `gpu_too_old`), float32 elsewhere; bfloat16 asked for on an older GPU is
    refused (there Triton's bfloat16 dots fail to compile, and PyTorch's are emulated)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and not gpu_too_old(device) else None
    if dtype in ("bfloat16", "bf16"):
        if too_old := gpu_too_old(device):
            raise SetupError(f"--dtype bfloat16: {too_old}. Use --dtype float32 (or auto, which picks it there)")
        return torch.bfloat16
    if dtype in ("float32", "fp32"):
        return None
    raise SetupError(f"unknown --dtype {dtype!r}; choose auto, bfloat16 or float32")


def compute_text(autocast_dtype, device):
    """How a run computes, for its summary line; on a GPU too old for bfloat16 and Triton, also why (whatever
    --dtype said: that is also why the scan backend "auto" is torch there)."""
    why = gpu_too_old(device)
    return (f"{'bfloat16 autocast' if autocast_dtype else 'float32'} with float32 master weights"
            + (f" ({why})" if why else ""))


def setup_distributed(device="auto"):
    """One process, or torch.distributed when launched by torchrun: NCCL on GPU, gloo on CPU."""
    dev = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Dist(rank, world_size, local_rank, dev)


def all_reduce_sum(values, dist):
    """Sum a list of floats over the processes (identity without torch.distributed)."""
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)  # (len(values),)
    if dist.enabled:
        torch.distributed.all_reduce(t)
    return t.tolist()


def wrap_model(model, cfg, dist):
    """DDP (each process holds the whole model, gradients are averaged) or FSDP2 (each holds a shard)."""
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:  # one all-gather per mixer, so only one layer is ever whole at a time
            fully_shard(block.mixer)  # (a Block has no forward of its own to hook: the LM calls its parts)
        fully_shard(model)  # the rest: embedding (= head), the blocks' norms, final norm
        return model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return model


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def full_tensor(t):
    """A whole tensor from an FSDP shard (a collective: every process must call it), else t itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------------------------------------
# The model


def hub_id(cfg):
    """The Hub repo or local path --init points to, or None for random weights."""
    if cfg.init == "scratch":
        return None
    if cfg.init == "pretrained":
        if cfg.scale is None:
            raise SetupError("--init pretrained needs --scale (one of " + ", ".join(PUBLIC_SCALES) + ")")
        if cfg.scale not in PUBLIC_SCALES:
            raise SetupError(
                f"there is no public checkpoint for scale {cfg.scale!r} (those are {', '.join(PUBLIC_SCALES)}); "
                "use --init scratch to train it from random weights, or --init PATH"
            )
        return f"state-spaces/mamba2-{cfg.scale}"
    return cfg.init


def offline_message(source, error, init=None):
    """What to do when the checkpoint `source` cannot be downloaded. `init`: the --init value, when it
    was a path or repo id of the user's (not "pretrained"): then say that no local folder has that name."""
    from minimamba.download import cache_dir, endpoint

    local = "" if init in (None, "pretrained") else (
        f"--init {init}: there is no local directory {Path(init).expanduser().absolute()}, so it was taken "
        "as a Hub repo id (check the path if you meant a local checkpoint), and it ")
    return (
        f"{local}could not download the checkpoint {source} (config.json and pytorch_model.bin) from {endpoint()}:\n"
        f"  {str(error).strip().splitlines()[0]}\n"
        "To train without internet, either\n"
        f"  * copy the checkpoint directory (config.json + pytorch_model.bin) here and pass --init /path/to/it, or\n"
        f"  * put those two files in {cache_dir() / source.replace('/', '--') / 'main'}/, or\n"
        f"  * set HF_ENDPOINT to a reachable mirror, or\n"
        "  * start from random weights with --init scratch."
    )


def check_model_source(cfg):
    """Fetch only config.json of a Hub checkpoint (small), so an offline machine fails fast and clearly."""
    source = hub_id(cfg)
    if source is None or Path(source).expanduser().exists():
        return
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", source):
        raise SetupError(f"--init {source}: no such checkpoint directory (expected config.json + pytorch_model.bin)")
    from minimamba.download import DownloadError, hub_file

    try:
        hub_file(source, "config.json")
    except DownloadError as e:
        raise SetupError(offline_message(source, e, cfg.init)) from None


def build_model(cfg):
    """The model --init asks for, in float32 on the CPU."""
    from minimamba.download import DownloadError
    from minimamba.hub import from_pretrained

    source = hub_id(cfg)
    if source is None:
        if cfg.scale is None:
            raise SetupError("--init scratch needs --scale: " + ", ".join(SCALES))
        model = Mamba2LM(Mamba2Config.from_scale(cfg.scale), backend=cfg.backend)
        model.reset_parameters(seed=cfg.seed)
        return model
    try:
        return from_pretrained(source, dtype=torch.float32, backend=cfg.backend)
    except DownloadError as e:
        raise SetupError(offline_message(source, e, cfg.init)) from None
    except FileNotFoundError as e:
        raise SetupError(f"--init {cfg.init}: {e}") from None
    except ValueError as e:  # hub.CheckpointError (weights that do not fit config.json), a bad config.json
        raise SetupError(
            f"--init {cfg.init}: {e}\nPass a checkpoint directory whose config.json describes its weights (one "
            "written by save_pretrained, or a train.py OUT/step-NNNNNN), or --init pretrained / scratch."
        ) from None


# ----------------------------------------------------------------------------------------------------------
# Optimizer: parameter groups, layer-wise LR decay, schedules

NO_DECAY = ("A_log", "D", "dt_bias", "norm", "norm_f", "bias")  # a name part equal to one of these: no weight decay


def _place(model, name, llrd):
    """(where, lr_scale, no_decay) of parameter `name`: what puts it in its group of `param_groups`."""
    L = model.config.n_layer
    parts = name.split(".")
    if parts[0] == "layers":
        layer = int(parts[1])
        scale, where = llrd ** (L - 1 - layer), f"layer {layer}"
    elif parts[0] == "embedding" and not model.config.tie_embeddings:
        scale, where = llrd ** (L - 1), "embedding"
    else:  # tied embedding = output head, lm_head, norm_f
        scale, where = 1.0, "top"
    return where, scale, any(part in NO_DECAY for part in parts[-2:])


def param_groups(model, weight_decay, llrd):
    """AdamW groups: [{"params", "weight_decay", "lr_scale", "name"}]; the LR of a group is peak·lr_scale.

    Layer l of L: lr_scale = llrd^(L-1-l). Embedding (tied to the head) and final norm: 1. No weight
    decay on A_log, D, dt_bias, norm weights and biases. See the module docstring for why.
    """
    groups = {}
    for name, p in model.named_parameters():  # a tied weight is listed once (as embedding.weight)
        if not p.requires_grad:
            continue
        where, scale, no_decay = _place(model, name, llrd)
        key = (where, no_decay)  # (the same groups whatever --weight-decay is, 0 included: resume may change it)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale,
                           "name": f"{where}{' (no decay)' if no_decay else ''}"}
        groups[key]["params"].append(p)
    return list(groups.values())


def merged_group_names(model):
    """The parameter names of each AdamW group as minimamba made them with --weight-decay 0 before commit
    afc376d: groups were keyed by (place, weight decay), so at 0 the decay and no-decay parameters of a
    place shared one group. `restore_state` maps an optimizer state of that layout onto `param_groups`."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(_place(model, name, 1.0)[0], []).append(name)
    return list(groups.values())


def schedule_steps(cfg, max_steps):
    """(warmup steps, decay steps) of the schedule."""
    warmup = round(cfg.warmup * max_steps) if cfg.warmup < 1 else int(cfg.warmup)
    decay = round(cfg.decay * max_steps) if cfg.schedule == "wsd" else 0
    return min(warmup, max_steps), min(decay, max_steps - min(warmup, max_steps))


def schedule_text(schedule, warmup, decay, max_steps, min_ratio):
    """The LR schedule of `lr_factor` in words, with its step counts (those of `schedule_steps`), e.g.
    "warmup 60 steps, then constant for 4,440, then a cosine decay to 0.1× the peak over the last 1,500"."""
    rest = max_steps - warmup  # the steps after warmup
    text = f"warmup {warmup:,} step{'s' * (warmup != 1)}, then " if warmup else "no warmup, "
    if schedule == "constant" or (schedule == "cosine" and rest == 0):
        return text + "constant"
    if schedule == "cosine":
        return text + (f"a cosine decay to {min_ratio:g}× the peak over "
                       f"{f'the {rest:,} steps after warmup' if warmup else f'all {rest:,} steps'}")
    if decay == 0:  # wsd with no decay steps (--decay 0, or too few steps)
        return text + "constant (--decay gives no decay steps)"
    return text + (f"constant for {rest - decay:,}, then " if rest > decay else "") + \
        f"a cosine decay to {min_ratio:g}× the peak over the last {decay:,}"


def tokens_text(n):
    """A number of tokens for people: "10,240" below a million, else 3 significant digits and M, B or T
    ("1.5M", "1.57B")."""
    n = int(n)
    rounded = float(f"{n:.3g}")  # (999,999,999 is "1B", not "1e+03M")
    if rounded < 1e6:
        return f"{n:,}"
    size, unit = next((size, unit) for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M")) if rounded >= size)
    return f"{rounded / size:.3g}{unit}"


def lr_factor(step, total, warmup, schedule="wsd", decay=0, min_ratio=0.1):
    """The LR of optimizer step `step` (0-based, of `total`) as a fraction of the peak LR.

    warmup: linear from 1/warmup to 1 over the first `warmup` steps (the first step already moves);
    wsd: 1 until the last `decay` steps, then a half cosine from 1 down to min_ratio;
    cosine: a half cosine from 1 after warmup down to min_ratio at the last step; constant: 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        start, length = total - decay, decay
    elif schedule == "cosine":
        start, length = warmup, total - warmup
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose wsd, cosine or constant")
    if step < start or length <= 0:
        return 1.0
    progress = min(1.0, (step - start + 1) / length)  # reaches exactly min_ratio at the last step
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_fused(device):
    """AdamW's `fused` for parameters on `device`: True on CPU and CUDA, torch's one-pass kernels (on a 2-core
    CPU a 130m model's update takes 0.08 s instead of 0.4-0.7 s by the default multi-tensor path; the same
    update, up to the last bit of a few entries in a thousand); None (torch's default) elsewhere."""
    return True if torch.device(device).type in ("cpu", "cuda") else None


class EMA:
    """An exponential moving average of the weights, in float32: ema ← decay·ema + (1 − decay)·w."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model):
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model):
        """Inside the block the model holds the EMA weights; its own weights come back exactly after."""
        self._swap(model)
        try:
            yield model
        finally:
            self._swap(model)

    def _swap(self, model):
        if hasattr(model, "reshard"):  # FSDP2 may leave the root's weights gathered after a forward
            model.reshard()
        for n, p in model.named_parameters():
            tmp = p.detach().clone()
            p.copy_(self.shadow[n])
            self.shadow[n].copy_(tmp)

    def state_dict(self):
        return {n: full_tensor(t).cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state):
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for n, t in self.shadow.items():
            src = state[n]
            if hasattr(t, "full_tensor"):  # an FSDP shard: take this process's piece of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(t.device), t.device_mesh, t.placements)
            t.copy_(src)


# ----------------------------------------------------------------------------------------------------------
# One optimizer step


def _grad_sync(model, on):
    """Gradients are reduced between processes only on the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(on)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not on:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


IGNORE = -100  # the label of a position whose next token is not trained on (F.cross_entropy's ignore_index)


def train_step(model, optimizer, rows, micro_batch, grad_clip, dist, autocast_dtype=None, params=None, labels=None):
    """One optimizer step over this process's `rows`, in micro-batches of `micro_batch` rows.

    Pretraining (labels None): rows (n, seq_len + 1) are packed windows, every token is the target of
    the one before it. Fine-tuning: rows (n, l) are the inputs and labels (n, l) their targets, IGNORE
    where no loss is taken (prompt and padding, see minimamba.finetune).

    The loss is the mean over every target token of the global batch (all micro-batches, all
    processes): each micro-batch's summed loss is divided by that global count, so accumulating
    micro-batches with different numbers of targets gives exactly the gradient of one big batch.
    (DDP and FSDP average the gradients over the W processes, hence the factor W.) Returns (loss,
    grad_norm before clipping, stop) where stop says whether any process asked to stop. Raises
    TrainingDiverged *before* updating the weights when the loss or the gradient norm is not finite.
    """
    if labels is None:
        rows, labels = rows[:, :-1], rows[:, 1:]  # (n, seq_len) inputs, (n, seq_len) targets
    device = dist.device
    (count,) = all_reduce_sum([(labels != IGNORE).sum().item()], dist)  # targets of the global batch
    if count == 0:
        raise ValueError("train_step: the batch has no target token (every label is IGNORE)")
    scale = dist.world_size / count
    loss_sum = torch.zeros((), device=device)  # ()
    micro = list(zip(rows.split(micro_batch), labels.split(micro_batch)))  # [((b, l), (b, l))], b ≤ micro_batch
    for i, (x, y) in enumerate(micro):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (b, l), (b, l)
        with _grad_sync(model, i == len(micro) - 1):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(x)  # (b, l, Vp)
                # logits (b·l, Vp) against the targets (b·l,), summed to (): IGNORE takes no loss
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
            (loss * scale).backward()
        loss_sum += loss.detach()
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    norm = full_tensor(grad_norm).item()  # already the global norm on every process (DDP averaged the gradients)
    loss_total, stop = all_reduce_sum([loss_sum.item(), float(STOP.requested is not None)], dist)
    loss = loss_total / count
    if not (math.isfinite(loss) and math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        raise TrainingDiverged(f"the {what} is {loss if what == 'loss' else norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, stop > 0


# ----------------------------------------------------------------------------------------------------------
# Stopping on SIGINT / SIGTERM


class StopRequest:
    """The first SIGINT/SIGTERM asks the loop to write a checkpoint after the current step and exit;
    a second one stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = None  # the signal number
        self.again = None  # the second signal's, which stopped at once
        self._previous = {}

    def install(self):
        self.requested = self.again = None
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.requested is not None:
            self.again = signum  # (train.py exits with 128 + it)
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


STOP = StopRequest()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_name(step):
    return f"step-{step:06d}"


def interrupted_saves(out):
    """{step directory: the directory `recover_interrupted_save` will put in its place} for each save that
    a kill cut short after it was committed (see `save_checkpoint`): a complete OUT/.step-N.tmp that
    OUT/latest names, or that was replacing a step-N moved aside to OUT/.step-N.old (a save of a minimamba
    that wrote OUT/latest after its renames); and an OUT/.step-N.old without step-N nor a complete .tmp
    (which only damage leaves): the old one goes back. Reads only."""
    out, found = Path(out), {}
    named = _latest_name(out, strict=False)
    for tmp in sorted(out.glob(".step-*.tmp")):
        final = out / tmp.name[1 : -len(".tmp")]
        moved_aside = (out / f".{final.name}.old").exists() and not final.exists()
        if (tmp / "training_state.pt").is_file() and (final.name == named or moved_aside):
            found[final] = tmp
    for old in sorted(out.glob(".step-*.old")):
        final = out / old.name[1 : -len(".old")]
        if final not in found and not final.exists():
            found[final] = old
    return found


def _latest_name(out, strict=True):
    """The step directory name OUT/latest holds, or None if there is no OUT/latest. Anything else than one
    name like step-000100 (a file emptied or damaged since a save wrote it) is a SetupError naming it, or
    with strict=False None (where a run does not follow OUT/latest: one resumed from a checkpoint named)."""
    pointer = Path(out) / "latest"
    if not pointer.is_file():
        return None
    text = pointer.read_bytes()
    name = text.decode("utf-8", errors="replace").strip()
    if not re.fullmatch(r"step-[0-9]+", name):
        if not strict:
            return None
        steps = sorted(p.name for p in Path(out).glob("step-*") if p.is_dir())
        raise SetupError(f"{pointer} should hold the name of one of {out}'s checkpoints (like step-000100), but it "
                         f"holds {text[:60]!r}: it is damaged. Write the name of the checkpoint to continue into it, "
                         f"e.g. echo {steps[-1] if steps else 'step-NNNNNN'} > {pointer} (the checkpoints there: "
                         f"{', '.join(steps) or 'none'})")
    return name


def readable_checkpoint(path):
    """Where the files of checkpoint `path` are now: `path`, or, while a save of it cut short by a kill is
    not yet recovered, the directory that will take its name (see `interrupted_saves`)."""
    path = Path(path)
    return interrupted_saves(path.parent).get(path, path)


def latest_checkpoint(out):
    """The checkpoint `--resume latest` continues: the one OUT/latest names, or None if there is no
    OUT/latest. After a kill in the middle of a save, that is the step directory being saved, as it will
    be after `recover_interrupted_save` (read its files from `readable_checkpoint`). Reads only."""
    out = Path(out)
    pointer = out / "latest"
    pending = [final for final, source in interrupted_saves(out).items() if source.suffix == ".tmp"]
    named = _latest_name(out)
    if pending:  # (the one OUT/latest names, or the one a save of an older minimamba was replacing)
        return next((final for final in pending if final.name == named), pending[-1])
    if named is None:
        return None
    path = out / named
    if not (readable_checkpoint(path) / "training_state.pt").is_file():
        raise SetupError(f"{pointer} names {path.name}, which holds no training_state.pt (deleted?); pass "
                         f"--resume {out / 'step-NNNNNN'} for another checkpoint, or delete {pointer}")
    return path


def recover_interrupted_save(out, tidy=False):
    """Finish the saves that a kill cut short after they were committed (`interrupted_saves`): the complete
    OUT/.step-N.tmp takes the name step-N (an old step-N is deleted) and OUT/latest names it, as the save
    would have done. That step was the newest checkpoint of the newest run in OUT, so `--resume latest`
    goes on with that run, never with one it went back on (whose later steps may still be in OUT). An
    OUT/.step-N.old left without step-N nor a complete .tmp is put back. With `tidy`, what else kills left
    (unfinished .step-N.tmp, replaced .step-N.old) is deleted. Only for an OUT this process holds
    (`lock_out`), as the run about to write to it. Returns the step directories it restored."""
    out, restored = Path(out), []
    for final, source in interrupted_saves(out).items():
        old = out / f".{final.name}.old"
        if source == old:
            os.replace(old, final)
            how = f"put {old.name} back"
        else:
            write_text_atomically(out / "latest", final.name + "\n")  # (first, as in save_checkpoint)
            if final.exists():  # (the kill came before the old one was moved aside)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(source, final)
            shutil.rmtree(old, ignore_errors=True)
            how = f"put the complete new checkpoint {source.name} in place; {out / 'latest'} names it"
        fsync_dir(out)
        print(f"note: {final} was being saved when the run writing it was stopped; {how}",
              file=sys.stderr, flush=True)
        restored.append(final)
    if tidy:
        for leftover in [*out.glob(".step-*.tmp"), *out.glob(".step-*.old")]:
            shutil.rmtree(leftover, ignore_errors=True)
    return restored


def lock_out(out):
    """Hold OUT/.lock exclusively (flock) for as long as the returned descriptor is open, so that two runs
    never write to one OUT; its text names the holder's process id. A SetupError naming the other run's
    process if one holds it. None where flock does not exist (Windows) or the filesystem refuses it (some
    network filesystems): then nothing guards OUT. The file stays after the run (removing a lock file
    races with a run that has just opened it); only a live process holds the lock."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    path = Path(out) / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise SetupError(f"cannot write to --out {out} ({e.strerror}: {path}); choose a directory this user "
                         "may write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = path.read_text().split()
        except OSError:
            holder = []
        who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "a process"
        raise SetupError(f"{out} is in use by another training run ({who} holds {path}); two runs in one --out "
                         "would overwrite each other's checkpoints. Wait for it to end (or stop it), or choose "
                         "another --out") from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
        os.close(fd)
        print(f"note: cannot lock {path} ({e.strerror}): nothing stops a second run in {out}; "
              "do not start one", file=sys.stderr, flush=True)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def save_checkpoint(out, step, model, optimizer, ema, sampler, extra, dist, keep=1, files=None):
    """Write OUT/step-NNNNNN/ (see the module docstring); every process must call it (FSDP gathers).
    `files` {name: path}: copied into it too (the run's tokenizer.json, which eval.py reads from a model's folder)."""
    out = Path(out)
    final = out / checkpoint_name(step)
    raw = unwrap(model)
    model_state, optim_state = _full_state(model, optimizer, dist)
    ema_state = ema.state_dict() if ema is not None else None
    if dist.is_main:
        from minimamba.hub import save_pretrained

        tmp = out / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = ema_state if ema_state is not None else model_state
        save_pretrained(Weights(raw.config, {k: v.float() for k, v in weights.items()}), tmp)
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        state = {
            "format": 1,
            "step": step,
            "model": model_state,
            "optimizer": optim_state,
            "ema": ema_state,
            "sampler": sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            **extra,
        }
        # last, atomically: a .tmp holding training_state.pt is complete (what recover_interrupted_save reads)
        atomic_write(tmp / "training_state.pt", lambda path: torch.save(state, path))  # (flushes tmp too)
        # the commit: from here OUT/latest names this step, whose files are in the .tmp until the renames
        # below are done; a kill before they are is finished by the next run (recover_interrupted_save)
        write_text_atomically(out / "latest", final.name + "\n")
        if final.exists():  # left by an earlier run that this one resumed from before it: replaced
            stale = out / f".{final.name}.old"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(tmp, final)
            fsync_dir(out)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_dir(out)
        # keep the newest `keep` of this run's checkpoints (later steps of an earlier run are left alone
        # until this run replaces them)
        old = sorted(p for p in out.glob("step-*") if p.is_dir() and p.name < final.name)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    if dist.enabled:
        torch.distributed.barrier()
    return final


class Weights:
    """What `hub.save_pretrained` reads from a model (config and state_dict), for weights held in a dict."""

    def __init__(self, config, state):
        self.config, self._state = config, state

    def state_dict(self):
        return self._state


def _full_state(model, optimizer, dist):
    """Whole (unsharded) model and optimizer state dicts on the CPU."""
    raw = unwrap(model)
    if any(hasattr(p, "full_tensor") for p in raw.parameters()):  # FSDP2
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(raw, options=options), get_optimizer_state_dict(raw, optimizer, options=options)
    return ({k: v.detach().cpu() for k, v in raw.state_dict().items()},
            _to_cpu(optimizer.state_dict()))


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def load_training_state(path):
    state_path = Path(path) / "training_state.pt"
    if not Path(path).exists():
        raise SetupError(f"--resume {path}: no such checkpoint directory")
    if not state_path.is_file() and (Path(path) / "latest").is_file():
        raise SetupError(f"{path} is a run's output folder, not one of its checkpoints: continue its latest with "
                         f"--out {path} --resume, or pass --resume {Path(path) / 'step-NNNNNN'}")
    if not state_path.is_file():
        raise SetupError(f"{path} is not a training checkpoint (no training_state.pt); pass a step-NNNNNN "
                         "folder of a run's --out")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # (checkpoints are written atomically: this is damage from outside)
        raise SetupError(f"{state_path} cannot be read ({type(e).__name__}: {e}); resume from another "
                         "checkpoint with --resume OUT/step-NNNNNN, or start again") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SetupError(f"{state_path} is not a training state of format 1 (found {found!r}); it was not "
                         "written by this version of minimamba's train.py")
    problems = _state_problems(state)
    if problems:
        raise SetupError(f"{state_path} is not a whole training state: " + "; ".join(problems) + ". train.py "
                         "writes every part, so it was changed since; resume from another checkpoint with "
                         "--resume OUT/step-NNNNNN, or start again")
    return state


JOB_SCRIPTS = {"pretraining": "train.py (continued pretraining)", "sft": "sft.py (supervised fine-tuning)"}


def job_kind(state):
    """Which job wrote a training state: its "job" entry; a checkpoint written before there was one is
    sft.py's if it holds an early-stopping state, else train.py's."""
    return state.get("job") or ("sft" if "early_stopping" in state else "pretraining")


def check_job_kind(state, job, source):
    """Refuse to resume a checkpoint of the other script (the data order, the job's state and the meaning
    of the steps differ): its weights can start a new run with --init instead."""
    kind = job_kind(state)
    if kind != job.kind:
        written = JOB_SCRIPTS.get(kind, repr(kind))
        raise SetupError(f"--resume {source}: this is a checkpoint of {written}, and this is "
                         f"{JOB_SCRIPTS[job.kind]}, which cannot continue it. To start from its weights, pass "
                         f"it as --init {source} (with a new --out)")


# the parts of a training state of format 1 and their types (what restore_state and _train read)
STATE_PARTS = {"step": int, "tokens_seen": int, "elapsed": (int, float), "model": dict, "optimizer": dict,
               "ema": (dict, type(None)), "sampler": dict, "rng": dict, "config": dict}


def _state_problems(state):
    """What is missing from a training state, or of the wrong type, one phrase each."""
    def kind(t):
        return " or ".join("None" if x is type(None) else x.__name__ for x in (t if isinstance(t, tuple) else (t,)))

    problems = [f"{k!r} is missing" if k not in state else f"{k!r} is a {type(state[k]).__name__}, not {kind(t)}"
                for k, t in STATE_PARTS.items() if k not in state or not isinstance(state[k], t)]
    opt = state.get("optimizer")
    if isinstance(opt, dict):
        groups = opt.get("param_groups")
        if not isinstance(opt.get("state"), dict):
            problems.append("the optimizer has no 'state' dict")
        if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                 for g in groups)):
            problems.append("the optimizer's 'param_groups' is not a list of groups with 'params'")
    rng = state.get("rng")
    if isinstance(rng, dict) and not (isinstance(rng.get("torch"), torch.Tensor) and isinstance(rng.get("cuda"), list)):
        problems.append("'rng' lacks the torch RNG state tensor or the list of CUDA ones")
    return problems


def _mismatches(expected, found):
    """What differs between {name: shape} `expected` and {name: tensor} `found`, one line each."""
    problems = [f"missing key {k} {tuple(s)}" for k, s in expected.items() if k not in found]
    problems += [f"unexpected key {k} {tuple(v.shape)}" for k, v in found.items() if k not in expected]
    problems += [f"wrong shape for {k}: checkpoint {tuple(found[k].shape)}, model {tuple(s)}"
                 for k, s in expected.items() if k in found and tuple(found[k].shape) != tuple(s)]
    return problems


def _from_merged_groups(optim_state, raw, optimizer):
    """An optimizer state dict in the layout of `merged_group_names` (an older minimamba's --weight-decay 0
    run) rewritten for `optimizer`'s groups: each parameter's moments and step count, unchanged, under its
    place in the new layout; None if the state is not of that layout. The entries of the groups' "params"
    are indices (a plain optimizer's state dict) or parameter names (FSDP's full state dict)."""
    groups, merged = optim_state["param_groups"], merged_group_names(raw)
    if [len(g["params"]) for g in groups] != [len(names) for names in merged] or any(
            g.get("weight_decay") != 0 for g in groups):
        return None
    entry_of, group_of = {}, {}  # parameter name -> its entry in the saved state, its saved group
    for group, names in zip(groups, merged):
        for entry, name in zip(group["params"], names):
            entry_of[name], group_of[name] = entry, group
    name_of = {id(p): n for n, p in raw.named_parameters()}
    by_name = _keyed_by_names(optim_state)
    new_groups, new_state, index = [], {}, 0
    for built in optimizer.param_groups:
        entries = []
        for p in built["params"]:
            name = name_of[id(p)]
            entry = name if by_name else index
            index += 1
            if entry_of[name] in optim_state["state"]:
                new_state[entry] = optim_state["state"][entry_of[name]]
            entries.append(entry)
        settings = {k: v for k, v in group_of[name_of[id(built["params"][0])]].items() if k != "params"}
        new_groups.append({**settings, "params": entries})
    return {"state": new_state, "param_groups": new_groups}


def _entries(optim_state):
    """The entries of an optimizer state dict's groups, in order: indices, or parameter names (FSDP)."""
    return [e for g in optim_state["param_groups"] for e in g["params"]]


def _keyed_by_names(optim_state):
    return any(isinstance(e, str) for e in _entries(optim_state))


def _params_in_order(raw, optimizer):
    """(name, parameter) of each parameter of `optimizer`'s groups, in order: the i-th goes with the i-th
    entry of an optimizer state dict of the same groups."""
    name_of = {id(p): n for n, p in raw.named_parameters()}
    return [(name_of[id(p)], p) for g in optimizer.param_groups for p in g["params"]]


def _listed(problems, most=8):
    """`problems` one per indented line, the first `most` of them and how many more."""
    shown = problems[:most] + ([f"... and {len(problems) - most} more"] if len(problems) > most else [])
    return "\n  " + "\n  ".join(shown)


def _keyed_by_name(optim_state, raw, optimizer):
    """An optimizer state dict whose entries are indices (a plain optimizer's, as one process or DDP saves it)
    with each entry replaced by its parameter's name, the keys FSDP's set_optimizer_state_dict reads (it
    fails on indices). The i-th entry is the i-th parameter of `optimizer`'s groups, in order."""
    rename = {e: name for e, (name, _) in zip(_entries(optim_state), _params_in_order(raw, optimizer))}
    return {"state": {rename[e]: s for e, s in optim_state["state"].items()},
            "param_groups": [{**g, "params": [rename[e] for e in g["params"]]} for g in optim_state["param_groups"]]}


def _moment_problems(optim_state, raw, optimizer):
    """The optimizer state's tensors whose shape is not their parameter's, one line each (torch would only
    fail at the first step, in the middle of AdamW's update)."""
    problems = []
    for entry, (name, p) in zip(_entries(optim_state), _params_in_order(raw, optimizer)):
        moments = optim_state["state"].get(entry, {})
        if not isinstance(moments, dict):
            problems.append(f"the state of {name} is a {type(moments).__name__}, not a dict")
            continue
        for key, t in moments.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(p.shape):
                problems.append(f"{key} of {name}: checkpoint {tuple(t.shape)}, model {tuple(p.shape)}")
    return problems


def restore_state(state, model, optimizer, ema, sampler, source=None):
    """Put a checkpoint's raw weights, optimizer, EMA, sampler and RNG state back.

    The optimizer keeps this run's hyperparameters (betas, weight decay, the groups' LR scales, as it
    was built) and takes the checkpoint's moments and step counts. A state that does not fit the model
    or the optimizer's groups is a SetupError naming what differs; `source` is the checkpoint directory.
    """
    raw = unwrap(model)
    c = raw.config
    what = (f"{Path(source) / 'training_state.pt' if source else 'the training state'} does not fit the model "
            f"(d_model={c.d_model}, n_layer={c.n_layer}, d_state={c.d_state}, headdim={c.headdim}, "
            f"vocab={c.padded_vocab_size})")
    advice = ("It comes from another model or run: resume from a checkpoint directory as train.py wrote it "
              "(OUT/step-NNNNNN, its config.json and training_state.pt together), or start from a model's "
              "weights with --init DIR instead of --resume.")
    expected = {"model": {k: v.shape for k, v in raw.state_dict().items()},
                "ema": {k: v.shape for k, v in raw.named_parameters()}}  # (a tied weight once, as in EMA)
    for part, name in (("model", "raw weights"), ("ema", "EMA weights")):
        problems = _mismatches(expected[part], state[part]) if state[part] is not None else []
        if problems:
            raise SetupError(f"{what}: its {name} differ:" + _listed(problems) + "\n" + advice)
    optim_state = state["optimizer"]
    saved = [len(g["params"]) for g in optim_state["param_groups"]]
    built = [len(g["params"]) for g in optimizer.param_groups]
    if saved != built:
        optim_state = _from_merged_groups(optim_state, raw, optimizer)
        if optim_state is None:
            raise SetupError(
                f"{what}: its optimizer has parameter groups of {saved} tensors, this run's has groups of "
                f"{built} ({', '.join(g['name'] for g in optimizer.param_groups)}), and the layout of an older "
                f"minimamba's --weight-decay 0 runs ({[len(g) for g in merged_group_names(raw)]}) does not "
                "fit either. " + advice)
        print(f"note: {source or 'the checkpoint'}: its optimizer state has the parameter groups of a --weight-decay "
              "0 run of a minimamba before commit afc376d (decay and no-decay parameters together); its moments "
              "were mapped onto this version's groups, parameter by parameter", file=sys.stderr, flush=True)
    problems = _moment_problems(optim_state, raw, optimizer)
    if problems:
        raise SetupError(f"{what}: its optimizer moments do not fit the parameters they belong to:"
                         + _listed(problems) + "\n" + advice)
    settings = [{k: g[k] for k in ("lr_scale", "weight_decay", "betas", "name")} for g in optimizer.param_groups]
    if any(hasattr(p, "full_tensor") for p in raw.parameters()):  # FSDP2
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        if not _keyed_by_names(optim_state):
            optim_state = _keyed_by_name(optim_state, raw, optimizer)  # (a checkpoint of one process or DDP)
        set_model_state_dict(raw, state["model"], options=options)
        set_optimizer_state_dict(raw, optimizer, optim_state, options=options)
    else:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(optim_state)
    for group, mine in zip(optimizer.param_groups, settings):  # (load_state_dict put the checkpoint's back)
        group.update(mine)
    if ema is not None:
        if state["ema"] is None:
            raise SetupError("the checkpoint was trained without EMA (--ema 0), so it has no EMA to go on with; "
                             "resume with --ema 0 (--ema may change on resume, but not from 0 to on)")
        ema.load_state_dict(state["ema"])
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def resume_state(state, model, optimizer, ema, sampler, job, source):
    """`restore_state`, then the job's own part of the state (job.load_state_dict). A part that is not what the
    job's script writes (a key missing inside it, a value of another type: a file changed since) is a
    SetupError naming the file, and so is a ValueError of the parts' own checks (e.g. a changed --mix)."""
    try:
        restore_state(state, model, optimizer, ema, sampler, source)
        job.load_state_dict(state)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # (what no check of _state_problems foresaw)
        raise SetupError(f"{Path(source) / 'training_state.pt'}: a part of it is not what {JOB_SCRIPTS[job.kind]} "
                         f"writes ({type(e).__name__}: {e}); it was changed since. Resume from another checkpoint "
                         "with --resume OUT/step-NNNNNN, or start again") from e  # (the cause kept: it may be a bug)
    except ValueError as e:
        raise SetupError(f"--resume {source}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Logging: JSON lines and a plot


class JsonlLog:
    """OUT/log.jsonl: one JSON object per line (train steps and evaluations), written by rank 0.
    A number that is not finite (an infinite perplexity, a NaN) is written as null."""

    def __init__(self, path, enabled=True, truncate_after_step=None):
        self.path, self.enabled = Path(path), enabled
        if enabled and truncate_after_step is not None and self.path.exists():
            # a resumed run redoes the steps after its checkpoint: drop their old records (and a line
            # cut short by a kill, which is not JSON, or any other line that is not a record: `_parse_log`)
            records, broken = _parse_log(self.path.read_bytes())
            if broken:
                tqdm.write(f"{self.path}: dropped line(s) {broken}, not records of the log (a line cut short when "
                           "the run was killed, or damage)", file=sys.stderr)
            kept = [r for r in records if r.get("step", 0) <= truncate_after_step]
            write_text_atomically(self.path, "".join(map(json_line, kept)))

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json_line(record))


def _parse_log(data):
    """The records of log.jsonl's bytes, and the numbers of its lines that are not records: not UTF-8 or not
    JSON (a line cut short), or not a JSON object whose "step", if it has one, is a number (damage)."""
    records, broken = [], []
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                record = parse_json(line.decode("utf-8"))
            except ValueError:  # (not UTF-8, not JSON, nested too deeply)
                record = None
            if isinstance(record, dict) and is_json_number(record.get("step", 0)):
                records.append(record)
            else:
                broken.append(number)
    return records, broken


def read_log(path):
    """The records of a log.jsonl. Its last line may be cut short (a run being written, or killed while
    writing it) and is then left out; a broken line elsewhere is an error. A number that was not finite
    is None (null in the file; the Infinity or NaN of logs from an older minimamba are read as floats)."""
    data = Path(path).read_bytes()
    records, broken = _parse_log(data)
    if broken and broken != [len(data.splitlines())]:
        raise ValueError(f"{path}: line(s) {broken} are not JSON records of the log; the log is damaged")
    return records


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend), or None if matplotlib (the `plot` extra)
    is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_log(log_path, png_path):
    """Train loss and per-domain held-out perplexity against tokens seen; False if matplotlib is missing.
    A value that is not a finite number (null in the log: it was not finite; or a record changed by hand) is a
    gap in its curve, and a record without a number of tokens is left out: a plot never stops a run."""
    plt = pyplot()
    if plt is None:
        return False
    records = [r for r in read_log(log_path) if is_json_number(r.get("tokens"))]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if isinstance(r.get("eval"), dict)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    def number(v):
        return v if is_json_number(v) and math.isfinite(v) else math.nan

    def ppl(record, domain):
        scores = record["eval"].get(domain)
        return number(scores.get("ppl") if isinstance(scores, dict) else None)

    if train:
        a.plot([r["tokens"] / 1e6 for r in train], [number(r["loss"]) for r in train], lw=0.8)
    a.set(xlabel="training tokens (M)", ylabel="train loss (nats/token)", title="train loss")
    for domain in (evals[0]["eval"] if evals else {}):
        b.plot([r["tokens"] / 1e6 for r in evals], [ppl(r, domain) for r in evals], "o-", label=str(domain))
    b.set(xlabel="training tokens (M)", ylabel="held-out perplexity", title="held-out perplexity", yscale="log")
    if evals:
        b.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------
# Estimates of memory and time per step

ASSUMED_MFU = {"cuda": 0.4, "cpu": 0.25}  # the fraction of the device's matmul speed the model is assumed to reach


def matmul_flops(device, dtype, seconds=0.25):
    """The device's speed on a large matmul in `dtype` (FLOP/s), measured for ~`seconds`: the yardstick of the
    time estimate."""
    device = torch.device(device)
    n = 2048 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - start > seconds:
            return 2 * n**3 * count / (time.perf_counter() - start)


class _ScanStandIn(torch.autograd.Function):
    """Shapes only, for the meta-device estimate: what the Triton scan saves for its backward (see
    kernels.ssd_triton.SSDChunkScanFn): its inputs, cs (and for fp32 inputs its low part), the chunk
    states S_c and CB, all fp32."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, chunk_size):
        b, l, h, p = x.shape
        g, n = B.shape[2:]
        nc = -(-l // chunk_size)
        f32 = dict(dtype=torch.float32)
        cs = x.new_empty(b, h, nc, chunk_size, **f32)  # (b, H, nc, Q)
        cs_lo = torch.empty_like(cs) if x.dtype == torch.float32 else None  # (b, H, nc, Q)
        chunk_states = x.new_empty(b, nc, h, p, n, **f32)  # S_c (b, nc, H, P, N)
        cb = x.new_empty(b, nc, g, chunk_size, chunk_size, **f32)  # (b, nc, G, Q, Q)
        ctx.save_for_backward(x, dt, A, B, C, D, cs, cs_lo, chunk_states, cb)
        return torch.empty_like(x), x.new_empty(b, h, p, n, **f32)  # y (b, l, H, P), final (b, H, P, N)

    @staticmethod
    def backward(ctx, dy, dfinal):
        return (None,) * 7


def activation_bytes(config, seq_len, backend="torch", grad_ckpt=False, dtype=torch.bfloat16):
    """Bytes autograd keeps for the backward of one sequence, counted on the meta device (no memory used).

    The count includes the logits and the cross-entropy; with grad_ckpt, only each block's input is
    kept, plus one block's activations while it is recomputed.
    """
    with torch.device("meta"):
        model = Mamba2LM(config, backend="torch").to(dtype)
    if backend == "triton":
        model._scan = lambda device: (lambda x, dt, A, B, C, D=None, initial_state=None:
                                      _ScanStandIn.apply(x, dt, A, B, C, D, config.chunk_size))
    params = {id(p) for p in model.parameters()}
    kept = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params:
            kept[id(base)] = base
        return t

    x = torch.zeros(1, seq_len, dtype=torch.long, device="meta")  # (1, seq_len)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x)  # (1, seq_len, Vp)
        F.cross_entropy(logits.flatten(0, 1).float(), x.flatten())
    total = sum(t.numel() * t.element_size() for t in kept.values())
    if not grad_ckpt:
        return total
    logit_bytes = seq_len * config.padded_vocab_size * (4 + dtype.itemsize)  # fp32 log-softmax + the logits
    per_layer = (total - logit_bytes) / config.n_layer
    return config.n_layer * seq_len * config.d_model * 4 + per_layer + logit_bytes


def flops_per_token(config, grad_ckpt=False):
    """Training FLOPs per token: 6 per weight of each matmul (forward 2, backward 4) plus the SSD scan."""
    c = config
    matmul = c.n_layer * (c.d_model * c.in_proj_dim + c.d_inner * c.d_model) + c.d_model * c.padded_vocab_size
    Q = c.chunk_size
    scan = c.n_layer * 2 * (Q * c.ngroups * c.d_state + Q * c.d_inner + 2 * c.d_inner * c.d_state)  # forward
    forward = 2 * matmul + scan
    return forward * (4 if grad_ckpt else 3)  # backward ≈ 2 forwards; checkpointing adds one forward


def estimate(config, micro_batch, seq_len, rows_per_step, world_size=1, backend="torch", grad_ckpt=False,
             ema=True, fsdp=False, dtype=torch.bfloat16):
    """A rough per-process memory peak (bytes) and step FLOPs, before anything runs; `dtype` is what the run
    computes in (bfloat16 autocast, or float32)."""
    n = _num_params(config)  # (a tied head counted once)
    copies = 2 if dtype == torch.bfloat16 else 0  # (autocast's bf16 copies of the weights)
    per_param = 4 + 4 + 8 + (4 if ema else 0) + copies  # weights, grads, AdamW m and v, EMA, weight copies
    static = n * per_param / (world_size if fsdp else 1)
    act = activation_bytes(config, seq_len, backend, grad_ckpt, dtype) * micro_batch
    transient = micro_batch * seq_len * config.padded_vocab_size * 4  # gradient of the logits
    flops = flops_per_token(config, grad_ckpt) * rows_per_step * seq_len
    return {"params": n, "static_bytes": static, "activation_bytes": act,
            "peak_bytes": 1.1 * (static + act + transient), "flops_per_step": flops}


def _num_params(config):
    with torch.device("meta"):
        return Mamba2LM(config, backend="torch").num_params()


# ----------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Resolved:
    """Values derived from a TrainConfig and the number of processes."""

    mix: dict
    eval_domains: list
    grad_accum: int
    rows_per_step: int  # sequences per optimizer step, all processes
    tokens_per_step: int
    max_steps: int
    warmup_steps: int
    decay_steps: int
    autocast_dtype: torch.dtype | None
    eval_batch_size: int
    eval_windows: int | None  # None: every held-out window


# the ranges of the settings every kind of run has: setting: (lowest, highest or None), both allowed
COMMON_RANGES = {
    "batch_size": (1, None), "keep": (1, None), "eval_batch_size": (1, None), "eval_every": (0, None),
    "save_every": (0, None), "lr": (0, None), "llrd": (0, 1), "weight_decay": (0, None), "beta1": (0, 1),
    "beta2": (0, 1), "grad_clip": (0, None), "warmup": (0, None), "decay": (0, 1), "min_lr_ratio": (0, 1),
    "seed": (0, None),  # (numpy's generators of the data order take no negative seed)
}


def check_settings(cfg, dist, ranges):
    """The checks of a run's settings made before anything slow: COMMON_RANGES and `ranges` (the kind of
    run's own), the schedule, EMA, FSDP, backend and dtype. Returns the autocast dtype (None: float32)."""
    if cfg.schedule not in ("wsd", "cosine", "constant"):
        raise SetupError(f"unknown --schedule {cfg.schedule!r}; choose wsd, cosine or constant")
    for name, value in asdict(cfg).items():  # (NaN passes every comparison below; inf makes no sense anywhere)
        if isinstance(value, float) and not math.isfinite(value):
            raise SetupError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name, (low, high) in {**COMMON_RANGES, **ranges}.items():
        value = getattr(cfg, name)
        if value is not None and (value < low or (high is not None and value > high)):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise SetupError(f"--{name.replace('_', '-')} must be {span}, got {value}")
    if not 0 <= cfg.ema < 1:
        raise SetupError(f"--ema must be in [0, 1), got {cfg.ema}")
    if cfg.fsdp and not dist.enabled:
        raise SetupError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N ...")
    if cfg.backend == "triton" and dist.device.type != "cuda":
        raise SetupError(f"--backend triton runs on CUDA only, and the device is {dist.device}; "
                         "use --backend torch (or auto)")
    return resolve_autocast(cfg.dtype, dist.device)


def micro_batches(grad_accum, wanted, default, per_pass, unit, flag):
    """Micro-batches per optimizer step: `grad_accum` (--grad-accum) where given, else the fewest passes of
    `per_pass` `unit` (one micro-batch on every process) that reach `wanted` (`flag`: train.py's
    --tokens-per-step, sft.py's --examples-per-step). Both given, they must agree: one would be ignored."""
    if grad_accum is None:
        return max(1, -(-wanted // per_pass))
    if grad_accum < 1:
        raise SetupError(f"--grad-accum must be >= 1, got {grad_accum}")
    if wanted != default and wanted != grad_accum * per_pass:
        raise SetupError(f"--grad-accum {grad_accum} makes {grad_accum * per_pass:,} {unit} per step "
                         f"({per_pass:,} per micro-batch on all processes) but {flag} asks for {wanted:,}: "
                         "give one of the two")
    return grad_accum


def resolve(cfg, dist):
    amp = check_settings(cfg, dist, {"seq_len": (1, None), "tokens_per_step": (1, None), "eval_windows": (0, None)})
    try:
        mix = parse_mix(cfg.mix)
    except ValueError as e:
        raise SetupError(str(e)) from None
    per_pass = cfg.batch_size * dist.world_size
    grad_accum = micro_batches(cfg.grad_accum, cfg.tokens_per_step, TrainConfig.tokens_per_step,
                               per_pass * cfg.seq_len, "tokens", "--tokens-per-step")
    rows = per_pass * grad_accum
    tokens_per_step = rows * cfg.seq_len
    if cfg.tokens is not None:
        max_steps = math.ceil(cfg.tokens / tokens_per_step)
    elif cfg.max_steps is not None:
        max_steps = cfg.max_steps
    else:
        raise SetupError("give --max-steps or --tokens")
    if max_steps < 1:
        raise SetupError(f"the run must have at least one step (got {max_steps})")
    warmup, decay = schedule_steps(cfg, max_steps)
    eval_domains = [d.strip() for d in cfg.eval_domains.split(",") if d.strip()] if cfg.eval_domains else list(mix)
    return Resolved(mix, eval_domains, grad_accum, rows, tokens_per_step, max_steps, warmup, decay, amp,
                    cfg.eval_batch_size or cfg.batch_size, cfg.eval_windows or None)


def check_vocabulary(data_dir, mix, eval_domains, vocab_size):
    """Refuse token files with ids the model has no embedding for (which would fail at the first step with
    an index error, on CUDA a device-side assert): the training split of each domain of the mix and the
    held-out split of each evaluated one."""
    for domain, split in [*((d, "train") for d in mix), *((d, "heldout") for d in eval_domains)]:
        needed, why = ids_needed(data_dir, domain, split)
        if needed > vocab_size:
            raise SetupError(f"{Path(data_dir) / domain}: {why}, but the model has a vocabulary of {vocab_size} ids; "
                             "prepare the data with the model's tokenizer, or train a model whose vocab_size is "
                             f"at least {needed}")


def data_tokenizer(data_dir, domain):
    """The tokenizer (a minimamba Tokenizer) that prepared the token files of `domain`: the checkpoints carry
    its file (`.path`; eval.py reads a model folder's own tokenizer.json) and the held-out evaluation counts
    the bytes its tokens spell (bits per byte). Found as the file meta.json records (`prepare` writes its
    absolute path), else the name it records (a path, or a Hub id, whose cached copy is used or downloaded),
    and checked as eval.py checks it (`check_prepared_with`: the fingerprint of what every id stands for, where
    meta.json keeps it, else the vocabulary size and EOS id).

    None for token files without a meta.json or made by a tokenizer that is no file (meta.json's file is
    null: the tests' byte tokenizer, the miniature's remapped ids); None with a note saying what eval.py then
    needs where no such file can be had (moved or changed since `prepare`, a relative path from another
    folder, no network)."""
    from minimamba.tokenizer import load_tokenizer, tokenizer_file

    meta = Path(data_dir) / domain / "meta.json"
    if not meta.exists():
        return None
    info = read_meta(data_dir, domain).get("tokenizer", {})
    if "file" in info and info["file"] is None:
        return None
    name = str(info.get("name", ""))
    tried = []
    for source in ([info["file"]] if info.get("file") else []) + ([name] if name else []):
        try:
            path = tokenizer_file(source)
            if not path.is_file():
                tried.append(f"{source}: no file {path}")
                continue
            tokenizer = load_tokenizer(path)
            check_prepared_with(data_dir, domain, tokenizer)  # (DataError: it reads the ids as other text)
            return tokenizer
        except DataError:
            tried.append(f"{source}: {path} is not the tokenizer that prepared the data (it changed since `prepare`: "
                         "put back the file that prepared it, or prepare the data again with this one)")
        except Exception as e:  # (a missing file, no network, a damaged file: its own message says which)
            tried.append(f"{source}: {e}")
    print(f"note: the checkpoints will hold no tokenizer.json and the held-out evaluation reports no bits per byte: "
          f"the data's tokenizer {name!r} ({meta}) cannot be read ({'; '.join(tried) or 'meta.json names none'}); "
          "give eval.py --tokenizer (the tokenizer that prepared the data)", file=sys.stderr, flush=True)
    return None


class Pretraining:
    """What a run of continued pretraining does that fine-tuning does not; `_train` does the rest.

    A job (this class, or minimamba.finetune.Finetuning) has `cfg` (a TrainConfig-like dataclass) and
    answers `_train`, in this order:
      resolve(dist)          the derived settings (a Resolved: steps, warmup, batch, precision), SetupError if bad
      check_data()           before the model is built: a DataError names what is wrong with the data
      load_data(raw)         after it: the data order, with state_dict / load_state_dict (checkpointed as "sampler")
      load_state_dict(state) on resume, after the rest: the job's own part of the training state (state_dict())
      resumed(step, model, ema)  on resume, once every check passed (OUT may be written): every process calls it
      describe(), resolved() the batch, data and length words of the summary; the job's part of the config file
      next_batch()           (rows, labels or None, tokens in the global batch) for `train_step`
      evaluate(model, step)  ({"eval": ..., ...} for the log, what, numbers), with the weights that are saved
      after_eval(step, result, model, ema)  after each evaluation, step 0's included; True ends the run
                             before max_steps (fine-tuning's early stopping)
      result()               what `run` returns besides step, checkpoint, eval and stopped_by
    and, after load_data, `tokenizer_file`: a tokenizer.json copied into every checkpoint, or None.
    """

    kind = "pretraining"  # stored in the checkpoints: --resume refuses another job's (check_job_kind)
    config_file = "train_config.json"  # the resolved configuration, in OUT
    finished = "--max-steps is {max_steps}: nothing to train. Pass a --max-steps above {step} to train on"

    def __init__(self, cfg):
        self.cfg = cfg

    def resolve(self, dist):
        self.dist, self.r = dist, resolve(self.cfg, dist)
        self.seq_len = self.cfg.seq_len  # (tokens per row, for the memory estimate)
        return self.r

    def check_data(self):
        check_domains(self.cfg.data, self.r.mix)
        check_domains(self.cfg.data, self.r.eval_domains, "heldout", "--eval-domains")
        check_one_tokenizer(self.cfg.data, dict.fromkeys([*self.r.mix, *self.r.eval_domains]))

    def load_data(self, raw):
        cfg, r, dist = self.cfg, self.r, self.dist
        self.sampler = MixtureSampler(cfg.data, r.mix, cfg.seq_len, r.rows_per_step, cfg.seed, dist.rank,
                                      dist.world_size)
        self.heldout = load_heldout(cfg.data, r.eval_domains, cfg.seq_len, r.eval_windows)
        check_vocabulary(cfg.data, r.mix, r.eval_domains, raw.config.vocab_size)
        # the data's tokenizer, on the main process only (the one that writes checkpoints and prints): the others'
        # evaluations leave out the bits per byte, which need it
        tokenizer = data_tokenizer(cfg.data, next(iter(r.mix))) if dist.is_main else None
        self.tokenizer_file = tokenizer.path if tokenizer else None
        self.byte_lengths = tokenizer.byte_lengths() if tokenizer else None  # (V,) bytes each id spells
        return self.sampler

    def state_dict(self):
        return {}  # (the sampler holds all of the data order)

    def load_state_dict(self, state):
        pass

    def resumed(self, step, model, ema):
        pass  # (nothing of pretraining's lives outside the checkpoints)

    def describe(self):
        cfg, r = self.cfg, self.r
        batch = (f"{cfg.batch_size} sequences × {r.grad_accum} micro-batches × {self.dist.world_size} process(es) = "
                 f"{r.rows_per_step} sequences × {cfg.seq_len} tokens = {r.tokens_per_step:,} tokens per step")
        return batch, self.sampler.describe(), f" = {tokens_text(r.max_steps * r.tokens_per_step)} tokens"

    def resolved(self):
        return {"tokens_per_step": self.r.tokens_per_step, "mix": self.r.mix, "eval_domains": self.r.eval_domains}

    def next_batch(self):
        return self.sampler.next_batch(), None, self.r.tokens_per_step

    def evaluate(self, model, step):
        dist = self.dist if not self.cfg.fsdp else None  # (under FSDP every process scores every window)
        res = domain_perplexity(model, self.heldout, self.r.eval_batch_size, self.dist.device, self.r.autocast_dtype,
                                dist, self.byte_lengths)
        shares = self.sampler.token_shares()
        numbers = "  ".join(f"{d} {v['ppl']:.3f}" + (f" ({v['bpb']:.3f} bits/byte)" if v.get("bpb") is not None else "")
                            for d, v in res.items()) + (
            " | token shares so far " + "  ".join(f"{d} {s:.1%}" for d, s in shares.items()) if step else "")
        return {"eval": res, "token_shares": shares, "epochs": self.sampler.epochs()}, "held-out perplexity", numbers

    def after_eval(self, step, result, model, ema):
        return False  # (pretraining runs its steps)

    def result(self):
        return {}


def _gib(n):
    return f"{n / 2**30:.1f} GiB"


def scale_name(config):
    """The named scale ("130m", "micro", ...) whose config this is, or None."""
    return next((name for name in SCALES if Mamba2Config.from_scale(name) == config), None)


def _summary(cfg, r, raw, dist, est, groups, source, start_step, batch, data, length):
    """The lines printed before the first step (a resumed run's time estimate is for the steps from
    start_step on); batch, data and length (what max_steps amounts to) are the job's own words."""
    c = raw.config
    lines = [
        f"model: {scale_name(c) or 'a custom config'} ({est['params'] / 1e6:.1f}M parameters, {c.n_layer} layers, "
        f"d_model {c.d_model}, vocab {c.vocab_size}), init: {source or 'random weights (seed %d)' % cfg.seed}",
        f"device: {dist.device} × {dist.world_size} process(es)"
        f"{' (FSDP)' if cfg.fsdp else ' (DDP)' if dist.enabled else ''}, compute "
        f"{compute_text(r.autocast_dtype, dist.device)}, scan backend "
        f"{raw.scan_backend(dist.device)}, activation checkpointing {'on' if cfg.grad_ckpt else 'off'}",
        f"batch: {batch}",
        f"data: {data}",
        f"schedule: {cfg.schedule}, peak lr {cfg.lr:g} (lowest layer {cfg.lr * min(g['lr_scale'] for g in groups):.3g});"
        f" {schedule_text(cfg.schedule, r.warmup_steps, r.decay_steps, r.max_steps, cfg.min_lr_ratio)};"
        f" {r.max_steps:,} steps{length}; EMA {cfg.ema or 'off'}",
        f"estimate: ~{_gib(est['peak_bytes'])} per process (weights+grads+AdamW+EMA {_gib(est['static_bytes'])}, "
        f"activations {_gib(est['activation_bytes'])} per micro-batch); {est['flops_per_step']:.3g} FLOPs per step",
    ]
    speed = matmul_flops(dist.device, r.autocast_dtype or torch.float32)
    mfu = ASSUMED_MFU.get(dist.device.type, 0.25)
    sec = est["flops_per_step"] / (mfu * speed * dist.world_size)
    left = r.max_steps - start_step
    lines.append(f"          ~{sec:.3g} s per step: this {dist.device.type.upper()} does {speed / 1e12:.3g} TFLOP/s on a "
                 f"large matmul and the model is assumed to reach {mfu:.0%} of that -> ~{sec * left / 3600:.2g} h "
                 f"for {'the run' if start_step == 0 else f'the {left:,} steps left'} (the real time is measured "
                 "after the first step)")
    if cfg.scale and cfg.scale != scale_name(raw.config):
        lines.append(f"note: --scale {cfg.scale} is not what runs: the model comes from {source}")
    return "\n".join(lines)


def train(cfg: TrainConfig, model=None):
    """Run training as `cfg` says; returns {"step", "checkpoint", "eval", "stopped_by"}.

    `model` (optional, for tests) replaces the one --init would build.
    """
    return run(Pretraining(cfg), model)


def run(job, model=None):
    """A run of `job` (a Pretraining, or a minimamba.finetune.Finetuning): `_train` with torch.distributed
    set up, SIGINT/SIGTERM caught and OUT locked for its duration."""
    dist = setup_distributed(job.cfg.device)
    STOP.install()
    try:
        with contextlib.ExitStack() as held:  # (the lock on OUT, released when the run ends, however it ends)
            return _train(job.cfg, dist, model, held, job)
    finally:
        STOP.restore()
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default, as ArgumentDefaultsHelpFormatter shows it, except where
    the help already says its default in words ("(default: ...)": what a None default stands for), which
    argparse would follow with "(default: None)", and where the default is None without words (an option
    that is off unless given: "(default: None)" would say nothing)."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def model_arguments(p, D):
    """The model's flags of train.py and sft.py (argparse parser `p`, defaults from the config `D`)."""
    p.add_argument("--scale", choices=list(SCALES), default=D.scale,
                   help="model size: the public Mamba2 checkpoints, or tiny/micro/mini to train on a CPU; needed "
                   "with --init pretrained or scratch (default: none; a checkpoint given to --init has its own)")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default=D.backend,
                   help="SSD scan: triton kernel on CUDA, PyTorch reference otherwise (auto)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=D.grad_ckpt,
                   help="activation checkpointing: recompute each block in the backward pass to save memory")


def run_arguments(p, D):
    """The flags train.py and sft.py share besides the model's: AdamW and the schedule's ends, evaluation
    at the start, checkpoints and resume, hardware."""
    p.add_argument("--weight-decay", type=float, default=D.weight_decay,
                   help="AdamW weight decay (not on A_log, D, dt_bias, norms, biases)")
    p.add_argument("--beta1", type=float, default=D.beta1, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=D.beta2, help="AdamW beta2")
    p.add_argument("--grad-clip", type=float, default=D.grad_clip, help="clip the gradient norm to this (0: off)")
    p.add_argument("--warmup", type=float, default=D.warmup, help="warmup: fraction of the steps if < 1, else steps")
    p.add_argument("--min-lr-ratio", type=float, default=D.min_lr_ratio, help="final LR as a fraction of the peak")
    p.add_argument("--eval-at-start", action=argparse.BooleanOptionalAction, default=D.eval_at_start,
                   help="also evaluate before the first step")
    p.add_argument("--save-every", type=int, default=D.save_every,
                   help="checkpoint every N steps (also at the end and on SIGINT/SIGTERM)")
    p.add_argument("--resume", nargs="?", const="latest", default=D.resume,
                   help="continue OUT's latest checkpoint exactly (or the checkpoint directory given)")
    p.add_argument("--device", default=D.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default=D.dtype,
                   help="compute dtype: auto = bfloat16 autocast on a GPU of compute capability 8.0 or newer, "
                        "float32 elsewhere (weights stay float32)")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=D.fsdp,
                   help="under torchrun: shard weights/grads/optimizer (FSDP2) instead of replicating them (DDP)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=D.progress,
                   help="show the progress bar")


def run_as_script(start, out=None):
    """The result of start() (a run: `train`, `finetune`), or the exit of train.py and sft.py: 2 for a bad
    setup, 1 for a diverged run (one line of error each), 128+N for signal N (after the checkpoint the
    first one asked for, or at once for a second). `out` (the run's --out) lets a stop at once say whether
    there is a checkpoint to --resume."""
    try:
        result = start()
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second SIGINT/SIGTERM (or a first one before training began): stop at once
        again = STOP.again or signal.SIGINT
        if out is not None and not (Path(out) / "latest").exists():  # (--resume would find nothing there)
            advice = f"no checkpoint was written in {out}: run the same command again to start over"
        else:
            advice = "the checkpoints written before are kept (continue with --resume)"
        print(f"\nstopped at once by {signal.Signals(again).name}: the step in progress was not saved; {advice}",
              file=sys.stderr)
        sys.exit(128 + again)
    if result["stopped_by"] in ("SIGINT", "SIGTERM"):
        sys.exit(128 + signal.Signals[result["stopped_by"]].value)
    return result


def _diverged_advice(last_ckpt, ckpt_step, step):
    """Which checkpoint to go back to after the step that follows `step` diverged: the last one this run
    wrote (or resumed from) is good if the weights it holds gave a finite loss; if it holds the weights the
    diverged step started from (written at `step`), resuming from it computes that step again."""
    if last_ckpt is None:
        return "no checkpoint was written yet. Lower --lr, check the data, or start again."
    if ckpt_step < step:
        return (f"the last good checkpoint is {last_ckpt}. Lower --lr, check the data, or resume from it with "
                f"--resume {last_ckpt}.")
    earlier = [p for p in sorted(Path(last_ckpt).parent.glob("step-*"))
               if p.name < checkpoint_name(ckpt_step) and (p / "training_state.pt").is_file()]
    before = (f"the last checkpoint before it is {earlier[-1]}: lower --lr and resume from that one with "
              f"--resume {earlier[-1]}, or check the data." if earlier else
              "no earlier checkpoint is kept (--keep 2 or more keeps some): lower --lr and start again, or check "
              "the data.")
    return (f"the last checkpoint, {last_ckpt}, holds the weights this step started from (resuming from it "
            f"computes the same step again, on the same batch); {before}")


def _print(dist, *args, **kwargs):
    if dist.is_main:
        tqdm.write(" ".join(str(a) for a in args), **kwargs)


def _on_main(dist, fn):
    """fn() on process 0 only, after the others got here; a SetupError it raises is raised by every process
    (so that none waits for the others at a collective)."""
    if dist.enabled:
        torch.distributed.barrier()
    error = None
    if dist.is_main:
        try:
            fn()
        except SetupError as e:
            error = e
    if dist.enabled and all_reduce_sum([float(error is not None)], dist)[0] and error is None:
        raise SetupError("process 0 stopped during setup (its message says why)")
    if error is not None:
        raise error


def _train(cfg, dist, model, held, job):
    """The run, for any job: `job` supplies what differs between pretraining and fine-tuning (see
    `Pretraining`, the model of what a job does); this function does the rest, the same for both."""
    r = job.resolve(dist)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {out} is a file, not a directory; choose another --out")

    def hold_out():  # one run at a time in OUT (see the module docstring)
        fd = lock_out(out)
        if fd is not None:
            held.callback(os.close, fd)

    # --- a second run in an OUT that a live run holds is refused here, before it reads anything there
    # (an OUT that does not exist yet is taken when this run creates it, below)
    # (process 0 decides, for every process: with OUT on each node's own disk, or an NFS cache behind, the
    # others may not see the OUT it sees, and must still make the same collective calls)
    held_early = bool(all_reduce_sum([float(dist.is_main and out.is_dir())], dist)[0])
    if held_early:
        _on_main(dist, hold_out)

    # --- what to start from: a checkpoint of this run, or --init (OUT is only read until every check passed)
    state, resume_dir = None, None
    if cfg.resume:
        resume_dir = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        if resume_dir is None:
            raise SetupError(f"--resume: no checkpoint in {out} (no {out / 'latest'}); start without --resume")
        state = load_training_state(readable_checkpoint(resume_dir))
        check_job_kind(state, job, resume_dir)
        if resume_dir.parent.resolve() != out.resolve() and (existing := latest_checkpoint(out)) is not None:
            raise SetupError(f"{out} already holds a run ({existing.name}), and {resume_dir} is a checkpoint of "
                             "another run: continuing it there would mix the two runs' checkpoints and logs. "
                             f"Choose another --out, or --resume a checkpoint of {out}")
        later = sorted(p.name for p in out.glob("step-*") if p.is_dir() and p.name > resume_dir.name)
        if later and dist.is_main:
            print(f"note: {out} also holds {', '.join(later)}, later steps than {resume_dir.name} that this run does "
                  "not continue: each is replaced when this run reaches its step")
    elif (existing := latest_checkpoint(out)) is not None:
        raise SetupError(f"{out} already holds a run ({existing.name}); pass --resume to continue it "
                         "or choose another --out")

    # --- check the data and the model source before anything slow
    try:
        job.check_data()
    except DataError as e:
        problem = str(e)
        if model is None and state is None:
            try:
                check_model_source(cfg)
            except SetupError as e2:
                problem += "\n\nAlso: " + str(e2)
        raise SetupError(problem) from None
    source = None
    if model is None:
        if state is not None:  # (its weights are put back by restore_state below)
            try:
                model = Mamba2LM(Mamba2Config.load(readable_checkpoint(resume_dir)), backend=cfg.backend)
            except (FileNotFoundError, ValueError) as e:
                raise SetupError(f"--resume {resume_dir}: {e}") from None
        else:
            check_model_source(cfg)
            source = hub_id(cfg)
            model = build_model(cfg)
    if state is not None:
        source = f"resumed from {resume_dir}"
    elif source is None and cfg.init != "scratch":
        source = "the model passed to train()"
    torch.manual_seed(cfg.seed)
    model.to(dist.device)
    model.gradient_checkpointing = cfg.grad_ckpt
    model = wrap_model(model, cfg, dist)
    raw = unwrap(model)

    # --- optimizer, EMA, data
    groups = param_groups(raw, cfg.weight_decay, cfg.llrd)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=adamw_fused(dist.device))
    ema = EMA(raw, cfg.ema) if cfg.ema > 0 else None
    try:
        sampler = job.load_data(raw)  # the data order, checkpointed with the rest
        if state is not None:
            resume_state(state, model, optimizer, ema, sampler, job, resume_dir)
    except (DataError, ValueError) as e:
        raise SetupError(str(e)) from None
    step, tokens_seen, elapsed = 0, 0, 0.0
    if state is not None:
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        if step >= r.max_steps:  # (before anything is written: train_config.json would say a run that is not)
            raise SetupError(f"{resume_dir} is at step {step}, and " + job.finished.format(max_steps=r.max_steps,
                                                                                           step=step))
        changed = {k: (state["config"][k], v) for k, v in asdict(cfg).items()
                   if k in state["config"] and state["config"][k] != v and k not in ("resume", "progress")}
        if changed:
            optim = {"beta1", "beta2", "weight_decay", "llrd"} & changed.keys()
            _print(dist, "note: changed since the checkpoint: " +
                   ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) +
                   (f" ({', '.join(sorted(optim))}: applied to the restored optimizer, its moments kept)"
                    if optim else "") +
                   ("; --init is not used: the weights are the checkpoint's" if "init" in changed else ""))
        del state

    # --- every check passed, and from here this run writes to OUT: take it if it did not exist before, and
    # finish the save a kill cut short there (or clear what unfinished ones left)
    def take_out():
        if not held_early:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SetupError(f"cannot create --out {out} ({e.strerror}); choose another --out") from None
            hold_out()
            others = sorted(set(os.listdir(out)) - {".lock"})
            if others:
                raise SetupError(f"{out} was created by another process while this run was starting (it holds "
                                 f"{', '.join(others[:5])}); choose another --out")
        recover_interrupted_save(out, tidy=True)
        # a run resumed from an earlier step of OUT goes back on the later ones (its log.jsonl drops their
        # records): OUT/latest names its start until it writes a checkpoint, so that a kill before then
        # resumes from there, with the log that goes with it
        pointer = out / "latest"
        named = _latest_name(out, strict=False)  # (damaged: replaced below by the checkpoint named)
        if resume_dir is not None and resume_dir.parent.resolve() == out.resolve() and named != resume_dir.name:
            write_text_atomically(pointer, resume_dir.name + "\n")
            if named is not None:
                print(f"note: {pointer} named {named}; it names {resume_dir.name}, where this run starts, until "
                      "this run writes a checkpoint", flush=True)

    _on_main(dist, take_out)
    if resume_dir is not None:
        job.resumed(step, model, ema)  # (fine-tuning: OUT/best made to match the state resumed from)

    # --- say what will happen, and store it
    backend = raw.scan_backend(dist.device)
    est = estimate(raw.config, cfg.batch_size, job.seq_len, r.rows_per_step, dist.world_size, backend,
                   cfg.grad_ckpt, ema is not None, cfg.fsdp, r.autocast_dtype or torch.float32)
    resolved = {**asdict(cfg), "resolved": {
        **job.resolved(), "grad_accum": r.grad_accum, "rows_per_step": r.rows_per_step,
        "max_steps": r.max_steps, "warmup_steps": r.warmup_steps, "decay_steps": r.decay_steps,
        "world_size": dist.world_size, "device": str(dist.device), "scan_backend": backend,
        "autocast_dtype": str(r.autocast_dtype).replace("torch.", "") if r.autocast_dtype else None,
        "params": est["params"], "model_config": raw.config.to_dict(), "init_source": source,
        "lr_scale_by_group": {g["name"]: g["lr_scale"] for g in groups}}}
    if dist.is_main:
        write_text_atomically(out / job.config_file, json.dumps(resolved, indent=2, default=str) + "\n")
        print("config: " + json.dumps(asdict(cfg)))
        print(_summary(cfg, r, raw, dist, est, groups, source, step, *job.describe()), flush=True)
        if ema is not None and cfg.ema ** (r.max_steps - step) > 0.5:  # (what is evaluated and saved is the EMA)
            print(f"note: with --ema {cfg.ema}, the EMA weights, which are evaluated and saved, will still be "
                  f"{cfg.ema ** (r.max_steps - step):.0%} the weights this run starts from after its "
                  f"{r.max_steps - step} steps; for a run this short pass --ema 0 (or a smaller decay)")
        if importlib.util.find_spec("matplotlib") is None:
            print("note: matplotlib is not installed, so no training.png (pip install 'minimamba[plot]')")
    log = JsonlLog(out / "log.jsonl", dist.is_main, truncate_after_step=step if resume_dir else None)
    if not resume_dir and dist.is_main:
        (out / "log.jsonl").unlink(missing_ok=True)

    def evaluate_now():
        ctx = ema.swapped_in(raw) if ema is not None else contextlib.nullcontext()
        with ctx:  # (evaluated with the weights that are saved)
            record, what, numbers = job.evaluate(raw if not cfg.fsdp else model, step)
        log.write(step=step, tokens=tokens_seen, **record)
        _print(dist, f"step {step}: {what}{' (EMA weights)' if ema else ''} {numbers}")
        if dist.is_main:
            plot_log(out / "log.jsonl", out / "training.png")
        return record["eval"]

    def checkpoint():
        extra = {"job": job.kind, "tokens_seen": tokens_seen, "elapsed": elapsed, "config": asdict(cfg),
                 **job.state_dict()}
        files = {"tokenizer.json": job.tokenizer_file} if job.tokenizer_file else None
        return save_checkpoint(out, step, model, optimizer, ema, sampler, extra, dist, cfg.keep, files)

    # --- the loop
    last_eval = None
    if step == 0 and cfg.eval_at_start:  # the start counts: fine-tuning may keep the weights it started from
        last_eval = evaluate_now()
        job.after_eval(0, last_eval, model, ema)
    bar = tqdm(total=r.max_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (dist.is_main and cfg.progress))
    # the last checkpoint of this run and its step: the one it resumed from until it writes one (OUT/latest
    # may name a later step of the run that went on after resume_dir)
    stopped_by, last_ckpt, ckpt_step, start_step = None, resume_dir, step, step
    ended_early = False  # a job's own end before max_steps (fine-tuning: early stopping)
    try:
        while step < r.max_steps:
            t0 = time.perf_counter()
            factor = lr_factor(step, r.max_steps, r.warmup_steps, cfg.schedule, r.decay_steps, cfg.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * factor * g["lr_scale"]
            rows, labels, tokens = job.next_batch()
            try:
                loss, grad_norm, stop = train_step(model, optimizer, rows, cfg.batch_size, cfg.grad_clip, dist,
                                                   r.autocast_dtype, params, labels)
            except TrainingDiverged as e:
                log.write(step=step + 1, error=str(e))
                raise TrainingDiverged(f"{e} at step {step + 1}: training stopped and the weights of that step "
                                       f"were not saved; {_diverged_advice(last_ckpt, ckpt_step, step)}") from None
            if ema is not None:
                ema.update(raw)
            step += 1
            tokens_seen += tokens
            dt = time.perf_counter() - t0
            elapsed += dt
            log.write(step=step, tokens=tokens_seen, loss=loss, lr=cfg.lr * factor, grad_norm=grad_norm,
                      tok_per_s=tokens / dt, time=elapsed)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:,.0f}", refresh=False)
            bar.update(1)
            if step == start_step + 1 and dist.is_main:
                mem = f", peak GPU memory {_gib(torch.cuda.max_memory_allocated())}" if dist.device.type == "cuda" else ""
                tqdm.write(f"first step: {dt:.2f} s{mem} (later steps are usually faster)")
            done = step == r.max_steps
            if stop:
                stopped_by = signal.Signals(STOP.requested).name if STOP.requested else "a signal to another process"
            if done or (cfg.eval_every and step % cfg.eval_every == 0):
                last_eval = evaluate_now()
                ended_early = job.after_eval(step, last_eval, model, ema) and not done
            if done or ended_early or stop or (cfg.save_every and step % cfg.save_every == 0):
                last_ckpt, ckpt_step = checkpoint(), step
                _print(dist, f"checkpoint: {last_ckpt}")
            if stop:
                _print(dist, f"stopped by {stopped_by} after step {step}; continue with --resume")
                break
            if ended_early:
                break
    finally:
        bar.close()
    return {"step": step, "checkpoint": str(last_ckpt) if last_ckpt else None, "eval": last_eval,
            "stopped_by": stopped_by, **job.result()}

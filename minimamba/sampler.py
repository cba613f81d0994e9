"""The mixture sampler: packed training windows drawn from several domains by *token* share.

Each domain is one flat token stream written by `python -m minimamba.data prepare`: DIR/NAME/train.bin,
uint16 ids, every document followed by EOS (id 0). A training row is a window of seq_len + 1 consecutive
tokens of one domain (inputs = window[:-1], targets = window[1:]); windows are cut from the stream
back to back, so documents are *packed* (an EOS separates them inside a window) and no compute is spent
on padding. Window j of a domain starts at token j·seq_len: consecutive windows share one token (the
last target of one is the first input of the next), so every token of the stream but the first is a
target once per epoch (the last (n_tokens - 1) % seq_len tokens, too few for a window, are never read).

Why this mixes by tokens. The recipe's authors padded every document to 1024 tokens and mixed by
document count, so the real token shares depended on document lengths. Here every row has the same
length, so a domain's share of rows *is* its share of training tokens: `--mix pubmed=0.8,c4=0.1,...`
means 80% of the tokens the model learns from are PubMed.

Which domain each row comes from. Step s takes G = rows_per_step rows (the global batch, all ranks
and all micro-batches). Each row goes, one after the other, to the domain furthest behind its target
count (s+1)·G·share; so after every step each domain's row count is within one row of its exact
share, with no sampling noise even in a short run. Within a domain, windows are visited in a random
order without replacement (a fresh permutation per pass over the domain, an "epoch"), and the G rows
of a step are shuffled before they are split between ranks and micro-batches.

Determinism and resume. Everything random is drawn from numpy generators seeded with (seed, step)
or (seed, domain, epoch), never from a global state; the only state is the step and the number of
windows taken from each domain so far (`state_dict`). A run resumed from that state sees exactly the
batches the uninterrupted run would have seen, and every rank computes the same global batch and
keeps its own slice of it (rows rank, rank + world_size, ...).

A window may span the end of one document and the start of the next; the model reads across the EOS
as ordinary context (Mamba2 has no per-document state reset here, like nanoGPT's packing).
"""

import zlib
from pathlib import Path

import numpy as np
import torch

from minimamba.data import DataError, load_split


def parse_mix(text, what="domain"):
    """"pubmed=0.8,c4=0.1,wikipedia=0.1" -> {"pubmed": 0.8, "c4": 0.1, "wikipedia": 0.1} (normalised to sum 1).
    `what` names the entries in the errors (sft.py's are tasks)."""
    mix = {}
    for part in str(text).split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"bad --mix entry {part.strip()!r}: write NAME=SHARE, e.g. pubmed=0.8,c4=0.1,wikipedia=0.1")
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"bad share {value.strip()!r} for {name!r} in --mix: it must be a number") from None
        if not np.isfinite(share) or share < 0:
            raise ValueError(f"the share of {name!r} in --mix must be >= 0, got {value.strip()}")
        if name in mix:
            raise ValueError(f"{what} {name!r} appears twice in --mix")
        mix[name] = share
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"the shares in --mix sum to 0; give at least one {what} a positive share")
    if not np.isfinite(total):  # (each share normalised to 0 and dropped)
        raise ValueError(f"the shares in --mix sum to {total}: use smaller numbers, e.g. fractions that sum to 1")
    return {name: share / total for name, share in mix.items() if share > 0}


def available_domains(data_dir, split="train"):
    """The domains prepared under data_dir (folders holding a `split`.bin)."""
    data_dir = Path(data_dir)
    return sorted(p.parent.name for p in data_dir.glob(f"*/{split}.bin")) if data_dir.is_dir() else []


def check_domains(data_dir, domains, split="train", option="--mix"):
    """Raise DataError naming the path, the domains there and the prepare command when a domain's `split` is
    missing; `option` is the flag that chose the domains."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {data_dir} does not exist. Prepare each domain of {option} first, e.g.\n"
            f"  python -m minimamba.data prepare --domain pubmed --input FILE... --out {data_dir}\n"
            f"(see `python -m minimamba.data download --help` for the recipe's sources), or pass --data DIR."
        )
    missing = [d for d in domains if not (data_dir / d / f"{split}.bin").is_file()]
    if missing:
        have = available_domains(data_dir, split)
        raise DataError(
            f"no {split} tokens for domain(s) {', '.join(missing)} in {data_dir} "
            f"(expected {data_dir / missing[0] / f'{split}.bin'}). Domains found there: "
            f"{', '.join(have) or 'none'}. Prepare it with\n"
            f"  python -m minimamba.data prepare --domain {missing[0]} --input FILE... --out {data_dir}\n"
            f"or change {option}."
        )


class MixtureSampler:
    """Global batches of packed (seq_len + 1)-token windows, mixed by token share; see the module doc.

    rows_per_step  G, the rows of one optimizer step summed over ranks and micro-batches (not the SSD's G)
    rank, world_size  this process keeps rows rank, rank + world_size, ... of each step's G rows
    """

    def __init__(self, data_dir, mix, seq_len, rows_per_step, seed=0, rank=0, world_size=1):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if rows_per_step % world_size:
            raise ValueError(f"rows_per_step {rows_per_step} is not a multiple of world_size {world_size}")
        self.data_dir, self.seq_len, self.rows_per_step = Path(data_dir), seq_len, rows_per_step
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.mix = dict(mix)
        self.domains = list(self.mix)
        check_domains(self.data_dir, self.domains)
        self.num_windows = {}  # windows of seq_len + 1 tokens in each domain's stream
        self.stream_tokens = {}
        for d in self.domains:
            n_tokens = len(load_split(self.data_dir, d, "train"))
            self.stream_tokens[d] = n_tokens
            self.num_windows[d] = (n_tokens - 1) // seq_len
            if self.num_windows[d] < 1:
                raise DataError(
                    f"{self.data_dir / d / 'train.bin'} holds {n_tokens} tokens, fewer than one window of "
                    f"seq_len + 1 = {seq_len + 1}; add data or lower --seq-len"
                )
        self.step = 0
        self.taken = dict.fromkeys(self.domains, 0)  # windows taken so far from each domain (all ranks)
        self._perms = {}  # domain -> (epoch, permutation of its windows)

    # which rows ----------------------------------------------------------------------------------
    def _rows_per_domain(self):
        """How many of this step's G = rows_per_step rows (G here is not the groups of heads) each domain
        gets: each row goes to the domain furthest behind its target share of all rows so far."""
        G, s = self.rows_per_step, self.step
        behind = {d: (s + 1) * G * self.mix[d] - self.taken[d] for d in self.domains}
        counts = dict.fromkeys(self.domains, 0)
        for _ in range(G):
            d = max(self.domains, key=lambda k: behind[k])  # ties: the first domain of the mix
            counts[d] += 1
            behind[d] -= 1
        return counts

    def _window_index(self, domain, k):
        """Index of the k-th window taken from `domain`: epoch k // n, visited in a per-epoch random order."""
        n = self.num_windows[domain]
        epoch, i = divmod(k, n)
        if self._perms.get(domain, (None,))[0] != epoch:
            rng = np.random.default_rng([self.seed, zlib.crc32(domain.encode()), epoch])
            self._perms[domain] = (epoch, rng.permutation(n))
        return int(self._perms[domain][1][i])

    def next_batch(self):
        """This rank's rows of the next step: a LongTensor (rows_per_step // world_size, seq_len + 1)."""
        counts = self._rows_per_domain()
        rows = [(d, self.taken[d] + j) for d in self.domains for j in range(counts[d])]  # (domain, k), rows_per_step
        order = np.random.default_rng([self.seed, self.step]).permutation(len(rows))  # (rows_per_step,)
        mine = [rows[i] for i in order[self.rank :: self.world_size]]  # rows_per_step / world_size of them
        # a fresh memmap per batch: a long-lived one keeps every page it ever read mapped (nanoGPT #287)
        streams = {d: load_split(self.data_dir, d, "train") for d in {d for d, _ in mine}}
        L = self.seq_len  # (a window's length minus one, not the decay mask L of the glossary)
        batch = np.empty((len(mine), L + 1), dtype=np.int64)  # (rows_per_step / world_size, seq_len + 1)
        for r, (d, k) in enumerate(mine):
            start = self._window_index(d, k) * L
            batch[r] = streams[d][start : start + L + 1]  # (seq_len + 1,)
        for d in self.domains:
            self.taken[d] += counts[d]
        self.step += 1
        return torch.from_numpy(batch)

    # reporting -----------------------------------------------------------------------------------
    def token_shares(self):
        """The realised share of training tokens of each domain so far (all ranks)."""
        total = sum(self.taken.values())
        return {d: (self.taken[d] / total if total else 0.0) for d in self.domains}

    def epochs(self):
        """How many passes over each domain's training tokens the run has made so far."""
        return {d: self.taken[d] / self.num_windows[d] for d in self.domains}

    def describe(self):
        return ", ".join(
            f"{d} {self.mix[d]:.0%} ({self.stream_tokens[d]:,} tokens, {self.num_windows[d]:,} windows)"
            for d in self.domains
        )

    # checkpointing -------------------------------------------------------------------------------
    def state_dict(self):
        return {"step": self.step, "taken": dict(self.taken), "seed": self.seed, "mix": dict(self.mix),
                "seq_len": self.seq_len, "rows_per_step": self.rows_per_step, "num_windows": dict(self.num_windows),
                "stream_tokens": dict(self.stream_tokens)}

    def load_state_dict(self, state):
        mine = {"mix": self.mix, "seq_len": self.seq_len, "rows_per_step": self.rows_per_step, "seed": self.seed}
        changed = [f"{k}: checkpoint {state[k]} vs now {v}" for k, v in mine.items()
                   if k != "mix" and state[k] != v]
        # (the order of the domains matters too: it breaks ties between their row counts and orders the rows)
        if list(state["mix"]) != list(self.mix) or any(abs(state["mix"][d] - self.mix[d]) > 1e-12 for d in self.mix):
            changed.append(f"mix: checkpoint {state['mix']} vs now {self.mix}")
        # the data of the domains both mixes hold (a domain added to or dropped from --mix is not new data); the
        # windows follow from the tokens and --seq-len, so a changed --seq-len alone is not new data either
        both = [d for d in self.mix if d in state["mix"]]
        for key, what in (("num_windows", "windows"), ("stream_tokens", "tokens")):  # (older checkpoints lack them)
            if key not in state or (key == "num_windows" and state["seq_len"] != self.seq_len):
                continue
            then, now = {d: state[key][d] for d in both}, {d: getattr(self, key)[d] for d in both}
            if then != now:
                changed.append(f"{what} per domain: checkpoint {then} vs now {now} (the training data was prepared "
                               "again)")
                break
        if changed:
            raise ValueError(
                "cannot resume exactly: the data order depends on --mix (and the order of its domains), --seq-len, "
                "the global batch, --seed and the training data, and these differ from the checkpoint's ("
                + "; ".join(changed) + "). Resume with the same values and data."
            )
        self.step, self.taken = int(state["step"]), {d: int(state["taken"][d]) for d in self.domains}
        # the checkpoint's shares themselves: the same mix written otherwise (7,2,1 for 0.7,0.2,0.1) can differ
        # in the last bit, enough to break a tie between domains differently and change the batches
        self.mix = {d: float(state["mix"][d]) for d in self.domains}


def heldout_windows(data_dir, domain, seq_len, max_windows=None):
    """Fixed, non-overlapping windows (n, seq_len + 1) of a domain's heldout.bin, for perplexity.

    Window j covers tokens [j·seq_len, (j+1)·seq_len + 1): every token after the first is scored
    once, but the last (n_tokens - 1) % seq_len, too few for a window, are not scored. With max_windows,
    that many windows spread evenly over the file (the same ones every call).
    """
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows (--eval-windows) must be at least 1, got {max_windows}")
    tokens = load_split(data_dir, domain, "heldout")
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise DataError(
            f"{Path(data_dir) / domain / 'heldout.bin'} holds {len(tokens)} tokens, fewer than one window of "
            f"{seq_len + 1}; prepare more held-out data or lower --seq-len"
        )
    idx = np.arange(n)  # (n,): the window numbers j
    if max_windows is not None and max_windows < n:
        idx = np.unique(np.linspace(0, n - 1, max_windows).round().astype(np.int64))  # (max_windows or fewer,)
    # (len(idx), seq_len + 1): window j is tokens [j·seq_len, (j+1)·seq_len + 1)
    out = np.stack([np.asarray(tokens[j * seq_len : j * seq_len + seq_len + 1], dtype=np.int64) for j in idx])
    return torch.from_numpy(out)

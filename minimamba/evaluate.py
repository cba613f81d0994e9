"""Evaluation: held-out perplexity per domain, and the downstream tasks of `minimamba.tasks`.

Held-out perplexity
-------------------
Perplexity is exp(mean negative log-likelihood per token): the model scores every target token of a
fixed set of windows, the NLLs are summed over *all* scored tokens of the domain and divided by their
number, and the exponential is taken last. (Averaging per-batch perplexities or per-batch losses
instead would weight batches, not tokens.) Each window is read on its own, from an empty state, so
a token's context is at most seq_len tokens; the same windows are used at every evaluation of a run
(see `minimamba.sampler.heldout_windows`), which makes the numbers comparable along the run and
between runs with the same --seq-len and --eval-windows.

The softmax runs over the model's whole (padded) output layer, as in training; perplexities are
only comparable between models that share a tokenizer. Bits per byte, the same summed NLL over the
UTF-8 bytes of the text the scored tokens spell (in bits: sum NLL / (ln 2 · bytes); the text after the
tokenizer's normalisation, NFC for GPT-NeoX: a decomposed "é" counts 2 bytes, not 3), compares models
with different tokenizers on the same text. A special token (the EOS between documents) spells no
bytes, but its NLL is counted: predicting where a document ends is part of the held-out text.

Downstream tasks
----------------
`evaluate_task` scores a task's items by its kind (see `minimamba.tasks`):

    "choice"   `score_options` + `choice_metrics`: acc / acc_norm, as lm-eval-harness's multiple choice
    "yesno"    the label of the likeliest option (or of a greedy answer, `parse_yes_no`) + `yesno_metrics`
    "lambada"  `score_options` + `lambada_metrics`: greedy-match accuracy and perplexity, as lm-eval-harness
    "generate" `generate_texts` (greedy) + `rouge`: ROUGE-1/2/L F1 with stemming, as the BioMamba recipe

Option scoring differs from the held-out perplexity in one way: its softmax runs over the real
vocabulary (`config.vocab_size` rows), not the padded output layer. The padding rows are no tokens:
generation never picks them (`Mamba2LM.generate`), so the greedy check must not either, and a log-
probability should be that of a token among tokens. (A trained model puts next to no mass on them,
so the difference is small; the held-out perplexity keeps the padded row so that it equals the
training loss.) `results_table` turns results into a Markdown comparison.
"""

import itertools
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minimamba.files import is_json_number, parse_json
from minimamba.model import InferenceCache
from minimamba.sampler import heldout_windows
from minimamba.tasks import KINDS, Choice, Generation


@torch.no_grad()
def token_nll(model, windows, batch_size=8, device="cpu", autocast_dtype=None):
    """(sum of NLL, number of scored tokens) over windows (n, seq_len + 1)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0  # () float64 sum of NLL, and a Python int
    device = torch.device(device)
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)  # (b, seq_len + 1), b ≤ batch_size
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(batch[:, :-1])  # (b, l, Vp)
        # logits (b·l, Vp) against the targets (b·l,), the windows shifted by one
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += nll.double().cpu()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total.item(), count


MAX_LOG = math.log(sys.float_info.max)  # ≈ 709.78: exp of more than this is not a float


def loss_summary(total, count, n_bytes=None):
    """{"loss": mean token NLL (nats), "ppl": exp(loss), "tokens": tokens scored} from the sums, and with
    `n_bytes` (the UTF-8 bytes the scored tokens spell, `target_bytes`) "bpb": total / (ln 2 · n_bytes), None
    where they spell no byte.

    A loss above ~709.8 nats (a diverging model) has a perplexity beyond the largest float: it is
    inf, as is that of an infinite loss; a NaN loss gives a NaN perplexity.
    """
    loss = total / count
    summary = {"loss": loss, "ppl": math.inf if loss > MAX_LOG else math.exp(loss), "tokens": count}
    if n_bytes is not None:
        summary["bpb"] = total / (math.log(2) * n_bytes) if n_bytes else None
    return summary


def target_bytes(windows, byte_lengths, what="the windows"):
    """The UTF-8 bytes of the text that the targets of `windows` (n, seq_len + 1) spell (every token but each
    window's first), from each id's byte length (`Tokenizer.byte_lengths`)."""
    table = torch.as_tensor(byte_lengths, dtype=torch.int64)  # (V,)
    targets = windows[:, 1:]  # (n, seq_len)
    if targets.numel() and int(targets.max()) >= len(table):
        raise ValueError(f"{what} hold id {int(targets.max())}, beyond the tokenizer's {len(table)} ids: they "
                         "were made by another tokenizer; give the byte lengths of that one")
    return int(table[targets].sum())


def perplexity(model, windows, batch_size=8, device="cpu", autocast_dtype=None):
    """{"loss": mean token NLL (nats), "ppl": exp(loss), "tokens": tokens scored} of some windows."""
    return loss_summary(*token_nll(model, windows, batch_size, device, autocast_dtype))


def domain_perplexity(model, windows_by_domain, batch_size=8, device="cpu", autocast_dtype=None, dist=None,
                      byte_lengths=None):
    """Perplexity of each domain: {domain: {"loss", "ppl", "tokens"}}, and "bpb" (bits per byte) given the
    tokenizer's `byte_lengths`.

    windows_by_domain: {domain: LongTensor (n, seq_len + 1)} (see `load_heldout`). Under
    torch.distributed (`dist` = a `minimamba.training.Dist`), each rank scores a slice of the
    windows and the sums are added up, so every rank returns the same numbers.
    """
    results = {}
    for domain, windows in windows_by_domain.items():
        if dist is not None and dist.world_size > 1:
            total, count = token_nll(model, windows[dist.rank :: dist.world_size], batch_size, device, autocast_dtype)
            sums = torch.tensor([total, float(count)], dtype=torch.float64, device=dist.device)  # (2,)
            torch.distributed.all_reduce(sums)
            total, count = sums[0].item(), int(sums[1].item())
        else:
            total, count = token_nll(model, windows, batch_size, device, autocast_dtype)
        n_bytes = (target_bytes(windows, byte_lengths, f"{domain}'s windows") if byte_lengths is not None
                   else None)
        results[domain] = loss_summary(total, count, n_bytes)
    return results


def load_heldout(data_dir, domains, seq_len, max_windows=None):
    """{domain: held-out windows} for `domain_perplexity`, read once at the start of a run."""
    return {d: heldout_windows(data_dir, d, seq_len, max_windows) for d in domains}


# ---------------------------------------------------------------------------------------------------
# Downstream tasks: scoring options by log-likelihood
# ---------------------------------------------------------------------------------------------------
def encode_option(tokenizer, context, continuation, max_tokens=None, what="an option"):
    """(context ids, continuation ids) of one option, as `score_options` reads it.

    The two strings are tokenized separately and the ids concatenated, so an option's continuation has
    the same tokens whatever the context (lm-eval-harness's older behaviour; since v0.4 it encodes
    context + continuation as one text and splits the ids where the context's own ids end). The two
    differ only where a BPE merge would cross the seam. Put the separating space at the start of the
    continuation (" yes"), not at the end of the context: GPT-NeoX's BPE attaches a space to the word
    after it, so that split is the one the model saw in training.

    An empty context is scored from the EOS token, as lm-eval-harness does: the model needs at least
    one token to predict the first continuation token from. With `max_tokens` (the most tokens the model
    reads for one option, lm-eval-harness's max_length), context + continuation keeps its last
    max_tokens + 1 tokens: tokens are dropped from the left of the context, never from the continuation.
    """
    cont = tokenizer.encode(continuation)
    if not cont:
        raise ValueError(f"{what}: the continuation {continuation!r} has no tokens, so there is nothing to score")
    ctx = _ids_or_eos(tokenizer, context, f"{what}: the context")
    if max_tokens is not None:
        if len(cont) > max_tokens:
            raise ValueError(f"{what}: the continuation has {len(cont)} tokens, more than max_tokens={max_tokens} "
                             "leaves for it (the model must read at least one context token); raise max_tokens")
        ctx = ctx[max(0, len(ctx) + len(cont) - (max_tokens + 1)):]  # the last max_tokens + 1 - len(cont)
    return ctx, cont


def _ids_or_eos(tokenizer, text, what):
    """The ids of a context or prompt; an empty one is the EOS token alone (as lm-eval-harness reads it: the
    model needs one token to predict from)."""
    if text:
        return tokenizer.encode(text)
    if tokenizer.eos_id is None:
        raise ValueError(f"{what} is empty, and the tokenizer has no EOS token to start from; give it text")
    return [tokenizer.eos_id]


@torch.no_grad()
def score_options(model, tokenizer, items, batch_size=16, device=None, max_tokens=None, autocast_dtype=None):
    """Score every option of every `Choice` item: scores[i][j] = (logprob, n_tokens, greedy) of option j of item i.

    logprob   sum over the continuation's tokens of log p(token | context, earlier continuation tokens)
    n_tokens  the number of continuation tokens
    greedy    whether every continuation token is the model's argmax (lm-eval-harness's is_greedy)

    The model reads context + continuation[:-1] (see `encode_option` for the tokens, the empty context
    and the truncation to `max_tokens`); the log-softmax is taken in float32 over the real vocabulary
    (see the module docstring).

    The Mamba way to do it: the state after a context summarises it whole, so a context shared by
    several options is read once. Options are taken `batch_size` at a time; in each batch
      1. every distinct context is prefilled alone (no padding, so exactly) into a cache of its own; its
         last logits predict the first continuation token;
      2. the caches are stacked, one copy per option (a context's state repeated for each of its options),
         and all continuations are run as one batch from them, right-padded to the longest. Right padding
         is exact for a causal recurrent model: the pad tokens come after every position that is scored.
    Options with a context each (WinoGrande) get one prefill each; options of different items share a
    batch. The result equals one unpadded forward of context + continuation per option (tests/test_evaluate.py).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else model.embedding.weight.device
    rows = []  # (item index, option index, context ids, continuation ids): one per option
    for i, item in enumerate(items):
        if not isinstance(item, Choice):
            raise TypeError(f"item {i} is a {type(item).__name__}, not a Choice: only Choice items have options "
                            "to score")
        if not item.options:
            raise ValueError(f"item {item.id!r} has no options")
        for j, (context, continuation) in enumerate(item.options):
            ctx, cont = encode_option(tokenizer, context, continuation, max_tokens, f"item {item.id!r} option {j}")
            rows.append((i, j, ctx, cont))
    scores = [[None] * len(item.options) for item in items]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = _continuation_logits(model, [(ctx, cont) for _, _, ctx, cont in batch], device)
            for (i, j, _, cont), row_logits in zip(batch, logits):  # row_logits (Lmax, Vp)
                # the continuation's positions and the real vocabulary: (len(cont), V)
                scores[i][j] = _score_tokens(row_logits[: len(cont), : model.config.vocab_size], cont, device)
    finally:
        model.train(was_training)
    return scores


def _continuation_logits(model, pairs, device):
    """pairs: b (context ids, continuation ids) -> logits (b, Lmax, Vp), Lmax the longest continuation's length,
    where row r, position t predicts continuation token t of pair r (positions t >= len(continuation r) are
    padding)."""
    # 1. each distinct context alone, from an empty state: its final state and its last logits
    index = {}  # context ids -> its index among the distinct contexts
    for ctx, _ in pairs:
        index.setdefault(tuple(ctx), len(index))
    caches, last = [], []
    for ctx in index:
        cache = model.allocate_cache(1, device=device)
        ids = torch.tensor([ctx], dtype=torch.long, device=device)  # (1, l_ctx)
        last.append(model(ids, cache=cache, num_last_tokens=1)[:, -1])  # (1, Vp): predicts continuation token 0
        caches.append(cache)
    which = torch.tensor([index[tuple(ctx)] for ctx, _ in pairs], device=device)  # (b,): each pair's context
    first = torch.cat(last)[which][:, None]  # (b, 1, Vp)
    rest = max(len(cont) for _, cont in pairs) - 1  # the longest continuation[:-1]
    if rest == 0:  # every continuation is one token: the contexts' last logits are all there is
        return first
    # 2. every continuation[:-1] from a copy of its context's state, right-padded (with token 0: any id does)
    cache = InferenceCache(torch.cat([c.conv for c in caches], dim=1)[:, which],  # (n_layer, b, K-1, conv_dim)
                           torch.cat([c.ssm for c in caches], dim=1)[:, which])  # (n_layer, b, H, P, N)
    ids = torch.zeros(len(pairs), rest, dtype=torch.long, device=device)  # (b, rest)
    for r, (_, cont) in enumerate(pairs):
        ids[r, : len(cont) - 1] = torch.tensor(cont[:-1], device=device)  # (len(cont) - 1,)
    return torch.cat([first, model(ids, cache=cache).to(first.dtype)], dim=1)  # (b, 1 + rest, Vp) = (b, Lmax, Vp)


def _score_tokens(logits, tokens, device):
    """logits (n, V) predicting tokens (n,) -> (sum of log-probabilities, n, every token the argmax)."""
    targets = torch.tensor(tokens, device=device)  # (n,)
    logp = logits.float().log_softmax(-1)  # (n, V), float32 whatever the model computed in
    token_logp = logp.gather(-1, targets[:, None])[:, 0]  # (n,)
    greedy = bool((logp.argmax(-1) == targets).all())
    return token_logp.double().sum().item(), len(tokens), greedy


def _argmax(values):
    """Index of the largest value; the first on a tie (as numpy.argmax, which lm-eval-harness uses)."""
    return max(range(len(values)), key=lambda k: (values[k], -k))


def _stderr(p, n):
    """Standard error of a mean of n 0/1 outcomes with mean p: sqrt(p(1-p)/(n-1)) (sample variance, as
    lm-eval-harness's mean_stderr); NaN for n < 2."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan


def _norm_length(continuation):
    """The continuation's length in characters for acc_norm, without the one space that separates it from
    the context: lm-eval-harness scores " " + choice and divides by len(choice)."""
    return len(continuation) - 1 if continuation.startswith(" ") else len(continuation)


def _choice_picks(item, item_scores):
    """(acc's pick, acc_norm's pick) of one item: the option with the highest summed log-likelihood, and the
    one with the highest per character of its continuation (`_norm_length`)."""
    lls = [ll for ll, _, _ in item_scores]  # summed log-likelihood per option
    lengths = [_norm_length(cont) for _, cont in item.options]
    if 0 in lengths:
        raise ValueError(f"item {item.id!r} has an option whose continuation has no characters to divide by")
    return _argmax(lls), _argmax([ll / k for ll, k in zip(lls, lengths)])


def choice_metrics(items, scores):
    """{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"} of Choice items and their `score_options` scores.

    acc       share of items whose gold option has the highest summed log-likelihood;
    acc_norm  the same with each sum divided by the continuation's length in characters (less the separating
              space: `_norm_length`), lm-eval-harness's acc_norm, which does not favour short options;
    *_stderr  sqrt(p(1-p)/(n-1)), lm-eval-harness's standard error of a mean.
    A tie goes to the first option, as numpy.argmax does in lm-eval-harness.
    """
    if len(items) != len(scores) or not items:
        raise ValueError(f"choice_metrics needs one score list per item, got {len(items)} items and {len(scores)} "
                         "score lists" + (" (no items)" if not items else ""))
    hits, hits_norm = 0, 0
    for item, item_scores in zip(items, scores):
        pick, pick_norm = _choice_picks(item, item_scores)
        hits += pick == item.gold
        hits_norm += pick_norm == item.gold
    n = len(items)
    acc, acc_norm = hits / n, hits_norm / n
    return {"acc": acc, "acc_stderr": _stderr(acc, n), "acc_norm": acc_norm,
            "acc_norm_stderr": _stderr(acc_norm, n), "n": n}


def lambada_metrics(scores):
    """{"acc", "ppl", "n"} of LAMBADA-style items (one option each: the passage and its last word).

    acc  share of items whose every continuation token is the greedy one (lm-eval-harness's lambada acc);
    ppl  exp(-mean over items of the continuation's summed log-likelihood): lm-eval-harness's "perplexity"
         aggregation, exp(-mean(items)) over per-item log-likelihoods, so a perplexity per *word*, not
         per token.
    """
    if not scores:
        raise ValueError("lambada_metrics got no scores")
    for k, item_scores in enumerate(scores):
        if len(item_scores) != 1:
            raise ValueError(f"a lambada item has one option (passage, last word); item {k} has {len(item_scores)}")
    lls = [s[0][0] for s in scores]
    n = len(scores)
    mean_ll = sum(lls) / n
    return {"acc": sum(s[0][2] for s in scores) / n, "ppl": math.inf if -mean_ll > MAX_LOG else math.exp(-mean_ll),
            "n": n}


# ---------------------------------------------------------------------------------------------------
# Yes / no / maybe questions
# ---------------------------------------------------------------------------------------------------
def predict_labels(items, scores):
    """The label of each item's likeliest option (highest summed log-likelihood, first on a tie). Several
    options may carry one label (" yes" and " Yes"): the label then gets its best variant's score."""
    preds = []
    for item, item_scores in zip(items, scores):
        if len(item.labels) != len(item.options):
            raise ValueError(f"item {item.id!r} has {len(item.options)} options and {len(item.labels)} labels; "
                             "a yes/no item names each option")
        preds.append(item.labels[_argmax([ll for ll, _, _ in item_scores])])
    return preds


def parse_yes_no(text):
    """"yes", "no" or "maybe" from a generated answer, or None: its first word (the first run of letters or
    digits, so leading spaces and punctuation are skipped: " Yes." -> "yes"), lower-cased. Anything else
    ("Answer: yes", "The answer is no") is None, which scores as wrong, as in the BioMamba BioASQ protocol."""
    m = re.search(r"[^\W_]+", text)
    word = m.group().lower() if m else None
    return word if word in ("yes", "no", "maybe") else None


def yesno_metrics(gold_labels, predicted_labels, labels):
    """Accuracy, macro-F1 and per-class scores of predicted labels against gold ones.

    labels: the classes, e.g. ("yes", "no", "maybe"). For each class c, with tp/fp/fn counted over items:
      precision = tp / (tp + fp), recall = tp / (tp + fn), f1 = 2·tp / (2·tp + fp + fn), support = tp + fn;
    a ratio with a zero denominator is 0 (scikit-learn's zero_division=0): a class never predicted has
    precision 0, and a class neither gold nor predicted has f1 0 and still counts in the macro mean (as
    scikit-learn's f1_score(labels=labels, average="macro") does). macro_* = the mean over `labels`.
    A prediction outside `labels` (None: an unparsed answer) is wrong for every class.
    Returns {"acc", "acc_stderr", "macro_f1", "macro_precision", "macro_recall", "f1_<label>"...,
    "n", "per_class": {label: {precision, recall, f1, support}}, "confusion": {gold: {predicted: count}}}
    (a None prediction is counted under "none").
    """
    if len(gold_labels) != len(predicted_labels) or not gold_labels:
        raise ValueError(f"yesno_metrics needs one prediction per gold label, got {len(gold_labels)} gold labels "
                         f"and {len(predicted_labels)} predictions")
    unknown = sorted(set(gold_labels) - set(labels))
    if unknown:
        raise ValueError(f"gold labels {unknown} are not among the classes {list(labels)}")
    n = len(gold_labels)
    pairs = list(zip(gold_labels, predicted_labels))
    per_class = {}
    for c in labels:
        tp = sum(g == c and p == c for g, p in pairs)
        fp = sum(g != c and p == c for g, p in pairs)
        fn = sum(g == c and p != c for g, p in pairs)
        per_class[c] = {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
                        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0, "support": tp + fn}
    confusion = {g: {} for g in labels}
    for g, p in pairs:
        key = "none" if p is None else p
        confusion[g][key] = confusion[g].get(key, 0) + 1
    acc = sum(g == p for g, p in pairs) / n

    def macro(k):
        return sum(per_class[c][k] for c in labels) / len(labels)

    return {"acc": acc, "acc_stderr": _stderr(acc, n), "macro_f1": macro("f1"), "macro_precision": macro("precision"),
            "macro_recall": macro("recall"), **{f"f1_{c}": per_class[c]["f1"] for c in labels}, "n": n,
            "per_class": per_class, "confusion": confusion}


# ---------------------------------------------------------------------------------------------------
# Generation and ROUGE
# ---------------------------------------------------------------------------------------------------
def _prompt_ids(tokenizer, prompt, max_prompt_tokens):
    """The prompt's ids, its last max_prompt_tokens if longer (the end of a prompt, where the question is,
    matters most); an empty prompt starts from EOS, as in `encode_option`."""
    ids = _ids_or_eos(tokenizer, prompt, "a prompt")
    if max_prompt_tokens is not None:
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        ids = ids[-max_prompt_tokens:]
    return ids


@torch.no_grad()
def generate_texts(model, tokenizer, prompts, max_new_tokens=128, batch_size=8, max_prompt_tokens=None,
                   autocast_dtype=None):
    """Greedy continuations of text prompts: a list of strings, the new text only (no prompt, no EOS).

    Greedy decoding (temperature 0) up to `max_new_tokens` tokens or the tokenizer's EOS, the BioMamba
    protocol (§3.3: greedy, 128 new tokens). `batch_size` prompts of any lengths go to `model.generate` as a
    list: each is prefilled alone and all are decoded as one batch, so each gets exactly what it gets
    alone. A prompt longer than `max_prompt_tokens` tokens keeps its last ones. With `autocast_dtype`
    (bf16 on a GPU) prefill and decoding run under autocast, as `score_options` does.
    """
    was_training = model.training
    model.eval()
    device = model.embedding.weight.device
    texts = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = [_prompt_ids(tokenizer, p, max_prompt_tokens) for p in prompts[start : start + batch_size]]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                outs = model.generate(batch, max_new_tokens, temperature=0.0, eos_token_id=tokenizer.eos_id)
            for ids, out in zip(batch, outs):  # out (len(ids) + new,), ending at the first EOS if any
                new = out[len(ids):].tolist()
                if new and new[-1] == tokenizer.eos_id:
                    new = new[:-1]
                texts.append(tokenizer.decode(new))
    finally:
        model.train(was_training)
    return texts


def rouge(predictions, references):
    """{"rouge1", "rouge2", "rougeL"}: the mean over pairs of each ROUGE F-measure, in percent.

    Google's rouge-score package with use_stemmer=True (its tokenizer lower-cases, keeps letters and
    digits, and Porter-stems words longer than three characters): the BioMamba recipe's metric for the
    MIMIC note tasks (§3.3, "ROUGE-1/2/L (rouge-score, with stemming)", reported in %). ROUGE-L is the
    sentence-level LCS one ("rougeL", not "rougeLsum").
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError("ROUGE needs Google's rouge-score package: pip install rouge-score") from e
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"rouge needs one reference per prediction, got {len(predictions)} predictions and "
                         f"{len(references)} references")
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # (target, prediction): precision is over the prediction's n-grams
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: 100 * totals[k] / len(predictions) for k in keys}


# how the BioMamba recipe scores its yes/no tasks (§3.4): PubMedQA by the answers' log-probabilities, BioASQ
# by a generated answer (few-shot there; zero-shot here); eval.py --qa-scoring recipe
RECIPE_QA_SCORING = {"pubmedqa": "logprob", "bioasq": "generate"}


# ---------------------------------------------------------------------------------------------------
# One task, and a table of runs
# ---------------------------------------------------------------------------------------------------
def evaluate_task(model, tokenizer, task, items, batch_size=16, device=None, max_tokens=None, autocast_dtype=None,
                  qa_scoring="logprob", qa_max_new_tokens=8, max_new_tokens=128, gen_batch_size=8,
                  max_prompt_tokens=None, return_predictions=False):
    """Score `items` of `task` (a `minimamba.tasks.Task`) by its kind: {"task", "kind", "n", metrics..., "seconds"}.

    "choice"   `score_options` -> `choice_metrics`
    "yesno"    qa_scoring="logprob" (PubMedQA in the BioMamba recipe, §3.4): the label of the likeliest option;
               qa_scoring="generate" (its BioASQ): a greedy answer of up to `qa_max_new_tokens` tokens after
               the options' shared context, read by `parse_yes_no`; then `yesno_metrics`
    "lambada"  `score_options` -> `lambada_metrics`
    "generate" `generate_texts` (max_new_tokens, gen_batch_size, max_prompt_tokens) -> `rouge`
    With return_predictions=True the result also holds "predictions": one dict per item (its id, what the
    model chose or wrote, and the gold answer) for a predictions file; pop it before a results table.
    """
    if task.kind not in KINDS:
        raise ValueError(f"task {task.name!r} has kind {task.kind!r}, not one of {KINDS}")
    if not items:
        raise ValueError(f"task {task.name!r}: no items to evaluate")
    want = Generation if task.kind == "generate" else Choice
    for item in items:
        if not isinstance(item, want):
            raise TypeError(f"task {task.name!r} ({task.kind}) scores {want.__name__} items, got a "
                            f"{type(item).__name__} ({getattr(item, 'id', '?')!r})")
    t0 = time.perf_counter()
    scoring = dict(batch_size=batch_size, device=device, max_tokens=max_tokens, autocast_dtype=autocast_dtype)
    if task.kind == "choice":
        scores = score_options(model, tokenizer, items, **scoring)
        metrics = choice_metrics(items, scores)
        preds = []
        for it, sc in zip(items, scores):
            pick, pick_norm = _choice_picks(it, sc)
            preds.append({"id": it.id, "pred": pick, "pred_norm": pick_norm, "gold": it.gold,
                          "logprobs": [s[0] for s in sc]})
    elif task.kind == "yesno":
        labels = tuple(dict.fromkeys(label for it in items for label in it.labels))  # in order of appearance
        gold = [it.labels[it.gold] for it in items]
        if qa_scoring == "logprob":
            scores = score_options(model, tokenizer, items, **scoring)
            pred = predict_labels(items, scores)
            preds = [{"id": it.id, "pred": p, "gold": g, "logprobs": [s[0] for s in sc]}
                     for it, p, g, sc in zip(items, pred, gold, scores)]
        elif qa_scoring == "generate":
            prompts = []
            for it in items:
                if len({ctx for ctx, _ in it.options}) != 1:
                    raise ValueError(f"item {it.id!r}: qa_scoring='generate' needs one context shared by the options")
                prompts.append(it.options[0][0])
            answers = generate_texts(model, tokenizer, prompts, qa_max_new_tokens, gen_batch_size, max_prompt_tokens,
                                     autocast_dtype)
            pred = [parse_yes_no(a) for a in answers]
            preds = [{"id": it.id, "pred": p, "gold": g, "answer": a}
                     for it, p, g, a in zip(items, pred, gold, answers)]
        else:
            raise ValueError(f"qa_scoring must be 'logprob' or 'generate', got {qa_scoring!r}")
        metrics = yesno_metrics(gold, pred, labels)
    elif task.kind == "lambada":
        scores = score_options(model, tokenizer, items, **scoring)
        metrics = lambada_metrics(scores)
        preds = [{"id": it.id, "logprob": sc[0][0], "tokens": sc[0][1], "greedy": sc[0][2]}
                 for it, sc in zip(items, scores)]
    else:  # "generate"
        texts = generate_texts(model, tokenizer, [it.prompt for it in items], max_new_tokens, gen_batch_size,
                               max_prompt_tokens, autocast_dtype)
        metrics = {**rouge(texts, [it.reference for it in items]), "n": len(items)}
        preds = [{"id": it.id, "prediction": t, "reference": it.reference} for it, t in zip(items, texts)]
    result = {"task": task.name, "kind": task.kind, **metrics, "n": len(items),
              "seconds": time.perf_counter() - t0}
    if return_predictions:
        result["predictions"] = preds
    return result


def read_results(path):
    """A results file of eval.py ({"model", "config", "results": {task: {metric: value}}}), read for a
    comparison; ValueError naming the problem: unreadable, not that shape, or another tool's output
    (lm-evaluation-harness's, whose metrics are named like "acc,none": its prompts and scoring differ from
    these, so its numbers do not compare with them)."""
    try:
        data = parse_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # (missing, not UTF-8, not JSON, nested too deeply)
        raise ValueError(f"cannot read results file {path}: {e}") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not all(isinstance(m, dict) for m in results.values()):
        raise ValueError(f'{path} is not a results file of eval.py: it needs "results": {{task: {{metric: value}}}}')
    if not isinstance(data.get("config") or {}, dict):
        raise ValueError(f'{path}: its "config" should be an object (eval.py\'s settings), got '
                         f"{type(data['config']).__name__}: the file is damaged")
    if bad := [task for task, m in results.items() if not isinstance(m.get("kind", ""), str)]:
        raise ValueError(f'{path}: the "kind" of {bad[0]} should be a string (choice, yesno, lambada, generate or '
                         f"perplexity), got {results[bad[0]]['kind']!r:.60}: the file is damaged")
    if "versions" in data or any("," in metric for metrics in results.values() for metric in metrics):
        raise ValueError(f"{path} looks like lm-evaluation-harness output (metrics named like 'acc,none'), not "
                         "eval.py's: its prompts and scoring differ, so its numbers do not compare with these")
    return data


# the settings of eval.py under which two runs' numbers compare (the model and its weights aside)
COMPARED_SETTINGS = ("split", "limit", "sample", "qa_scoring", "max_tokens", "max_new_tokens", "dtype", "tokenizer_id",
                     "seq_len", "ppl_windows")
# the kinds of result (evaluate_task's "kind"; "perplexity" for --ppl-data) whose numbers a setting changes; a
# setting not named here changes every kind's
SETTING_KINDS = {"qa_scoring": {"yesno"}, "max_new_tokens": {"generate"},
                 "max_tokens": {"choice", "yesno", "lambada", "generate"},
                 "seq_len": {"perplexity"}, "ppl_windows": {"perplexity"}}


def settings_that_differ(runs):
    """{setting: [its value in each run]} for the COMPARED_SETTINGS on which `runs` ({name: results file})
    disagree where it matters: two runs whose values differ both hold a task whose numbers the setting
    changes (SETTING_KINDS; a result without a "kind" counts as changed by every setting), or, for a setting
    SETTING_KINDS does not name (split, limit, sample, dtype, tokenizer_id), any two runs whose values differ. A
    table of such runs compares more than the models; --max-new-tokens, say, does not matter to runs
    without a generation task in common."""
    configs = {name: run.get("config") or {} for name, run in runs.items()}
    kinds = {name: {task: m.get("kind") for task, m in (run.get("results") or {}).items()} for name, run in runs.items()}

    def matters(setting, a, b):  # to a task that runs a and b both hold
        changed = SETTING_KINDS.get(setting)
        return changed is None or any(kind is None or kind in changed
                                      for t in kinds[a].keys() & kinds[b].keys() for kind in (kinds[a][t], kinds[b][t]))

    differ = {}
    for k in COMPARED_SETTINGS:
        value = {name: json.dumps(c.get(k)) for name, c in configs.items()}
        if any(value[a] != value[b] and matters(k, a, b) for a, b in itertools.combinations(runs, 2)):
            differ[k] = [c.get(k) for c in configs.values()]
    return differ


def tasks_missing(runs):
    """{run name: the tasks (and ppl_ domains) of other runs that it does not hold} for the runs that miss
    some; runs = {name: {task: metrics}}, as for results_table (whose rows show "–" there)."""
    every = list(dict.fromkeys(task for results in runs.values() for task in results))
    return {name: missing for name, results in runs.items() if (missing := [t for t in every if t not in results])}


def _fmt(x):
    return "–" if x is None else str(x) if isinstance(x, int) else f"{x:.4f}"


def results_table(runs):
    """A Markdown table comparing runs: runs = {run name: {task: metrics dict}} (`evaluate_task`'s results).

    One row per task and numeric metric (in the order first seen; not "seconds", and not the nested
    per_class / confusion dicts), one column per run; with exactly two runs a last column Δ = second
    minus first. Integers print as they are, other numbers with 4 decimals; a metric a run lacks is "–".
    """
    if not runs:
        raise ValueError("results_table got no runs")
    names = list(runs)
    rows = {}  # (task, metric) -> None, in order of appearance
    for results in runs.values():
        for task, metrics in results.items():
            for metric, value in metrics.items():
                if is_json_number(value) and metric != "seconds":
                    rows.setdefault((task, metric), None)
    delta = len(names) == 2
    lines = ["| task | metric | " + " | ".join(names) + (" | Δ |" if delta else " |"),
             "|---|---|" + "---:|" * (len(names) + delta)]
    for task, metric in rows:
        values = [runs[name].get(task, {}).get(metric) for name in names]
        values = [v if is_json_number(v) else None for v in values]
        cells = [_fmt(v) for v in values]
        if delta:
            a, b = values
            cells.append("–" if a is None or b is None else f"{b - a:+d}" if isinstance(a, int) and isinstance(b, int)
                         else f"{b - a:+.4f}")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

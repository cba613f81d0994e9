"""Evaluation: held-out perplexity per domain.

Perplexity is exp(mean negative log-likelihood per token): the model scores every target token of a
fixed set of windows, the NLLs are summed over *all* scored tokens of the domain and divided by their
number, and the exponential is taken last. (Averaging per-batch perplexities or per-batch losses
instead would weight batches, not tokens.) Each window is read on its own, from an empty state, so
a token's context is at most seq_len tokens; the same windows are used at every evaluation of a run
(see `minimamba.sampler.heldout_windows`), which makes the numbers comparable along the run and
between runs with the same --seq-len and --eval-windows.

The softmax runs over the model's whole (padded) output layer, as in training; perplexities are
only comparable between models that share a tokenizer.
"""

import math
import sys

import torch
import torch.nn.functional as F

from minimamba.sampler import heldout_windows


@torch.no_grad()
def token_nll(model, windows, batch_size=8, device="cpu", autocast_dtype=None):
    """(sum of NLL, number of scored tokens) over windows (n, seq_len + 1)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
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


def _summary(total, count):
    """{"loss": mean token NLL (nats), "ppl": exp(loss), "tokens": tokens scored} from the sums.

    A loss above ~709.8 nats (a diverging model) has a perplexity beyond the largest float: it is
    inf, as is that of an infinite loss; a NaN loss gives a NaN perplexity.
    """
    loss = total / count
    return {"loss": loss, "ppl": math.inf if loss > MAX_LOG else math.exp(loss), "tokens": count}


def perplexity(model, windows, batch_size=8, device="cpu", autocast_dtype=None):
    """{"loss": mean token NLL (nats), "ppl": exp(loss), "tokens": tokens scored} of some windows."""
    return _summary(*token_nll(model, windows, batch_size, device, autocast_dtype))


def domain_perplexity(model, windows_by_domain, batch_size=8, device="cpu", autocast_dtype=None, dist=None):
    """Perplexity of each domain: {domain: {"loss", "ppl", "tokens"}}.

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
        results[domain] = _summary(total, count)
    return results


def load_heldout(data_dir, domains, seq_len, max_windows=None):
    """{domain: held-out windows} for `domain_perplexity`, read once at the start of a run."""
    return {d: heldout_windows(data_dir, d, seq_len, max_windows) for d in domains}

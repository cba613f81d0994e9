"""The paper's experiment in miniature, on a CPU in under 10 minutes:

    python -m minimamba.miniature --data-root ../shared/data --out runs/miniature

BioMamba continues the pretraining of a general-text model on 80% PubMed + 10% C4 + 10% Wikipedia, and
the PubMed perplexity falls while C4 stays where it was and Wikipedia does not get worse. Here:

  1. prepare   the small public corpora in --data-root with `minimamba.data` (PubMed abstracts, C4 and
               Wikipedia/WikiText documents; each split into train and held-out by a hash of the text);
  2. general   pretrain a 4-layer, 128-wide Mamba2 from random weights on C4 + Wikipedia (50/50 by tokens),
               200 steps of 8×256 tokens at an LR of 2e-4 (after a 10-step warmup; lower layers less, by the
               recipe's layer-wise decay): the "before" model;
  3. continue  from it, with the same training code as train.py, three ways (140 steps each, the same
               tokens per step, the general data in a new order: about half of the Wikipedia windows and a
               tenth of the C4 windows it draws were seen in step 2; a fresh optimizer as from a public
               checkpoint):
                 mix    80/10/10 at 2e-4 (the recipe: a gentle LR and a general share);
                 pubmed PubMed only at 2e-4 (ablation: no general share);
                 lr1e-3 80/10/10 at 1e-3 (ablation: an aggressive LR);
  4. report    held-out perplexity per domain (every held-out window, ~300 of 256 tokens per domain) for
               every row: a table (stdout, miniature.md), the numbers (miniature.json, keyed by row and
               domain, with which parts of the target hold) and a plot (miniature.png, needs matplotlib).

What is and is not like the paper. The public checkpoints are trained to convergence on far more text
than a CPU sees in minutes; this "before" model is not: trained longer on the same general text it keeps
improving. So two things move the general perplexities during continued pretraining: the general share
(and the English that PubMed shares with it) keeps teaching general language, and the shift towards
PubMed pulls them up (the first ~10 steps of a fresh AdamW cost C4 and Wikipedia 8–11%). The recipe row is
where the two balance; the PubMed-only row shows what the general share protects. (The 5× higher LR is,
for this still-learning model, mostly faster learning on every domain: see the README.) The balance is
calibrated (the general LR and length, the 140 steps): it is a demonstration of the mechanism at this
scale, not a measurement of the paper's numbers. Calibration runs are described in the README.

One simplification keeps it fast: the output layer of a 128-wide model over GPT-NeoX's 50,277 tokens
would be 94% of the compute, so the token files are remapped to the 8,191 most frequent ids of the
training text (88% of the tokens) plus one shared "rare" id. Perplexities are therefore over this
8,192-id vocabulary: comparable between the rows, not with full-vocabulary models. EMA is off: the runs
are a few hundred steps, fewer than an EMA of 0.999 averages over.
"""

import os

# On a shared machine, OpenMP threads that spin while they wait for each other steal the cores the
# other threads need (2 threads ran slower than 1 here); a passive wait avoids it. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from minimamba import data  # noqa: E402
from minimamba.config import Mamba2Config  # noqa: E402
from minimamba.model import Mamba2LM  # noqa: E402
from minimamba.training import TrainConfig, latest_checkpoint, pyplot, train  # noqa: E402

DOMAINS = ("pubmed", "c4", "wikipedia")
VOCAB = 8192  # ids kept: the 8,191 most frequent + one "rare" id
# where each domain comes from, relative to --data-root: (path, read_documents options)
SOURCES = {
    "pubmed": [("pubmed/pubtator_corpora_abstracts.jsonl", {"template": data.PUBMED_TEMPLATE})],
    "c4": [("c4/c4_train_sample_1000.jsonl", {}), ("c4/llamafactory_c4_demo.jsonl", {}),
           ("c4/c4_validation_2k.jsonl", {})],
    "wikipedia": [("wiki/wikitext-2-raw_wiki.test.raw", {"text_unit": "wikitext"}),
                  ("wiki/llamafactory_wiki_demo.txt", {"text_unit": "line"})],
}
HELDOUT_FRACTION = {"pubmed": 0.05, "c4": 0.05, "wikipedia": 0.1}  # ~75-80k held-out tokens each
SEQ_LEN, BATCH = 256, 8  # tokens per window, windows per optimizer step
GENERAL_LR = 2e-4  # the general pretraining's LR, constant after a 10-step warmup (see the module docstring)

# the rows of the table after the "before" row: name -> (mix, LR, what it shows)
ROWS = {
    "mix": ("pubmed=0.8,c4=0.1,wikipedia=0.1", 2e-4, "80/10/10 at lr 2e-4 (the recipe)"),
    "pubmed": ("pubmed=1", 2e-4, "PubMed only at lr 2e-4 (no general share)"),
    "lr1e-3": ("pubmed=0.8,c4=0.1,wikipedia=0.1", 1e-3, "80/10/10 at lr 1e-3 (aggressive)"),
    "general-only": ("c4=0.5,wikipedia=0.5", 2e-4, "C4+Wikipedia only at lr 2e-4 (reference: no domain shift)"),
}
DEFAULT_ROWS = ("mix", "pubmed", "lr1e-3")


def model_config():
    return Mamba2Config.from_scale("micro", vocab_size=VOCAB)  # d_model 128, 4 layers, d_state 32, headdim 32


# ----------------------------------------------------------------------------------------------------------
# 1. data


MARKER = ".minimamba-miniature"  # in --out: the folder is this script's, to replace on the next run


def check_data_root(data_root):
    """The tokenizer and the corpus files under data_root, or a DataError naming the missing ones."""
    data_root = Path(data_root)
    tokenizer_path = data_root / "tokenizer" / "tokenizer.json"
    missing = [str(data_root / p) for d in DOMAINS for p, _ in SOURCES[d] if not (data_root / p).is_file()]
    if not tokenizer_path.is_file():
        missing.insert(0, str(tokenizer_path))
    if missing:
        raise data.DataError(f"--data-root {data_root}: missing {', '.join(missing)}. Point --data-root (or "
                             "$MINIMAMBA_DATA) at the shared data folder that holds pubmed/, c4/, wiki/ and tokenizer/")
    return tokenizer_path


def prepare(data_root, out):
    """DIR/tokens-full/<domain> (GPT-NeoX ids) and DIR/tokens/<domain> (the reduced vocabulary)."""
    data_root = Path(data_root)
    tokenizer_path = check_data_root(data_root)
    from minimamba.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    raw, full, small = out / "raw", out / "tokens-full", out / "tokens"
    raw.mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        # several files with different layouts -> one JSON-lines file, so one `prepare` splits them all
        combined = raw / f"{domain}.jsonl"
        with open(combined, "w") as f:
            for path, options in SOURCES[domain]:
                for doc in data.read_documents(data_root / path, **options):
                    f.write(json.dumps({"text": doc.text}) + "\n")
        data.prepare(domain, [combined], tokenizer, full, heldout_fraction=HELDOUT_FRACTION[domain])

    # keep the VOCAB-1 most frequent ids of the training text (EOS = 0 among them), the rest -> one id
    counts = sum(np.bincount(data.load_split(full, d, "train"), minlength=tokenizer.vocab_size) for d in DOMAINS)
    rank = counts.copy()
    rank[tokenizer.eos_id] = counts.max() + 1  # (EOS kept whatever its count)
    kept = np.argsort(-rank, kind="stable")[: VOCAB - 1]
    new_id = np.full(tokenizer.vocab_size, VOCAB - 1, dtype=np.uint16)  # VOCAB-1 = "rare"
    new_id[kept] = np.arange(VOCAB - 1, dtype=np.uint16)
    assert new_id[tokenizer.eos_id] == 0
    for domain in DOMAINS:
        (small / domain).mkdir(parents=True, exist_ok=True)
        for split in data.SPLITS:
            new_id[data.load_split(full, domain, split)].tofile(small / domain / f"{split}.bin")
        meta = data.read_meta(full, domain)
        meta["tokenizer"] = {"name": f"{tokenizer_path} remapped to {VOCAB} ids (see vocab.npy)",
                             "vocab_size": VOCAB, "eos_id": 0, "file": None}  # (no tokenizer.json gives these ids)
        (small / domain / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    np.save(small / "vocab.npy", kept)  # new id i <- GPT-NeoX id kept[i]; every other id -> VOCAB-1
    covered = counts[kept].sum() / counts.sum()
    print(f"vocabulary: {VOCAB - 1} most frequent ids + 1 rare id cover {covered:.1%} of the training tokens")
    return small


# ----------------------------------------------------------------------------------------------------------
# 2.-3. training


def run_config(tokens, out, **kw):
    """The settings shared by every run of the miniature (the recipe's optimizer, a small batch)."""
    base = TrainConfig(
        data=str(tokens), seq_len=SEQ_LEN, batch_size=BATCH, grad_accum=1, weight_decay=0.1, llrd=0.95,
        beta1=0.9, beta2=0.95, grad_clip=1.0, ema=0.0, eval_every=0, eval_at_start=False, eval_domains=",".join(DOMAINS),
        eval_windows=None, eval_batch_size=16,  # every held-out window (~300 per domain)
        save_every=0, keep=1, out=str(out), device="cpu", backend="torch", dtype="float32", seed=0,
        progress=sys.stderr.isatty(),
    )
    return replace(base, **kw)


def general_pretraining(tokens, out, steps, **kw):
    cfg = run_config(tokens, out / "general", init="scratch", mix="c4=0.5,wikipedia=0.5", lr=GENERAL_LR,
                     schedule="constant", warmup=0.05, max_steps=steps, **kw)
    model = Mamba2LM(model_config(), backend="torch")
    model.reset_parameters(seed=0)
    return train(cfg, model=model)


def continued_pretraining(tokens, out, start, row, steps, **kw):
    mix, lr, _ = ROWS[row]
    # seed 1: the general windows are drawn in another order than in the general phase; about half of the
    # Wikipedia windows and a tenth of the C4 windows it draws were seen there (the general phase went
    # through about half of Wikipedia's and less of C4's)
    cfg = run_config(tokens, out / f"cpt-{row}", init=str(start), mix=mix, lr=lr, schedule="constant",
                     warmup=min(10, steps), max_steps=steps, seed=1, **kw)
    return train(cfg)


# ----------------------------------------------------------------------------------------------------------
# 4. report


def perplexities(result):
    return {d: result["eval"][d]["ppl"] for d in DOMAINS if d in result["eval"]}


def table(ppl, before="before"):
    lines = ["| row | " + " | ".join(f"{d} ppl (change)" for d in DOMAINS) + " |",
             "|---|" + "---|" * len(DOMAINS)]
    for row, values in ppl.items():
        label = "general model (before)" if row == before else ROWS[row][2]
        cells = [f"{values[d]:.2f}" + ("" if row == before else f" ({values[d] / ppl[before][d] - 1:+.1%})")
                 for d in DOMAINS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(ppl, path, before="before"):
    plt = pyplot()
    if plt is None:
        return False
    rows = [r for r in ppl if r != before]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        change = [100 * (ppl[row][d] / ppl[before][d] - 1) for d in DOMAINS]
        bars = ax.bar(np.arange(len(DOMAINS)) + (i - (len(rows) - 1) / 2) * width, change, width, label=ROWS[row][2])
        ax.bar_label(bars, fmt="%+.0f%%", fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhspan(-3, 3, color="grey", alpha=0.2, label="±3%")
    ax.axhline(-50, color="grey", ls="--", lw=0.8, label="-50% (PubMed target)")
    ax.set_xticks(range(len(DOMAINS)), [f"{d} held-out" for d in DOMAINS])
    ax.set_ylabel("perplexity change vs the general model (%)")
    ax.set_title("Continued pretraining of a general 4-layer Mamba2 (CPU miniature)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def check_target(ppl, before="before", row="mix"):
    change = {d: ppl[row][d] / ppl[before][d] - 1 for d in DOMAINS}
    return {"pubmed_at_most_half": change["pubmed"] <= -0.5, "c4_within_3pct": abs(change["c4"]) <= 0.03,
            "wikipedia_not_worse": change["wikipedia"] <= 0.0}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minimamba.miniature", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=data.shared_data_dir(),
                   help="folder with pubmed/, c4/, wiki/, tokenizer/ (default: $MINIMAMBA_DATA, else shared/data "
                        "beside the clone; here %(default)s)")
    p.add_argument("--out", default="runs/miniature", help="output folder (replaced)")
    p.add_argument("--general-steps", type=int, default=200,
                   help=f"steps of general pretraining ({BATCH}×{SEQ_LEN} tokens each)")
    p.add_argument("--cpt-steps", type=int, default=140, help="steps of each continued-pretraining row")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"continued-pretraining rows to run, from: {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="held-out windows per domain (default: all of them, ~300)")
    args = p.parse_args(argv)
    rows = list(dict.fromkeys(r.strip() for r in args.rows.split(",") if r.strip()))  # (once each, in order)
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        p.error(f"unknown row(s) {', '.join(unknown) or repr(args.rows)}; choose from {', '.join(ROWS)}")
    for name in ("general_steps", "cpt_steps", "threads", "eval_windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file, not a folder: choose an empty or new folder")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        p.error(f"--out {out} holds files that this script did not write, and it replaces its folder: "
                "choose an empty or new folder")
    try:
        check_data_root(args.data_root)  # before anything is deleted
    except data.DataError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    start = time.time()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by python -m minimamba.miniature; --out replaces this folder\n")

    tokens = prepare(args.data_root, out)
    kw = dict(eval_windows=args.eval_windows)
    ppl = {"before": perplexities(general_pretraining(tokens, out, args.general_steps, **kw))}
    start_ckpt = latest_checkpoint(out / "general")
    for row in rows:
        ppl[row] = perplexities(continued_pretraining(tokens, out, start_ckpt, row, args.cpt_steps, **kw))

    wall = time.time() - start
    md = table(ppl)
    target = check_target(ppl) if "mix" in ppl else None
    result = {
        "perplexity": ppl,  # row -> domain -> held-out perplexity ("before" = the general model)
        "change_vs_before": {r: {d: v[d] / ppl["before"][d] - 1 for d in DOMAINS} for r, v in ppl.items()},
        "rows": {"before": "general model (before continued pretraining)", **{r: ROWS[r][2] for r in rows}},
        "target": target,
        "setup": {"model": model_config().to_dict(), "vocab": VOCAB, "seq_len": SEQ_LEN, "batch": BATCH,
                  "general_lr": GENERAL_LR, "general_steps": args.general_steps, "cpt_steps": args.cpt_steps,
                  "general_tokens": args.general_steps * BATCH * SEQ_LEN,
                  "cpt_tokens": args.cpt_steps * BATCH * SEQ_LEN, "threads": args.threads,
                  "eval_windows": args.eval_windows or "all"},
        "wall_time_s": round(wall, 1),
    }
    (out / "miniature.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "miniature.md").write_text(md + "\n")
    plotted = plot(ppl, out / "miniature.png")
    print("\n" + md + "\n")
    if target is not None:
        print("target (80/10/10 row): " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in target.items()))
    print(f"wrote {out / 'miniature.json'}, {out / 'miniature.md'}"
          f"{', ' + str(out / 'miniature.png') if plotted else ' (pip install matplotlib for the plot)'}; "
          f"wall time {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

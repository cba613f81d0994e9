"""Evaluate a Mamba2 checkpoint: the BioMamba recipe's downstream tasks and per-domain perplexity.

    python -m minimamba.tasks download all --out data/tasks          # first: the tasks' public files
    python eval.py --model state-spaces/mamba2-370m --tasks pubmedqa,mc,clinical --task-data data/tasks \
        --out results/mamba2-370m.json                                # (bioasq too once its files are there)
    python eval.py --model runs/bio-370m/step-010000 --tasks pubmedqa,mc --ppl-data data/tokens --out results/bio-370m.json
    python eval.py --compare results/mamba2-370m.json results/bio-370m.json     # a Markdown table, with Δ

--tasks takes task names (`python -m minimamba.tasks list`) and the groups
    qa        pubmedqa, bioasq                                    (yes/no accuracy and macro-F1)
    mc        arc_easy, arc_challenge, hellaswag, piqa, winogrande, openbookqa, lambada   (out-of-domain)
    clinical  note_completion, note_summary                       (ROUGE-1/2/L of greedy generations)
    all       all of them (BioASQ's files need a registration: see `python -m minimamba.tasks download bioasq`)
    mimic     mimic_completion, mimic_discharge: the recipe's own clinical tasks on MIMIC-IV-Note discharge notes
              (credentialed: bring your copy, see `python -m minimamba.tasks download mimic_completion`; not in all)
The protocols (prompts, scoring, splits) are in minimamba/tasks.py and minimamba/evaluate.py. --ppl-data adds the
held-out perplexity (and bits per byte) of each domain of a token directory (`python -m minimamba.data prepare`),
as train.py measures it; the token files must have been prepared with the model's tokenizer (checked).
The resolved configuration and every result go to --out (JSON, written atomically); --predictions also writes each
item's prediction (JSON lines) for error analysis; both are rewritten after every task, so a run stopped
later keeps what it measured. Exit status: 0 done, 2 bad setup (a message says what to fix).
"""

import argparse
import json
import sys
from pathlib import Path

from minimamba.data import DataError, check_prepared_with
from minimamba.download import DownloadError
from minimamba.evaluate import (RECIPE_QA_SCORING, domain_perplexity, evaluate_task, load_heldout, read_results,
                                results_table, settings_that_differ, tasks_missing)
from minimamba.files import json_line, sha256_of, write_json_atomically, write_text_atomically
from minimamba.hub import CheckpointError, from_pretrained
from minimamba.model import gpu_too_old
from minimamba.sampler import check_domains
from minimamba.tasks import GROUPS, TASKS, TaskDataError, load_task, task_files
from minimamba.tokenizer import DEFAULT_TOKENIZER, checkpoint_tokenizer, load_tokenizer
from minimamba.training import HelpFormatter, SetupError, resolve_autocast, resolve_device

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
p.add_argument("--model", default="state-spaces/mamba2-370m", help="a Hub repo id or a checkpoint directory")
p.add_argument("--tokenizer", default=None,
               help=f"tokenizer.json, its directory or a Hub id (default: the model directory's, else {DEFAULT_TOKENIZER})")
p.add_argument("--tasks", default="all", help="comma-separated task names and groups (qa, mc, clinical, all, mimic); '' for none")
p.add_argument("--task-data", default=None, help="directory of the tasks' files (default: $MINIMAMBA_TASK_DATA if "
               "set, else data/tasks in the current directory)")
p.add_argument("--split", default="test", help="which split of each task to score")
p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task (a quick look)")
p.add_argument("--sample", type=int, default=None, help="score N items of each task drawn at random (the same N on "
               "every run: those whose ids hash lowest), as the recipe scored 500 MIMIC-IV-Note notes per task")
p.add_argument("--qa-scoring", choices=["logprob", "generate", "recipe"], default="logprob",
               help="yes/no tasks: compare the answers' log-probabilities, or generate and read the first word, or "
               "as the recipe did: PubMedQA by log-probabilities, BioASQ by generation")
p.add_argument("--max-new-tokens", type=int, default=128, help="generation tasks: greedy tokens per answer")
p.add_argument("--max-tokens", type=int, default=None,
               help="the most tokens the model reads: longer contexts and generation prompts lose tokens on the left")
p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
p.add_argument("--ppl-data", default=None, help="token directory (DIR/<domain>/heldout.bin): held-out perplexity and bits per byte too")
p.add_argument("--ppl-domains", default="pubmed,c4,wikipedia", help="domains of --ppl-data to score")
p.add_argument("--seq-len", type=int, default=1024, help="perplexity: tokens per held-out window")
p.add_argument("--ppl-windows", type=int, default=None, help="perplexity: at most this many windows per domain (default all)")
p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
               help="compute dtype: auto = bfloat16 autocast on a GPU of compute capability 8.0 or newer, "
                    "float32 elsewhere (weights stay float32)")
p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto", help="SSD scan (auto: triton on a GPU it supports)")
p.add_argument("--out", default=None, help="results JSON (default: print only)")
p.add_argument("--predictions", default=None, help="also write every item's prediction here (JSON lines)")
p.add_argument("--compare", nargs="+", metavar="RESULTS", help="print a Markdown table of these results files and exit")
args = p.parse_args()


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if args.compare:  # no model: a table of earlier runs
    runs = {}
    for k, path in enumerate(args.compare):
        try:
            runs[path if path not in runs else f"{path} ({k + 1})"] = read_results(path)
        except ValueError as e:
            fail(str(e))
    for setting, values in settings_that_differ(runs).items():
        print(f"note: the runs differ in --{setting.replace('_', '-')} ({' vs '.join(map(str, values))}): their "
              "numbers compare more than the models", file=sys.stderr)
    results = {name: run["results"] for name, run in runs.items()}
    for name, missing in tasks_missing(results).items():
        print(f"note: {name} has no {', '.join(missing)} (– in its column)", file=sys.stderr)
    print(results_table(results))
    sys.exit(0)

# 1. what to run, checked before anything slow
names = []
for part in (t.strip() for t in args.tasks.split(",")):
    for name in GROUPS.get(part, [part] if part else []):
        if name not in TASKS:
            fail(f"unknown task {name!r}; choose from {', '.join(TASKS)} or a group: {', '.join(GROUPS)}")
        if name not in names:
            names.append(name)
if not names and not args.ppl_data:
    fail("nothing to evaluate: give --tasks and/or --ppl-data")
if args.limit is not None and args.sample is not None:
    fail("give --limit (the first N items) or --sample (N drawn at random), not both")
for name, value in (("limit", args.limit), ("sample", args.sample), ("max-new-tokens", args.max_new_tokens),
                    ("max-tokens", args.max_tokens), ("batch-size", args.batch_size), ("seq-len", args.seq_len),
                    ("ppl-windows", args.ppl_windows)):
    if value is not None and value < 1:
        fail(f"--{name} must be at least 1, got {value}")
try:
    device = resolve_device(args.device)
    amp = resolve_autocast(args.dtype, device)  # (None: float32)
except SetupError as e:
    fail(str(e))
if too_old := gpu_too_old(device):  # (what --dtype auto and --backend auto choose there, and why)
    print(f"note: {too_old}: computing in float32, with the torch scan unless --backend triton", file=sys.stderr)

for path in (args.out, args.predictions):  # where the results go: made now, not after an hour of scoring
    if path:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"cannot write {path}: {e}")
        if Path(path).is_dir():
            fail(f"{path} is a directory; give a file name")

# 2. the items of every task and the held-out windows (a missing file fails now, not after an hour of scoring)
try:
    items = {name: load_task(name, args.split, args.task_data, args.limit, args.sample) for name in names}
    # what was read, by content: the results say which files they come from
    paths = {name: list(map(str, task_files(name, args.split, args.task_data))) for name in names}
    hashes = {path: sha256_of(path) for path in dict.fromkeys(p for found in paths.values() for p in found)}
    files_read = {name: {path: hashes[path] for path in found} for name, found in paths.items()}  # (a file once)
except (TaskDataError, DataError, OSError) as e:
    fail(str(e))
heldout = {}
if args.ppl_data:
    domains = [d.strip() for d in args.ppl_domains.split(",") if d.strip()]
    if not domains:
        fail("--ppl-data needs at least one domain in --ppl-domains")
    try:
        check_domains(args.ppl_data, domains, "heldout", "--ppl-domains")  # (names the domains there)
        heldout = load_heldout(args.ppl_data, domains, args.seq_len, args.ppl_windows)
    except (DataError, OSError) as e:
        fail(str(e))

# 3. the tokenizer (the token files must be its ids, or their perplexity means nothing), then the model
try:
    tokenizer_source = args.tokenizer or checkpoint_tokenizer(args.model)
    tokenizer = load_tokenizer(tokenizer_source)
except (DownloadError, OSError, ValueError) as e:
    fail(str(e))
for domain, windows in heldout.items():
    try:
        if note := check_prepared_with(args.ppl_data, domain, tokenizer):
            print(f"note: {note}", file=sys.stderr)
    except DataError as e:
        fail(str(e))
    if len(windows) and (top := int(windows.max())) >= tokenizer.vocab_size:
        fail(f"{Path(args.ppl_data) / domain}: its held-out tokens hold id {top}, but the tokenizer ({tokenizer_source}) "
             f"has {tokenizer.vocab_size} ids: they were made by another tokenizer (give --tokenizer)")
try:
    model = from_pretrained(args.model, device=device, backend=args.backend).eval()
except (CheckpointError, DownloadError, OSError, ValueError) as e:
    fail(str(e))
if tokenizer.vocab_size > model.config.vocab_size:
    fail(f"the tokenizer ({tokenizer_source}) has {tokenizer.vocab_size} ids, the model only "
         f"{model.config.vocab_size}: they do not belong together (give --tokenizer)")

config = {k: v for k, v in vars(args).items() if k != "compare"}
config.update(tasks=names, tokenizer=tokenizer_source, device=str(device), amp=str(amp) if amp else None,
              # which tokenizer, whatever its path: the file's sha256 (a Hub id stands for itself)
              tokenizer_id=sha256_of(tokenizer.path) if Path(tokenizer_source).exists() else tokenizer_source,
              scan_backend=model.scan_backend(device), parameters=model.num_params(), task_files=files_read)
print(json.dumps(config, indent=2))

# 4. score, saving after every task (a run stopped later keeps what it measured)
if amp is not None:
    model.decode_backend = "torch"  # (the C decode step computes in float32, whatever the autocast)
results, predictions = {}, []


def save():
    if args.out:
        write_json_atomically(Path(args.out), {"model": args.model, "config": config, "results": results})
    if args.predictions:
        write_text_atomically(Path(args.predictions), "".join(map(json_line, predictions)))


for name in names:
    qa_scoring = RECIPE_QA_SCORING.get(name, "logprob") if args.qa_scoring == "recipe" else args.qa_scoring
    result = evaluate_task(model, tokenizer, TASKS[name], items[name], batch_size=args.batch_size, device=device,
                           autocast_dtype=amp, max_tokens=args.max_tokens, max_prompt_tokens=args.max_tokens,
                           max_new_tokens=args.max_new_tokens, gen_batch_size=args.batch_size, qa_scoring=qa_scoring,
                           return_predictions=args.predictions is not None)
    predictions += [{"task": name, **row} for row in result.pop("predictions", [])]
    results[name] = result
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float) and k != "seconds")
    print(f"{name:16s} n={result['n']:<6d} {shown}  ({result['seconds']:.0f} s)", flush=True)
    save()
byte_lengths = tokenizer.byte_lengths() if heldout else None  # (every id is the tokenizer's: checked in 3.)
for domain, r in domain_perplexity(model, heldout, args.batch_size, device, amp, byte_lengths=byte_lengths).items():
    # (n: the tokens scored, the "n" every result has; not repeated as "tokens", which was a second table row)
    results[f"ppl_{domain}"] = {"task": f"ppl_{domain}", "kind": "perplexity", "n": r["tokens"], "loss": r["loss"],
                                "ppl": r["ppl"], "bpb": r["bpb"]}
    bpb = "–" if r["bpb"] is None else f"{r['bpb']:.4f}"
    print(f"ppl_{domain:12s} tokens={r['tokens']:<8d} ppl {r['ppl']:.4g}  loss {r['loss']:.4f}  bits/byte {bpb}",
          flush=True)
save()

# 5. the table
print()
print(results_table({args.model: results}))
for path in (args.out, args.predictions):
    if path:
        print(f"wrote {path}")

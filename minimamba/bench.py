"""Benchmarks, one subcommand each.

    python -m minimamba.bench tokenizer [--data-root DIR]   encode speed vs HF `tokenizers` on the shared corpora
"""

import argparse
import json
import os
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def corpus_documents(data_root: Path) -> dict[str, list[str]]:
    """The pretraining-style corpora of shared/data: PubMed abstracts, C4 documents, WikiText lines."""
    def jsonl(path, text):
        with open(path, encoding="utf-8") as f:
            return [text(json.loads(line)) for line in f if line.strip()]

    def lines(path):
        with open(path, encoding="utf-8") as f:
            return [line for line in f if line.strip()]

    return {
        "PubMed": jsonl(data_root / "pubmed/pubtator_corpora_abstracts.jsonl", lambda r: r["title"] + "\n" + r["abstract"]),
        "C4": [doc for name in ("c4_train_sample_1000", "c4_validation_2k", "llamafactory_c4_demo")
               for doc in jsonl(data_root / f"c4/{name}.jsonl", lambda r: r["text"])],
        "WikiText": [doc for name in ("wikitext-2-raw_wiki.test.raw", "wikitext-2_tokenized_valid.txt", "llamafactory_wiki_demo.txt")
                     for doc in lines(data_root / f"wiki/{name}")],
    }


def bench_tokenizer(args):
    from minimamba.tokenizer import load_tokenizer

    tokenizer_json = args.tokenizer or args.data_root / "tokenizer" / "tokenizer.json"
    corpora = corpus_documents(args.data_root)
    docs = [doc for corpus in corpora.values() for doc in corpus]
    megabytes = sum(len(doc.encode("utf-8")) for doc in docs) / 1e6
    threads = args.threads or os.cpu_count()
    print(f"{len(docs):,} documents, {megabytes:.1f} MB ({', '.join(f'{k} {len(v):,}' for k, v in corpora.items())})")
    print(f"tokenizer {tokenizer_json}, {threads} threads for the batch rows, best of {args.repeat} runs\n")

    ours = load_tokenizer(tokenizer_json)
    contenders = {
        "minimamba encode": lambda: [ours.encode(d) for d in docs],
        "minimamba encode_batch": lambda: ours.encode_batch(docs, num_threads=threads),
    }
    try:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # before tokenizers starts its pool
        from tokenizers import Tokenizer

        ref = Tokenizer.from_file(str(tokenizer_json))
        contenders["HF tokenizers encode"] = lambda: [ref.encode(d).ids for d in docs]
        contenders["HF tokenizers encode_batch"] = lambda: [e.ids for e in ref.encode_batch(docs)]
    except ImportError:
        print("(HF tokenizers is not installed: no reference rows)\n")

    results = {}
    for name, run in contenders.items():
        seconds = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            ids = run()
            seconds.append(time.perf_counter() - start)
        results[name] = (min(seconds), ids)

    n_tokens = sum(map(len, results["minimamba encode"][1]))
    print(f"{'':28} {'MB/s':>8} {'Mtokens/s':>10} {'vs HF':>7}")
    for name, (secs, _) in results.items():
        mode = name.split()[-1]
        ref_secs = results.get(f"HF tokenizers {mode}", (None,))[0]
        ratio = f"{ref_secs / secs:6.2f}x" if ref_secs else ""
        print(f"{name:28} {megabytes / secs:8.2f} {n_tokens / secs / 1e6:10.3f} {ratio:>7}")
    if "HF tokenizers encode" in results:
        same = all(r[1] == results["HF tokenizers encode"][1] for r in results.values())
        print(f"\n{n_tokens:,} tokens; ids identical to the reference: {'yes' if same else 'NO'}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minimamba.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser("tokenizer", help="encode speed (MB/s, tokens/s) vs HF tokenizers")
    tok.add_argument("--data-root", type=Path, default=Path(os.environ.get("MINIMAMBA_DATA", DEFAULT_DATA)),
                     help="shared/data folder with the corpora (default: $MINIMAMBA_DATA or ../shared/data)")
    tok.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: DATA_ROOT/tokenizer/tokenizer.json)")
    tok.add_argument("--threads", type=int, help="threads for encode_batch (default: all cores)")
    tok.add_argument("--repeat", type=int, default=3, help="runs per row; the best is reported")
    tok.set_defaults(run=bench_tokenizer)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

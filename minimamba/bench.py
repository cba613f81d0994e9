"""Benchmarks, one subcommand each. Every number is measured in this run, beside its baseline.

    python -m minimamba.bench model --scale 130m [--compare-hf]   forward / train step / prefill / decode speed
                                                                 and peak memory (options without a subcommand mean
                                                                 it too: python -m minimamba.bench --scale 130m)
    python -m minimamba.bench inference --scale 130m               decode cost and state size vs context length,
                                                                 beside a same-width Transformer's KV cache
    python -m minimamba.bench tokenizer [--data-root DIR]        encode speed vs HF `tokenizers` on the shared corpora
    python -m minimamba.bench scoring --task pubmedqa            option scoring (eval.py): a shared context read once,
                                                                 beside one forward per option
The shared data (corpora, tokenizer, task files) are read from $MINIMAMBA_DATA, else from shared/data beside the clone.
Exit status: 0 done, 2 bad arguments or missing data (a message says what to fix).
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from minimamba.config import SCALES
from minimamba.data import DataError, shared_data_dir
from minimamba.tasks import TASKS, TaskDataError

# the tasks whose items are scored by their options' log-likelihoods (`score_options`): what `scoring` times
SCORED_KINDS = ("choice", "yesno", "lambada")
SCORED_TASKS = [name for name, task in TASKS.items() if task.kind in SCORED_KINDS]


# the pretraining-style corpora of shared/data, relative to it: corpus -> [(file, how a line gives a document)]
_ABSTRACT = lambda r: r["title"] + "\n" + r["abstract"]  # noqa: E731
_TEXT = lambda r: r["text"]  # noqa: E731
CORPUS_FILES = {
    "PubMed": [("pubmed/pubtator_corpora_abstracts.jsonl", _ABSTRACT)],
    "C4": [(f"c4/{name}.jsonl", _TEXT) for name in ("c4_train_sample_1000", "c4_validation_2k", "llamafactory_c4_demo")],
    "WikiText": [(f"wiki/{name}", None) for name in ("wikitext-2-raw_wiki.test.raw", "wikitext-2_tokenized_valid.txt",
                                                      "llamafactory_wiki_demo.txt")],
}


def corpus_documents(data_root: Path) -> dict[str, list[str]]:
    """The documents of `CORPUS_FILES` under data_root: a JSON record's text per line of a .jsonl file, a
    non-blank line of a text file. A missing file: DataError naming --data-root and $MINIMAMBA_DATA."""
    missing = [name for files in CORPUS_FILES.values() for name, _ in files if not (data_root / name).is_file()]
    if missing:
        raise DataError(f"--data-root {data_root}: missing {', '.join(missing)}. Point --data-root (or "
                        "$MINIMAMBA_DATA) at the shared data folder that holds pubmed/, c4/ and wiki/")

    def read(path, text):
        with open(path, encoding="utf-8") as f:
            return [line if text is None else text(json.loads(line)) for line in f if line.strip()]

    return {corpus: [doc for name, text in files for doc in read(data_root / name, text)]
            for corpus, files in CORPUS_FILES.items()}


def bench_tokenizer(args):
    """MB/s and tokens/s of encode (one thread) and encode_batch (all threads), ours beside HF
    `tokenizers` on the same documents; the runs are interleaved and the best of each is kept."""
    from minimamba.tokenizer import load_tokenizer

    tokenizer_json = args.tokenizer or args.data_root / "tokenizer" / "tokenizer.json"
    corpora = corpus_documents(args.data_root)
    docs = [doc for corpus in corpora.values() for doc in corpus]
    megabytes = sum(len(doc.encode("utf-8")) for doc in docs) / 1e6
    threads = args.threads or os.cpu_count()
    print(f"{len(docs):,} documents, {megabytes:.1f} MB ({', '.join(f'{k} {len(v):,}' for k, v in corpora.items())})")
    print(f"tokenizer {tokenizer_json}; encode_batch with {threads} threads; best of {args.repeat} runs\n")

    ours = load_tokenizer(tokenizer_json)
    rows = {
        "minimamba encode": lambda: [ours.encode(d) for d in docs],
        "minimamba encode_batch": lambda: ours.encode_batch(docs, num_threads=threads),
    }
    try:
        _give_hf_tokenizers(threads)
        from tokenizers import Tokenizer

        ref = Tokenizer.from_file(str(tokenizer_json))
        rows["HF tokenizers encode"] = lambda: [ref.encode(d).ids for d in docs]
        rows["HF tokenizers encode_batch"] = lambda: [e.ids for e in ref.encode_batch(docs)]
    except ImportError:
        print("(HF tokenizers is not installed: no reference rows)\n")

    seconds = {name: float("inf") for name in rows}
    first_ids, n_tokens, identical = None, 0, True
    for _ in range(args.repeat):
        for name, run in rows.items():
            start = time.perf_counter()
            ids = run()
            seconds[name] = min(seconds[name], time.perf_counter() - start)
            if first_ids is None:
                first_ids, n_tokens = ids, sum(map(len, ids))
            identical &= ids == first_ids
            del ids

    print(f"{'':28} {'MB/s':>7} {'tokens/s':>11} {'vs HF':>7}")
    for mode in ("encode", "encode_batch"):
        for who in ("minimamba", "HF tokenizers"):
            name = f"{who} {mode}"
            if name in seconds:
                ref_seconds = seconds.get(f"HF tokenizers {mode}")
                ratio = f"{ref_seconds / seconds[name]:.2f}x" if ref_seconds else ""
                print(f"{name:28} {megabytes / seconds[name]:7.2f} {n_tokens / seconds[name]:11,.0f} {ratio:>7}")
    print(f"\n{n_tokens:,} tokens; every row gave the same ids: {'yes' if identical else 'NO'}")


# model speed ------------------------------------------------------------------------------------------------
def _give_hf_tokenizers(threads):
    """Make HF tokenizers' batch encoding use `threads` threads, the number the benchmark prints (read when it
    starts its thread pool): a RAYON_NUM_THREADS set before, or TOKENIZERS_PARALLELISM=false (one thread),
    would time it on others."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _isolated(fn, *args):
    """Run fn(*args) in a fresh process and return (its result, that process's peak RSS in GiB), so that
    every row's peak memory is its own and not the high-water mark of an earlier row."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_with_peak_rss, fn, *args).result()


def _with_peak_rss(fn, *args):
    result = fn(*args)
    return result, _peak_rss_gib()


def _peak_rss_gib():
    """This process's peak RSS in GiB: VmHWM in /proc/self/status (Linux). Not getrusage's ru_maxrss, which Linux
    carries across exec: a spawned row reported at least its parent's peak (0.36 GiB for the benchmark's own
    process, all of a tiny row's number). Elsewhere: ru_maxrss (bytes on macOS, KiB on Linux and BSD)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):  # "VmHWM:    123456 kB"
                return int(line.split()[1]) / 2**20  # KiB -> GiB
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**30 if sys.platform == "darwin" else maxrss / 2**20


def _build(impl, scale, dtype, chunk_size, seed=0, backend="torch", device="cpu"):
    """The model to time: ours, or HF transformers' Mamba2ForCausalLM with bit-identical weights and the
    scan chunk ours uses on `device` (the result does not depend on it, the speed does: HF's default 256
    is ~1.26× slower than 64 on a 2-core CPU at 130m, so the same chunk for both)."""
    import torch

    from minimamba.config import Mamba2Config
    from minimamba.model import Mamba2LM

    torch.manual_seed(seed)
    cfg = Mamba2Config.from_scale(scale)
    ours = Mamba2LM(cfg, backend=backend)
    ours.scan_chunk_size = chunk_size  # None: the model's per-device default
    if impl == "minimamba":
        return ours.to(dtype)
    import transformers

    chunk = ours.scan_chunk(torch.device(device))
    # built on the meta device and given ours' tensors (assign=True), not a copy of them: a process that held
    # both models' weights at once would count them twice in its peak memory (RSS), against HF only
    with torch.device("meta"):
        hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg.replace(chunk_size=chunk).to_dict("hf")))
    sd = {("backbone." + k if not k.startswith("lm_head") else k): v for k, v in ours.state_dict().items()}
    sd["backbone.embeddings.weight"] = sd.pop("backbone.embedding.weight")
    hf.load_state_dict(sd, assign=True)
    hf.tie_weights()  # the head and the embedding one Parameter again, as HF's own init leaves them
    return hf.to(dtype)


def hf_path():
    """What HF's Mamba2 computes with here, said once in the header (each phase's process would print
    transformers' own warning about it): its PyTorch path for the conv and the scan, unless mamba_ssm and
    causal_conv1d (CUDA kernels) are installed."""
    import importlib.util

    import transformers

    missing = [m for m in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"HF: transformers {transformers.__version__}, its PyTorch path for the conv and the scan "
                f"({' and '.join(missing)} not installed)")
    return f"HF: transformers {transformers.__version__}, with mamba_ssm and causal_conv1d installed"


def _set_checkpointing(model, impl, on):
    """Activation checkpointing of every block, ours or HF's (HF's blocks ignore a model-level
    `gradient_checkpointing` attribute: it must be switched on through its own method)."""
    if impl == "minimamba":
        model.gradient_checkpointing = on
    elif on:  # transformers >= 5.x renamed gradient_checkpointing_enable (kept as a deprecated alias)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()


def _logits(model, impl, ids):
    """The logits of `ids`. HF's model in eval mode builds a decoding cache unless told not to
    (`config.use_cache`); ours builds none in a forward, so neither does HF's here."""
    if impl == "minimamba":
        return model(ids)
    return model(ids, use_cache=False).logits


def _time(fn, repeat, sync=lambda: None):
    fn()  # warm-up (on a GPU: Triton compilation and autotuning happen here)
    seconds = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return _median(seconds)


def _median(values):
    """The middle value (the upper of the two middle ones for an even count: always a measured value)."""
    return sorted(values)[len(values) // 2]


def _prefill_and_decode(gen, n, repeat, sync):
    """(seconds of a prefill, seconds per decoded token): `gen(k)` prefills and generates k tokens. Each of
    `repeat` rounds times gen(1) and then gen(1 + n); a round's decode time is the difference, per token,
    and the medians are kept (the difference of two runs side by side: the machine's speed drifts)."""
    gen(1 + n)  # warm-up
    prefills, decodes = [], []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        gen(1)
        sync()
        t1 = time.perf_counter()
        gen(1 + n)
        sync()
        prefills.append(t1 - t0)
        decodes.append((time.perf_counter() - t1 - (t1 - t0)) / n)
    return _median(prefills), _median(decodes)


def _phase(impl, phase, a):
    import torch
    import torch.nn.functional as F

    import contextlib

    torch.set_num_threads(a["threads"])
    device = torch.device(a["device"])
    cuda = device.type == "cuda"
    if a.get("compare_hf"):  # (both processes hold transformers' code, ~0.22 GiB of RSS: not counted against HF)
        from transformers import Mamba2ForCausalLM  # noqa: F401
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # (its "falling back" warnings, once per phase's process: see hf_path)
    model = _build(impl, a["scale"], getattr(torch, a["dtype"]), a["chunk_size"], backend=a["backend"],
                   device=a["device"]).to(device)
    _set_checkpointing(model, impl, a["checkpointing"])
    if impl == "minimamba":  # (under --amp, "auto" takes the torch step: the C step computes in float32, HF in bf16)
        model.decode_backend = "torch" if a["amp"] and a["decode_backend"] == "auto" else a["decode_backend"]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # --amp: float32 weights, bfloat16 matmuls (the recipe's mixed precision)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if a["amp"] else contextlib.nullcontext
    g = torch.Generator().manual_seed(1)
    result = {}
    if phase == "forward":
        model.eval()
        ids = torch.randint(0, 50277, (a["batch"], a["seqlen"]), generator=g).to(device)
        with torch.no_grad(), amp():
            secs = _time(lambda: _logits(model, impl, ids), a["repeat"], sync)
        result = {"tok/s": a["batch"] * a["seqlen"] / secs}
    elif phase == "train":
        model.train()
        ids = torch.randint(0, 50277, (a["batch"], a["seqlen"] + 1), generator=g).to(device)
        from minimamba.training import adamw_fused

        # the same optimizer for both implementations, as train.py makes it
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=adamw_fused(device))

        def step():
            with amp():
                logits = _logits(model, impl, ids[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        secs = _time(step, a["repeat"], sync)
        result = {"tok/s": a["batch"] * a["seqlen"] / secs}
    elif phase == "generate":  # prefill = generate 1 token; decode = the extra time per extra token
        model.eval()
        prompt = torch.randint(0, 50277, (1, a["prompt"]), generator=g).to(device)
        n = a["decode_tokens"]
        if impl == "minimamba":
            gen = lambda k: model.generate(prompt, max_new_tokens=k)
        else:
            gen = lambda k: model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                           attention_mask=torch.ones_like(prompt))
        with torch.no_grad(), amp():
            prefill, decode = _prefill_and_decode(gen, n, a["repeat"], sync)
        result = {"prefill tok/s": a["prompt"] / prefill, "decode ms/token": 1000 * decode}
        if impl == "minimamba":
            result["decode step"] = model.decode_backend_used
    elif phase == "floor":  # its own process: the 2 GiB it reads must not count in the generation row's memory
        model.eval()
        prompt = torch.randint(0, 50277, (1, a["prompt"]), generator=g)
        with torch.no_grad():
            result["floor"] = _decode_vs_floor(model, prompt, a)
    if cuda:  # peak GPU memory of this row (the process's RSS is reported too, as for CPU rows)
        result["GPU peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _decode_vs_floor(model, prompt, a):
    """Decode time beside the memory-bandwidth floor (weight bytes / read bandwidth), measured in turns in one
    process: this machine's bandwidth drifts by up to 2x within minutes, so only same-moment ratios are fair.

    Each round takes the median time of `decode_tokens` steps and the median of 5 sums over a 1 GiB tensor,
    once on ordinary 4 KiB pages and once on 2 MiB pages (where Linux gives them): medians on both sides, so
    that a noisy moment weighs the same on each. The ratios are per round, reported as medians over rounds.
    """
    import statistics

    import torch

    from kernels.decode_cpu import use_huge_pages

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = model.allocate_cache(1)
    model(prompt, cache=cache, num_last_tokens=1)
    step, tok = model.decoder(1), prompt[:, -1]
    pages = {"4 KiB": torch.ones(2**28)}  # 1 GiB of float32
    huge = torch.ones(2**28)
    huge_bytes, why = use_huge_pages([huge])
    if huge_bytes > 2**29:
        pages["2 MiB"] = huge
    else:
        why = f"2 MiB pages not given: {why or f'{huge_bytes / 2**20:.0f} MiB of 1 GiB collapsed'}"
    rounds = {"decode ms/token": [], **{f"{k} GB/s": [] for k in pages}, **{f"{k} ratio": [] for k in pages}}
    for _ in range(a["floor_rounds"]):
        ms = 1000 * _time(lambda: step(tok, cache), a["decode_tokens"])
        rounds["decode ms/token"].append(ms)
        for name, t in pages.items():
            gbps = t.numel() * 4 / _time(t.sum, 5) / 1e9
            rounds[f"{name} GB/s"].append(gbps)
            rounds[f"{name} ratio"].append(ms / (weight_bytes / gbps / 1e6))
    return {"weight MiB": weight_bytes / 2**20, **{k: statistics.median(v) for k, v in rounds.items()},
            "note": None if "2 MiB" in pages else why}


def bench_model(args):
    import platform

    import torch

    a = vars(args) | {"threads": args.threads or torch.get_num_threads()}
    impls = ["minimamba"] + (["hf"] if args.compare_hf else [])
    from minimamba.config import Mamba2Config

    cfg = Mamba2Config.from_scale(args.scale)
    with torch.device("meta"):
        from minimamba.model import Mamba2LM

        n_params = Mamba2LM(cfg).num_params()
    weight_bytes = n_params * torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a['threads']} threads; mamba2-{args.scale} shapes ({n_params / 1e6:.1f}M params, "
          f"{weight_bytes / 2**20:.0f} MiB of {args.dtype} weights), random weights")
    where = f"device {args.device}" + (f": {torch.cuda.get_device_name()}" if args.device != "cpu" else "")
    print(f"{where}, scan backend {args.backend}, {'bf16 autocast' if args.amp else args.dtype}, "
          f"activation checkpointing {args.checkpointing}, decode step {args.decode_backend}")
    if args.compare_hf:
        print(hf_path())
    print(f"forward / train step: batch {args.batch} x {args.seqlen} tokens; prefill: 1 x {args.prompt}; "
          f"decode: batch 1; scan chunk {args.chunk_size or 'default'}; median of {args.repeat}\n")
    rows, floor, decode_step = {}, None, None
    for phase in args.phases.split(","):
        for impl in impls:
            result, peak = _isolated(_phase, impl, phase, a)
            decode_step = result.pop("decode step", decode_step)
            for k, v in result.items():
                rows.setdefault((phase, k), {})[impl] = v
            rows.setdefault((phase, "peak GiB"), {})[impl] = peak
    if args.device == "cpu" and args.floor_rounds and "generate" in args.phases.split(","):
        floor = _isolated(_phase, "minimamba", "floor", a)[0]["floor"]
    print(f"{'':32} {'minimamba':>11}" + (f" {'HF':>11} {'ratio':>7}" if args.compare_hf else ""))
    for (phase, metric), v in rows.items():
        name = f"{phase} {metric}" if phase != "generate" else metric
        line = f"{name:32} {v['minimamba']:11.2f}"
        if "hf" in v:
            better = v["hf"] / v["minimamba"] if ("ms" in metric or "GiB" in metric) else v["minimamba"] / v["hf"]
            line += f" {v['hf']:11.2f} {better:6.2f}x"
        print(line)
    if args.compare_hf:
        print("ratio: how many times better minimamba is (speed: ours/HF; time and memory: HF/ours)")
    if decode_step:
        print(f"minimamba decode step: {decode_step[0]} ({decode_step[1]})")
    if floor:
        print(f"\ndecode vs the bandwidth floor ({floor['weight MiB']:.0f} MiB of weights read once per token), "
              f"{args.floor_rounds} interleaved rounds, medians: decode {floor['decode ms/token']:.1f} ms/token")
        for pages in ("4 KiB", "2 MiB"):
            if f"{pages} ratio" in floor:
                gbps = floor[f"{pages} GB/s"]
                print(f"  read bandwidth on {pages} pages {gbps:5.1f} GB/s -> floor "
                      f"{floor['weight MiB'] * 2**20 / gbps / 1e6:5.1f} ms/token; decode = "
                      f"{floor[f'{pages} ratio']:.2f}x the floor")
        if floor["note"]:
            print(f"  ({floor['note']})")
    if args.json:
        out = {"scale": args.scale, "dtype": args.dtype, "amp": args.amp, "checkpointing": args.checkpointing,
               "batch": args.batch, "seqlen": args.seqlen, "prompt": args.prompt, "threads": a["threads"],
               "decode_step": decode_step,
               "decode_vs_floor": floor, "rows": {f"{p} {m}": v for (p, m), v in rows.items()}}
        Path(args.json).write_text(json.dumps(out, indent=2))


def _inference_cost(a):
    import torch

    from minimamba.model import Mamba2LM

    torch.set_num_threads(a["threads"])
    model = _build("minimamba", a["scale"], torch.float32, a["chunk_size"]).eval()
    assert isinstance(model, Mamba2LM)
    cfg, rows = model.config, []
    g = torch.Generator().manual_seed(0)
    for context in a["contexts"]:
        prompt = torch.randint(0, 50277, (1, context), generator=g)
        cache = model.allocate_cache(1)
        with torch.no_grad():
            model(prompt, cache=cache, num_last_tokens=1)
            tok, step = prompt[:, -1], model.decoder(1)
            for _ in range(3):
                step(tok, cache)
            start = time.perf_counter()
            for _ in range(a["decode_tokens"]):
                step(tok, cache)
            ms = 1000 * (time.perf_counter() - start) / a["decode_tokens"]
        kv = 2 * cfg.n_layer * cfg.d_model * context * 4  # K and V, every layer, float32
        rows.append({"context": context, "decode ms/token": ms, "state bytes": cache.nbytes(), "kv bytes": kv,
                     "decode step": model.decode_backend_used[0]})
    return rows


def bench_inference(args):
    import torch

    a = vars(args) | {"threads": args.threads or torch.get_num_threads()}
    rows, _ = _isolated(_inference_cost, a)
    print(f"mamba2-{args.scale} shapes, float32, batch 1, {a['threads']} threads, decode step "
          f"{rows[0]['decode step']}: decode cost after a prefill of each context length")
    print(f"{'context':>8} {'decode ms/token':>16} {'Mamba2 state':>13} {'Transformer KV cache':>21}")
    for r in rows:
        print(f"{r['context']:>8} {r['decode ms/token']:16.1f} {r['state bytes'] / 2**20:10.1f} MiB"
              f" {r['kv bytes'] / 2**20:18.1f} MiB")
    print("KV cache of a same-width Transformer: 2 (K, V) x n_layer x d_model x context x 4 bytes")


def bench_scoring(args):
    """Seconds to score a task's options with `score_options` (each distinct context read once, its state
    copied for every option) beside the plain way (one forward of context + continuation per option), and the
    largest difference of the log-likelihoods they give. Random weights: the speed does not depend on them."""
    import torch

    from minimamba.config import Mamba2Config
    from minimamba.evaluate import encode_option, score_options
    from minimamba.model import Mamba2LM
    from minimamba.tasks import load_task
    from minimamba.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    items = load_task(args.task, "test", args.task_data, args.items)
    tokenizer = load_tokenizer(args.tokenizer or args.data_root / "tokenizer" / "tokenizer.json")
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config.from_scale(args.scale)).to(args.device).eval()
    V = model.config.vocab_size

    @torch.no_grad()
    def one_forward_per_option():
        out = []
        for item in items:
            for context, continuation in item.options:
                ctx, cont = encode_option(tokenizer, context, continuation)
                ids = torch.tensor([ctx + cont[:-1]], device=args.device)  # (1, l_ctx + l_cont - 1)
                logp = model(ids)[0, len(ctx) - 1 :, :V].float().log_softmax(-1)  # (l_cont, V)
                out.append(logp.gather(-1, torch.tensor(cont, device=args.device)[:, None]).sum().item())
        return out

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    shared, plain = {}, {}
    t_shared = _time(lambda: shared.update(s=score_options(model, tokenizer, items, args.batch_size, args.device)),
                     args.repeat, sync)
    t_plain = _time(lambda: plain.update(s=one_forward_per_option()), args.repeat, sync)
    flat = [s[0] for options in shared["s"] for s in options]
    options = len(flat)
    tokens = sum(len(c) + len(o) for item in items for c, o in
                 (encode_option(tokenizer, *option) for option in item.options))
    print(f"{args.task}: {len(items)} items, {options} options, {tokens:,} tokens read the plain way; "
          f"mamba2-{args.scale} shapes, random weights, {args.device}, float32, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size} options, median of {args.repeat}")
    print(f"{'one forward per option':>28}: {t_plain:8.2f} s  ({1e3 * t_plain / len(items):7.1f} ms/item)")
    print(f"{'shared context (score_options)':>28}: {t_shared:8.2f} s  ({1e3 * t_shared / len(items):7.1f} ms/item)"
          f"  {t_plain / t_shared:.2f}x")
    print(f"largest |difference| of the summed log-likelihoods: {max(abs(a - b) for a, b in zip(flat, plain['s'])):.2e}")


PHASES = ("forward", "train", "generate")


def _integer_at_least(low):
    """argparse type: an integer >= low."""
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # (argparse names it in "invalid ... value: 'x'")
    return parse


_positive, _nonnegative = _integer_at_least(1), _integer_at_least(0)


def _contexts(text):
    """argparse type: comma-separated context lengths, each >= 1."""
    try:
        values = [int(c) for c in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, got {text!r}")
    return values


def _device(text):
    """argparse type: "cpu", "cuda" or "cuda:N" (the devices the benchmarks run on)."""
    if text == "cpu" or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu or cuda (cuda:N for one of several GPUs), got {text!r}")


def _scored_task(name):
    """argparse type: the name of a task of minimamba.tasks whose kind is one of SCORED_KINDS."""
    if name not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {name!r}; choose from {', '.join(SCORED_TASKS)}")
    if name not in SCORED_TASKS:
        raise argparse.ArgumentTypeError(f"{name} is a {TASKS[name].kind} task, not scored by its options; "
                                         f"choose from {', '.join(SCORED_TASKS)}")
    return name


_scored_task.__name__ = "task"  # (argparse names it in "invalid ... value: 'x'")


def _phases(text):
    """argparse type: a comma-separated subset of PHASES."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PHASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {unknown or text!r}; choose from {', '.join(PHASES)} "
                                         "(generate gives the prefill and decode rows)")
    return ",".join(names)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minimamba.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser("tokenizer", help="encode speed (MB/s, tokens/s) vs HF tokenizers")
    tok.add_argument("--data-root", type=Path, default=shared_data_dir(),
                     help="shared/data folder with the corpora (default: $MINIMAMBA_DATA, else shared/data beside "
                          "the clone; here %(default)s)")
    tok.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: DATA_ROOT/tokenizer/tokenizer.json)")
    tok.add_argument("--threads", type=_positive, help="threads for encode_batch (default: all cores)")
    tok.add_argument("--repeat", type=_positive, default=3, help="runs per row; the best is reported")
    tok.set_defaults(run=bench_tokenizer)

    def speed_options(p):
        p.add_argument("--scale", default="130m", choices=list(SCALES),
                       help="model shapes (Mamba2Config.from_scale), random weights")
        p.add_argument("--chunk-size", type=_positive, default=None,
                       help="chunk of the SSD scan (default: the model's per-device one, 64 for the torch scan on "
                            "a CPU, else the config's; the result is the same for any)")
        p.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's choice)")
        p.add_argument("--decode-tokens", type=_positive, default=64,
                       help="tokens decoded per timing (default: %(default)s)")

    mod = commands.add_parser("model", help="forward, train-step, prefill and decode speed; peak memory")
    speed_options(mod)
    mod.add_argument("--batch", type=_positive, default=4,
                     help="sequences per call of the forward and train-step rows (default: %(default)s)")
    mod.add_argument("--seqlen", type=_positive, default=256,
                     help="tokens per sequence of the forward and train-step rows (default: %(default)s)")
    mod.add_argument("--prompt", type=_positive, default=256,
                     help="prompt length for prefill/decode (default: %(default)s)")
    mod.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                     help="the weights' dtype (default: %(default)s)")
    mod.add_argument("--repeat", type=_positive, default=3,
                     help="timed runs per row (after one warm-up); median (default: %(default)s)")
    mod.add_argument("--compare-hf", action="store_true", help="also time HF transformers' Mamba2, same weights")
    mod.add_argument("--json", help="also write the numbers to this JSON file")
    mod.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")
    mod.add_argument("--backend", default="torch", choices=["torch", "triton"], help="SSD scan backend")
    mod.add_argument("--amp", action="store_true", help="bfloat16 autocast with float32 weights")
    mod.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the train step")
    mod.add_argument("--phases", type=_phases, default=",".join(PHASES),
                     help=f"which rows to measure, comma-separated, from {', '.join(PHASES)} (generate: the prefill, "
                          "decode and generation-memory rows, and the decode-vs-bandwidth floor; default: all)")
    mod.add_argument("--decode-backend", default="auto", choices=["auto", "torch", "c"],
                     help="minimamba's decode step (default: auto, the C step for float32 on a CPU)")
    mod.add_argument("--floor-rounds", type=_nonnegative, default=8,
                     help="rounds of decode vs read bandwidth, interleaved, on a CPU (0: skip; default: %(default)s)")
    mod.set_defaults(run=bench_model)

    inf = commands.add_parser("inference", help="decode ms/token and state bytes vs context, and KV-cache bytes")
    speed_options(inf)
    inf.add_argument("--contexts", type=_contexts, default="1024,4096,16384", help="comma-separated context lengths")
    inf.set_defaults(run=bench_inference)

    sc = commands.add_parser("scoring", help="eval.py's option scoring vs one forward per option")
    sc.add_argument("--task", type=_scored_task, default="pubmedqa",
                    help=f"a task of kind {' / '.join(SCORED_KINDS)} (minimamba.tasks): "
                         f"{', '.join(SCORED_TASKS)} (default: %(default)s)")
    sc.add_argument("--items", type=_positive, default=20, help="the first N items of its test split")
    sc.add_argument("--task-data", type=Path, default=shared_data_dir(),
                    help="the tasks' files (default: $MINIMAMBA_DATA, else shared/data beside the clone; "
                         "here %(default)s)")
    sc.add_argument("--data-root", type=Path, default=shared_data_dir(),
                    help="where tokenizer/tokenizer.json is, unless --tokenizer (default: as --task-data)")
    sc.add_argument("--tokenizer", type=Path, help="tokenizer.json")
    sc.add_argument("--scale", default="130m", choices=list(SCALES), help="model shapes (random weights)")
    sc.add_argument("--batch-size", type=_positive, default=16, help="options per batch of score_options")
    sc.add_argument("--repeat", type=_positive, default=3, help="timed runs (after one warm-up); median")
    sc.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's choice)")
    sc.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")
    sc.set_defaults(run=bench_scoring)

    argv = list(argv if argv is not None else sys.argv[1:])
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["model"] + argv  # `python -m minimamba.bench --scale 130m` means the model benchmark (README)
    args = parser.parse_args(argv)  # (no arguments: the usage, and exit status 2)
    if getattr(args, "device", "cpu").startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no GPU here; use --device cpu")
    elif getattr(args, "backend", "torch") == "triton":
        parser.error("--backend triton needs --device cuda (the Triton kernel runs on CUDA tensors)")
    if getattr(args, "decode_backend", "auto") == "c" and (getattr(args, "dtype", "float32") != "float32"
                                                           or getattr(args, "amp", False)):
        parser.error("--decode-backend c computes in float32: use --dtype float32 without --amp, or "
                     "--decode-backend torch")
    try:
        args.run(args)
    except (DataError, TaskDataError, FileNotFoundError) as e:  # (a data file or the tokenizer missing, a
        # task's file malformed: what to fix, not a traceback)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

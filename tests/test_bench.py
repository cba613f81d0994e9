"""minimamba.bench: what its rows measure (the model benchmark's option checks and its decode-vs-floor
run are in tests/test_decode_cpu.py, HF's activation checkpointing in tests/test_hub.py)."""

import os
import re
from pathlib import Path

import pytest
import torch

from minimamba import bench
from tests.conftest import DATA


def test_the_hf_model_takes_our_weights_without_a_second_copy(monkeypatch):
    """Each row's peak memory is its process's peak RSS, so the HF row must never hold our model's weights
    and its own at once (it did: HF built its own random weights, then copied ours into them, and 130m's
    HF rows counted ~0.6 GiB more than HF needs: 1.55 vs 0.92 GiB after the build alone)."""
    transformers = pytest.importorskip("transformers", reason="HF transformers is the test-only oracle for Mamba2")
    import minimamba.model

    built = []

    class Recorded(minimamba.model.Mamba2LM):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            built.append(self)

    monkeypatch.setattr(minimamba.model, "Mamba2LM", Recorded)
    hf = bench._build("hf", "tiny", torch.float32, None)
    assert isinstance(hf, transformers.Mamba2ForCausalLM)
    ours = {p.data_ptr() for p in built[0].parameters()}
    assert all(p.device.type == "cpu" and p.data_ptr() in ours for p in hf.parameters())
    assert hf.lm_head.weight is hf.backbone.embeddings.weight  # tied: one Parameter, as HF's own init leaves it
    assert len(list(hf.parameters())) == len(list(built[0].parameters()))
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, built[0](ids), rtol=1e-4, atol=1e-4)


# (each with options that keep it short on code that would run it anyway)
SHORT = {"model": ["--scale", "tiny", "--phases", "generate", "--prompt", "8", "--decode-tokens", "2", "--repeat", "1",
                   "--threads", "1"],
         "inference": ["--scale", "tiny", "--decode-tokens", "2", "--threads", "1"],
         "tokenizer": ["--repeat", "1", "--data-root", "/nonexistent"],
         "scoring": ["--items", "1", "--repeat", "1", "--scale", "tiny", "--task-data", "/nonexistent"]}


@pytest.mark.parametrize("args, message", [
    (["model", "--floor-rounds", "-1"], "--floor-rounds: must be >= 0, got -1"),  # was: StatisticsError after the rows
    (["model", "--chunk-size", "0"], "--chunk-size: must be >= 1, got 0"),  # was: silently the default chunk
    (["inference", "--chunk-size", "-4"], "--chunk-size: must be >= 1, got -4"),
    (["inference", "--contexts", "0"], "--contexts: must be comma-separated integers >= 1, got '0'"),
    (["inference", "--contexts", "16,abc"], "--contexts: must be comma-separated integers >= 1"),
    (["tokenizer", "--threads", "0"], "--threads: must be >= 1, got 0"),  # was: silently every core
    (["model", "--backend", "triton"], "--backend triton needs --device cuda"),  # was: a worker's traceback
    (["model", "--decode-backend", "c", "--dtype", "bfloat16"], "--decode-backend c computes in float32"),
    (["model", "--decode-backend", "c", "--amp"], "--decode-backend c computes in float32"),
    # was: TaskDataError's traceback after the tokenizer was read; the list is every task scored by its options
    (["scoring", "--task", "arc_easyy"], "--task: unknown task 'arc_easyy'; choose from pubmedqa, bioasq, arc_easy, "
                                         "arc_challenge, hellaswag, piqa, winogrande, openbookqa, lambada\n"),
    (["scoring", "--task", "note_summary"], "--task: note_summary is a generate task, not scored by its options; "
                                            "choose from pubmedqa, bioasq,"),  # was: a TypeError's traceback
])
def test_bad_numbers_are_refused_before_anything_runs(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main([*args, *SHORT[args[0]]])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_no_arguments_print_the_usage_and_options_alone_mean_the_model_benchmark(monkeypatch, capsys):
    """A bare `python -m minimamba.bench` started the 130m model benchmark (~1.5 min on a CPU); options
    without a subcommand (the README's `python -m minimamba.bench --scale 130m --compare-hf`) still mean it."""
    with pytest.raises(SystemExit) as stop:
        bench.main([])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "usage: python -m minimamba.bench" in err and "{tokenizer,model,inference,scoring}" in err
    ran = []
    monkeypatch.setattr(bench, "bench_model", lambda args: ran.append((args.command, args.scale, args.compare_hf)))
    assert bench.main(["--scale", "tiny", "--compare-hf"]) == 0
    assert ran == [("model", "tiny", True)]


def test_the_scoring_benchmark_names_missing_task_files_in_one_line(tmp_path, capsys):
    """Missing files were a TaskDataError traceback; now one line that says how to get them, and status 2."""
    assert bench.main(["scoring", *SHORT["scoring"], "--task-data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task pubmedqa (test) needs ") and err.count("\n") == 1
    assert f"python -m minimamba.tasks download pubmedqa --out {tmp_path}" in err


def test_inference_contexts_are_parsed():
    import unittest.mock

    parsed = []  # (main builds the parser and binds bench_inference then: a stand-in records what it gets)
    with unittest.mock.patch.object(bench, "bench_inference", lambda args: parsed.append(args.contexts)):
        bench.main(["inference", "--contexts", "16, 32"])
        bench.main(["inference"])
    assert parsed == [[16, 32], [1024, 4096, 16384]]


def test_the_hf_forward_row_builds_no_decoding_cache(monkeypatch):
    """HF's Mamba2 in eval mode builds a decoding cache (its config's use_cache) unless told not to; ours
    builds none in a forward, so the timed HF forward must not either (it did: every timed call allocated
    and filled a cache of every layer's states)."""
    pytest.importorskip("transformers", reason="HF transformers is the test-only oracle for Mamba2")
    import transformers.models.mamba2.modeling_mamba2 as hf_mamba2

    caches = []
    real = hf_mamba2.DynamicCache

    def counted(*args, **kwargs):
        caches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_mamba2, "DynamicCache", counted)
    # (threads: _phase sets them for the whole process; these are the ones it has)
    a = dict(threads=torch.get_num_threads(), device="cpu", scale="tiny", dtype="float32", chunk_size=None, backend="torch",
             checkpointing=False, decode_backend="torch", amp=False, batch=1, seqlen=16, repeat=1)
    for phase in ("forward", "train"):
        assert bench._phase("hf", phase, a)["tok/s"] > 0
    assert caches == []
    hf = bench._build("hf", "tiny", torch.float32, None).eval()  # (the counter sees HF's default)
    with torch.no_grad():
        hf(torch.zeros(1, 4, dtype=torch.long))
    assert caches == [1]


def test_the_tokenizer_benchmark_names_a_missing_data_folder(tmp_path, capsys):
    """Run from a clone that does not sit beside shared/, it said FileNotFoundError with a traceback."""
    (tmp_path / "pubmed").mkdir()
    assert bench.main(["tokenizer", "--repeat", "1", "--data-root", str(tmp_path)]) == 2
    assert re.fullmatch(r"error: --data-root .*: missing pubmed/pubtator_corpora_abstracts.jsonl, "
                        r"c4/c4_train_sample_1000.jsonl.*MINIMAMBA_DATA.*\n", capsys.readouterr().err)


def test_the_data_folders_default_to_minimamba_data(monkeypatch, tmp_path):
    """$MINIMAMBA_DATA, else shared/data beside the clone, as the tests' DATA (one rule: data.shared_data_dir)."""
    import unittest.mock

    seen = []
    with unittest.mock.patch.object(bench, "bench_scoring", lambda args: seen.append((args.task_data, args.data_root))):
        monkeypatch.setenv("MINIMAMBA_DATA", str(tmp_path))
        bench.main(["scoring"])
        monkeypatch.delenv("MINIMAMBA_DATA")
        bench.main(["scoring"])
    beside = Path(bench.__file__).resolve().parents[1].parent / "shared" / "data"
    assert seen == [(tmp_path, tmp_path), (beside, beside)]


def test_decode_time_is_the_paired_difference_per_token(monkeypatch):
    """Each round times a prefill and then a generation of n more tokens; the decode row is the median of
    the rounds' differences per token (a clock the fake generation advances: no real timing here)."""
    clock = [0.0]
    # (the machine slowed: round 1 throughout, round 2 during its prefill only; unpaired, the median of the
    # totals less the median of the prefills would read 0.0084 s per token)
    slow = iter([0, 0.2, 0.2, 0.1, 0, 0, 0])

    def gen(k):
        clock[0] += 0.5 + 0.01 * k + next(slow)

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    prefill, decode = bench._prefill_and_decode(gen, 64, 3, lambda: None)
    assert prefill == pytest.approx(0.61) and decode == pytest.approx(0.01)


def test_hf_scans_in_the_chunks_ours_scans_in():
    """The chunk changes the speed, not the result: HF's default 256 against our 64 on a CPU made HF ~1.26×
    slower at 130m, a quarter of the forward ratio the README once printed."""
    pytest.importorskip("transformers", reason="HF transformers is the baseline")
    for chunk, want in ((None, 64), (32, 32)):
        hf = bench._build("hf", "tiny", torch.float32, chunk, device="cpu")
        ours = bench._build("minimamba", "tiny", torch.float32, chunk)
        assert hf.config.chunk_size == ours.scan_chunk("cpu") == want


def test_the_tokenizer_benchmark_gives_hf_the_threads_it_prints(monkeypatch):
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")  # (a value set before kept HF's batch on one thread)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    bench._give_hf_tokenizers(2)
    import os

    assert os.environ["RAYON_NUM_THREADS"] == "2" and "TOKENIZERS_PARALLELISM" not in os.environ


@pytest.mark.skipif(not (DATA / "pubmedqa" / "ori_pqal.json").exists() or not (DATA / "tokenizer").exists(),
                    reason=f"the shared data (pubmedqa/, tokenizer/) is not in {DATA}")
def test_the_scoring_benchmark_agrees_with_its_baseline(capsys):
    bench.main(["scoring", "--task", "pubmedqa", "--items", "2", "--repeat", "1", "--scale", "tiny",
                "--task-data", str(DATA), "--data-root", str(DATA)])
    out = capsys.readouterr().out
    assert "2 items, 12 options" in out and "x\n" in out  # (" yes" ... " Maybe": six options an item)
    difference = float(out.rsplit("log-likelihoods: ", 1)[1].split()[0])
    assert difference < 1e-4


# The benchmarks' own arithmetic and control flow (session 18's mutation audit of this module): fake clocks,
# stand-in tokenizers and canned rows, so every number is known beforehand; nothing here is timed.
def _corpus_folder(root):
    """The shared-data layout of CORPUS_FILES with a few documents each; returns the documents, by hand."""
    for folder in ("pubmed", "c4", "wiki"):
        (root / folder).mkdir()
    (root / "pubmed" / "pubtator_corpora_abstracts.jsonl").write_text(
        '{"title": "Caf\\u00e9 study.", "abstract": "It  works."}\n\n{"title": "T", "abstract": "A"}\n')
    c4 = ("c4_train_sample_1000", "c4_validation_2k", "llamafactory_c4_demo")
    for i, name in enumerate(c4):
        (root / "c4" / f"{name}.jsonl").write_text(f'{{"text": "doc {i}", "url": "x"}}\n   \n')
    wiki = ("wikitext-2-raw_wiki.test.raw", "wikitext-2_tokenized_valid.txt", "llamafactory_wiki_demo.txt")
    for i, name in enumerate(wiki):
        (root / "wiki" / name).write_text(f" = Title {i} = \n \n\nline {i}\n")
    return {"PubMed": ["Café study.\nIt  works.", "T\nA"], "C4": ["doc 0", "doc 1", "doc 2"],
            "WikiText": [d for i in range(3) for d in (f" = Title {i} = \n", f"line {i}\n")]}


def test_corpus_documents_are_one_record_or_non_blank_line_each(tmp_path):
    by_hand = _corpus_folder(tmp_path)
    assert bench.corpus_documents(tmp_path) == by_hand


class _FakeClock:
    """time.perf_counter for the benchmark: the stand-ins advance it by what they 'cost'."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        monkeypatch.setattr(bench.time, "perf_counter", lambda: self.now)


def test_tokenizer_rows_are_the_best_of_repeat_runs_on_a_fake_clock(tmp_path, monkeypatch, capsys):
    """Stand-in tokenizers that cost a known time per byte, round 1 three times slower and round 3 twice: each
    row's MB/s, tokens/s and speed against HF, computed here from those costs, is the one printed; and ids that
    differ in one row of one round are reported."""
    import os
    import sys
    import types

    import minimamba.tokenizer

    docs = [d for corpus in _corpus_folder(tmp_path).values() for d in corpus]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)  # ("é": 2 bytes, 1 character)
    clock, rounds, seen = _FakeClock(monkeypatch), [], {}
    per_byte = {"minimamba encode": 4e-6, "minimamba encode_batch": 1e-6,
                "HF tokenizers encode": 2e-6, "HF tokenizers encode_batch": 5e-7}

    def run(row, texts):
        if row == "minimamba encode" and texts == docs[:1]:  # (every round starts with it)
            rounds.append(len(rounds))
        clock.now += (3, 1, 2)[rounds[-1]] * per_byte[row] * sum(len(t.encode("utf-8")) for t in texts)
        return [list(t.encode("utf-8")) for t in texts]  # (a token a byte)

    class Ours:
        def encode(self, text):
            return run("minimamba encode", [text])[0]

        def encode_batch(self, texts, num_threads):
            seen["num_threads"] = num_threads
            ids = run("minimamba encode_batch", texts)
            return [i + [0] for i in ids] if rounds[-1] == 1 else ids  # (round 2: other ids, not in the last row)

    class Reference:
        def encode(self, text):
            return types.SimpleNamespace(ids=run("HF tokenizers encode", [text])[0])

        def encode_batch(self, texts):
            seen["RAYON_NUM_THREADS"] = os.environ.get("RAYON_NUM_THREADS")
            return [types.SimpleNamespace(ids=i) for i in run("HF tokenizers encode_batch", texts)]

    monkeypatch.setattr(minimamba.tokenizer, "load_tokenizer", lambda path: Ours())
    fake = types.ModuleType("tokenizers")
    fake.Tokenizer = types.SimpleNamespace(from_file=lambda path: Reference())
    monkeypatch.setitem(sys.modules, "tokenizers", fake)
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    assert bench.main(["tokenizer", "--data-root", str(tmp_path), "--repeat", "3", "--threads", "3"]) == 0
    out = capsys.readouterr().out
    assert rounds == [0, 1, 2] and seen == {"num_threads": 3, "RAYON_NUM_THREADS": "3"}
    assert out.endswith(f"\n{n_bytes:,} tokens; every row gave the same ids: NO\n")
    printed = {m[1]: (float(m[2]), float(m[3].replace(",", "")), m[4]) for m in re.finditer(
        r"^(\S+(?: \S+)? encode(?:_batch)?) +([\d.]+) +([\d,]+) +([\d.]+x)$", out, re.M)}
    assert list(printed) == ["minimamba encode", "HF tokenizers encode", "minimamba encode_batch",
                             "HF tokenizers encode_batch"]
    for row, (mb_per_s, tokens_per_s, vs_hf) in printed.items():
        best = per_byte[row] * n_bytes  # (round 2's)
        assert mb_per_s == pytest.approx(n_bytes / 1e6 / best, abs=0.005)
        assert tokens_per_s == pytest.approx(n_bytes / best, abs=0.5)
        assert vs_hf == f"{per_byte['HF tokenizers ' + row.rsplit(' ', 1)[1]] / per_byte[row]:.2f}x"


def test_time_warms_up_then_takes_the_median_of_repeat_synced_runs(monkeypatch):
    clock, events, costs = _FakeClock(monkeypatch), [], iter([100.0, 5.0, 1.0, 3.0, 2.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: events.append("t") or clock.now)

    def fn():
        events.append("fn")
        clock.now += next(costs)

    # the warm-up (100 s) untimed; of 5, 1, 3, 2 the upper middle value: 3
    assert bench._time(fn, 4, lambda: events.append("sync")) == 3.0
    assert events == ["fn"] + ["sync", "t", "fn", "sync", "t"] * 4  # (a GPU's queue drained before each clock)
    assert bench._median([2.0, 9.0, 1.0]) == 2.0 and bench._median([4.0, 1.0, 3.0, 2.0]) == 3.0


def test_a_rows_peak_memory_is_its_own_processs(tmp_path):
    """_isolated runs the row in another process and reports that process's peak RSS in GiB: here the row
    reads /proc/self/status, whose VmHWM (kB) is the same peak, read by the kernel's other door."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc/self/status here (not Linux)")
    text, peak_gib = bench._isolated(Path.read_text, status)
    fields = dict(line.split(":", 1) for line in text.splitlines())
    assert int(fields["Pid"]) != os.getpid()
    vm_hwm_kib = int(fields["VmHWM"].split()[0])
    assert peak_gib * 2**20 == pytest.approx(vm_hwm_kib, rel=0.05)


def test_the_model_rows_build_the_same_weights_in_any_process_in_the_dtype_asked():
    """Each row builds its model in a process of its own, so the weights must come from the seed alone (HF's row
    is ours' weights only then) and --dtype bfloat16 must reach both models."""
    first, again = (bench._build("minimamba", "tiny", torch.float32, None) for _ in range(2))
    torch.rand(3)  # (the global generator moved on: the build must not depend on it)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert {p.dtype for p in bench._build("minimamba", "tiny", torch.bfloat16, None).parameters()} == {torch.bfloat16}

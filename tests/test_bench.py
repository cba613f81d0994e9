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
    (["model", "--phases", ","], "--phases: unknown phase(s) ','"),  # (no phase: no row, and no message)
    # the table's rows are named prefill and decode; the phase that measures them is generate
    (["model", "--phases", "prefill,decode"], "--phases: unknown phase(s) ['prefill', 'decode']; choose from forward, "
                                              "train, generate (generate gives the prefill and decode rows)"),
    (["tokenizer", "--threads", "0"], "--threads: must be >= 1, got 0"),  # was: silently every core
    (["model", "--backend", "triton"], "--backend triton needs --device cuda"),  # was: a worker's traceback
    # was: the header printed, then AssertionError "Torch not compiled with CUDA enabled" (scoring: a RuntimeError
    # listing torch's device types), each a traceback
    (["model", "--device", "gpu"], "--device: must be cpu or cuda (cuda:N for one of several GPUs), got 'gpu'"),
    (["scoring", "--device", "mps"], "--device: must be cpu or cuda (cuda:N for one of several GPUs), got 'mps'"),
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
                    reason=f"the shared data (pubmedqa/, tokenizer/) is not in {DATA} (set MINIMAMBA_DATA)")
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


def _row_options(**changes):
    return dict(threads=1, device="cpu", scale="tiny", dtype="float32", chunk_size=None, backend="torch",
                checkpointing=False, decode_backend="auto", amp=False, batch=2, seqlen=8, repeat=3, prompt=5,
                decode_tokens=3) | changes


@pytest.fixture
def recorded_rows(monkeypatch):
    """_phase with _time standing in (the warm-up and one timed call, 0.5 s) and _logits, _build recorded."""
    threads = torch.get_num_threads()
    seen = {"time": [], "logits": [], "built": []}

    def fake_time(fn, repeat, sync):
        seen["time"].append((repeat, torch.get_num_threads()))
        fn(), fn()
        return 0.5

    def logits(model, impl, ids):
        seen["logits"].append((impl, tuple(ids.shape), model.training, torch.is_autocast_enabled("cpu")
                               and torch.get_autocast_dtype("cpu")))
        return real_logits(model, impl, ids)

    def build(impl, *args, **kw):
        model = real_build(impl, *args, **kw)
        seen["built"].append((model, [p.detach().clone() for p in model.parameters()]))
        if impl == "hf":  # every token but 7 ends HF's generation, unless min_new_tokens holds it off
            model.generation_config.eos_token_id = [i for i in range(model.config.vocab_size) if i != 7]
        return model

    real_logits, real_build = bench._logits, bench._build
    monkeypatch.setattr(bench, "_time", fake_time)
    monkeypatch.setattr(bench, "_logits", logits)
    monkeypatch.setattr(bench, "_build", build)
    yield seen
    torch.set_num_threads(threads)


def test_the_forward_and_train_rows_time_the_step_they_name(recorded_rows):
    """tok/s is batch x seqlen over the step's time; the forward runs in eval mode, the train step on seqlen
    tokens (of seqlen + 1) and moves the weights and clears the gradients; --amp autocasts to bfloat16."""
    assert bench._phase("minimamba", "forward", _row_options()) == {"tok/s": 2 * 8 / 0.5}
    assert bench._phase("minimamba", "forward", _row_options(amp=True)) == {"tok/s": 2 * 8 / 0.5}
    assert bench._phase("minimamba", "train", _row_options()) == {"tok/s": 2 * 8 / 0.5}
    assert recorded_rows["time"] == [(3, 1)] * 3  # (--repeat, --threads)
    forward, amp = ("minimamba", (2, 8), False, False), ("minimamba", (2, 8), False, torch.bfloat16)
    assert recorded_rows["logits"] == [forward] * 2 + [amp] * 2 + [("minimamba", (2, 8), True, False)] * 2
    model, before = recorded_rows["built"][-1]
    assert all(not torch.equal(p, q) and p.grad is None for p, q in zip(model.parameters(), before))


def test_the_generation_row_reports_prefill_and_decode_from_the_paired_times(monkeypatch, recorded_rows):
    """prefill tok/s = prompt / prefill seconds and decode ms/token = 1000 x seconds per token, from what
    _prefill_and_decode measures; gen(k) gives k new tokens (HF's too, through EOS); under --amp the "auto"
    decode step is torch's (the C step computes in float32)."""
    lengths = []

    def fake(gen, n, repeat, sync):
        lengths.append((n, repeat, gen(1).shape[-1], gen(1 + n).shape[-1]))
        return 0.25, 0.004

    monkeypatch.setattr(bench, "_prefill_and_decode", fake)
    for impl in ("minimamba", "hf"):
        result = bench._phase(impl, "generate", _row_options(amp=True))
        if impl == "minimamba":
            assert result.pop("decode step")[0] == "torch"
        assert result == {"prefill tok/s": 5 / 0.25, "decode ms/token": 4.0}
    assert lengths == [(3, 3, 5 + 1, 5 + 4)] * 2


@pytest.mark.parametrize("huge, note", [((2**30, None), None), ((0, "THP is off"), "2 MiB pages not given: THP is off"),
                                        ((2**28, None), "2 MiB pages not given: 256 MiB of 1 GiB collapsed")])
def test_decode_against_the_bandwidth_floor_from_given_times(huge, note, monkeypatch):
    """Three rounds of given times (the 1 GiB sums on 4 KiB of float32 here): the floor is the time to read the
    model's float32 weights once at the measured rate, each round's ratio its decode time over it, and every
    number the median of the rounds (the means differ); the 2 MiB row only where most of 1 GiB got those pages."""
    import kernels.decode_cpu
    from minimamba.config import Mamba2Config
    from minimamba.model import Mamba2LM

    real_ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *shape, **kw: real_ones(1024) if shape == (2**28,) else
                        real_ones(*shape, **kw))
    monkeypatch.setattr(kernels.decode_cpu, "use_huge_pages", lambda tensors: huge)
    pages = ["4 KiB", "2 MiB"] if note is None else ["4 KiB"]
    decode_s, sum_s = [0.002, 0.009, 0.004], {"4 KiB": [1e-6, 2e-6, 4e-6], "2 MiB": [5e-7, 1e-6, 8e-7]}
    given, calls = iter(t for r in range(3) for t in [decode_s[r]] + [sum_s[p][r] for p in pages]), []

    def fake_time(fn, repeat, sync=None):
        calls.append((fn.__name__, repeat))
        fn()
        return next(given)

    monkeypatch.setattr(bench, "_time", fake_time)
    model = Mamba2LM(Mamba2Config.from_scale("tiny")).eval()
    model.decode_backend = "torch"
    with torch.no_grad():
        got = bench._decode_vs_floor(model, torch.tensor([[3, 1, 4, 1, 5]]), {"floor_rounds": 3, "decode_tokens": 4})
    assert calls == [c for _ in range(3) for c in [("<lambda>", 4)] + [("sum", 5)] * len(pages)]
    weight_bytes = model.num_params() * 4  # (float32; the tied head counted once)
    median = lambda v: sorted(v)[1]  # noqa: E731
    want = {"weight MiB": weight_bytes / 2**20, "decode ms/token": median(decode_s) * 1000, "note": note}
    for p in pages:
        bytes_per_s = [1024 * 4 / s for s in sum_s[p]]
        want[f"{p} GB/s"] = median(bytes_per_s) / 1e9
        floor_ms = [1000 * weight_bytes / b for b in bytes_per_s]
        want[f"{p} ratio"] = median([1000 * d / f for d, f in zip(decode_s, floor_ms)])
    assert got == pytest.approx(want, rel=1e-9)


def test_the_model_table_puts_each_rows_numbers_beside_hfs_with_the_ratio_ours_wins_by(tmp_path, monkeypatch, capsys):
    """Canned rows in place of the isolated processes: the table, its ratios (speed: ours / HF; time and
    memory: HF / ours), the floor's lines and the JSON carry those numbers; the floor runs only after a
    generation row and with --floor-rounds > 0."""
    import json

    from minimamba.config import Mamba2Config
    from minimamba.model import Mamba2LM

    canned = {("minimamba", "forward"): ({"tok/s": 1000.0}, 0.5), ("hf", "forward"): ({"tok/s": 400.0}, 1.25),
              ("minimamba", "train"): ({"tok/s": 300.0}, 0.8), ("hf", "train"): ({"tok/s": 200.0}, 2.0),
              ("minimamba", "generate"): ({"prefill tok/s": 900.0, "decode ms/token": 4.0,
                                           "decode step": ("c", "auto: float32 on a CPU")}, 0.6),
              ("hf", "generate"): ({"prefill tok/s": 300.0, "decode ms/token": 10.0}, 0.9),
              ("minimamba", "floor"): ({"floor": {"weight MiB": 12.0, "decode ms/token": 4.0, "4 KiB GB/s": 8.0,
                                                  "4 KiB ratio": 2.5, "note": "no 2 MiB pages"}}, 2.5)}
    calls = []

    def isolated(fn, impl, phase, a):
        assert fn is bench._phase
        calls.append((impl, phase))
        result, peak = canned[impl, phase]
        return dict(result), peak

    monkeypatch.setattr(bench, "_isolated", isolated)
    out = tmp_path / "rows.json"
    assert bench.main(["model", "--scale", "tiny", "--compare-hf", "--floor-rounds", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert calls == [(impl, phase) for phase in bench.PHASES for impl in ("minimamba", "hf")] + [("minimamba", "floor")]
    n = Mamba2LM(Mamba2Config.from_scale("tiny")).num_params()
    assert f"({n / 1e6:.1f}M params, {n * 4 / 2**20:.0f} MiB of float32 weights)" in text
    lines = re.finditer(r"^(\S.*?) +([\d.]+) +([\d.]+) +([\d.]+)x$", text, re.M)  # name, ours, HF, ratio
    table = {m[1]: tuple(map(float, m.groups()[1:])) for m in lines}
    want = {"forward tok/s": (1000, 400, 2.5), "forward peak GiB": (0.5, 1.25, 2.5), "train tok/s": (300, 200, 1.5),
            "train peak GiB": (0.8, 2.0, 2.5), "prefill tok/s": (900, 300, 3.0), "decode ms/token": (4, 10, 2.5),
            "peak GiB": (0.6, 0.9, 1.5)}
    assert table == want
    assert "minimamba decode step: c (auto: float32 on a CPU)" in text and "(no 2 MiB pages)" in text
    assert re.search(r"^HF: transformers \S+, ", text, re.M)  # (what HF computes with, once: see the next test)
    floor_ms = 12.0 * 2**20 / 8e9 * 1000  # 12 MiB read at 8 GB/s
    assert f"read bandwidth on 4 KiB pages   8.0 GB/s -> floor {floor_ms:5.1f} ms/token; decode = 2.50x" in text
    written = json.loads(out.read_text())
    assert written["threads"] == torch.get_num_threads() and written["decode_step"] == ["c", "auto: float32 on a CPU"]
    assert written["decode_vs_floor"] == canned["minimamba", "floor"][0]["floor"]
    assert {k: (v["minimamba"], v["hf"]) for k, v in written["rows"].items()} == {
        ("generate " + k if k in ("prefill tok/s", "decode ms/token", "peak GiB") else k): v[:2]
        for k, v in want.items()}
    for args in (["--floor-rounds", "0"], ["--phases", "forward,train"]):
        calls.clear()
        bench.main(["model", "--scale", "tiny", *args])
        assert ("minimamba", "floor") not in calls and len(calls) == len(bench.PHASES) - (args[0] == "--phases")


def test_hf_path_names_the_packages_whose_absence_makes_hf_run_its_pytorch_path(monkeypatch):
    """Each phase's process printed transformers' own two "falling back" warnings (ten lines for five
    phases); the header now says it once, naming what is missing."""
    import importlib.util

    import transformers

    real, torch_path = importlib.util.find_spec, "its PyTorch path for the conv and the scan"
    for installed, want in (((), f"{torch_path} (mamba_ssm and causal_conv1d not installed)"),
                            (("mamba_ssm",), f"{torch_path} (causal_conv1d not installed)"),
                            (("mamba_ssm", "causal_conv1d"), "with mamba_ssm and causal_conv1d installed")):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in installed
                            else None if name in ("mamba_ssm", "causal_conv1d") else real(name, *a))
        assert bench.hf_path() == f"HF: transformers {transformers.__version__}, {want}"


def test_the_model_table_without_hf_has_no_ratio_column_and_no_line_explaining_one(monkeypatch, capsys):
    """Without --compare-hf the table said "ratio: how many times better minimamba is ..." under a table with
    no ratio (and no HF) column."""
    monkeypatch.setattr(bench, "_isolated", lambda fn, impl, phase, a: ({"tok/s": 100.0}, 0.5))
    assert bench.main(["model", "--scale", "tiny", "--phases", "forward"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^forward tok/s +100.00$", text, re.M) and "ratio" not in text and "HF" not in text


def test_inference_cost_times_the_decode_steps_alone_on_a_fake_clock(monkeypatch):
    """Each decode step advances the clock 10 ms: after a prefill of each context and 3 untimed steps,
    decode_tokens timed steps read 10 ms/token; the state's bytes (by hand from the config's shapes) and a
    same-width Transformer's K and V for the context are beside it."""
    from minimamba.model import Mamba2LM

    clock, prompts, threads = _FakeClock(monkeypatch), [], torch.get_num_threads()
    real_decoder, real_forward = Mamba2LM.decoder, Mamba2LM.forward

    def decoder(self, batch_size):
        step = real_decoder(self, batch_size)

        def timed(tok, cache):
            clock.now += 0.010
            return step(tok, cache)

        return timed

    def forward(self, ids, *args, **kw):
        prompts.append(ids.shape[1])
        return real_forward(self, ids, *args, **kw)

    monkeypatch.setattr(Mamba2LM, "decoder", decoder)
    monkeypatch.setattr(Mamba2LM, "forward", forward)
    try:
        rows = bench._inference_cost({"threads": 1, "scale": "tiny", "chunk_size": None, "contexts": [3, 70],
                                      "decode_tokens": 4})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    # tiny: 2 layers, d_model 64, d_inner 128, 8 heads of 16, d_state 16, conv width 4; float32
    state = 2 * (3 * (128 + 2 * 16) + 8 * 16 * 16) * 4  # per layer: the last 3 conv inputs (x, B, C) and the SSM state
    assert prompts == [3, 70]
    assert [(r["context"], r["state bytes"], r["kv bytes"]) for r in rows] == [(c, state, 2 * 2 * 64 * c * 4)
                                                                              for c in (3, 70)]
    assert [r["decode ms/token"] for r in rows] == pytest.approx([10.0, 10.0])


def test_the_inference_table_prints_mib(monkeypatch, capsys):
    rows = [{"context": 1024, "decode ms/token": 12.25, "state bytes": 3 * 2**20, "kv bytes": 5 * 2**20,
             "decode step": "c"}]
    monkeypatch.setattr(bench, "_isolated", lambda fn, a: (rows, 0.0) if fn is bench._inference_cost else None)
    bench.main(["inference", "--scale", "tiny", "--threads", "2"])
    out = capsys.readouterr().out
    assert "2 threads, decode step c:" in out
    assert re.search(r"^ +1024 +12\.2 +3\.0 MiB +5\.0 MiB$", out, re.M)


def test_the_scoring_lines_from_given_times_and_shifted_scores(tmp_path, monkeypatch, capsys):
    """Two items of stand-in options (a shared context; a context per option) and given times: the lines carry
    the times, the ms per item, the speed-up plain / shared, the tokens counted by hand, and the largest
    difference from the baseline when score_options' log-likelihoods are shifted by known amounts."""
    import minimamba.evaluate
    import minimamba.tasks
    from minimamba.tasks import Choice
    from minimamba.tokenizer import load_tokenizer
    from tests.test_tokenizer import tiny_tokenizer_json, write_json

    items = [Choice("1", (("the heart", " yes"), ("the heart", " no"), ("the heart", " maybe")), 0),
             Choice("2", (("a he", " the end"), ("the a", " the end")), 1)]
    tokenizer_json = write_json(tmp_path / "tokenizer.json", tiny_tokenizer_json())
    shifts, seen, given, threads = [0.0, 2e-3, -5e-3, 1e-3, 0.0], [], iter([0.3, 1.2]), torch.get_num_threads()
    real_score_options = minimamba.evaluate.score_options

    def shifted(model, tokenizer, items, batch_size, device):
        seen.append(("batch", batch_size))
        flat = iter(shifts)
        return [[(ll + next(flat), n, g) for ll, n, g in scores]
                for scores in real_score_options(model, tokenizer, items, batch_size, device)]

    def fake_time(fn, repeat, sync):
        seen.append(("time", repeat, torch.get_num_threads()))
        fn()
        return next(given)

    monkeypatch.setattr(minimamba.tasks, "load_task", lambda name, split, data_dir, limit: items[:limit])
    monkeypatch.setattr(minimamba.evaluate, "score_options", shifted)
    monkeypatch.setattr(bench, "_time", fake_time)
    try:
        assert bench.main(["scoring", "--scale", "tiny", "--items", "2", "--repeat", "4", "--batch-size", "3",
                           "--threads", "1", "--tokenizer", str(tokenizer_json)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert seen == [("time", 4, 1), ("batch", 3), ("time", 4, 1)]
    tok = load_tokenizer(tokenizer_json)
    tokens = sum(len(tok.encode(c)) + len(tok.encode(o)) for item in items for c, o in item.options)
    assert f"pubmedqa: 2 items, 5 options, {tokens:,} tokens read the plain way;" in out
    assert "one forward per option:     1.20 s  (  600.0 ms/item)\n" in out
    assert "shared context (score_options):     0.30 s  (  150.0 ms/item)  4.00x\n" in out
    assert float(out.rsplit("log-likelihoods: ", 1)[1]) == pytest.approx(5e-3, abs=2e-5)


def test_options_at_their_bounds_are_taken(monkeypatch, capsys):
    """The smallest values each check allows, and phases written with spaces; -h alone is the top-level help."""
    import unittest.mock

    parsed = []
    with unittest.mock.patch.object(bench, "bench_model", lambda args: parsed.append((args.floor_rounds, args.repeat,
                                                                                         args.phases))), \
         unittest.mock.patch.object(bench, "bench_inference", lambda args: parsed.append(args.contexts)):
        assert bench.main(["model", "--floor-rounds", "0", "--repeat", "1", "--phases", " generate, forward"]) == 0
        assert bench.main(["inference", "--contexts", "1,2"]) == 0
    assert parsed == [(0, 1, "generate,forward"), [1, 2]]
    with pytest.raises(SystemExit) as stop:
        bench.main(["-h"])
    assert stop.value.code == 0 and "{tokenizer,model,inference,scoring}" in capsys.readouterr().out


def test_model_help_lists_the_phases_and_the_defaults(capsys):
    """--phases said only "which rows to measure", and --batch, --seqlen, --prompt, --repeat no default."""
    with pytest.raises(SystemExit) as stop:
        bench.main(["model", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    assert f"from {', '.join(bench.PHASES)} (generate: the prefill, decode" in text
    for option, default in [("--batch", 4), ("--seqlen", 256), ("--prompt", 256), ("--repeat", 3),
                            ("--decode-tokens", 64), ("--floor-rounds", 8), ("--dtype", "float32")]:
        assert f"default: {default})" in text.split(f"{option} ", 2)[2].split(" --", 1)[0], option


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: --device cuda is taken")
def test_device_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["model", "--device", "cuda", "--scale", "tiny"])
    assert stop.value.code == 2 and "--device cuda: torch sees no GPU here; use --device cpu" in capsys.readouterr().err


def test_the_tokenizer_benchmark_names_a_missing_tokenizer_file(tmp_path, capsys):
    _corpus_folder(tmp_path)
    assert bench.main(["tokenizer", "--data-root", str(tmp_path), "--repeat", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no tokenizer file at {tmp_path / 'tokenizer' / 'tokenizer.json'}")
    assert err.count("\n") == 1

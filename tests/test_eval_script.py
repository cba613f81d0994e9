"""eval.py end to end: a tiny random checkpoint scored on a few items of real tasks, the results file, the
predictions file, --compare, and the setup errors (exit 2 with a message, before any model is loaded)."""

import contextlib
import functools
import hashlib
import io
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from minimamba.config import Mamba2Config
from minimamba.evaluate import evaluate_task
from minimamba.hub import from_pretrained
from minimamba.model import Mamba2LM
from minimamba.tasks import TASKS, load_task
from minimamba.tokenizer import load_tokenizer
from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = DATA / "tokenizer" / "tokenizer.json"
needs_data = pytest.mark.skipif(not (TOKENIZER.exists() and (DATA / "mc" / "arc_easy.jsonl").exists()),
                                reason=f"the shared data (tokenizer.json, mc/, pubmedqa/) is not in {DATA} "
                                       "(set MINIMAMBA_DATA)")


def run_eval(*args, cwd):
    """eval.py run as a script (in this process: torch is imported once) -> (exit status, stdout, stderr)."""
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [str(ROOT / "eval.py"), *map(str, args)]
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / "eval.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "tiny"
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=16))
    model.reset_parameters(seed=0)
    model.save_pretrained(path)
    return path


@needs_data
def test_eval_writes_what_the_library_computes(checkpoint, tmp_path):
    out, preds = tmp_path / "res" / "a.json", tmp_path / "res" / "a.jsonl"
    r = run_eval("--model", checkpoint, "--tokenizer", TOKENIZER, "--task-data", DATA, "--tasks", "arc_easy,pubmedqa",
                 "--limit", 3, "--device", "cpu", "--out", out, "--predictions", preds, cwd=tmp_path)
    assert r[0] == 0, r[2]
    saved = json.loads(out.read_text())
    assert saved["config"]["tasks"] == ["arc_easy", "pubmedqa"] and saved["config"]["scan_backend"] == "torch"
    assert saved["config"]["tokenizer_id"] == hashlib.sha256(TOKENIZER.read_bytes()).hexdigest()  # not its path
    arc = DATA / "mc" / "arc_easy.jsonl"
    assert saved["config"]["task_files"]["arc_easy"] == {str(arc): hashlib.sha256(arc.read_bytes()).hexdigest()}
    # the same numbers as the library's, called here on the same checkpoint and items
    model, tok = from_pretrained(checkpoint).eval(), load_tokenizer(TOKENIZER)
    for name in ("arc_easy", "pubmedqa"):
        expected = evaluate_task(model, tok, TASKS[name], load_task(name, "test", DATA, 3), batch_size=16)
        got = saved["results"][name]
        assert got["n"] == 3
        for metric in ("acc", "acc_norm", "macro_f1"):
            if metric in expected:
                assert got[metric] == pytest.approx(expected[metric], abs=1e-12), (name, metric)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["task"], r["id"]) for r in rows] == [(n, it.id) for n in ("arc_easy", "pubmedqa")
                                                    for it in load_task(n, "test", DATA, 3)]

    # --compare: two results files side by side, with their difference
    other = json.loads(out.read_text())
    other["results"]["arc_easy"]["acc"] += 0.25
    (tmp_path / "b.json").write_text(json.dumps(other))
    code, stdout, stderr = run_eval("--compare", out, tmp_path / "b.json", cwd=tmp_path)
    assert code == 0, stderr
    row = next(line for line in stdout.splitlines() if line.startswith("| arc_easy | acc |"))
    assert row.rstrip().endswith("| +0.2500 |")


@needs_data
def test_eval_ppl_data_scores_each_domain_as_a_plain_loop_over_its_windows_does(checkpoint, tmp_path):
    """--ppl-data: a domain's held-out perplexity in the results file is that of a per-window loop over the
    model's forward: back-to-back windows of --seq-len + 1 tokens (the last tokens, too few for one, unscored),
    the next-token cross-entropy summed over every window's targets, over their count; and its table rows are
    n, loss and ppl (the count was also a "tokens" row)."""
    seq = 16
    gen = torch.Generator().manual_seed(0)
    tokens = {"pubmed": torch.randint(0, 1000, (5 * seq + 1,), generator=gen),
              "c4": torch.randint(0, 1000, (3 * seq + 7,), generator=gen)}  # (7 - 1 tokens left over)
    for domain, t in tokens.items():
        (tmp_path / "tok" / domain).mkdir(parents=True)
        t.numpy().astype("uint16").tofile(tmp_path / "tok" / domain / "heldout.bin")
    out = tmp_path / "r.json"
    code, stdout, stderr = run_eval("--model", checkpoint, "--tokenizer", TOKENIZER, "--tasks", "", "--ppl-data",
                                    tmp_path / "tok", "--ppl-domains", "pubmed,c4", "--seq-len", seq,
                                    "--batch-size", 2, "--device", "cpu", "--out", out, cwd=tmp_path)
    assert code == 0, stderr
    results = json.loads(out.read_text())["results"]
    model = from_pretrained(checkpoint).eval()
    for domain, t in tokens.items():
        windows = (len(t) - 1) // seq
        nll = 0.0
        with torch.no_grad():
            for j in range(windows):
                w = t[j * seq : j * seq + seq + 1]  # (seq + 1,)
                logits = model(w[None, :-1])[0]  # (seq, Vp)
                nll += torch.nn.functional.cross_entropy(logits.double(), w[1:], reduction="sum").item()
        expected = nll / (windows * seq)
        got = results[f"ppl_{domain}"]
        assert set(got) == {"task", "kind", "n", "loss", "ppl", "bpb"} and got["n"] == windows * seq
        assert got["loss"] == pytest.approx(expected, rel=1e-5) and got["ppl"] == pytest.approx(math.exp(expected),
                                                                                                 rel=1e-4)
        # bits per byte: the bytes of the targets' text, by HF tokenizers' token strings and GPT-2's byte alphabet
        targets = [w for j in range(windows) for w in t[j * seq + 1 : j * seq + seq + 1].tolist()]
        n_bytes = sum(len(hf_token_bytes(i)) for i in targets)
        assert got["bpb"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert [line.split("|")[2].strip() for line in stdout.splitlines() if line.startswith("| ppl_c4 |")] == [
        "n", "loss", "ppl", "bpb"]
    assert "heldout" not in stderr and "pubmed/meta.json is missing" in stderr  # (no meta.json: not checked)



@needs_data
def test_eval_ppl_data_of_another_tokenizer_is_refused(checkpoint, tmp_path):
    """Token files whose meta.json names another tokenizer than the one eval.py scores with (the second of two
    domains): exit 2, naming both and the fix, before the model is loaded; so are token files holding an id the
    tokenizer does not have."""
    from minimamba.data import prepare
    from tests.test_tokenizer import tiny_tokenizer_json

    (tmp_path / "tiny.json").write_text(json.dumps(tiny_tokenizer_json()))
    raw = tmp_path / "doc.txt"
    raw.write_text("the hat\n\nhe ate a tea\n", encoding="utf-8")
    prepare("pubmed", [raw], load_tokenizer(TOKENIZER), tmp_path / "tok", split="heldout")  # (the right one)
    prepare("c4", [raw], load_tokenizer(tmp_path / "tiny.json"), tmp_path / "tok", split="heldout")
    out = tmp_path / "r.json"
    # (a --model that is no checkpoint: the token files are checked before any model is loaded)
    code, stdout, stderr = run_eval("--model", tmp_path / "no-model", "--tokenizer", TOKENIZER, "--tasks", "",
                                    "--ppl-data", tmp_path / "tok", "--ppl-domains", "pubmed,c4", "--seq-len", 4,
                                    "--out", out, cwd=tmp_path)
    assert code == 2 and not out.exists()
    assert f"c4's token files were prepared with {tmp_path / 'tiny.json'}, whose ids stand for other text than " \
           f"{TOKENIZER}'s: give the tokenizer that prepared them (--tokenizer {tmp_path / 'tiny.json'})" in stderr

    # token files without a meta.json, with an id beyond the tokenizer: refused before the model too
    (tmp_path / "raw" / "pubmed").mkdir(parents=True)
    torch.tensor([5, 60000, 7, 8, 9, 0], dtype=torch.int32).numpy().astype("uint16").tofile(
        tmp_path / "raw" / "pubmed" / "heldout.bin")
    code, stdout, stderr = run_eval("--model", tmp_path / "no-model", "--tokenizer", TOKENIZER, "--tasks", "",
                                    "--ppl-data", tmp_path / "raw", "--ppl-domains", "pubmed", "--seq-len", 4,
                                    cwd=tmp_path)
    assert code == 2 and "pubmed/meta.json is missing" in stderr
    assert f"{tmp_path / 'raw' / 'pubmed'}: its held-out tokens hold id 60000, but the tokenizer ({TOKENIZER}) has " \
           "50277 ids: they were made by another tokenizer (give --tokenizer)" in stderr


def hf_token_bytes(i):
    """The text bytes of id i by HF tokenizers (the oracle): an added token's content (none for a special one),
    else its token string in GPT-2's byte alphabet (printable Latin-1 bytes as themselves, each other byte k-th
    in order as chr(256 + k)), mapped back to bytes."""
    ref, added = _hf_reference()
    if i in added:
        return b"" if added[i].special else added[i].content.encode("utf-8")
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
    return bytes(to_byte[c] for c in ref.id_to_token(i))


@functools.lru_cache
def _hf_reference():
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers (the test oracle) is not installed")
    ref = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    return ref, ref.get_added_tokens_decoder()  # ({id: AddedToken})


@pytest.mark.parametrize("args, says", [
    (["--tasks", "arc_easy,nosuchtask"], "unknown task 'nosuchtask'"),
    (["--tasks", "pubmedqa", "--task-data", "{tmp}/empty"], "python -m minimamba.tasks download pubmedqa"),
    (["--tasks", "arc_easy", "--limit", "0"], "--limit must be at least 1"),
    (["--tasks", ""], "nothing to evaluate"),
    (["--tasks", "", "--ppl-data", "{tmp}/none"],  # before the model, not after the tasks
     "data directory {tmp}/none does not exist. Prepare each domain of --ppl-domains first"),
    (["--tasks", "", "--ppl-data", "{tmp}"], "no heldout tokens for domain(s) pubmed, c4, wikipedia in {tmp}"),
    (["--tasks", "", "--ppl-data", "{tmp}", "--ppl-domains", " "], "needs at least one domain"),
    (["--tasks", "", "--ppl-data", "{tmp}", "--out", "{tmp}/a-file/res.json"], "cannot write {tmp}/a-file/res.json"),
    (["--tasks", "arc_easy", "--device", "gpu"], "unknown --device 'gpu'"),
    # every count is checked, not only --limit
    *[(["--tasks", "arc_easy", f"--{name}", "0"], f"--{name} must be at least 1, got 0")
      for name in ("sample", "max-new-tokens", "max-tokens", "batch-size", "seq-len", "ppl-windows")],
    (["--tasks", "arc_easy", "--limit", "2", "--sample", "2"], "give --limit (the first N items) or --sample"),
    (["--tasks", "", "--ppl-data", "{tmp}", "--predictions", "{tmp}"], "{tmp} is a directory; give a file name"),
])
def test_eval_setup_errors(args, says, tmp_path):
    (tmp_path / "a-file").write_text("")
    code, _, stderr = run_eval("--model", tmp_path / "never-read", *[a.format(tmp=tmp_path) for a in args],
                               cwd=tmp_path)
    assert code == 2 and says.format(tmp=tmp_path) in stderr, stderr


def test_help_says_what_each_default_is_once(tmp_path):
    """--task-data's help said "(default: $MINIMAMBA_TASK_DATA or data/tasks) (default: None)"."""
    code, stdout, _ = run_eval("--help", cwd=tmp_path)
    text = " ".join(stdout.split())
    assert code == 0 and ("--task-data TASK_DATA directory of the tasks' files (default: $MINIMAMBA_TASK_DATA if "
                          "set, else data/tasks in the current directory) --split") in text
    assert "(default: the model directory's, else EleutherAI/gpt-neox-20b) --tasks" in text
    assert "(default: print only) --predictions" in text


@pytest.mark.parametrize("content, says", [
    ('{"loss": 1}', "is not a results file of eval.py"),
    ('{"results": [1, 2]}', "is not a results file of eval.py"),
    ('{"results": {"arc_easy": 0.5}}', "is not a results file of eval.py"),
    ('{"results": {"arc_easy": {"acc,none": 0.7}}, "versions": {"arc_easy": 1}}', "lm-evaluation-harness output"),
    ("{not json", "cannot read results file"),
])
def test_compare_refuses_a_file_that_is_not_results(tmp_path, content, says):
    (tmp_path / "x.json").write_text(content)
    code, _, stderr = run_eval("--compare", tmp_path / "x.json", cwd=tmp_path)
    assert code == 2 and says in stderr, stderr


def test_compare_says_where_the_runs_settings_differ(tmp_path):
    run = {"config": {"split": "test", "limit": None, "max_new_tokens": 16},
           "results": {"arc_easy": {"kind": "choice", "acc": 0.5}}}
    (tmp_path / "a.json").write_text(json.dumps(run))
    (tmp_path / "b.json").write_text(json.dumps({"config": {"split": "test", "limit": 10, "max_new_tokens": 128},
                                                 "results": {**run["results"], "note_completion": {
                                                     "kind": "generate", "rouge1": 7.0}}}))
    code, stdout, stderr = run_eval("--compare", "a.json", "b.json", "a.json", cwd=tmp_path)
    assert code == 0 and "the runs differ in --limit (None vs 10 vs None)" in stderr and "split" not in stderr
    assert "max-new-tokens" not in stderr  # (only b.json has a generation task)
    assert "| task | metric | a.json | b.json | a.json (3) |" in stdout  # a file named twice: two columns
    # the tasks one run has and another has not: named, and "–" in the table
    assert stderr.count("has no note_completion (– in its column)") == 2 and "note: a.json has no" in stderr
    assert "| note_completion | rouge1 | – | 7.0000 | – |" in stdout


@needs_data
def test_results_are_saved_after_every_task(checkpoint, tmp_path, monkeypatch):
    import minimamba.evaluate

    def second_task_fails(model, tokenizer, task, items, **options):
        if task.name == "piqa":
            raise KeyboardInterrupt
        return {"task": task.name, "kind": task.kind, "acc": 0.5, "n": len(items), "seconds": 1.0}

    monkeypatch.setattr(minimamba.evaluate, "evaluate_task", second_task_fails)
    with pytest.raises(KeyboardInterrupt):
        run_eval("--model", checkpoint, "--tokenizer", TOKENIZER, "--task-data", DATA, "--tasks", "arc_easy,piqa",
                 "--limit", 2, "--device", "cpu", "--out", tmp_path / "res.json", cwd=tmp_path)
    assert list(json.loads((tmp_path / "res.json").read_text())["results"]) == ["arc_easy"]


@needs_data
def test_qa_scoring_recipe_scores_each_task_as_the_recipe_did(checkpoint, tmp_path, monkeypatch):
    import minimamba.evaluate

    seen = {}

    def record(model, tokenizer, task, items, **options):
        seen[task.name] = options["qa_scoring"]
        return {"task": task.name, "kind": task.kind, "acc": 0.5, "n": len(items), "seconds": 1.0}

    monkeypatch.setattr(minimamba.evaluate, "evaluate_task", record)
    code, _, stderr = run_eval("--model", checkpoint, "--tokenizer", TOKENIZER, "--task-data", DATA, "--tasks", "qa",
                               "--qa-scoring", "recipe", "--limit", 1, "--device", "cpu", cwd=tmp_path)
    assert code == 0, stderr
    assert seen == {"pubmedqa": "logprob", "bioasq": "generate"}


@needs_data
def test_tasks_named_twice_run_once_with_the_options_given_and_bf16_decodes_with_the_torch_step(checkpoint, tmp_path,
                                                                                                monkeypatch):
    """--tasks pubmedqa,qa names pubmedqa twice (itself and in its group): scored once, in the order first named,
    each with the counts given. Under --dtype bfloat16 the model decodes with the torch step, which runs in the
    autocast (the C step computes in float32 whatever the autocast: not the bf16 model's generations)."""
    import minimamba.evaluate

    seen = []

    def record(model, tokenizer, task, items, **options):
        seen.append((task.name, model.decode_backend, options))
        return {"task": task.name, "kind": task.kind, "acc": 0.5, "n": len(items), "seconds": 1.0}

    monkeypatch.setattr(minimamba.evaluate, "evaluate_task", record)
    for dtype, backend, amp in (("bfloat16", "torch", torch.bfloat16), ("float32", "auto", None)):
        seen.clear()
        code, _, stderr = run_eval("--model", checkpoint, "--tokenizer", TOKENIZER, "--task-data", DATA, "--tasks",
                                   "pubmedqa,qa,pubmedqa", "--limit", 1, "--device", "cpu", "--dtype", dtype,
                                   "--max-new-tokens", 7, "--max-tokens", 300, "--batch-size", 3, cwd=tmp_path)
        assert code == 0, stderr
        assert [(name, b) for name, b, _ in seen] == [("pubmedqa", backend), ("bioasq", backend)], dtype
        for _, _, options in seen:
            assert {k: options[k] for k in ("autocast_dtype", "max_new_tokens", "max_tokens", "max_prompt_tokens",
                                            "batch_size", "gen_batch_size")} == dict(
                autocast_dtype=amp, max_new_tokens=7, max_tokens=300, max_prompt_tokens=300, batch_size=3,
                gen_batch_size=3), dtype


@needs_data
def test_a_tokenizer_with_more_ids_than_the_model_is_refused(tmp_path):
    small = tmp_path / "small"
    Mamba2LM(Mamba2Config(d_model=32, n_layer=1, d_state=16, headdim=16, vocab_size=1000)).save_pretrained(small)
    code, _, stderr = run_eval("--model", small, "--tokenizer", TOKENIZER, "--task-data", DATA, "--tasks", "arc_easy",
                               "--limit", 1, "--device", "cpu", cwd=tmp_path)
    assert code == 2 and "the model only 1000: they do not belong together (give --tokenizer)" in stderr, stderr


def test_on_a_gpu_older_than_8_0_eval_says_it_computes_in_float32(tmp_path, fake_gpu):
    """eval.py on a T4 (torch.cuda's answers faked; the run stops at a missing --ppl-data, before any model is
    loaded): a note names the GPU and what it means, and --dtype bfloat16 is refused naming it."""
    fake_gpu((7, 5), "Tesla T4")
    code, stdout, stderr = run_eval("--model", tmp_path / "none", "--device", "cuda", "--tasks", "", "--ppl-data",
                                    tmp_path / "none", cwd=tmp_path)
    assert code == 2 and "note: Tesla T4 has compute capability 7.5; Triton and bfloat16 arithmetic need 8.0 or " \
                          "newer: computing in float32, with the torch scan unless --backend triton" in stderr
    code, stdout, stderr = run_eval("--model", tmp_path / "none", "--device", "cuda", "--dtype", "bfloat16", "--tasks",
                                    "", "--ppl-data", tmp_path / "none", cwd=tmp_path)
    assert code == 2 and "error: --dtype bfloat16: Tesla T4 has compute capability 7.5" in stderr


@needs_data
def test_the_mimic_group_scores_a_users_discharge_notes(checkpoint, tmp_path):
    """`--tasks mimic`: both MIMIC-IV-Note tasks on the discharge notes put in the task data (made here in its
    layout), their ROUGE as the library computes it; the group is not part of `all`."""
    from minimamba.tasks import GROUPS, drawn, patient_split
    from tests.test_tasks import mimic_note, write_mimic

    subjects = [s for s in map(str, range(300, 400)) if patient_split(s) == "test"][:2]
    write_mimic(tmp_path / "tasks/clinical/mimic-iv-note/discharge.csv.gz",
                [(f"{s}-DS-1", s, mimic_note(s)) for s in subjects])
    out = tmp_path / "res.json"
    code, stdout, stderr = run_eval("--model", checkpoint, "--tokenizer", TOKENIZER, "--task-data", tmp_path / "tasks",
                                    "--tasks", "mimic", "--max-new-tokens", 4, "--device", "cpu", "--out", out,
                                    cwd=tmp_path)
    assert code == 0, stderr
    saved = json.loads(out.read_text())
    results = saved["results"]
    assert set(results) == {"mimic_completion", "mimic_discharge"} and "mimic_completion" not in GROUPS["all"]
    notes = tmp_path / "tasks/clinical/mimic-iv-note/discharge.csv.gz"  # (hashed once, named by both tasks)
    assert saved["config"]["task_files"] == {name: {str(notes): hashlib.sha256(notes.read_bytes()).hexdigest()}
                                             for name in results}
    model, tok = from_pretrained(checkpoint).eval(), load_tokenizer(TOKENIZER)
    for name in results:
        expected = evaluate_task(model, tok, TASKS[name], load_task(name, "test", tmp_path / "tasks"), batch_size=16,
                                 max_new_tokens=4, gen_batch_size=16)
        assert results[name]["n"] == 2
        assert {k: results[name][k] for k in ("rouge1", "rouge2", "rougeL")} == \
            {k: pytest.approx(expected[k], abs=1e-9) for k in ("rouge1", "rouge2", "rougeL")}
    # --sample 1: the one note of each task that tasks.drawn picks (its id hashing lowest), whichever it is
    preds = tmp_path / "preds.jsonl"
    code, stdout, stderr = run_eval("--model", checkpoint, "--tokenizer", TOKENIZER, "--task-data", tmp_path / "tasks",
                                    "--tasks", "mimic", "--sample", 1, "--max-new-tokens", 1, "--device", "cpu",
                                    "--predictions", preds, cwd=tmp_path)
    assert code == 0, stderr
    scored = [(row["task"], row["id"]) for row in map(json.loads, preds.read_text().splitlines())]
    assert scored == [(name, drawn(load_task(name, "test", tmp_path / "tasks"), 1)[0].id) for name in results]

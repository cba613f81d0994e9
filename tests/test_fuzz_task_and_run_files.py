"""Fuzzing the readers of files a user supplies (task data, eval.py's results) or a crash can damage (a run's
OUT/latest, log.jsonl, a checkpoint's config.json, OUT/best/best.json, training_state.pt).

Each test draws a damaged variant of a well-formed file (a field dropped or given another JSON value, a lone
surrogate, a byte order mark, bytes that are not UTF-8, a cut, a CSV row with a field more or less...), reads
it, and asserts what the module promises: the read succeeds and gives sane items (golds in range, labels in
the allowed set, text that is Unicode), or it fails with the module's own error (TaskDataError, SetupError,
or the ValueError the function documents) naming the file. Never a traceback of another kind, and a run's
folder is never changed by a refused resume. The regression tests below them pin each failure the fuzzing
found, by hand.

Budget: MINIMAMBA_FUZZ_DRAWS draws per reader (default 12, deterministic); a campaign:
    MINIMAMBA_FUZZ_DRAWS=500 python -m pytest tests/test_fuzz_task_and_run_files.py -k fuzz
"""

import bz2
import copy
import csv
import functools
import io
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minimamba import evaluate, finetune, tasks, training
from minimamba.config import Mamba2Config
from minimamba.tasks import Choice, Generation, TaskDataError, load_task
from minimamba.tokenizer import SURROGATE
from minimamba.training import SetupError
from tests.conftest import scratch_folder
from tests.test_tasks import write

DRAWS = int(os.environ.get("MINIMAMBA_FUZZ_DRAWS", "12"))
fuzz = settings(max_examples=DRAWS, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------------------------------
# Strategies: well-formed records, then damage to their fields and to the file's bytes

ODD_TEXTS = ["", " ", "\n", "\ud800", "a\udfffb", "\udc80", "yes", "no", "maybe", "Yes ", "NO", "Question: ", "\ufeffx",
             "[title]", "0", "-1", "null"]
texts = st.text(max_size=12) | st.sampled_from(ODD_TEXTS)
words = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x24F), min_size=1, max_size=10)
scalars = st.none() | st.booleans() | st.integers(-3, 6) | st.floats() | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(texts, inner, max_size=3), max_leaves=6)


@st.composite
def damaged(draw, record):
    """`record` (a dict) with some fields dropped, replaced by another JSON value or an odd text, or added;
    anything else than a dict as it is."""
    if not isinstance(record, dict):
        return record
    record = dict(record)
    for key in list(record):
        action = draw(st.sampled_from(["keep"] * 3 + ["drop", "replace", "odd", "odd"]))
        if action == "drop":
            del record[key]
        elif action == "replace":
            record[key] = draw(json_values)
        elif action == "odd":  # (in a list of texts, its first one)
            odd = draw(st.sampled_from(ODD_TEXTS))
            record[key] = [odd, *record[key][1:]] if isinstance(record[key], list) else odd
    if draw(st.integers(0, 5)) == 0:
        record[draw(texts)] = draw(json_values)
    return record


@st.composite
def damaged_bytes(draw, data):
    """`data` (bytes) as a damaged copy may hold it: unchanged, cut, a byte order mark, bytes that are not
    UTF-8, a junk line, "\\r\\n" line ends, or nothing."""
    kind = draw(st.sampled_from(["same", "same", "cut", "bom", "latin1", "junk", "crlf", "empty"]))
    at = draw(st.integers(0, len(data)))
    if kind == "cut":
        return data[:at]
    if kind == "bom":
        return b"\xef\xbb\xbf" + data
    if kind == "latin1":
        return data[:at] + draw(st.sampled_from([b"\xe9", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80"])) + data[at:]
    if kind == "junk":
        line = draw(st.sampled_from([b"{", b"[1]", b"null", b"{}", b"\"x\"", b"1,2", b'"a', b"\x00\x00",
                                     b"[" * 5000 + b"]" * 5000]))  # (the last: deeper than Python's recursion limit)
        return data[:at] + b"\n" + line + b"\n" + data[at:]
    if kind == "crlf":
        return data.replace(b"\n", b"\r\n")
    if kind == "empty":
        return b""
    return data


def jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# ----------------------------------------------------------------------------------------------------------
# What a task reader may do: give sane items, or raise TaskDataError naming one of its files


def is_text(s):
    return isinstance(s, str) and not SURROGATE.search(s)


def check_items(items, labels=None):
    assert items and len({i.id for i in items}) == len(items)
    for item in items:
        if isinstance(item, Choice):
            assert item.options and 0 <= item.gold < len(item.options)
            assert all(is_text(c) and is_text(k) and k.strip() for c, k in item.options)
            if labels is not None:
                assert item.labels[item.gold] in labels
        else:
            assert isinstance(item, Generation)
            assert is_text(item.prompt) and is_text(item.reference) and item.reference.strip()


def load_or_refuse(name, data_dir, split="test", labels=None):
    """load_task(name); its items are sane, or it raised a TaskDataError naming one of the task's files."""
    try:
        items = load_task(name, split, data_dir)
    except TaskDataError as e:
        files = tasks.task_files(name, split, data_dir)
        assert any(str(p) in str(e) for p in files), f"the error names none of {files}: {e}"
        event("refused")
        return None
    event("read")
    check_items(items, labels)
    return items


mc_records = {
    "arc_easy": st.fixed_dictionaries({"query": words.map("Question: {}".format),
                                       "choices": st.lists(words, min_size=2, max_size=4), "gold": st.integers(0, 1)}),
    "piqa": st.fixed_dictionaries({"query": words.map("Question: {}\n".format),
                                   "choices": st.lists(words, min_size=2, max_size=2), "gold": st.integers(0, 1)}),
    "openbookqa": st.fixed_dictionaries({"query": words, "choices": st.lists(words, min_size=4, max_size=4),
                                         "gold": st.integers(0, 3)}),
    "winogrande": st.fixed_dictionaries({"context_options": st.lists(words, min_size=2, max_size=2),
                                         "continuation": words, "gold": st.integers(0, 1)}),
    "lambada": st.fixed_dictionaries({"context": words, "continuation": words}),
}
mc_files = {"arc_easy": "mc/arc_easy.jsonl", "piqa": "mc/piqa.jsonl", "openbookqa": "mc/openbook_qa.jsonl",
            "winogrande": "mc/winogrande.jsonl", "lambada": "mc/lambada_openai.jsonl"}


@pytest.mark.parametrize("name", list(mc_records))
@fuzz
@given(st.data())
def test_fuzz_multiple_choice_jsonl(name, data):
    records = data.draw(st.lists(mc_records[name], min_size=1, max_size=3))
    records = [data.draw(damaged(r)) if data.draw(st.booleans()) else r for r in records]
    with scratch_folder() as d:
        write(d / mc_files[name], data.draw(damaged_bytes(jsonl(records))))
        load_or_refuse(name, d)


@fuzz
@given(st.data())
def test_fuzz_hellaswag_text(data):
    item = st.tuples(words, st.sampled_from(["0", "1", "2", "3"]), st.lists(words, min_size=4, max_size=4))
    items = data.draw(st.lists(item, min_size=1, max_size=3))
    text = "".join(f"{q}\n{g}\n" + "".join(e + "\n" for e in endings) for q, g, endings in items).encode()
    text = data.draw(damaged_bytes(text))
    compressed = bz2.compress(text)
    wrapped = data.draw(st.sampled_from(["bz2", "bz2", "cut", "plain"]))
    payload = {"bz2": compressed, "cut": compressed[: len(compressed) // 2], "plain": text}[wrapped]
    with scratch_folder() as d:
        write(d / "mc/hellaswag_val_full.txt.bz2", payload)
        load_or_refuse("hellaswag", d)


pqal_records = st.fixed_dictionaries({"QUESTION": words, "CONTEXTS": st.lists(words, min_size=1, max_size=2),
                                      "final_decision": st.sampled_from(["yes", "no", "maybe"])})


@pytest.mark.parametrize("split", ["test", "train"])
@fuzz
@given(st.data())
def test_fuzz_pubmedqa_json(split, data):
    pmids = data.draw(st.lists(st.integers(1, 99).map(str), min_size=2, max_size=4, unique=True))
    pqal = {pmid: data.draw(pqal_records) for pmid in pmids}
    truth = {pmid: pqal[pmid]["final_decision"] for pmid in pmids[:1]}
    pqal = {k: data.draw(damaged(v)) if data.draw(st.booleans()) else v for k, v in pqal.items()}
    if data.draw(st.integers(0, 3)) == 0:
        truth = data.draw(json_values | damaged(truth))
    with scratch_folder() as d:
        write(d / "pubmedqa/ori_pqal.json", data.draw(damaged_bytes(json.dumps(pqal, indent=1).encode())))
        write(d / "pubmedqa/test_ground_truth.json", data.draw(damaged_bytes(json.dumps(truth).encode())))
        load_or_refuse("pubmedqa", d, split, labels=("yes", "no", "maybe"))


bioasq_questions = st.fixed_dictionaries({
    "id": words, "body": words, "type": st.sampled_from(["yesno", "yesno", "factoid"]),
    "exact_answer": st.sampled_from(["yes", "no", "Yes ", "NO"]),
    "snippets": st.lists(st.fixed_dictionaries({"text": words}), min_size=1, max_size=2)})


@fuzz
@given(st.data())
def test_fuzz_bioasq_golden_files(data):
    questions = data.draw(st.lists(bioasq_questions, min_size=1, max_size=3, unique_by=lambda q: q["id"]))
    questions = [data.draw(damaged(q)) if data.draw(st.booleans()) else q for q in questions]
    for q in questions:
        if isinstance(q.get("snippets"), list) and q["snippets"] and data.draw(st.booleans()):
            q["snippets"][0] = data.draw(damaged(q["snippets"][0]) | json_values)
    golden = {"questions": questions} if data.draw(st.integers(0, 5)) else data.draw(json_values)
    with scratch_folder() as d:
        write(d / "bioasq/raw/12B1_golden.json", data.draw(damaged_bytes(json.dumps(golden).encode())))
        for batch in ("12B2", "12B3", "12B4"):
            write(d / f"bioasq/raw/{batch}_golden.json", json.dumps({"questions": []}).encode())
        load_or_refuse("bioasq", d, labels=("yes", "no"))


bioasq_derived = st.fixed_dictionaries({
    "id": words, "question": words, "answer": st.sampled_from(["yes", "no", "Yes ", "NO"]),
    "snippets": st.lists(words, min_size=1, max_size=2), "batch": st.sampled_from(["12B1", "12B4", "9B5", "13B1"])})


@pytest.mark.parametrize("split", ["test", "train"])
@fuzz
@given(st.data())
def test_fuzz_bioasq_derived_jsonl(split, data):
    records = data.draw(st.lists(bioasq_derived, min_size=1, max_size=3, unique_by=lambda r: r["id"]))
    records = [data.draw(damaged(r)) if data.draw(st.booleans()) else r for r in records]
    with scratch_folder() as d:
        write(d / tasks.BIOASQ_DERIVED, data.draw(damaged_bytes(jsonl(records))))
        load_or_refuse("bioasq", d, split, labels=("yes", "no"))


NOTE = ("CHIEF COMPLAINT\n\nKnee pain after a fall, with swelling and stiffness since last week, worse on the stairs "
        "and at night.\n\nASSESSMENT AND PLAN\n\nKnee sprain. Rest, ice, ibuprofen as needed, and a follow-up visit "
        "in two weeks if it is not better.")


@pytest.mark.parametrize("name", ["note_completion", "note_summary"])
@fuzz
@given(st.data())
def test_fuzz_aci_bench_csv(name, data):
    """ACI-BENCH's CSVs (dataset,encounter_id,dialogue,note): a row with a field more or less, an empty or odd
    field, a quoted field left open, a header without a column, and the byte-level damage above."""
    rows = [["dataset", "encounter_id", "dialogue", "note"]]
    for i in range(data.draw(st.integers(1, 3))):
        rows.append(["virtassist", f"D{i}", "[doctor] hi", NOTE])
        what = data.draw(st.sampled_from(["keep", "keep", "field", "more", "fewer"]))
        if what == "field":
            rows[-1][data.draw(st.integers(0, 3))] = data.draw(texts)
        elif what == "more":
            rows[-1].append(data.draw(texts))
        elif what == "fewer":
            rows[-1].pop()
    if data.draw(st.integers(0, 5)) == 0:
        rows[0][data.draw(st.integers(0, 3))] = data.draw(texts)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    text = buffer.getvalue().encode("utf-8", "surrogatepass")
    if data.draw(st.integers(0, 5)) == 0:
        text += b'virtassist,D9,"open quote\n'
    with scratch_folder() as d:
        split = tasks.TASKS[name].files["test"]
        write(d / split[0], data.draw(damaged_bytes(text)))
        for k, rel in enumerate(split[1:]):
            write(d / rel, f"dataset,encounter_id,dialogue,note\nv,E{k},d,\"{NOTE}\"\n".encode())
        load_or_refuse(name, d)


# the task-file failures the fuzzing found, by hand


def test_a_task_text_with_half_a_character_is_refused_naming_the_file_and_line():
    """A JSON escape "\\ud800" without its other half reads as a str that is not Unicode: it was accepted,
    and the tokenizer refused it later, in the middle of an evaluation, naming no file."""
    with scratch_folder() as d:
        write(d / "mc/lambada_openai.jsonl", b'{"context": "a", "continuation": "b"}\n'
                                             b'{"context": "x\\ud800y", "continuation": "b"}\n')
        with pytest.raises(TaskDataError, match=r"lambada_openai.jsonl:2: 'context' holds an unpaired surrogate "
                                                r"\('\\ud800', half of a character\) at position 1: a damaged copy"):
            load_task("lambada", data_dir=d)
        write(d / "mc/arc_easy.jsonl", b'{"query": "Question: q", "choices": ["a", "\\udc80"], "gold": 0}\n')
        with pytest.raises(TaskDataError, match=r"arc_easy.jsonl:1: 'choices' holds an unpaired surrogate"):
            load_task("arc_easy", data_dir=d)
        golden = {"questions": [{"id": "a", "body": "q?", "type": "yesno", "exact_answer": "yes",
                                 "snippets": [{"text": "fine"}, {"text": "half \ud800"}]}]}
        write(d / "bioasq/raw/12B1_golden.json", json.dumps(golden).encode())
        for batch in ("12B2", "12B3", "12B4"):
            write(d / f"bioasq/raw/{batch}_golden.json", b'{"questions": []}')
        with pytest.raises(TaskDataError, match=r"12B1_golden.json \(question 0\): 'snippets' holds an unpaired"):
            load_task("bioasq", data_dir=d)


def test_json_nested_too_deeply_is_refused_naming_the_file():
    """Arrays nested deeper than Python's recursion limit made json raise RecursionError through the loaders."""
    deep = b"[" * 5000 + b"]" * 5000
    with scratch_folder() as d:
        write(d / "mc/lambada_openai.jsonl", b'{"context": "a", "continuation": "b"}\n' + deep + b"\n")
        with pytest.raises(TaskDataError, match=r"lambada_openai.jsonl:2: JSON nested too deeply to read"):
            load_task("lambada", data_dir=d)
        write(d / "pubmedqa/ori_pqal.json", b'{"1": ' + deep + b"}")
        write(d / "pubmedqa/test_ground_truth.json", b'{"1": "yes"}')
        with pytest.raises(TaskDataError, match=r"ori_pqal.json: JSON nested too deeply to read: a damaged copy"):
            load_task("pubmedqa", data_dir=d)


# ----------------------------------------------------------------------------------------------------------
# A run's files, which a crash or a hand can damage: what --resume (train.py, sft.py) reads must refuse with
# a SetupError naming the file, before it changes anything in OUT


def snapshot(d):
    """{relative path: bytes (None for a folder)} of everything under d."""
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


latest_texts = (st.sampled_from(["step-000002\n", "step-000001", "", "\n", ".", "..", "/etc", "step-000002/..",
                                 "latest", "step-000002\nstep-000001\n", "step-000009\n", " step-000002 "])
                .map(str.encode) | st.binary(max_size=16))


@fuzz
@given(st.data())
def test_fuzz_out_latest(data):
    """OUT/latest names the checkpoint --resume continues (and a start without --resume refuses an OUT that
    has one): whatever it holds, latest_checkpoint names a step directory of OUT holding a training state,
    or refuses with a SetupError naming OUT/latest; OUT is left as it was."""
    with scratch_folder() as out:
        for step in (1, 2):
            write(out / f"step-00000{step}/training_state.pt", b"state")
        write(out / "latest", data.draw(damaged_bytes(data.draw(latest_texts))))
        before = snapshot(out)
        try:
            found = training.latest_checkpoint(out)
        except SetupError as e:
            assert str(out / "latest") in str(e)
        else:
            assert found.parent == out and (found / "training_state.pt").is_file()
        assert snapshot(out) == before


log_records = st.fixed_dictionaries(
    {"step": st.integers(0, 6), "tokens": st.integers(0, 10**6)},
    optional={"loss": st.floats(0, 10),
              "eval": st.fixed_dictionaries({"c4": st.fixed_dictionaries({"ppl": st.floats(1, 9)})})})


def well_formed(line):
    """The record a log line holds, or None where it is not one (not UTF-8 or JSON, not an object, a step that is
    not a number): a straightforward reading, to compare with."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or type(record.get("step", 0)) not in (int, float):
        return None
    return record


@fuzz
@given(st.data())
def test_fuzz_log_jsonl_on_resume(data):
    """A resumed run keeps the records of OUT/log.jsonl up to its step (a line cut short by a kill, or not a
    record of the log, is dropped and said); read_log gives its records, or a ValueError naming the file."""
    records = [data.draw(damaged(r)) if data.draw(st.integers(0, 3)) == 0 else r
               for r in data.draw(st.lists(log_records, max_size=5))]
    raw = data.draw(damaged_bytes(jsonl(records)))
    with scratch_folder() as d:
        path = d / "log.jsonl"
        write(path, raw)
        try:
            read = training.read_log(path)
        except ValueError as e:
            assert str(path) in str(e)
        else:
            assert all(isinstance(r, dict) for r in read)
        training.JsonlLog(path, True, truncate_after_step=3)
        expected = [r for r in map(well_formed, raw.splitlines()) if r is not None and r.get("step", 0) <= 3]
        assert [json.loads(line) for line in path.read_text().splitlines()] == json.loads(json.dumps(expected))


CONFIG = Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=8, headdim=16, chunk_size=16)


@pytest.mark.parametrize("layout", ["state-spaces", "hf"])
@fuzz
@given(st.data())
def test_fuzz_checkpoint_config_json(layout, data):
    """A checkpoint's config.json (what --resume and from_pretrained build the model from): a Mamba2Config, or
    the ValueError naming the file that _train turns into a SetupError."""
    config = data.draw(damaged(CONFIG.to_dict(layout)))
    if isinstance(config.get("ssm_cfg"), dict):
        config["ssm_cfg"] = data.draw(damaged(config["ssm_cfg"]))
    with scratch_folder() as d:
        write(d / "config.json", data.draw(damaged_bytes(json.dumps(config).encode())))
        try:
            loaded = Mamba2Config.load(d)
        except ValueError as e:
            assert str(d / "config.json") in str(e)
        else:
            assert isinstance(loaded, Mamba2Config) and loaded.d_model > 0 and loaded.n_layer > 0


class _Job:
    kind = "pretraining"


STATE = {"format": 1, "job": "pretraining", "step": 2, "tokens_seen": 64, "elapsed": 1.5, "model": {},
         "optimizer": {"state": {}, "param_groups": [{"params": [0, 1]}]}, "ema": None, "sampler": {"epoch": 0},
         "rng": {"torch": torch.get_rng_state(), "cuda": []}, "config": {"lr": 0.001}}


@fuzz
@given(st.data())
def test_fuzz_training_state(data):
    """A checkpoint's training_state.pt, cut short or with parts missing or of another type: load_training_state
    and check_job_kind accept it or refuse with a SetupError naming the file; the folder is left as it was."""
    state = data.draw(damaged(STATE))
    for part in ("optimizer", "rng"):
        if isinstance(state.get(part), dict) and data.draw(st.booleans()):
            state[part] = data.draw(damaged(state[part]))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with scratch_folder() as d:
        path = d / "step-000002" / "training_state.pt"
        write(path, data.draw(damaged_bytes(buffer.getvalue())))
        before = snapshot(d)
        try:
            loaded = training.load_training_state(path.parent)
            training.check_job_kind(loaded, _Job, path.parent)
        except SetupError as e:
            assert str(path.parent) in str(e)
        assert snapshot(d) == before


class _SFTJob:
    """The part of sft.py's job that resuming reads: its early-stopping state and the fingerprint of its pairs
    (finetune.Finetuning's)."""
    kind = "sft"
    rows_sha256 = {"train": {"pubmedqa": "0" * 64}, "val": {"pubmedqa": "1" * 64}}

    def __init__(self, out):
        self.cfg = type("Cfg", (), {"out": out})
        self.dist = training.Dist()

    def load_state_dict(self, state):
        finetune.Finetuning.load_state_dict(self, state)


@functools.cache
def _resumable_once():
    from minimamba.model import Mamba2LM

    model = Mamba2LM(CONFIG, backend="torch")
    optimizer = torch.optim.AdamW(training.param_groups(model, 0.1, 1.0), lr=1e-3)
    for p in model.parameters():  # (the moments of one step, set by hand: a first step imports torch._dynamo, 3 s)
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.full_like(p, 1e-4),
                              "exp_avg_sq": torch.full_like(p, 1e-8)}
    ema, order = training.EMA(model, 0.9), finetune.EpochOrder({"pubmedqa": 8}, None, 4, seed=0)
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "ema": ema.state_dict(),
             "optimizer": copy.deepcopy(optimizer.state_dict()), "sampler": order.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "cuda": []},
             "early_stopping": {"loss": 1.0, "step": 0, "bad_evals": 0, "stopped_early": False, "eval": None},
             "rows_sha256": copy.deepcopy(_SFTJob.rows_sha256)}
    return model, optimizer, ema, order, state


def _resumable():
    """(model, optimizer, EMA, data order, a training state that fits them, a copy of its own) of a tiny model
    after one step (made once: a resume that succeeds puts back what they hold already)."""
    model, optimizer, ema, order, state = _resumable_once()
    return model, optimizer, ema, order, copy.deepcopy(state)


@fuzz
@given(st.data())
def test_fuzz_training_state_parts_on_resume(data):
    """The parts of a training state (as load_training_state lets them through: of the right top-level type)
    with a key missing or a value of another type inside: resume_state puts them back, or refuses with a
    SetupError naming the checkpoint."""
    model, optimizer, ema, order, state = _resumable()
    part = data.draw(st.sampled_from(["model", "ema", "optimizer", "sampler", "rng", "early_stopping",
                                      "rows_sha256"]))
    state[part] = data.draw(damaged(state[part]))
    if part == "optimizer" and isinstance(state[part].get("param_groups"), list) and state[part]["param_groups"]:
        groups = state[part]["param_groups"]
        i = data.draw(st.integers(0, len(groups) - 1))
        groups[i] = data.draw(damaged(groups[i]))
        if isinstance(groups[i], dict) and isinstance(groups[i].get("params"), list) and groups[i]["params"]:
            groups[i]["params"][0] = data.draw(json_values)
    if part == "optimizer" and isinstance(state[part].get("state"), dict) and state[part]["state"]:
        moments = state[part]["state"]
        key = data.draw(st.sampled_from(list(moments)))
        moments[key] = data.draw(damaged(moments[key]) | json_values)
    source = Path("runs/x/step-000002")
    try:
        training.resume_state(state, model, optimizer, ema, order, _SFTJob("runs/x"), source)
    except SetupError as e:
        assert str(source) in str(e)


@fuzz
@given(st.data())
def test_fuzz_best_json_on_resume(data):
    """sft.py --resume compares OUT/best/best.json with the checkpoint's best (`_mend_best`): whatever the file
    holds, it ends in one of its four outcomes, not a traceback."""
    info = data.draw(damaged({"step": 2, "val_loss": 0.5, "eval": {"all": {"loss": 0.5}}, "tokenizer": None})
                     | json_values)
    with scratch_folder() as out:
        write(out / "best" / "best.json", data.draw(damaged_bytes(json.dumps(info).encode())))
        assert finetune._mend_best(out, {"step": 3, "loss": 0.25, "eval": None}, 4) in (0, 1, 2, 3)


RESULT = {"model": "m", "config": {"split": "test", "limit": None, "max_tokens": None, "qa_scoring": "logprob"},
          "results": {"pubmedqa": {"task": "pubmedqa", "kind": "yesno", "n": 5, "acc": 0.6, "seconds": 1.0},
                      "note_summary": {"task": "note_summary", "kind": "generate", "n": 2, "rouge1": 0.25}}}


@fuzz
@given(st.data())
def test_fuzz_results_files_compared(data):
    """eval.py --compare A B: read_results refuses a file that is not eval.py's with a ValueError naming it;
    one it accepts goes through the comparison (settings, missing tasks, the table) without a traceback."""
    with scratch_folder() as d:
        paths = [d / "a.json", d / "b.json"]
        for path in paths:
            result = data.draw(damaged(copy.deepcopy(RESULT)))
            for part in ("config", "results"):
                if isinstance(result.get(part), dict) and data.draw(st.booleans()):
                    result[part] = data.draw(damaged(result[part]))
            results = result.get("results")
            if isinstance(results, dict) and isinstance(results.get("pubmedqa"), dict) and data.draw(st.booleans()):
                results["pubmedqa"] = data.draw(damaged(results["pubmedqa"]))
            write(path, data.draw(damaged_bytes(json.dumps(result).encode())))
        try:
            runs = {str(p): evaluate.read_results(p) for p in paths}
        except ValueError as e:
            assert any(str(p) in str(e) for p in paths)
            return
        evaluate.settings_that_differ(runs)
        results = {name: run["results"] for name, run in runs.items()}
        evaluate.tasks_missing(results)
        assert evaluate.results_table(results).startswith("| task | metric |")


# the run-file and results-file failures the fuzzing found, by hand


@pytest.mark.parametrize("text", [b"step-\xff\n", b"", b"\n", b"step-000002/..\n", b"../step-000002\n"])
def test_a_damaged_out_latest_is_a_setup_error_naming_it_and_what_to_write(text):
    """OUT/latest not UTF-8 was a UnicodeDecodeError; empty, it "named" OUT itself (whose name the message gave
    as the checkpoint's); a path in it reached outside the step directories. Now: a SetupError naming the file,
    what it holds and the checkpoints to choose from, and OUT unchanged. A name with spaces around still reads."""
    with scratch_folder() as out:
        for step in (1, 2):
            write(out / f"step-00000{step}/training_state.pt", b"state")
        write(out / "latest", text)
        before = snapshot(out)
        with pytest.raises(SetupError, match=rf"^{out / 'latest'} should hold the name of one of {out}'s "
                                             r"checkpoints \(like step-000100\), but it holds .*: it is damaged. Write "
                                             r"the name of the checkpoint to continue into it, e.g. echo step-000002 > "
                                             r".* \(the checkpoints there: step-000001, step-000002\)$"):
            training.latest_checkpoint(out)
        assert snapshot(out) == before
        write(out / "latest", b" step-000001 \r\n")
        assert training.latest_checkpoint(out) == out / "step-000001"
        # a checkpoint named by the user does not go through OUT/latest, damaged or not
        write(out / "latest", text)
        assert training.readable_checkpoint(out / "step-000001") == out / "step-000001"
        assert training.interrupted_saves(out) == {}


def test_log_lines_that_are_not_records_are_dropped_on_resume_and_refused_by_read_log(capsys):
    """Resuming with a log.jsonl holding a JSON line that is not an object ([1]), a step that is not a number,
    bytes that are not UTF-8, or arrays nested too deeply raised AttributeError, TypeError, UnicodeDecodeError
    or RecursionError; now such lines are dropped with a note, like a line a kill cut short, and the records up
    to the resumed step are kept, in order."""
    good = [{"step": 1, "tokens": 8, "loss": 2.5}, {"step": 3, "tokens": 24, "loss": 2.0}, {"tokens": 0, "eval": {}}]
    bad = [b"[1]", b'{"step": "2", "loss": 1.0}', b'{"step": null}', b'{"step": 2, "note": "\xe9"}', b"[" * 5000]
    with scratch_folder() as d:
        path = d / "log.jsonl"
        lines = [json.dumps(good[0]).encode(), *bad, json.dumps(good[1]).encode(), b'{"step": 5, "loss": 1.0}',
                 json.dumps(good[2]).encode()]
        write(path, b"\n".join(lines) + b"\n")
        with pytest.raises(ValueError, match=rf"{path}: line\(s\) \[2, 3, 4, 5, 6\] are not JSON records of the log"):
            training.read_log(path)
        training.JsonlLog(path, True, truncate_after_step=3)
        assert "log.jsonl: dropped line(s) [2, 3, 4, 5, 6], not records of the log" in capsys.readouterr().err
        assert training.read_log(path) == good


def test_a_damaged_best_json_is_not_taken_for_a_best(capsys):
    """OUT/best/best.json with a val_loss that is not a number made sft.py --resume fail formatting it
    (ValueError: Unknown format code 'f'); now that folder is not any evaluation's best: set aside."""
    with scratch_folder() as out:
        write(out / "best" / "best.json", b'{"step": 2, "val_loss": "0.5"}')
        assert finetune._mend_best(out, {"step": 3, "loss": 0.25, "eval": None}, 4) == 3
        assert (out / "best.abandoned" / "best.json").is_file() and not (out / "best").exists()
        assert f"{out / 'best'} is not this run's best, not the best of the run resumed from step 4" in \
            capsys.readouterr().out


@pytest.mark.parametrize("change,message", [
    ({"config": [1]}, r'its "config" should be an object \(eval.py\'s settings\), got list'),
    ({"results": {"pubmedqa": {"kind": ["yesno"], "acc": 0.5}}}, r'the "kind" of pubmedqa should be a string'),
])
def test_a_damaged_results_file_is_refused_by_read_results(change, message):
    """eval.py --compare A B with a results file whose "config" is not an object, or a result's "kind" is not a
    string, failed in the comparison (AttributeError; TypeError: unhashable type); and JSON nested too deeply
    (RecursionError). Now read_results refuses them with a ValueError naming the file."""
    with scratch_folder() as d:
        good, damaged_file = d / "a.json", d / "b.json"
        write(good, json.dumps(RESULT).encode())
        write(damaged_file, json.dumps({**RESULT, "config": {**RESULT["config"], "split": "train"}, **change}).encode())
        with pytest.raises(ValueError, match=rf"^{damaged_file}: {message}"):
            evaluate.read_results(damaged_file)
        write(damaged_file, b'{"results": ' + b"[" * 5000 + b"]" * 5000 + b"}")
        deep = rf"^cannot read results file {damaged_file}: JSON nested too deeply to read$"
        with pytest.raises(ValueError, match=deep):
            evaluate.read_results(damaged_file)


@pytest.mark.parametrize("part,value,error", [
    ("model", {"embedding.weight": 3}, "AttributeError: 'int' object has no attribute 'shape'"),
    ("rng", {"torch": torch.zeros(3), "cuda": []}, "TypeError: RNG state must be a torch.ByteTensor"),
    ("early_stopping", {"loss": 1.0}, "KeyError: 'stopped_early'"),
    ("rows_sha256", ["0" * 64], "AttributeError: 'list' object has no attribute 'get'"),
    ("sampler", {"kind": "sft", "seed": 0, "sizes": {"pubmedqa": 8}, "shares": None, "rows_per_step": 4,
                 "step": "two"}, None),
])
def test_a_training_state_part_of_another_shape_is_a_setup_error_naming_the_checkpoint(part, value, error):
    """A part of training_state.pt that passes its top-level type check but holds a non-tensor weight, an RNG
    state of another dtype or an early-stopping state without its keys raised AttributeError / TypeError /
    KeyError from inside the restore, and a step that is not a number a ValueError naming no file; now each is
    a SetupError naming the checkpoint (and what failed)."""
    model, optimizer, ema, order, state = _resumable()
    state[part] = {**state[part], **value} if part == "model" else value
    source = Path("runs/x/step-000002")
    expected = (rf"^{source / 'training_state.pt'}: a part of it is not what sft.py \(supervised fine-tuning\) writes "
                rf"\({error}\); it was changed since. Resume from another checkpoint" if error else
                rf"^--resume {source}: invalid literal for int\(\) with base 10: 'two'$")
    with pytest.raises(SetupError, match=expected):
        training.resume_state(state, model, optimizer, ema, order, _SFTJob("runs/x"), source)


def test_a_config_json_nested_too_deeply_is_a_value_error_naming_it():
    """Mamba2Config.load let json's RecursionError through (what --resume and from_pretrained call); it is now
    the ValueError naming the file that _train turns into a SetupError."""
    with scratch_folder() as d:
        write(d / "config.json", b'{"d_model": ' + b"[" * 5000 + b"]" * 5000 + b"}")
        deep = rf"^{d / 'config.json'} is not valid JSON \(JSON nested too deeply to read\)"
        with pytest.raises(ValueError, match=deep):
            Mamba2Config.load(d)

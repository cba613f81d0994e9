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
    MINIMAMBA_FUZZ_DRAWS=500 python -m pytest tests/test_fuzz_files.py -k fuzz
"""

import bz2
import csv
import io
import json
import os
import tempfile
from contextlib import contextmanager
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

DRAWS = int(os.environ.get("MINIMAMBA_FUZZ_DRAWS", "12"))
fuzz = settings(max_examples=DRAWS, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextmanager
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


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


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


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
    with folder() as d:
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
    with folder() as d:
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
    with folder() as d:
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
    with folder() as d:
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
    with folder() as d:
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
    with folder() as d:
        split = tasks.TASKS[name].files["test"]
        write(d / split[0], data.draw(damaged_bytes(text)))
        for k, rel in enumerate(split[1:]):
            write(d / rel, f"dataset,encounter_id,dialogue,note\nv,E{k},d,\"{NOTE}\"\n".encode())
        load_or_refuse(name, d)


# the task-file failures the fuzzing found, by hand


def test_a_task_text_with_half_a_character_is_refused_naming_the_file_and_line():
    """A JSON escape "\\ud800" without its other half reads as a str that is not Unicode: it was accepted,
    and the tokenizer refused it later, in the middle of an evaluation, naming no file."""
    with folder() as d:
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
    with folder() as d:
        write(d / "mc/lambada_openai.jsonl", b'{"context": "a", "continuation": "b"}\n' + deep + b"\n")
        with pytest.raises(TaskDataError, match=r"lambada_openai.jsonl:2: JSON nested too deeply to read"):
            load_task("lambada", data_dir=d)
        write(d / "pubmedqa/ori_pqal.json", b'{"1": ' + deep + b"}")
        write(d / "pubmedqa/test_ground_truth.json", b'{"1": "yes"}')
        with pytest.raises(TaskDataError, match=r"ori_pqal.json: JSON nested too deeply to read: a damaged copy"):
            load_task("pubmedqa", data_dir=d)

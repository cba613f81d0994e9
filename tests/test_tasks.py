"""minimamba.tasks: the task files read as lm-eval / the BioMamba recipe read them, clear errors, downloads.

The shared-data tests check counts against /work/shared/data/SOURCES.md and prompts against strings built
here from the files' raw fields (or from independent derivations kept next to them: pqal_test_500.jsonl,
hellaswag.jsonl, bioasq_yesno_golden_9b-12b.jsonl)."""

import bz2
import csv
import gzip
import hashlib
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimamba import tasks
from minimamba.download import DownloadError
from minimamba.tasks import Choice, Generation, TaskDataError, download_task, load_task, sft_example
from tests.conftest import DATA

needs_data = pytest.mark.skipif(not (DATA / "mc" / "arc_easy.jsonl").exists(),
                                reason=f"shared data not found at {DATA} (set MINIMAMBA_DATA)")
QA_HEAD = "Answer the following biomedical research question with yes, no, or maybe based on the provided context."

COUNTS = {  # (task, split) -> items, from SOURCES.md
    ("pubmedqa", "test"): 500, ("pubmedqa", "train"): 500,
    ("bioasq", "test"): 25 + 26 + 24 + 27, ("bioasq", "train"): 19 + 23 + 18 + 24 + 24 + 28 + 6 + 24,
    ("arc_easy", "test"): 2376, ("arc_challenge", "test"): 1172, ("hellaswag", "test"): 10042,
    ("piqa", "test"): 1838, ("winogrande", "test"): 1267, ("openbookqa", "test"): 500, ("lambada", "test"): 5153,
    ("note_completion", "test"): 120, ("note_completion", "train"): 87,  # 40 + 40 + 40; 67 + 20: none skipped
    ("note_summary", "test"): 120, ("note_summary", "train"): 87,
}
_loaded = {}


def shared(name, split="test"):
    """The items of a task on the shared data, loaded once per test session."""
    if (name, split) not in _loaded:
        _loaded[name, split] = load_task(name, split, DATA)
    return _loaded[name, split]


def jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def aci_rows(name):
    with open(DATA / "clinical" / "aci-bench" / f"{name}.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------
# The shared data


@needs_data
@pytest.mark.parametrize("name,split", list(COUNTS))
def test_item_counts_golds_and_ids(name, split):
    items = shared(name, split)
    assert len(items) == COUNTS[name, split]
    assert len({item.id for item in items}) == len(items) and all(item.id.startswith(name + "/") for item in items)
    kind = tasks.TASKS[name].kind
    for item in items:
        if kind == "generate":
            assert isinstance(item, Generation) and item.prompt and item.reference
            assert not item.prompt[-1].isspace() and item.reference == item.reference.strip()
        else:
            assert isinstance(item, Choice) and 0 <= item.gold < len(item.options)
            assert all(continuation.startswith(" ") for _, continuation in item.options)
    assert load_task(name, split, DATA, limit=3) == items[:3]


@needs_data
def test_label_counts():
    def counts(items):
        return [sum(item.gold == i for item in items) for i in range(len(set(items[0].labels)))]

    assert counts(shared("pubmedqa")) == [276, 169, 55]  # yes / no / maybe of the official test
    assert [a + b for a, b in zip(counts(shared("bioasq")), counts(shared("bioasq", "train")))] == [175, 93]
    assert not {item.id for item in shared("pubmedqa")} & {item.id for item in shared("pubmedqa", "train")}


@needs_data
def test_pubmedqa_test_is_the_independently_derived_500():
    derived = jsonl(DATA / "pubmedqa" / "pqal_test_500.jsonl")
    items = shared("pubmedqa")
    assert [item.id for item in items] == [f"pubmedqa/{r['pmid']}" for r in derived]
    for item, r in zip(items, derived):
        assert item.labels == ("yes", "no", "maybe") * 2 and item.labels[item.gold] == r["final_decision"]
        assert item.gold < 3  # the lower-case spelling
        prompt = item.options[0][0]
        assert prompt.startswith(f"{QA_HEAD}\n\nQuestion: {r['question']}\n\nContext:\n")
        assert prompt.endswith(" ".join(r["contexts"])[:2400] + "\n\nAnswer:")
    # train: the other 500 in ori_pqal.json's order (the derived file keeps it; sorted PMIDs would differ)
    train = [r["pmid"] for r in jsonl(DATA / "pubmedqa" / "pqal_trainval_500.jsonl")]
    assert [item.id.split("/")[1] for item in shared("pubmedqa", "train")] == train != sorted(train)


@needs_data
def test_qa_prompts_from_the_raw_records():
    pqal = json.loads((DATA / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    item = next(i for i in shared("pubmedqa") if len(" ".join(pqal[i.id.split("/")[1]]["CONTEXTS"])) > 2400)
    record = pqal[item.id.split("/")[1]]
    context = " ".join(record["CONTEXTS"])[:2400]  # a long abstract: cut to 2,400 characters
    prompt = QA_HEAD + "\n\nQuestion: " + record["QUESTION"] + "\n\nContext:\n" + context + "\n\nAnswer:"
    assert item.options == tuple((prompt, a) for a in (" yes", " no", " maybe", " Yes", " No", " Maybe"))
    assert item.labels[item.gold] == record["final_decision"]

    golden = json.loads((DATA / "bioasq" / "raw" / "12B1_golden.json").read_text(encoding="utf-8"))
    q = next(q for q in golden["questions"] if q["type"] == "yesno")
    item = next(i for i in shared("bioasq") if i.id == f"bioasq/{q['id']}")
    context = " ".join(s["text"].strip() for s in q["snippets"])[:2400]
    prompt = QA_HEAD + "\n\nQuestion: " + q["body"] + "\n\nContext:\n" + context + "\n\nAnswer:"
    assert item.options == tuple((prompt, a) for a in (" yes", " no", " Yes", " No"))
    assert item.labels[item.gold] == q["exact_answer"] and item.gold < 2


@needs_data
def test_bioasq_derived_file_gives_the_same_items(tmp_path):
    """Without bioasq/raw/, the derived JSON lines (made independently from the same golden files) are read."""
    (tmp_path / "bioasq").mkdir()
    (tmp_path / tasks.BIOASQ_DERIVED).symlink_to(DATA / tasks.BIOASQ_DERIVED)
    for split in ("test", "train"):
        assert sorted(load_task("bioasq", split, tmp_path), key=lambda i: i.id) == sorted(
            shared("bioasq", split), key=lambda i: i.id)


@needs_data
def test_multiple_choice_strings_are_lm_evals():
    first = {name: jsonl(DATA / "mc" / f"{file}.jsonl")[0] for name, file in
             [("arc_easy", "arc_easy"), ("arc_challenge", "arc_challenge"), ("piqa", "piqa"),
              ("openbookqa", "openbook_qa"), ("winogrande", "winogrande")]}
    # ARC: lm-eval's "Question: {question}\nAnswer:" and " {choice}"
    for name in ("arc_easy", "arc_challenge"):
        question = first[name]["query"].removeprefix("Question: ")
        context = f"Question: {question}\nAnswer:"
        assert shared(name)[0] == Choice(f"{name}/0", tuple((context, f" {c}") for c in first[name]["choices"]),
                                         first[name]["gold"])
    piqa = shared("piqa")[0]
    assert piqa.options[0] == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                               " " + first["piqa"]["choices"][0])
    assert piqa.gold == 0 and len(piqa.options) == 2
    obqa = shared("openbookqa")[0]
    assert obqa.options[1] == (first["openbookqa"]["query"], " quit eating lunch out") and obqa.gold == 1
    assert shared("winogrande")[0] == Choice("winogrande/0", (
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")), 1)


@needs_data
def test_lambada_is_lm_evals_split_of_the_text():
    """lm-eval's lambada_openai: context = the text's words but the last (split on " "), target " " + last."""
    for item, r in zip(shared("lambada"), jsonl(DATA / "mc" / "lambada_openai.jsonl"), strict=True):
        words = (r["context"] + " " + r["continuation"]).split(" ")
        assert item.options == ((" ".join(words[:-1]), " " + words[-1]),) and item.gold == 0


@needs_data
def test_hellaswag_text_file_matches_the_jsonl_derived_from_it():
    """The 6-line items of the bz2 text against the shared JSON lines made from it; they differ only where
    lm-eval's preprocessing (applied here, not in the JSON lines) drops a "[...]" tag or a double space."""
    items, records = shared("hellaswag"), jsonl(DATA / "mc" / "hellaswag.jsonl")
    differ = 0
    for item, r in zip(items, records, strict=True):
        assert item.gold == r["gold"]
        text = r["query"] + "".join(r["choices"])
        if "[" in text or "  " in text:
            differ += 1
            continue
        assert item.options == tuple((r["query"], " " + c) for c in r["choices"])
    assert 0 < differ < 20


@needs_data
def test_clinical_prompts_from_the_raw_notes():
    row = aci_rows("clinicalnlp_taskB_test1")[0]
    note = row["note"]
    completion = shared("note_completion")[0]
    assert completion.id == f"note_completion/{row['encounter_id']}"
    prefix = completion.prompt.removeprefix("Continue the following clinical note.\n\n")
    assert len(prefix) < len(completion.prompt) and note.startswith(prefix + " ")
    assert len(note) // 2 - 40 <= len(prefix) <= len(note) // 2  # cut at a space at or before the middle
    rest = note[len(prefix) + 1 :]
    assert len(rest) > 2000 and rest.startswith(completion.reference) and len(completion.reference) <= 2000
    assert rest[len(completion.reference)] == " "  # cut at a word's end

    header = note.index("\nASSESSMENT AND PLAN\n")
    summary = shared("note_summary")[0]
    assert summary.prompt == ("Based on the following clinical information, write the assessment and plan.\n\n"
                              "Clinical Notes:\n" + note[:header].strip() + "\n\nAssessment and Plan:")
    assert summary.reference == note[header + len("\nASSESSMENT AND PLAN\n") :].strip()


@needs_data
def test_note_completion_prompt_plus_response_is_the_note():
    notes = {r["encounter_id"]: r["note"] for name in ("clinicalnlp_taskB_test1", "clinicalnlp_taskC_test2",
                                                        "clef_taskC_test3") for r in aci_rows(name)}
    whole = 0
    for item in shared("note_completion"):
        prompt, response = sft_example("note_completion", item)
        note = notes[item.id.split("/")[1]]
        text = prompt.removeprefix("Continue the following clinical note.\n\n") + response
        if len(item.reference) < 1900:  # not cut: the whole note
            whole += 1
            assert text == note.strip()
        else:
            assert note.startswith(text)
    assert whole > 50


# ----------------------------------------------------------------------------------------------------------
# SFT examples


@needs_data
def test_sft_example_is_the_gold_option_and_the_eval_prompt():
    for name in ("pubmedqa", "bioasq"):
        for item in shared(name)[:20]:
            prompt, response = sft_example(name, item)
            assert prompt + response == item.options[item.gold][0] + item.options[item.gold][1]
            assert response == " " + item.labels[item.gold] and prompt.endswith("\n\nAnswer:")
    item = shared("note_summary")[0]
    assert sft_example(tasks.TASKS["note_summary"], item) == (item.prompt, " " + item.reference)


def test_sft_example_refuses_eval_only_tasks_and_wrong_items():
    item = Choice("arc_easy/0", (("Question: q\nAnswer:", " a"), ("Question: q\nAnswer:", " b")), 0)
    with pytest.raises(TaskDataError, match="evaluation-only.*pubmedqa, bioasq, note_completion, note_summary"):
        sft_example("arc_easy", item)
    with pytest.raises(TaskDataError, match="lambada is an evaluation-only"):
        sft_example("lambada", item)
    with pytest.raises(TaskDataError, match="Generations, got a Choice"):
        sft_example("note_summary", item)
    with pytest.raises(TaskDataError, match="unknown task 'pubmed'"):
        sft_example("pubmed", item)


# ----------------------------------------------------------------------------------------------------------
# Errors


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


ARC_LINE = '{"query": "Question: Why?", "choices": ["a", "b"], "gold": 1}\n'


def test_small_files_give_the_expected_items(tmp_path):
    write(tmp_path / "mc/arc_easy.jsonl", ARC_LINE + "\n" + ARC_LINE.replace('"gold": 1', '"gold": 0'))
    assert load_task("arc_easy", data_dir=tmp_path) == [
        Choice("arc_easy/0", (("Question: Why?\nAnswer:", " a"), ("Question: Why?\nAnswer:", " b")), 1),
        Choice("arc_easy/1", (("Question: Why?\nAnswer:", " a"), ("Question: Why?\nAnswer:", " b")), 0)]
    hellaswag = "Act: a man walks. he\n2\nsits [title] down.\nruns  off.\njumps.\nfalls.\n"
    write(tmp_path / "mc/hellaswag_val_full.txt.bz2", bz2.compress(hellaswag.encode()))
    assert load_task("hellaswag", data_dir=tmp_path) == [Choice("hellaswag/0", tuple(
        ("Act: a man walks. he", e) for e in (" sits. down.", " runs off.", " jumps.", " falls.")), 2)]


def test_data_dir_comes_from_the_environment(tmp_path, monkeypatch):
    write(tmp_path / "mc/arc_easy.jsonl", ARC_LINE)
    monkeypatch.setenv("MINIMAMBA_TASK_DATA", str(tmp_path))
    assert load_task("arc_easy")[0].gold == 1
    with pytest.raises(TaskDataError, match="limit must be at least 1, got 0"):
        load_task("arc_easy", limit=0)
    monkeypatch.delenv("MINIMAMBA_TASK_DATA")
    assert str(tasks.default_data_dir()) == "data/tasks"


def test_missing_files_say_where_and_how_to_get_them(tmp_path):
    with pytest.raises(TaskDataError) as err:
        load_task("arc_easy", data_dir=tmp_path)
    assert str(tmp_path / "mc" / "arc_easy.jsonl") in str(err.value)
    assert f"python -m minimamba.tasks download arc_easy --out {tmp_path}" in str(err.value)
    with pytest.raises(TaskDataError, match=r"12B1_golden.json.*bioasq.org.*participants area") as err:
        load_task("bioasq", data_dir=tmp_path)
    assert str(tmp_path / "bioasq" / "raw") in str(err.value)
    with pytest.raises(TaskDataError, match="cannot be downloaded.*bioasq.org"):
        download_task("bioasq", tmp_path)
    assert tasks.main(["download", "bioasq", "--out", str(tmp_path)]) == 2
    with pytest.raises(TaskDataError, match="no 'train' split.*evaluation only"):
        load_task("arc_easy", "train", tmp_path)


@pytest.mark.parametrize("content,message", [
    (ARC_LINE + ARC_LINE.replace('"gold": 1', '"gold": 7'),
     r"arc_easy.jsonl:2: gold 7 is not an option index \(0..1\)"),
    (ARC_LINE.replace('"gold": 1', '"gold": 2'), r"arc_easy.jsonl:1: gold 2 is not an option index \(0..1\)"),
    (ARC_LINE.replace('"gold": 1', '"gold": -1'), r"arc_easy.jsonl:1: gold -1 is not an option index \(0..1\)"),
    (ARC_LINE.replace('"gold": 1', '"gold": true'), r"arc_easy.jsonl:1: 'gold' should be a non-empty int"),
    ('{"query": "Question: Why?", "gold": 0}\n', r"arc_easy.jsonl:1: no 'choices' field"),
    (ARC_LINE + "\n" + ARC_LINE[:30] + "\n", r"arc_easy.jsonl:3: not valid JSON"),
    ((ARC_LINE + ARC_LINE.replace("Why?", "Why \xe9?")).encode("latin-1"),
     r"arc_easy.jsonl:2: not UTF-8 from column 26: a damaged or converted copy; delete it and download it again$"),
    ("", r"arc_easy.jsonl: the file is empty"),
    ("\n \n", r"arc_easy.jsonl: the file is empty"),
    (ARC_LINE.replace("Question: ", ""), r"arc_easy.jsonl:1: the query should look like 'Question: \.\.\.'"),
    (ARC_LINE + '["a"]\n', r"arc_easy.jsonl:2: expected a JSON object, got list"),
    ('["a"]\n', r"arc_easy.jsonl:1: this file is one JSON array, not JSON Lines.*delete it and download it again"),
    (ARC_LINE.replace('["a", "b"]', '["a", " "]'), r"arc_easy.jsonl:1: 'choices' should be a non-empty list of non-empty"),
])
def test_malformed_records_name_the_file_and_line(tmp_path, content, message):
    write(tmp_path / "mc/arc_easy.jsonl", content)
    with pytest.raises(TaskDataError, match=message):
        load_task("arc_easy", data_dir=tmp_path)


def test_malformed_structured_files(tmp_path):
    write(tmp_path / "mc/hellaswag_val_full.txt.bz2", bz2.compress(b"q\n1\na\nb\nc\n"))
    with pytest.raises(TaskDataError, match="5 lines, not a multiple of 6"):
        load_task("hellaswag", data_dir=tmp_path)
    write(tmp_path / "mc/hellaswag_val_full.txt.bz2", b"not bz2")
    with pytest.raises(TaskDataError, match=r"txt.bz2: cannot be read to its end \(Invalid data stream\): a truncated "
                                            "or damaged copy; delete it and download it again"):
        load_task("hellaswag", data_dir=tmp_path)
    write(tmp_path / "mc/hellaswag_val_full.txt.bz2", bz2.compress(b"q\n1\na\nb\nc\nd\n" * 100)[:-20])  # cut short
    with pytest.raises(TaskDataError, match=r"txt.bz2: cannot be read to its end \(Compressed file ended"):
        load_task("hellaswag", data_dir=tmp_path)
    write(tmp_path / "pubmedqa/ori_pqal.json", '{"1": {"QUESTION": "q?", "CONTEXTS": ["c"], "final_decision": "no"}}')
    write(tmp_path / "pubmedqa/test_ground_truth.json", '{"1": "yes"}')
    with pytest.raises(TaskDataError, match=r"ori_pqal.json \(PMID 1\): final_decision 'no' but .* says 'yes'"):
        load_task("pubmedqa", data_dir=tmp_path)
    write(tmp_path / "pubmedqa/test_ground_truth.json", '{"1": "no",\n "2": }')
    with pytest.raises(TaskDataError, match=r"test_ground_truth.json:2: not valid JSON"):
        load_task("pubmedqa", data_dir=tmp_path)
    for name in ("train", "valid"):
        write(tmp_path / f"clinical/aci-bench/{name}.csv", 'dataset,encounter_id,dialogue\naci,D1,"hi"\n')
    with pytest.raises(TaskDataError, match=r"train.csv:1: no column note"):
        load_task("note_summary", "train", tmp_path)
    write(tmp_path / "clinical/aci-bench/train.csv", 'encounter_id,note\nD1,"a\nb",extra\n')
    with pytest.raises(TaskDataError, match=r"train.csv:2: 3 fields where the header has 2"):
        load_task("note_summary", "train", tmp_path)
    write(tmp_path / "clinical/aci-bench/train.csv", 'encounter_id,note\nD1,"a\nb"\nD2\n')
    with pytest.raises(TaskDataError, match=r"train.csv:4: 1 field where the header has 2"):
        load_task("note_summary", "train", tmp_path)
    write(tmp_path / "pubmedqa/ori_pqal.json", " \n\n")
    write(tmp_path / "pubmedqa/test_ground_truth.json", '{"1": "no"}')
    with pytest.raises(TaskDataError, match=r"ori_pqal.json: the file is empty \(only whitespace\)"):
        load_task("pubmedqa", data_dir=tmp_path)


PQ = {"QUESTION": "Does it work?", "CONTEXTS": ["It was tried.", "It worked."], "final_decision": "yes"}


def write_pqal(tmp_path, records, truth):
    write(tmp_path / "pubmedqa/ori_pqal.json", json.dumps(records))
    write(tmp_path / "pubmedqa/test_ground_truth.json", json.dumps(truth))


def test_pubmedqa_small_files_by_hand(tmp_path):
    """test = the ground truth's PMIDs in its order, train = the others in ori_pqal.json's order (neither sorted);
    context = CONTEXTS joined by one space; gold = final_decision's place in yes / no / maybe."""
    write_pqal(tmp_path, {"3": {**PQ, "final_decision": "maybe"}, "9": PQ, "2": {**PQ, "final_decision": "no"},
                          "1": {**PQ, "final_decision": "no"}}, {"2": "no", "3": "maybe"})
    prompt = f"{QA_HEAD}\n\nQuestion: Does it work?\n\nContext:\nIt was tried. It worked.\n\nAnswer:"
    options = tuple((prompt, a) for a in (" yes", " no", " maybe", " Yes", " No", " Maybe"))
    labels = ("yes", "no", "maybe") * 2
    assert load_task("pubmedqa", "test", tmp_path) == [Choice("pubmedqa/2", options, 1, labels),
                                                       Choice("pubmedqa/3", options, 2, labels)]
    assert load_task("pubmedqa", "train", tmp_path) == [Choice("pubmedqa/9", options, 0, labels),
                                                        Choice("pubmedqa/1", options, 1, labels)]


@pytest.mark.parametrize("records,truth,split,message", [
    ({"1": PQ, "2": {**PQ, "final_decision": "perhaps"}}, {"1": "yes"}, "train",
     r"ori_pqal.json \(PMID 2\): answer 'perhaps' is not one of yes, no, maybe"),
    ({"1": PQ}, {"1": "yes", "5": "no"}, "test", r"test_ground_truth.json: 1 test PMIDs are not in .*ori_pqal.json "
                                                 r"\(e.g. 5\)"),
    ([PQ], {"1": "yes"}, "test", r"ori_pqal.json: expected a JSON object keyed by PMID, got list"),
    ({"1": PQ}, ["1"], "test", r"test_ground_truth.json: expected a JSON object keyed by PMID, got list"),
    ({"1": {**PQ, "CONTEXTS": []}}, {"1": "yes"}, "test",
     r"ori_pqal.json \(PMID 1\): 'CONTEXTS' should be a non-empty list of non-empty strings"),
    ({"1": PQ, "2": {**PQ, "QUESTION": " "}}, {"1": "yes"}, "train",
     r"ori_pqal.json \(PMID 2\): 'QUESTION' should be a non-empty str"),
])
def test_pubmedqa_malformed_records_name_the_file_and_pmid(tmp_path, records, truth, split, message):
    write_pqal(tmp_path, records, truth)
    with pytest.raises(TaskDataError, match=message):
        load_task("pubmedqa", split, tmp_path)


def golden(*questions):
    return json.dumps({"questions": list(questions)}, indent=1)


def bq(qid, answer, *snippets, kind="yesno"):
    """One question of a BioASQ golden file, with the fields the real ones have."""
    return {"body": f"Is {qid} true?", "documents": ["http://www.ncbi.nlm.nih.gov/pubmed/1"], "type": kind,
            "snippets": [{"text": s, "document": "http://www.ncbi.nlm.nih.gov/pubmed/1"} for s in snippets],
            "id": qid, "ideal_answer": ["It is."], "exact_answer": answer}


def bq_item(qid, answer, context):
    prompt = f"{QA_HEAD}\n\nQuestion: Is {qid} true?\n\nContext:\n{context}\n\nAnswer:"
    return Choice(f"bioasq/{qid}", tuple((prompt, a) for a in (" yes", " no", " Yes", " No")),
                  ["yes", "no"].index(answer), ("yes", "no") * 2)


def test_bioasq_golden_files_by_hand(tmp_path):
    """The raw golden files of the split's batches, in batch then file order: only type "yesno" questions;
    exact_answer stripped and lower-cased ("Yes " is yes: BioASQ's answers are not always lower-case); each
    snippet's text stripped, joined by one space."""
    raw = tmp_path / "bioasq" / "raw"
    write(raw / "12B1_golden.json", golden(bq("a", "Yes ", " First snippet. ", "Second.\n"),
                                           bq("f", [["x"]], "A factoid.", kind="factoid")))
    write(raw / "12B2_golden.json", golden(bq("b", "no", "Only one.")))
    write(raw / "12B3_golden.json", golden(bq("s", "", "A summary.", kind="summary")))
    write(raw / "12B4_golden.json", golden(bq("c", "NO", "Third.")))
    assert load_task("bioasq", "test", tmp_path) == [
        bq_item("a", "yes", "First snippet. Second."), bq_item("b", "no", "Only one."), bq_item("c", "no", "Third.")]
    # the derived JSON lines are read only where none of the raw files is there, not instead of a missing one
    write(tmp_path / tasks.BIOASQ_DERIVED, "")
    (raw / "12B3_golden.json").unlink()
    with pytest.raises(TaskDataError, match=r"needs \S*12B3_golden.json, which is not there"):
        load_task("bioasq", "test", tmp_path)


@pytest.mark.parametrize("questions,message", [
    ([bq("a", "maybe", "s.")], r"12B1_golden.json \(question 0\): answer 'maybe' is not one of yes, no"),
    ([bq("f", "x", "s.", kind="factoid"), {**bq("a", "yes"), "snippets": [{"document": "d"}]}],
     r"12B1_golden.json \(question 1\): 'snippets' should be a non-empty list of \{\"text\": ...\} objects"),
    ([bq("a", "yes")], r"\(question 0\): 'snippets' should be a non-empty list"),
    ([bq("a", "yes", "s.", " \n")], r"\(question 0\): 'snippets' should be .* objects with non-empty texts"),
    ([bq("a", "yes", "s."), bq("a", "no", "t.")], r"task bioasq \(test\): the id bioasq/a appears twice"),
    ({"questions": {"a": 1}}, r"12B1_golden.json: expected a BioASQ golden file"),
    ([{k: v for k, v in bq("a", "yes", "s.").items() if k != "body"}], r"\(question 0\): no 'body' field"),
])
def test_bioasq_malformed_golden_files_name_the_file_and_question(tmp_path, questions, message):
    raw = tmp_path / "bioasq" / "raw"
    write(raw / "12B1_golden.json", json.dumps(questions) if isinstance(questions, dict) else golden(*questions))
    for batch in ("12B2", "12B3", "12B4"):
        write(raw / f"{batch}_golden.json", golden(bq(batch, "yes", "s.")))
    with pytest.raises(TaskDataError, match=message):
        load_task("bioasq", "test", tmp_path)


def test_bioasq_derived_file_by_hand(tmp_path):
    """The derived JSON lines: a split keeps the records of its batches (one of no listed batch is in neither);
    answers are lower-cased and snippets stripped as in the golden files."""
    def record(qid, answer, batch, snippets=("Some text.",)):
        return json.dumps({"id": qid, "question": f"Is {qid} true?", "answer": answer, "snippets": list(snippets),
                           "ideal_answer": ["It is."], "documents": [], "batch": batch}) + "\n"

    write(tmp_path / tasks.BIOASQ_DERIVED, record("t", "Yes", "12B2", (" One. ", "Two.")) + record("r", "no", "9B5")
          + record("x", "yes", "13B1") + record("u", "No", "11B2"))
    assert load_task("bioasq", "test", tmp_path) == [bq_item("t", "yes", "One. Two.")]
    assert load_task("bioasq", "train", tmp_path) == [bq_item("r", "no", "Some text."), bq_item("u", "no", "Some text.")]
    write(tmp_path / tasks.BIOASQ_DERIVED, record("t", "maybe", "12B2"))
    with pytest.raises(TaskDataError, match=r"bioasq_yesno_golden_9b-12b.jsonl:1: answer 'maybe' is not one of yes, no"):
        load_task("bioasq", "test", tmp_path)


def test_piqa_and_hellaswag_small_files(tmp_path):
    """PIQA's query must end in "\n" (llm-foundry's format), to which "Answer:" is appended; HellaSwag's ids
    count items (not lines) and a gold outside 0-3 names its line (the 2nd of its item)."""
    write(tmp_path / "mc/piqa.jsonl", '{"query": "Question: Open a jar?\\n", "choices": ["Twist.", "Shake."], "gold": 0}\n')
    assert load_task("piqa", data_dir=tmp_path) == [
        Choice("piqa/0", (("Question: Open a jar?\nAnswer:", " Twist."), ("Question: Open a jar?\nAnswer:", " Shake.")), 0)]
    write(tmp_path / "mc/piqa.jsonl", '{"query": "Question: Open a jar?", "choices": ["Twist.", "Shake."], "gold": 0}\n')
    with pytest.raises(TaskDataError, match=r"piqa.jsonl:1: the query should look like 'Question: \.\.\.\\n'"):
        load_task("piqa", data_dir=tmp_path)
    item = "Act: a man [title] walks.  he\n{}\nsits.\nruns.\njumps.\nfalls.\n"
    write(tmp_path / "mc/hellaswag_val_full.txt.bz2", bz2.compress((item.format(1) + item.format(3)).encode()))
    items = load_task("hellaswag", data_dir=tmp_path)
    assert [(i.id, i.gold) for i in items] == [("hellaswag/0", 1), ("hellaswag/1", 3)]
    assert items[1].options[2] == ("Act: a man. walks. he", " jumps.")  # (the query cleaned up as the endings)
    write(tmp_path / "mc/hellaswag_val_full.txt.bz2", bz2.compress((item.format(1) + item.format(4)).encode()))
    with pytest.raises(TaskDataError, match=r"txt.bz2:8: the gold should be 0, 1, 2 or 3, got '4'"):
        load_task("hellaswag", data_dir=tmp_path)


def test_files_that_are_not_utf8_text_are_refused_with_the_fix(tmp_path):
    """What minimamba.data's readers refuse (UTF-16, compressed data under a plain name; one JSON array: above)
    is a TaskDataError that names the file, why, how to convert it and that downloading it again fixes it."""
    write(tmp_path / "mc/arc_easy.jsonl", ARC_LINE.encode("utf-16"))  # (with its byte order mark)
    with pytest.raises(TaskDataError, match=r"arc_easy.jsonl is not UTF-8: it starts with the UTF-16 byte order mark"
                       r"\. Convert .* iconv -f UTF-16 -t UTF-8 .*own name: delete it and download it again, or put the "
                       "converted file in its place"):
        load_task("arc_easy", data_dir=tmp_path)
    write(tmp_path / "mc/hellaswag_val_full.txt.bz2", bz2.compress("q\n1\na\nb\nc\nd\n".encode("utf-16-le")))
    with pytest.raises(TaskDataError, match=r"txt.bz2 is not UTF-8: .* as in UTF-16LE .*bzip2 -dc .*\| iconv "
                                            r"-f UTF-16LE -t UTF-8"):
        load_task("hellaswag", data_dir=tmp_path)
    write(tmp_path / "pubmedqa/ori_pqal.json", '{"1": {"QUESTION": "q?", "CONTEXTS": ["c"], "final_decision": "no"}}')
    write(tmp_path / "pubmedqa/test_ground_truth.json", gzip.compress(b'{"1": "no"}'))
    with pytest.raises(TaskDataError, match=r"test_ground_truth.json holds gzip-compressed data, not text: .*A task "
                                            "file is read under its own name: delete it and download it again"):
        load_task("pubmedqa", data_dir=tmp_path)
    write(tmp_path / "pubmedqa/test_ground_truth.json", '{"1": "no",\n "2": "\xe9"}'.encode("latin-1"))
    with pytest.raises(TaskDataError, match=r"test_ground_truth.json:2: not UTF-8 from column 8: a damaged"):
        load_task("pubmedqa", data_dir=tmp_path)


def test_csv_line_ends_byte_order_mark_and_empty_splits(tmp_path):
    """A CRLF copy of a CSV (line breaks in quoted notes included) with a byte order mark gives the items of
    the LF file: its notes hold "\n" (as published); a CSV with a header only is an error, not 0 items."""
    context, plan = "CHIEF COMPLAINT\n\n" + "Knee pain after a fall. " * 6, "Ice, rest and ibuprofen. " * 3
    rows = "".join(f'aci,{e},"{context}\n\nASSESSMENT AND PLAN\n\n{plan}"\n' for e in ("D1", "D2"))
    csv_text = "dataset,encounter_id,note\n" + rows
    write(tmp_path / "clinical/aci-bench/valid.csv", csv_text)
    write(tmp_path / "clinical/aci-bench/train.csv", csv_text.replace("D1", "T1").replace("D2", "T2"))
    lf = load_task("note_summary", "train", tmp_path)
    assert [i.id for i in lf] == ["note_summary/T1", "note_summary/T2", "note_summary/D1", "note_summary/D2"]
    assert lf[0].reference == plan.strip() and "\r" not in lf[0].prompt
    write(tmp_path / "clinical/aci-bench/valid.csv", b"\xef\xbb\xbf" + csv_text.replace("\n", "\r\n").encode())
    assert load_task("note_summary", "train", tmp_path) == lf
    write(tmp_path / "clinical/aci-bench/valid.csv", csv_text[:-40])  # (cut short inside D2's note)
    with pytest.raises(TaskDataError, match=r"valid.csv:\d+: a quoted field is not closed before the end of the "
                                            "file .*delete it and download it again"):
        load_task("note_summary", "train", tmp_path)
    write(tmp_path / "clinical/aci-bench/valid.csv", "dataset,encounter_id,note\n")
    with pytest.raises(TaskDataError, match=r"valid.csv: no rows \(the file is empty or holds its header only\); "
                                            "delete it and download it again"):
        load_task("note_summary", "train", tmp_path)


def test_notes_without_an_assessment_are_skipped_and_counted(tmp_path, capsys):
    context = "CHIEF COMPLAINT\n\n" + "Knee pain after a fall. " * 6
    plan = "Knee sprain. Ice, rest and ibuprofen; come back in two weeks if it is not better."
    notes = [("D1", f"{context}\n\nASSESSMENT AND PLAN\n\n{plan}"), ("D2", context + "\n\nNo plan written."),
             ("D3", f"{context}\n\nIMPRESSION:\n\n{plan}\n\nPLAN\n\nRest.")]
    rows = [f'aci,{e},"[doctor] hi","{n}"\n' for e, n in notes]
    write(tmp_path / "clinical/aci-bench/train.csv", "dataset,encounter_id,dialogue,note\n" + "".join(rows[:2]))
    write(tmp_path / "clinical/aci-bench/valid.csv", "dataset,encounter_id,dialogue,note\n" + rows[2])
    items = load_task("note_summary", "train", tmp_path)
    assert [i.id for i in items] == ["note_summary/D1", "note_summary/D3"]
    assert items[0].reference == plan and items[1].reference == plan + "\n\nPLAN\n\nRest."
    assert items[0].prompt.endswith(context.strip() + "\n\nAssessment and Plan:")
    err = capsys.readouterr().err
    d2_line = 2 + notes[0][1].count("\n") + 1  # (the header, then D1's row spans several lines)
    assert "note_summary (train): skipped 1 of 3 notes" in err and f"train.csv:{d2_line}: no ASSESSMENT AND" in err


def test_split_note_and_clipping():
    note = "alpha beta  gamma\ndelta epsilon"
    prefix, rest = tasks.split_note(note)  # middle = 15, inside "gamma": the single space before "beta"
    assert (prefix, rest) == ("alpha", "beta  gamma\ndelta epsilon") and prefix + " " + rest == note
    assert tasks.split_note("nospaces" * 10) == ("", "nospaces" * 10)
    assert tasks._keep_start("one two three", 9) == "one two" and tasks._keep_start("one two three", 7) == "one two"
    assert tasks._keep_end("one two three", 8) == "three" and tasks._keep_end("one two three", 9) == "two three"
    # the space exactly at len·ratio is a cut ("ab cd": int(5 · 0.5) = 2)
    assert tasks.split_note("ab cd") == ("ab", "cd") and tasks.split_note("abc de", 0.5) == ("abc", "de")


def test_the_minimum_lengths_keep_a_note_at_exactly_the_minimum():
    """MIN_PREFIX_CHARS = 100, MIN_REFERENCE_CHARS = 50 are the least kept, by hand: a note of 100 + 1 + 100
    characters cuts at its middle, so its prefix has exactly 100; one character less and it is skipped."""
    kept = tasks._completion("a" * 100 + " " + "b" * 100)
    assert kept == (tasks.COMPLETION_TEMPLATE.format(prefix="a" * 100), "b" * 100)
    assert tasks._completion("a" * 99 + " " + "b" * 100) == "prefix 99 / rest 100 characters"
    context, target = "c" * 100, "t" * 50
    assert tasks._summary(f"{context}\nPLAN\n{target}") == (tasks.SUMMARY_TEMPLATE.format(context=context), target)
    assert tasks._summary(f"{context}\nPLAN\n{target[1:]}") == "context 100 / target 49 characters"
    assert tasks._summary(f"{context[1:]}\nPLAN\n{target}") == "context 99 / target 50 characters"


def test_long_notes_are_clipped_at_words_to_the_recipes_limits():
    """No ACI-BENCH note reaches these limits, so by hand: note_completion keeps the last 3,000 characters of the
    prefix from a word start and the first 2,000 of the rest to a word end; note_summary the first 4,000 of the
    context and 2,000 of the target, each to a word end."""
    prefix, rest = "A" * 600 + " bbbb" * 600, " ".join(["cccc"] * 720)  # 3,600 and 3,599 characters
    assert tasks._completion(prefix + " " + rest) == ("Continue the following clinical note.\n\n"
                                                      + " ".join(["bbbb"] * 600), " ".join(["cccc"] * 400))
    context, target = " ".join(["dddd"] * 900), " ".join(["eeee"] * 500)  # 4,499 and 2,499 characters
    assert tasks._summary(f"{context}\nASSESSMENT AND PLAN\n{target}") == (
        "Based on the following clinical information, write the assessment and plan.\n\nClinical Notes:\n"
        + " ".join(["dddd"] * 800) + "\n\nAssessment and Plan:", " ".join(["eeee"] * 400))


def test_hellaswag_preprocess_by_hand():
    """lm-eval's steps in order: strip, " [title]" -> ". ", each "[...]" tag dropped alone (not greedily from the
    first "[" to the last "]"), then "  " -> " "."""
    assert tasks.hellaswag_preprocess("  Roof [title] Cut [step] the onion [substeps] now. ") == "Roof. Cut the onion now."


# ----------------------------------------------------------------------------------------------------------
# Downloads (a local server stands in for raw.githubusercontent.com)


def serve(server, monkeypatch, rel, data):
    """Serve `data` where DOWNLOADS says `rel` is, with its size and sha256 in the table."""
    (repo, commit), path, _, _ = tasks.DOWNLOADS[rel]
    monkeypatch.setitem(tasks.DOWNLOADS, rel, ((repo, commit), path, len(data), hashlib.sha256(data).hexdigest()))
    server.files[f"/{repo}/{commit}/{path}"] = data
    return f"/{repo}/{commit}/{path}"


def test_download_then_load_and_resume(server, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIMAMBA_GITHUB_RAW", server.url + "/")
    lines = "".join(ARC_LINE.replace("Why?", f"Why {i}?") for i in range(2000)).encode()
    url = serve(server, monkeypatch, "mc/arc_easy.jsonl", lines)
    server.drop_after[url] = 10_000  # the first answer stops after 10,000 bytes: the download resumes
    out = tmp_path / "tasks"
    assert tasks.github_raw() == server.url  # (the final "/" dropped: this server reads "//mc/..." as "/mc/...")
    assert download_task("arc_easy", out) == [out / "mc" / "arc_easy.jsonl"]
    assert [r[:2] for r in server.requests] == [(url, None), (url, "bytes=10000-")]
    items = load_task("arc_easy", data_dir=out)
    assert len(items) == 2000 and items[5].options[0][0] == "Question: Why 5?\nAnswer:"
    assert download_task("arc_easy", out) and len(server.requests) == 2  # there and checked: no request
    monkeypatch.setitem(tasks.DOWNLOADS, "mc/arc_easy.jsonl", (*tasks.DOWNLOADS["mc/arc_easy.jsonl"][:3], "0" * 64))
    with pytest.raises(DownloadError, match="already exists but has sha256"):
        download_task("arc_easy", out)


def test_a_wrong_file_on_the_server_is_refused(server, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIMAMBA_GITHUB_RAW", server.url)
    url = serve(server, monkeypatch, "mc/piqa.jsonl", b'{"query": "Question: q\\n", "choices": ["a"], "gold": 0}\n')
    server.files[url] = server.files[url].replace(b"q", b"x")  # same size, other bytes
    with pytest.raises(DownloadError, match="sha256 .* does not match"):
        download_task("piqa", tmp_path)
    assert not (tmp_path / "mc" / "piqa.jsonl").exists()


@needs_data
def test_the_pinned_sizes_and_hashes_are_those_of_the_shared_files(server, monkeypatch, tmp_path, capsys):
    """The real files, served at their pinned addresses, pass the table's size and sha256 checks; the CLI
    downloads them and `list` counts their items."""
    monkeypatch.setenv("MINIMAMBA_GITHUB_RAW", server.url)
    for rel in ("pubmedqa/ori_pqal.json", "pubmedqa/test_ground_truth.json", "mc/openbook_qa.jsonl"):
        (repo, commit), path, size, sha256 = tasks.DOWNLOADS[rel]
        data = (DATA / rel).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha256
        server.files[f"/{repo}/{commit}/{path}"] = data
    out = tmp_path / "tasks"
    assert tasks.main(["download", "pubmedqa", "openbookqa", "--out", str(out)]) == 0
    for split in ("test", "train"):
        assert load_task("pubmedqa", split, out) == shared("pubmedqa", split)
    capsys.readouterr()
    assert tasks.main(["list", "--data", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "pubmedqa         yesno     test 500, train 500" in listing
    assert "openbookqa       choice    test 500" in listing and "arc_easy         choice    test -" in listing
    assert tasks.main(["download", "note_summary", "--out", str(out)]) == 2  # not served here: 404
    assert "HTTP 404" in capsys.readouterr().err


def test_every_task_is_in_exactly_one_group():
    from minimamba.tasks import GROUPS

    named = [n for g, names in GROUPS.items() if g != "all" for n in names]
    assert sorted(named) == sorted(tasks.TASKS) and len(set(named)) == len(named)
    # "all" is every task but MIMIC-IV-Note's, which only credentialed users have
    assert GROUPS["all"] == [n for n in named if n not in GROUPS["mimic"]]


def test_list_says_why_a_split_is_unreadable(tmp_path, capsys):
    write(tmp_path / "mc/arc_easy.jsonl", ARC_LINE.replace('"gold": 1', '"gold": 9'))
    assert tasks.main(["list", "--data", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "arc_easy         choice    test unreadable" in captured.out
    assert "unreadable: arc_easy (test):" in captured.err and "gold 9 is not an option index" in captured.err


# ----------------------------------------------------------------------------------------------------------
# MIMIC-IV-Note (credentialed, so never here): discharge notes written by the tests in its layout

def mimic_note(n, hospital_course="Admitted for a paracentesis; 3L removed, tolerated well. Diuretics restarted."):
    """A discharge note laid out as MIMIC-IV-Note's are (de-identified blanks as ___)."""
    return (f"Name:  ___                     Unit No:   ___\n \nAdmission Date:  ___              Discharge Date:   ___\n"
            f" \nService: MEDICINE\n \nAllergies: \nNo Known Allergies / Adverse Drug Reactions\n \nAttending: ___.\n"
            f" \nChief Complaint:\nWorsening abdominal distension and pain ({n})\n \nMajor Surgical or Invasive "
            f"Procedure:\nParacentesis\n \nHistory of Present Illness:\nCirrhosis complicated by ascites, presents "
            f"with a week of worsening distension.\n \nPhysical Exam:\nVS: 98.1 107/61 78 18 97RA\nGeneral: in NAD\n"
            f" \nBrief Hospital Course:\n{hospital_course}\n \nDischarge Diagnosis:\nAscites\n \nDischarge "
            f"Disposition:\nHome\n \nFollowup Instructions:\n___\n")


ADMISSION_OF = ("Allergies:\nNo Known Allergies / Adverse Drug Reactions\n\nChief Complaint:\nWorsening abdominal "
                "distension and pain ({n})\n\nHistory of Present Illness:\nCirrhosis complicated by ascites, presents "
                "with a week of worsening distension.\n\nPhysical Exam:\nVS: 98.1 107/61 78 18 97RA\nGeneral: in NAD")
DISCHARGE_OF = ("Brief Hospital Course:\n{course}\n\nDischarge Diagnosis:\nAscites\n\nFollowup Instructions:\n___")
COURSE = "Admitted for a paracentesis; 3L removed, tolerated well. Diuretics restarted."


def write_mimic(path, rows):
    """discharge.csv(.gz) with MIMIC-IV-Note's columns; rows: (note_id, subject_id, text)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"])
    for note_id, subject, text in rows:
        writer.writerow([note_id, subject, "2" + subject, "DS", "21", "2180-05-07 00:00:00", "", text])
    data = out.getvalue().encode("utf-8")
    return write(path, gzip.compress(data) if path.suffix == ".gz" else data)


def test_mimic_discharge_reads_the_admission_sections_and_writes_the_discharge_ones():
    """The recipe's discharge task: the admission sections (as the note has them, in its order) are the context,
    the discharge sections the reference; the note's other sections are in neither, and a line like "VS: ..."
    inside a section starts none."""
    from minimamba.tasks import _discharge, note_sections

    note = mimic_note(7)
    assert [h for h, _ in note_sections(note)] == [
        "Name", "Admission Date", "Service", "Allergies", "Attending", "Chief Complaint",
        "Major Surgical or Invasive Procedure", "History of Present Illness", "Physical Exam", "Brief Hospital Course",
        "Discharge Diagnosis", "Discharge Disposition", "Followup Instructions"]
    prompt, reference = _discharge(note)
    assert prompt == ("Based on the following clinical information, write the discharge summary including hospital "
                      "course, discharge diagnosis, discharge medications, and discharge instructions.\n\nClinical "
                      f"Notes:\n{ADMISSION_OF.format(n=7)}\n\nDischarge Summary:")
    assert reference == DISCHARGE_OF.format(course=COURSE)
    # spelled otherwise (case, a hyphen, a slash): the same sections
    other = note.replace("Followup Instructions:", "FOLLOW-UP INSTRUCTIONS:").replace("Brief Hospital Course:",
                                                                                       "Assessment/Plan:")
    assert _discharge(other)[1] == DISCHARGE_OF.format(course=COURSE).replace(
        "Brief Hospital Course:", "Assessment/Plan:").replace("Followup Instructions:", "FOLLOW-UP INSTRUCTIONS:")
    # no discharge section, or too little of either: skipped, with the reason
    assert _discharge(note.split("Brief Hospital Course:")[0]).startswith("no discharge section")
    assert _discharge("Chief Complaint:\npain\n\nDischarge Diagnosis:\n" + "x" * 60) == \
        "admission sections 21 / discharge sections 81 characters"  # ("Header:\\n" + body)


def test_mimic_tasks_split_by_patient_and_read_only_as_far_as_the_limit(tmp_path, capsys):
    """Every note of a patient is in one split (the 9:1 split by subject_id, whatever the file's order), both
    tasks read the same notes, the completion prompt and reference are the note's halves, and a --limit reads
    the file only that far (a damaged row after it is not reached)."""
    from minimamba.tasks import patient_split

    subjects = [str(10000000 + 37 * i) for i in range(60)]
    rows = [(f"{s}-DS-{k}", s, mimic_note(f"{s}/{k}")) for k in range(2) for s in subjects]
    write_mimic(tmp_path / "clinical/mimic-iv-note/discharge.csv.gz", rows)
    split_of = {s: patient_split(s) for s in subjects}
    assert 0 < list(split_of.values()).count("test") < 20  # (10% of 60 expected)
    # (a subject of the smaller split: a blank around it must not move it, which a hash of " id " would, 9 times in 10)
    some_test_subject = next(s for s in subjects if split_of[s] == "test")
    assert patient_split(f" {some_test_subject} ") == "test"
    for split in ("test", "train"):
        wanted = [note_id for note_id, s, _ in rows if split_of[s] == split]
        completion = load_task("mimic_completion", split, tmp_path)
        discharge = load_task("mimic_discharge", split, tmp_path)
        assert [i.id for i in completion] == [f"mimic_completion/{n}" for n in wanted]
        assert [i.id for i in discharge] == [f"mimic_discharge/{n}" for n in wanted]
        by_id = {n: text for n, _, text in rows}
        for item in completion:
            note = by_id[item.id.split("/", 1)[1]].strip()
            prefix = item.prompt.removeprefix("Continue the following clinical note.\n\n")
            assert prefix + " " + item.reference == note and abs(len(prefix) - len(note) / 2) < 40
        assert all(i.reference == DISCHARGE_OF.format(course=COURSE) for i in discharge)
        assert tasks.sft_example("mimic_discharge", discharge[0]) == (discharge[0].prompt, " " + discharge[0].reference)
    # a damaged row after the first 3 test notes: --limit 3 does not reach it, the whole split does; a note
    # skipped before the limit is reached is counted on stderr all the same (the reading stopped early)
    test_rows = [i for i, (_, s, _) in enumerate(rows) if split_of[s] == "test"]
    bad_at, short_at = test_rows[4], test_rows[1]
    rows[bad_at] = (rows[bad_at][0], rows[bad_at][1], " ")
    rows[short_at] = (rows[short_at][0], rows[short_at][1], "Chief Complaint:\n" + "No discharge section. " * 8)
    write_mimic(tmp_path / "clinical/mimic-iv-note/discharge.csv.gz", rows)
    capsys.readouterr()
    assert len(load_task("mimic_discharge", "test", tmp_path, limit=3)) == 3
    err = capsys.readouterr().err
    assert f"mimic_discharge (test): skipped 1 of 4 notes: {tmp_path}" in err and "no discharge section" in err
    with pytest.raises(TaskDataError, match=r"discharge.csv.gz:\d+: 'text' should be a non-empty str"):
        load_task("mimic_discharge", "test", tmp_path)


def test_mimic_notes_skipped_are_counted_and_the_file_is_named_where_missing(tmp_path, capsys):
    from minimamba.tasks import patient_split

    a, b, c = [s for s in map(str, range(100, 200)) if patient_split(s) == "train"][:3]
    d = next(s for s in map(str, range(100, 200)) if patient_split(s) == "test")
    rows = [(f"{d}-DS-1", d, "Chief Complaint:\npain"),  # (a test patient's: not read for train, not counted)
            (f"{a}-DS-1", a, mimic_note(a)),
            (f"{b}-DS-1", b, "Chief Complaint:\n" + "No discharge section in this note at all. " * 4),
            (f"{c}-DS-1", c, "Chief Complaint:\npain\n\nDischarge Diagnosis:\nAscites")]
    write_mimic(tmp_path / "clinical/mimic-iv-note/discharge.csv", rows)  # (uncompressed: the fallback name)
    assert [i.id for i in load_task("mimic_discharge", "train", tmp_path)] == [f"mimic_discharge/{a}-DS-1"]
    err = capsys.readouterr().err
    assert "mimic_discharge (train): skipped 2 of 3 notes" in err and "discharge.csv:" in err
    assert "no discharge section (Brief Hospital Course" in err and "admission sections 21 / discharge sections 28" in err
    # neither file there: where to put it and how to get it (credentialed: not downloaded)
    with pytest.raises(TaskDataError, match=r"physionet.org/content/mimic-iv-note.*discharge.csv.gz") as e:
        load_task("mimic_completion", "test", tmp_path / "none")
    assert str(tmp_path / "none" / "clinical" / "mimic-iv-note" / "discharge.csv.gz") in str(e.value)
    assert tasks.main(["download", "mimic_completion", "--out", str(tmp_path)]) == 2
    assert "credentialed PhysioNet users only" in capsys.readouterr().err
    # a file without MIMIC-IV-Note's columns
    write(tmp_path / "wrong/clinical/mimic-iv-note/discharge.csv", "id,note\n1,text\n")
    with pytest.raises(TaskDataError, match=r"discharge.csv:1: no column note_id, subject_id, text in the header "
                                            r"\['id', 'note'\]: not the file this task reads; delete it and download"):
        load_task("mimic_completion", "test", tmp_path / "wrong")


def test_mimic_discharge_on_notes_laid_out_as_real_ones_vary():
    """What real discharge notes hold: numbered medication lists with "Word:" lines inside ("Hold for: ..."),
    headers in capitals, with odd spacing or repeated, a header with nothing under it (not written), CRLF line
    ends; and long sections, cut at a word to the recipe's 4,000 (context) and 2,000 (reference) characters."""
    from minimamba.tasks import _discharge, note_sections

    note = ("  Chief  Complaint :\r\nshortness of breath\r\n \r\nHISTORY OF PRESENT ILLNESS:  \r\n"
            "Progressive dyspnea over two weeks, orthopnea, leg swelling.\r\n\r\nSocial History:\r\n \r\n"
            "Medications on Admission:\r\n1. Furosemide 20 mg PO DAILY \r\nHold for: SBP<100\r\n\r\n"
            "Brief Hospital Course:\r\nDiuresed with IV furosemide.\r\n\r\nDischarge Medications:\r\n"
            "1. Furosemide 40 mg PO DAILY \r\nRX *furosemide 40 mg 1 tablet(s) by mouth Daily Disp #*30 Tablet "
            "Refills:*0\r\n\r\nDischarge Instructions:\r\nWeigh yourself every morning.\r\n\r\n"
            "Discharge Instructions:\r\nCall if your weight goes up 3 lbs.\r\n").replace("\r\n", "\n")
    assert [h for h, _ in note_sections(note)] == [
        "Chief  Complaint", "HISTORY OF PRESENT ILLNESS", "Social History", "Medications on Admission",
        "Brief Hospital Course", "Discharge Medications", "Discharge Instructions", "Discharge Instructions"]
    assert note_sections(note.replace("\n", "\r\n")) == note_sections(note)  # (CRLF: the same bodies)
    prompt, reference = _discharge(note)
    assert prompt.split("Clinical Notes:\n")[1] == (
        "Chief  Complaint:\nshortness of breath\n\nHISTORY OF PRESENT ILLNESS:\nProgressive dyspnea over two "
        "weeks, orthopnea, leg swelling.\n\nMedications on Admission:\n1. Furosemide 20 mg PO DAILY \nHold for: "
        "SBP<100\n\nDischarge Summary:")
    assert reference == (
        "Brief Hospital Course:\nDiuresed with IV furosemide.\n\nDischarge Medications:\n1. Furosemide 40 mg PO "
        "DAILY \nRX *furosemide 40 mg 1 tablet(s) by mouth Daily Disp #*30 Tablet Refills:*0\n\nDischarge "
        "Instructions:\nWeigh yourself every morning.\n\nDischarge Instructions:\nCall if your weight goes up 3 lbs.")
    # long sections: the context keeps its first 4,000 characters, the reference its first 2,000, ending at a word
    long = ("History of Present Illness:\n" + "dyspnea worse " * 400 + "\n\nBrief Hospital Course:\n"
            + "diuresed well " * 200)
    prompt, reference = _discharge(long)
    context = prompt.split("Clinical Notes:\n")[1].removesuffix("\n\nDischarge Summary:")
    assert 3990 < len(context) <= 4000 and context.endswith(("dyspnea", "worse"))
    assert 1990 < len(reference) <= 2000 and reference.endswith(("diuresed", "well"))
    # the other spellings some notes use for the same sections (without them, their text joined the section before)
    variants = ("HPI:\nDyspnea for two weeks, orthopnea and leg swelling; no chest pain, no fever.\n\n"
                "Physical Examination:\nJVP to the jaw.\n\nBrief Hospital Course:\nDiuresed.\n\nDischarge Diagnoses:\n"
                "Heart failure with reduced ejection fraction")
    assert [h for h, _ in note_sections(variants)] == ["HPI", "Physical Examination", "Brief Hospital Course",
                                                       "Discharge Diagnoses"]
    prompt, reference = _discharge(variants)
    assert "HPI:\nDyspnea" in prompt and "Physical Examination:\nJVP to the jaw." in prompt
    assert reference == ("Brief Hospital Course:\nDiuresed.\n\nDischarge Diagnoses:\nHeart failure with reduced "
                         "ejection fraction")


_BODY_WORDS = ("pain", "BP: 120/80", "1. Furosemide 40 mg PO DAILY", "Hold for: SBP<100", "___", "General: NAD",
               "no fever", "Refills:*0", "x", "Dear Mr. ___,", "Labs: see below", "  indented line", "")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(tasks.ADMISSION_SECTIONS + tasks.DISCHARGE_SECTIONS + tasks.OTHER_SECTIONS),
                          st.sampled_from(("as is", "upper", "lower", "padded")),
                          st.lists(st.sampled_from(_BODY_WORDS), max_size=4)), max_size=8),
       st.sampled_from(("\n", "\r\n")))
def test_note_sections_recovers_the_sections_a_note_was_written_from(sections, newline):
    """Property: a note written from (header, body lines) pairs, the headers in any case or padding and the bodies
    holding "Word: ..." lines of no known header, parses back into those sections, in order, bodies stripped."""
    from minimamba.tasks import note_sections

    spelled = {"as is": str, "upper": str.upper, "lower": str.lower, "padded": lambda h: f"  {h} "}
    written, expected = [], []
    for header, how, lines in sections:
        shown = spelled[how](header)
        written.append(f"{shown}:{newline}" + newline.join(lines))
        expected.append((shown.strip(), "\n".join(lines).strip()))
    note = f"Name: ___{newline} {newline}" + f"{newline} {newline}".join(written)
    assert note_sections(note)[1:] == expected


def test_any_header_naming_the_hospital_course_is_a_discharge_section():
    """Notes name the hospital course in several ways; one the lists lacked ended up in the prompt, as the tail of
    the admission section before it (the reference the model is asked to write, handed to it)."""
    from minimamba.tasks import _discharge, section_kind

    note = ("History of Present Illness:\n" + "Dyspnea for two weeks, orthopnea, leg swelling. " * 3 + "\n\n"
            "Pertinent Results:\nBNP 2400.\n\nConcise Summary of Hospital Course by Issue/System:\n"
            "# Heart failure: diuresed with IV furosemide, 6 L net negative.\n\nDischarge Diagnosis:\nHFrEF")
    prompt, reference = _discharge(note)
    assert "furosemide" not in prompt and "Pertinent Results:\nBNP 2400.\n\nDischarge Summary:" in prompt
    assert reference.startswith("Concise Summary of Hospital Course by Issue/System:\n# Heart failure: diuresed")
    assert [section_kind(h) for h in ("HOSPITAL COURSE", "Summary of hospital course by systems", "Physical Exam",
                                      "Service", "BP", "General", "Outside Hospital Course", "OSH course")] == \
        ["discharge", "discharge", "admission", "other", None, None, None, None]
    # a course at another hospital, told in the history of present illness, stays there (it is history)
    told = note.replace("Pertinent Results:", "Outside Hospital Course:\nTreated for pneumonia.\n\nPertinent Results:")
    assert "Outside Hospital Course:\nTreated for pneumonia." in _discharge(told)[0]


def test_a_sample_is_drawn_at_random_the_same_whatever_the_files_order(tmp_path):
    """--sample N: N items drawn at random (those whose ids hash lowest), in file order; the same N when the file's
    rows come in another order, or when other items are added (a MIMIC-IV-Note copy of another version); read from
    the whole file (a large one is read lazily, keeping N items)."""
    from minimamba.tasks import drawn, patient_split

    *subjects, other = [s for s in map(str, range(1000, 1400)) if patient_split(s) == "test"]
    rows = [(f"{s}-DS-1", s, mimic_note(s)) for s in subjects]
    write_mimic(tmp_path / "a/clinical/mimic-iv-note/discharge.csv.gz", rows)
    write_mimic(tmp_path / "b/clinical/mimic-iv-note/discharge.csv.gz", rows[::-1] + [(f"{other}-DS-1", other,
                                                                                       mimic_note(other))])
    first = load_task("mimic_completion", "test", tmp_path / "a", sample=5)
    again = load_task("mimic_completion", "test", tmp_path / "b", sample=5)
    everything = [i.id for i in load_task("mimic_completion", "test", tmp_path / "a")]
    assert len(first) == 5 and len(everything) > 30
    # the same five, or the added note in place of the one that now ranks sixth
    assert len({i.id for i in first} & {i.id for i in again}) >= 4
    assert {i.id for i in again} - {i.id for i in first} <= {f"mimic_completion/{other}-DS-1"}
    assert [i.id for i in first] == [i for i in everything if i in {j.id for j in first}]  # (file order)
    assert [i.id for i in first] != everything[:5]  # (not the first five; the ids are fixed, so is the draw)
    assert load_task("mimic_completion", "test", tmp_path / "a", sample=10**6) == \
        load_task("mimic_completion", "test", tmp_path / "a")  # (more than there are: all of them)
    assert [i.id for i in drawn(first, 2)] == [i.id for i in drawn(first[::-1], 2)][::-1]
    with pytest.raises(TaskDataError, match="sample must be at least 1, got 0"):
        load_task("mimic_completion", "test", tmp_path / "a", sample=0)
    with pytest.raises(TaskDataError, match="give limit .* or sample .*, not both"):
        load_task("mimic_completion", "test", tmp_path / "a", limit=5, sample=5)
    # a list task too (ARC), and a damaged item anywhere in a lazily read file is read (the whole file is drawn from)
    write(tmp_path / "mc/arc_easy.jsonl", "".join(ARC_LINE.replace("Why?", f"Why {n}?") for n in range(30)))
    arc, every_arc = load_task("arc_easy", data_dir=tmp_path, sample=7), load_task("arc_easy", data_dir=tmp_path)
    assert arc == drawn(every_arc, 7) and len(arc) == 7 and arc != every_arc[:7]  # (drawn, not the first seven)
    rows[-1] = (rows[-1][0], rows[-1][1], " ")
    write_mimic(tmp_path / "a/clinical/mimic-iv-note/discharge.csv.gz", rows)
    with pytest.raises(TaskDataError, match="'text' should be a non-empty str"):
        load_task("mimic_completion", "test", tmp_path / "a", sample=5)


def test_count_items_reads_a_large_file_without_keeping_it_and_a_repeated_id_is_found_by_a_sample(tmp_path, capsys):
    """`tasks list` counts with count_items: what load_task gives, with its checks (a repeated id, no items), item
    by item. A --sample reads the whole file, so a repeated note id anywhere in it is an error, as without one."""
    from minimamba.tasks import count_items, patient_split

    subjects = [s for s in map(str, range(2000, 2300)) if patient_split(s) == "test"]
    rows = [(f"{s}-DS-1", s, mimic_note(s)) for s in subjects]
    write_mimic(tmp_path / "clinical/mimic-iv-note/discharge.csv.gz", rows)
    assert count_items("mimic_discharge", "test", tmp_path) == len(load_task("mimic_discharge", "test", tmp_path)) \
        == len(subjects)
    write(tmp_path / "mc/arc_easy.jsonl", ARC_LINE * 3)
    assert count_items("arc_easy", "test", tmp_path) == 3
    rows.append(rows[0])  # (the first note again, last in the file)
    write_mimic(tmp_path / "clinical/mimic-iv-note/discharge.csv.gz", rows)
    for how in (dict(sample=3), dict()):
        with pytest.raises(TaskDataError, match=rf"mimic_discharge \(test\): the id mimic_discharge/{subjects[0]}-DS-1 "
                                                 "appears twice"):
            load_task("mimic_discharge", "test", tmp_path, **how)
    with pytest.raises(TaskDataError, match="appears twice"):
        count_items("mimic_discharge", "test", tmp_path)
    assert len(load_task("mimic_discharge", "test", tmp_path, limit=3)) == 3  # (read no further than it needs)
    write_mimic(tmp_path / "clinical/mimic-iv-note/discharge.csv.gz", [])
    with pytest.raises(TaskDataError, match=r"mimic_discharge \(test\): no items in"):
        count_items("mimic_discharge", "test", tmp_path)

"""Downstream tasks: what eval.py scores and sft.py trains on, read from their public files.

One source of truth for each task's prompt: evaluation and fine-tuning build it here, so they agree.
Every task gives a list of items of one of two kinds:

    Choice      a question answered by the option the model finds most likely: option i is a
                (context, continuation) pair, the model reads the context and is scored on the
                continuation's tokens. Multiple-choice benchmarks, PubMedQA / BioASQ yes-no, LAMBADA.
    Generation  a prompt and a reference text: the model writes greedily, ROUGE compares.

A task's `kind` says how its items are scored (minimamba.evaluate):

    "choice"    acc (highest summed log-likelihood) and acc_norm (per character of the continuation)
    "yesno"     accuracy, macro-F1 and per-class precision / recall / F1 over the option labels
    "lambada"   acc (every continuation token is the greedy one) and perplexity of the continuation
    "generate"  ROUGE-1 / 2 / L F1 of greedy generations against the references

    load_task("pubmedqa", split="test", data_dir=None, limit=None)  -> [Choice | Generation]
    sft_example("pubmedqa", item)                                    -> (prompt, response) for SFT
    python -m minimamba.tasks download pubmedqa arc_easy --out data/tasks
    python -m minimamba.tasks list [--data DIR]

Files are read from DIR (default: $MINIMAMBA_TASK_DATA, else data/tasks) with the relative layout of the
project's shared data folder (pubmedqa/ori_pqal.json, mc/arc_easy.jsonl, clinical/aci-bench/train.csv...).
`download` fetches them from GitHub at the commits pinned in DOWNLOADS (size and sha256 checked), from
$MINIMAMBA_GITHUB_RAW (default https://raw.githubusercontent.com) as {base}/{owner}/{repo}/{commit}/{path}.
Files are read by minimamba.data's readers (.bz2 decompressed, a byte order mark dropped, "\\r\\n" read as
"\\n", in quoted CSV fields too; UTF-16/32 or compressed data under a plain name refused with the command
that converts it), but strictly: a record that cannot be read (a missing field, a gold index out of range,
bytes that are not UTF-8, a text with half of a character (an escape "\\ud800" alone), JSON nested too deeply,
an empty file or a CSV with a header only) is a TaskDataError naming the file and line: a benchmark with
silently dropped items is not that benchmark any more. Item ids are stable ("pubmedqa/12377809",
"arc_easy/17": the record's place in its file).

Biomedical yes/no QA (the BioMamba recipe's QA protocol: log-likelihood of each answer after its template)
    QA_TEMPLATE = "Answer the following biomedical research question with yes, no, or maybe based on the
                   provided context.\\n\\nQuestion: {question}\\n\\nContext:\\n{context}\\n\\nAnswer:"
    continuations " yes", " no" (, " maybe") and, as the recipe also compares them, " Yes", " No" (, " Maybe"):
    each label is an option twice and scores its likelier spelling (gold: the lower-case one, which SFT
    trains on); the context is cut to its first 2,400 characters (the recipe's PubMedQA eval script; BioASQ
    the same here).
  pubmedqa  PubMedQA PQA-L (pubmedqa/pubmedqa ori_pqal.json + test_ground_truth.json). test: the official
            500 (the PMIDs of test_ground_truth.json, in its order; 276 yes / 169 no / 55 maybe); train: the
            other 500 (the official cross-validation pool). context = the abstract's CONTEXTS joined by one
            space (the sections' text without their labels, as one paragraph); gold = final_decision.
            The recipe instead cut the 1,000 into 800 / 200 at random (seed 42); the official split is used
            here so that numbers compare with the PubMedQA leaderboard / BLURB.
  bioasq    BioASQ Task B yes/no questions from the official golden files bioasq/raw/{batch}_golden.json
            (type == "yesno"; body, exact_answer, snippets[].text). context = the snippets' texts, each
            stripped, joined by one space. test: the newest batches here, 12B1-12B4 (102 questions); train:
            the older ones, 9B5, 10B1-10B6, 11B2 (166). The recipe tested on the newest batches of its time
            (13B1-13B4, 82 questions) and trained on older data (7b + 13b training), the same idea one year
            earlier. Without bioasq/raw/, the derived bioasq/bioasq_yesno_golden_9b-12b.jsonl (same questions,
            with a "batch" field) is read instead. BioASQ data need a registration: nothing is downloaded.
            The recipe scored BioASQ by generating and parsing the first word; here it is scored like
            PubMedQA (log-likelihood of " yes" / " no"), which cannot produce an unparseable answer.

Multiple choice (the out-of-domain benchmarks; test split only: eval-only), with lm-evaluation-harness's
strings (its default target delimiter " " goes in front of every continuation). Files from llm-foundry's
local_data (its "query" fields already hold part of lm-eval's context, as said below):
  arc_easy / arc_challenge  ARC test (2,376 / 1,172): context "Question: {q}\\nAnswer:" (the file's query is
            "Question: {q}", so "\\nAnswer:" is appended), continuation " {choice}". (This copy has exactly 4
            choices per item; a few ARC items have 3 or 5 in the original.)
  piqa      PIQA validation (1,838): context "Question: {goal}\\nAnswer:" (the file's query is
            "Question: {goal}\\n", so "Answer:" is appended), continuation " {solution}".
  openbookqa  OpenBookQA test (500), no fact: context = the question stem, continuation " {choice}".
  winogrande  WinoGrande dev / xl (1,267), lm-eval's partial scoring: one context per option (the sentence
            up to the blank with that option filled in: the file's context_options), the shared continuation
            " {rest of the sentence}"; only the continuation is scored, so options are compared fairly.
  hellaswag  HellaSwag validation (10,042) from klosax/hellaswag_text_data's text file (6 lines an item:
            "activity_label: ctx", gold, 4 endings; rowanz's jsonl and llm-foundry's copy are too large for
            the project's mirrors). lm-eval's preprocessing (drop "[...]" tags, "  " -> " ", strip) is applied
            again to the query and endings (it changes 14 lines that the uploader's narrower version left);
            context = the query, continuation " {ending}". One difference from lm-eval remains: lm-eval
            capitalizes ctx_b ("... on a roof. He"), which this file cannot (ctx_a and ctx_b are merged, "he").
  lambada   LAMBADA (OpenAI's detokenized test, 5,153), kind "lambada": one option (context, " " + last
            word) as lm-eval's lambada_openai (target " {word}", empty delimiter; one word is "\\n\\nrecorder").

Clinical generation (kind "generate"): ACI-BENCH (wyim/aci-bench challenge_data, CC BY 4.0: role-played visits,
their full visit notes), standing in for MIMIC-IV-Note (credentialed). test = clinicalnlp_taskB_test1 +
clinicalnlp_taskC_test2 + clef_taskC_test3 (120 notes), train = train + valid (87).
  note_completion  the recipe's clinical note completion: prompt "Continue the following clinical
            note.\\n\\n{prefix}", reference = the rest. The note is cut at the last single space at or before
            its middle (prefix_ratio 0.5), so prefix + " " + reference == the note (stripped). The prefix keeps
            at most its last 3,000 characters (from a word start), the reference its first 2,000 (to a word
            end). Notes whose prefix is under 100 characters or rest under 50 are skipped (none in ACI-BENCH);
            how many is printed on stderr.
  note_summary  the recipe's discharge-summary task adapted to visit notes: context = the sections before
            the first assessment header (a line "ASSESSMENT AND PLAN", "ASSESSMENT", "IMPRESSION" or "PLAN";
            the notes use all four), target = everything after that header line (the assessment, the plan
            and what follows, e.g. INSTRUCTIONS). Prompt, after the recipe's discharge template: "Based on the
            following clinical information, write the assessment and plan.\\n\\nClinical Notes:\\n{context}
            \\n\\nAssessment and Plan:". Context at most 4,000 characters (the recipe's eval limit; the start
            kept; no ACI-BENCH note is that long), target at most 2,000. Notes without such a header, or with
            a context under 100 or a target under 50 characters, are skipped and counted on stderr.

Clinical generation on MIMIC-IV-Note (kind "generate"; group "mimic", not in "all"): the recipe's own data, the
discharge notes of discharge.csv(.gz) (note_id, subject_id, text), which PhysioNet gives to credentialed users only:
never downloaded. Split by patient, 9:1 (`patient_split`: a hash of subject_id; test ~10% of the patients).
  mimic_completion  note_completion's protocol on a discharge note.
  mimic_discharge  the recipe's discharge task: DISCHARGE_TEMPLATE around the note's admission sections
            (ADMISSION_SECTIONS: chief complaint, HPI, PMH, admission medications, allergies, social and family
            history, physical exam, pertinent results; at most 4,000 characters), reference = its discharge
            sections (DISCHARGE_SECTIONS: hospital course, assessment and plan, discharge diagnosis, medications,
            instructions and condition, follow-up; at most 2,000), each "Header:\nbody" in note order
            (`note_sections`). Notes without a discharge section, or under 100 / 50 characters on either side,
            are skipped and counted on stderr. The file is read lazily, only as far as `load_task`'s limit (its
            sample reads all of it, keeping the items drawn).

SFT (sft_example) trains on the yes/no and generation tasks only: the prompt is what eval shows the model,
the response what it should say next: yesno -> (the gold option's context, its continuation, e.g. " yes");
generate -> (prompt, " " + reference). Every generation prompt ends without whitespace, and the response
starts with one space: eval's prompt followed by the model's words is the text SFT trained on.
"""

import argparse
import contextlib
import csv
import hashlib
import heapq
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from minimamba.data import REPLACED, STOPPED_EARLY, DataError, csv_records, jsonl_records, read_lines
from minimamba.download import DownloadError, download
from minimamba.files import parse_json
from minimamba.tokenizer import SURROGATE

KINDS = ("choice", "yesno", "lambada", "generate")

QA_TEMPLATE = ("Answer the following biomedical research question with yes, no, or maybe based on the provided "
               "context.\n\nQuestion: {question}\n\nContext:\n{context}\n\nAnswer:")
QA_CONTEXT_CHARS = 2400  # the recipe's PubMedQA eval cuts the context here
COMPLETION_TEMPLATE = "Continue the following clinical note.\n\n{prefix}"
SUMMARY_TEMPLATE = ("Based on the following clinical information, write the assessment and plan.\n\n"
                    "Clinical Notes:\n{context}\n\nAssessment and Plan:")
PREFIX_RATIO = 0.5  # note completion: the prefix is the first half of the note
MAX_PREFIX_CHARS = 3000  # the recipe's max_context_chars (note completion)
MAX_SUMMARY_CONTEXT_CHARS = 4000  # the recipe's eval "max context" (the discharge task)
MAX_REFERENCE_CHARS = 2000  # the recipe's max_response_chars
MIN_PREFIX_CHARS, MIN_REFERENCE_CHARS = 100, 50  # the recipe's filters
SFT_SEPARATOR = " "  # between a generation prompt and its reference in SFT
# a line that starts the assessment part of an ACI-BENCH note
ASSESSMENT_HEADER = re.compile(r"^(ASSESSMENT AND PLAN|ASSESSMENT|IMPRESSION|PLAN):?[ \t]*$", re.MULTILINE)
BIOASQ_TEST_BATCHES = ("12B1", "12B2", "12B3", "12B4")
BIOASQ_TRAIN_BATCHES = ("9B5", "10B1", "10B2", "10B3", "10B4", "10B5", "10B6", "11B2")
BIOASQ_DERIVED = "bioasq/bioasq_yesno_golden_9b-12b.jsonl"


class TaskDataError(ValueError):
    """A task file that is missing or cannot be read; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class Choice:
    """options[i] = (context, continuation); gold = index of the right option.

    Most tasks share one context across the options; WinoGrande has one context per option and one
    continuation shared by all. labels name the options where they have names ("yes", "no", "maybe")."""

    id: str
    options: tuple[tuple[str, str], ...]
    gold: int
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    """The model writes after `prompt`; `reference` is what a clinician wrote."""

    id: str
    prompt: str
    reference: str


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # one of KINDS
    source: str  # one line: the dataset, its split, where it comes from
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> paths under the task data dir
    # (list of paths, split) -> list of Choice or Generation, or a generator of them that `load_task` reads only as
    # far as its limit (MIMIC-IV-Note's large file)
    loader: Callable | None = None
    # split -> the files read instead where none of `files` is there (BioASQ: the derived JSON lines)
    fallback: dict[str, tuple[str, ...]] = field(default_factory=dict)
    obtain: str = ""  # how to get the files where they cannot be downloaded (BioASQ); {dir} = the data dir


# ----------------------------------------------------------------------------------------------------------
# Reading files: minimamba.data's readers (decompression, UTF-8, byte order mark, UTF-16/32 and compressed
# data refused, JSON lines, CSV rows with their line numbers) with evaluation data's policy: every problem
# they report is an error naming the file and line (a corpus's reader counts it and reads on)

_FIX = "delete it and download it again"


def _strict(path: Path) -> Callable[[str, int | None, str], None]:
    """The `report` given to data.py's readers: any problem in a task file is a TaskDataError."""

    def report(kind: str, line: int | None, message: str) -> None:
        where = path if line is None else f"{path}:{line}"
        message = message.removesuffix(f" {REPLACED}")  # (nothing is replaced: reading stops here)
        raise TaskDataError(f"{where}: {message}: a damaged or converted copy; {_FIX}")

    return report


@contextlib.contextmanager
def _reading(path: Path):
    """Where data.py's readers fail on `path`, a TaskDataError naming the file and the fix."""
    try:
        yield
    except DataError as e:  # (UTF-16/32, compressed data under a plain name, one JSON array: how to convert it)
        raise TaskDataError(f"{e}. (A task file is read under its own name: {_FIX}, or put the converted "
                            "file in its place.)") from e
    except (*STOPPED_EARLY, csv.Error) as e:  # (a .bz2 file that is not bz2 data or is cut short)
        raise TaskDataError(f"{path}: cannot be read to its end ({e}): a truncated or damaged copy; {_FIX}") from e


def _read(path: Path, reader: Callable, nothing: str = "the file is empty") -> list:
    """Everything reader(path, strict report) yields, with TaskDataErrors where it fails; an error saying
    `nothing` where it yields nothing."""
    with _reading(path):
        found = list(reader(path, _strict(path)))
    if not found:
        raise TaskDataError(f"{path}: {nothing}; {_FIX}")
    return found


def _lines(path: Path) -> list[str]:
    """The file's lines without their ends; only whitespace: TaskDataError."""
    lines = [line for _, line in _read(path, read_lines)]
    if not any(line.strip() for line in lines):
        raise TaskDataError(f"{path}: the file is empty (only whitespace); {_FIX}")
    return lines


def _json(path: Path):
    try:
        return parse_json("\n".join(_lines(path)))  # (line numbers as in the file)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}): a damaged copy; "
                            f"{_FIX}") from e
    except ValueError as e:  # (nested too deeply)
        raise TaskDataError(f"{path}: {e}: a damaged copy; {_FIX}") from None


def _jsonl(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for each non-blank line, a JSON object; `where` is "path:line"."""
    return [(f"{path}:{number}", record) for number, record in _read(path, jsonl_records)]


def _csv(path: Path, columns: tuple[str, ...]) -> list[tuple[str, dict]]:
    """(where, row) for each CSV row after the header; `where` is "path:line" (the line the row starts on).
    A line break inside a quoted field is "\\n" (a "\\r\\n" there is read as "\\n")."""
    records = _read(path, csv_records, "no rows (the file is empty or holds its header only)")
    rows = [(f"{path}:{number}", row) for number, row in records]
    _check_columns(path, rows[0][1], columns)
    return rows


def _check_columns(path: Path, row: dict, columns: tuple[str, ...]) -> None:
    if missing := [c for c in columns if c not in row]:
        raise TaskDataError(f"{path}:1: no column {', '.join(missing)} in the header {list(row)}: not the file this "
                            f"task reads; {_FIX}")


def _unicode(where: str, key: str, text: str) -> str:
    """`text`, refused if it holds half of a character (a JSON escape like "\\ud800" without its other half):
    it is not Unicode, and the tokenizer would refuse it later, in the middle of an evaluation."""
    if half := SURROGATE.search(text):
        raise TaskDataError(f"{where}: {key!r} holds an unpaired surrogate ({half.group()!a}, half of a character) "
                            f"at position {half.start()}: a damaged copy; {_FIX}")
    return text


def _get(where: str, record: dict, key: str, kind: type = str):
    """record[key], which must be a `kind` (a str must not be empty, and must be Unicode: `_unicode`)."""
    if key not in record:
        raise TaskDataError(f"{where}: no {key!r} field (it has {', '.join(map(repr, record))})")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value.strip()):
        raise TaskDataError(f"{where}: {key!r} should be a non-empty {kind.__name__}, got {value!r:.80}")
    return _unicode(where, key, value) if kind is str else value


def _strings(where: str, record: dict, key: str) -> list[str]:
    values = _get(where, record, key, list)
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise TaskDataError(f"{where}: {key!r} should be a non-empty list of non-empty strings, got {values!r:.80}")
    return [_unicode(where, key, v) for v in values]


def _gold(where: str, record: dict, n: int) -> int:
    gold = _get(where, record, "gold", int)
    if not 0 <= gold < n:
        raise TaskDataError(f"{where}: gold {gold} is not an option index (0..{n - 1})")
    return gold


# ----------------------------------------------------------------------------------------------------------
# Biomedical yes/no QA


def qa_prompt(question: str, context: str) -> str:
    """The recipe's QA prompt; the context cut to its first QA_CONTEXT_CHARS characters."""
    return QA_TEMPLATE.format(question=question, context=context[:QA_CONTEXT_CHARS])


def _yesno(item_id: str, where: str, question: str, context: str, answer: str, labels: tuple[str, ...]) -> Choice:
    """Options " yes", " no"(, " maybe"), then " Yes", " No"(, " Maybe"): each label twice, as the recipe
    compares the answers and their capitalised variants (a label scores its likelier spelling). gold is the
    lower-case option, which SFT trains on."""
    if answer not in labels:
        raise TaskDataError(f"{where}: answer {answer!r} is not one of {', '.join(labels)}")
    prompt = qa_prompt(question, context)
    spellings = [" " + label for label in labels] + [" " + label.capitalize() for label in labels]
    return Choice(item_id, tuple((prompt, s) for s in spellings), labels.index(answer), labels + labels)


def _pubmedqa(paths: list[Path], split: str) -> list[Choice]:
    pqal_path, truth_path = paths
    pqal, truth = _json(pqal_path), _json(truth_path)
    for path, data in ((pqal_path, pqal), (truth_path, truth)):
        if not isinstance(data, dict):
            raise TaskDataError(f"{path}: expected a JSON object keyed by PMID, got {type(data).__name__}")
    if missing := [pmid for pmid in truth if pmid not in pqal]:
        raise TaskDataError(f"{truth_path}: {len(missing)} test PMIDs are not in {pqal_path} (e.g. {missing[0]})")
    pmids = list(truth) if split == "test" else [pmid for pmid in pqal if pmid not in truth]
    items = []
    for pmid in pmids:
        where, record = f"{pqal_path} (PMID {pmid})", pqal[pmid]
        if not isinstance(record, dict):
            raise TaskDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        answer = _get(where, record, "final_decision")
        if split == "test" and truth[pmid] != answer:
            raise TaskDataError(f"{where}: final_decision {answer!r} but {truth_path} says {truth[pmid]!r}")
        context = " ".join(_strings(where, record, "CONTEXTS"))
        items.append(_yesno(f"pubmedqa/{pmid}", where, _get(where, record, "QUESTION"), context, answer,
                            ("yes", "no", "maybe")))
    return items


def _bioasq(paths: list[Path], split: str) -> list[Choice]:
    """Yes/no questions of BioASQ golden files ({"questions": [...]}), or of the derived JSON lines."""
    items = []
    if paths[0].suffix == ".jsonl":  # the derived file: one question a line, with its batch
        batches = BIOASQ_TEST_BATCHES if split == "test" else BIOASQ_TRAIN_BATCHES
        for where, r in _jsonl(paths[0]):
            if _get(where, r, "batch") in batches:
                context = " ".join(s.strip() for s in _strings(where, r, "snippets"))
                items.append(_yesno(f"bioasq/{_get(where, r, 'id')}", where, _get(where, r, "question"), context,
                                    _get(where, r, "answer").strip().lower(), ("yes", "no")))
        return items
    for path in paths:
        golden = _json(path)
        if not isinstance(golden, dict) or not isinstance(golden.get("questions"), list):
            raise TaskDataError(f"{path}: expected a BioASQ golden file, {{\"questions\": [...]}}")
        for i, q in enumerate(golden["questions"]):
            where = f"{path} (question {i})"
            if not isinstance(q, dict):
                raise TaskDataError(f"{where}: expected a JSON object, got {type(q).__name__}")
            if _get(where, q, "type") != "yesno":
                continue
            snippets = _get(where, q, "snippets", list)
            if not snippets or not all(isinstance(s, dict) and isinstance(s.get("text"), str) and s["text"].strip()
                                       for s in snippets):
                raise TaskDataError(f"{where}: 'snippets' should be a non-empty list of {{\"text\": ...}} objects "
                                    "with non-empty texts")
            context = " ".join(_unicode(where, "snippets", s["text"]).strip() for s in snippets)
            items.append(_yesno(f"bioasq/{_get(where, q, 'id')}", where, _get(where, q, "body"), context,
                                _get(where, q, "exact_answer").strip().lower(), ("yes", "no")))
    return items


# ----------------------------------------------------------------------------------------------------------
# Multiple choice (lm-evaluation-harness's strings)


def _query(prefix: str = "", suffix: str = "", append: str = "") -> Callable[[str, str], str]:
    """The context from a file's query: checks that it starts with `prefix` and ends with `suffix`
    (what llm-foundry's files hold), then appends `append` (the rest of lm-eval's context)."""

    def context(where: str, query: str) -> str:
        if not (query.startswith(prefix) and query.endswith(suffix)):
            raise TaskDataError(f"{where}: the query should look like {prefix + '...' + suffix!r} (llm-foundry's "
                                f"format), got {query!r:.80}")
        return query + append

    return context


def _multiple_choice(paths: list[Path], split: str, name: str, context: Callable[[str, str], str]) -> list[Choice]:
    items = []
    for i, (where, r) in enumerate(_jsonl(paths[0])):
        choices = _strings(where, r, "choices")
        ctx = context(where, _get(where, r, "query"))
        items.append(Choice(f"{name}/{i}", tuple((ctx, " " + c) for c in choices), _gold(where, r, len(choices))))
    return items


def _winogrande(paths: list[Path], split: str) -> list[Choice]:
    items = []
    for i, (where, r) in enumerate(_jsonl(paths[0])):
        contexts, rest = _strings(where, r, "context_options"), _get(where, r, "continuation")
        options = tuple((context, " " + rest) for context in contexts)  # one context per option, one continuation
        items.append(Choice(f"winogrande/{i}", options, _gold(where, r, len(contexts))))
    return items


def _lambada(paths: list[Path], split: str) -> list[Choice]:
    return [Choice(f"lambada/{i}", ((_get(where, r, "context"), " " + _get(where, r, "continuation")),), 0)
            for i, (where, r) in enumerate(_jsonl(paths[0]))]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: " [title]" -> ". ", drop "[...]" tags, "  " -> " ", strip."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(paths: list[Path], split: str) -> list[Choice]:
    """klosax's text file: 6 lines an item ("activity_label: ctx", gold 0-3, 4 endings)."""
    path = paths[0]
    lines = _lines(path)
    if len(lines) % 6:
        raise TaskDataError(f"{path}: {len(lines)} lines, not a multiple of 6 (a query, the gold and 4 endings "
                            "an item): a truncated or damaged file; delete it and download it again")
    items = []
    for start in range(0, len(lines), 6):
        query, gold, *endings = lines[start : start + 6]
        if gold not in ("0", "1", "2", "3"):
            raise TaskDataError(f"{path}:{start + 2}: the gold should be 0, 1, 2 or 3, got {gold!r:.80}")
        context = hellaswag_preprocess(query)
        items.append(Choice(f"hellaswag/{start // 6}", tuple((context, " " + hellaswag_preprocess(e)) for e in endings),
                            int(gold)))
    return items


# ----------------------------------------------------------------------------------------------------------
# Clinical generation (ACI-BENCH)


def _notes(paths: list[Path]) -> list[tuple[str, str, str]]:
    """(where, encounter_id, note without its surrounding whitespace) of every row of the ACI-BENCH CSVs."""
    return [(where, _get(where, row, "encounter_id"), _get(where, row, "note").strip())
            for path in paths for where, row in _csv(path, ("encounter_id", "note"))]


def _report_skipped(name: str, split: str, total: int, skipped: list[str]) -> None:
    if skipped:
        shown = "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        print(f"{name} ({split}): skipped {len(skipped)} of {total} notes: {shown}", file=sys.stderr)


def _keep_end(text: str, n: int) -> str:
    """The last n characters of text at most, starting at a word (text without leading whitespace)."""
    if len(text) <= n:
        return text
    tail = text[-n:]
    return (tail if text[-n - 1].isspace() else re.sub(r"^\S*", "", tail, count=1)).lstrip()


def _keep_start(text: str, n: int) -> str:
    """The first n characters of text at most, ending at a word (text without trailing whitespace)."""
    if len(text) <= n:
        return text
    head = text[:n]
    return (head if text[n].isspace() else re.sub(r"\S*$", "", head, count=1)).rstrip()


def split_note(note: str, ratio: float = PREFIX_RATIO) -> tuple[str, str]:
    """(prefix, rest) cut at the last single space (between two non-spaces) at or before len(note)·ratio,
    so that prefix + " " + rest == note; ("", note) if there is none."""
    cut = int(len(note) * ratio)
    for i in range(min(cut, len(note) - 2), 0, -1):
        if note[i] == " " and not note[i - 1].isspace() and not note[i + 1].isspace():
            return note[:i], note[i + 1 :]
    return "", note


def _completion(note: str) -> "tuple[str, str] | str":
    """note_completion's (prompt, reference) of a note, or why the note is skipped."""
    prefix, rest = split_note(note)
    if len(prefix) < MIN_PREFIX_CHARS or len(rest) < MIN_REFERENCE_CHARS:
        return f"prefix {len(prefix)} / rest {len(rest)} characters"
    return COMPLETION_TEMPLATE.format(prefix=_keep_end(prefix, MAX_PREFIX_CHARS)), _keep_start(rest, MAX_REFERENCE_CHARS)


def split_assessment(note: str) -> tuple[str, str] | None:
    """(the sections before the first assessment header line, what follows that line), both stripped;
    None if the note has no such header."""
    match = ASSESSMENT_HEADER.search(note)
    return (note[: match.start()].strip(), note[match.end() :].strip()) if match else None


def _summary(note: str) -> "tuple[str, str] | str":
    """note_summary's (prompt, reference) of a note, or why the note is skipped."""
    parts = split_assessment(note)
    if parts is None:
        return "no ASSESSMENT AND PLAN / ASSESSMENT / IMPRESSION / PLAN header line"
    context, target = parts
    if len(context) < MIN_PREFIX_CHARS or len(target) < MIN_REFERENCE_CHARS:
        return f"context {len(context)} / target {len(target)} characters"
    return (SUMMARY_TEMPLATE.format(context=_keep_start(context, MAX_SUMMARY_CONTEXT_CHARS)),
            _keep_start(target, MAX_REFERENCE_CHARS))


def _clinical(paths: list[Path], split: str, name: str, cut: Callable) -> list[Generation]:
    """The Generation items of the notes in `paths`: cut(note) gives (prompt, reference), or the reason why
    that note is skipped (the skipped ones are counted on stderr)."""
    items, skipped, notes = [], [], _notes(paths)
    for where, encounter, note in notes:
        made = cut(note)
        if isinstance(made, str):
            skipped.append(f"{where}: {made}")
        else:
            items.append(Generation(f"{name}/{encounter}", *made))
    _report_skipped(name, split, len(notes), skipped)
    return items


# ----------------------------------------------------------------------------------------------------------
# Clinical generation on MIMIC-IV-Note (the recipe's own data: credentialed, so each user brings their copy)


def _section_key(header: str) -> str:
    """A section header as compared: letters only, lower case ("Follow-up Instructions" = "followupinstructions")."""
    return re.sub(r"[^a-z]", "", header.lower())


# the recipe's discharge task: the model reads a note's admission sections and writes its discharge sections
# (with the spellings other than the usual one that the same section goes by: HPI, Physical Examination, ...)
ADMISSION_SECTIONS = ("Chief Complaint", "History of Present Illness", "HPI", "Past Medical History",
                      "Medications on Admission", "Allergies", "Social History", "Family History", "Physical Exam",
                      "Physical Examination", "Pertinent Results")
DISCHARGE_SECTIONS = ("Brief Hospital Course", "Hospital Course", "Assessment and Plan", "Assessment/Plan",
                      "Discharge Diagnosis", "Discharge Diagnoses", "Discharge Medications", "Discharge Instructions",
                      "Discharge Condition", "Followup Instructions", "Follow-up Instructions")
# the other headers of a MIMIC-IV discharge note: they end the section before them, and are read by neither side
OTHER_SECTIONS = ("Name", "Admission Date", "Date of Birth", "Service", "Attending",
                  "Major Surgical or Invasive Procedure", "Discharge Disposition", "Facility")
_KINDS = {_section_key(h): kind for kind, names in (("admission", ADMISSION_SECTIONS), ("discharge", DISCHARGE_SECTIONS),
                                                    ("other", OTHER_SECTIONS)) for h in names}
_HEADER_LINE = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&-]*?)[ \t]*:(.*)$", re.MULTILINE)  # "Header:" and what follows
DISCHARGE_TEMPLATE = ("Based on the following clinical information, write the discharge summary including hospital "
                      "course, discharge diagnosis, discharge medications, and discharge instructions.\n\nClinical "
                      "Notes:\n{context}\n\nDischarge Summary:")
MIMIC_FILE, MIMIC_FILE_PLAIN = "clinical/mimic-iv-note/discharge.csv.gz", "clinical/mimic-iv-note/discharge.csv"
MIMIC_TEST_SHARE = 0.1  # the recipe's patient-level 9:1 split
_MIMIC_HELP = ("MIMIC-IV-Note is given to credentialed PhysioNet users only, so it is not downloaded: get access at "
               "https://physionet.org/content/mimic-iv-note/, download note/discharge.csv.gz (v2.2) and put it at "
               "{dir}/" + MIMIC_FILE + " (or uncompressed, as {dir}/" + MIMIC_FILE_PLAIN + ")")


def section_kind(header: str) -> str | None:
    """Which side of the discharge task a header's section is on: "admission" (read), "discharge" (written),
    "other" (a header of the note that neither side reads), or None: no section header (its line stays in the
    section it is in). Any header that names the hospital course is "discharge" ("Concise Summary of Hospital
    Course by Issue/System:", a spelling some notes use), so that the main part of the reference cannot end up
    in the prompt as the tail of the section before it; but not a course at another hospital or an earlier stay
    ("Outside Hospital Course:" inside the history of present illness), which is history."""
    key = _section_key(header)
    if "hospitalcourse" in key and not key.startswith(("outside", "osh", "prior", "previous", "past")):
        return "discharge"
    return _KINDS.get(key)


def note_sections(note: str) -> list[tuple[str, str]]:
    """(header as written, body stripped) of each section of a MIMIC-IV discharge note, in note order. A section
    starts at a line "Header:" (text may follow on that line) whose header is one of the note's known headers
    (`section_kind`: ADMISSION_SECTIONS, DISCHARGE_SECTIONS, OTHER_SECTIONS, any hospital course), so that
    "BP: 120/80" inside the physical exam starts none; it runs to the next such line. What comes before the first
    is left out. Line ends are read as "\\n" ("\\r\\n" too, as the CSV reader gives them: a note passed with CRLF
    has the same sections)."""
    note = note.replace("\r\n", "\n")
    starts = [m for m in _HEADER_LINE.finditer(note) if section_kind(m[1]) is not None]
    ends = [m.start() for m in starts[1:]] + [len(note)]
    return [(m[1], (m[2] + note[m.end() : end]).strip()) for m, end in zip(starts, ends)]


def _discharge(note: str) -> "tuple[str, str] | str":
    """mimic_discharge's (prompt, reference) of a note: its admission sections, its discharge sections, each
    as "Header:\nbody" and joined by a blank line; or why the note is skipped."""
    sections = note_sections(note)
    context, target = ("\n\n".join(f"{header}:\n{body}" for header, body in sections
                                    if body and section_kind(header) == side) for side in ("admission", "discharge"))
    if not target:
        return "no discharge section (" + ", ".join(DISCHARGE_SECTIONS[:3]) + ", ...)"
    if len(context) < MIN_PREFIX_CHARS or len(target) < MIN_REFERENCE_CHARS:
        return f"admission sections {len(context)} / discharge sections {len(target)} characters"
    return (DISCHARGE_TEMPLATE.format(context=_keep_start(context, MAX_SUMMARY_CONTEXT_CHARS)),
            _keep_start(target, MAX_REFERENCE_CHARS))


def patient_split(subject_id: str) -> str:
    """"test" for the patients whose subject_id hashes below MIMIC_TEST_SHARE, else "train": every note of a
    patient is in one split, whatever the file's order or size."""
    digest = hashlib.sha256(subject_id.strip().encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < MIMIC_TEST_SHARE else "train"


def _mimic(paths: list[Path], split: str, name: str, cut: Callable):
    """The Generation items of the discharge notes (discharge.csv: note_id, subject_id, text) of the patients in
    `split` (`patient_split`), in file order, as a generator: the file holds ~330k notes of ~10k characters,
    and `load_task` reads only as far as its `limit` asks. The notes skipped among those read are counted on
    stderr when it stops."""
    [path] = paths
    read, skipped = 0, []
    try:
        with _reading(path):
            for i, (number, row) in enumerate(csv_records(path, _strict(path))):
                where = f"{path}:{number}"
                if i == 0:
                    _check_columns(path, row, ("note_id", "subject_id", "text"))
                if patient_split(_get(where, row, "subject_id")) != split:
                    continue
                read += 1
                made = cut(_get(where, row, "text").strip())
                if isinstance(made, str):
                    skipped.append(f"{where}: {made}")
                else:
                    yield Generation(f"{name}/{_get(where, row, 'note_id').strip()}", *made)
    finally:
        _report_skipped(name, split, read, skipped)


# ----------------------------------------------------------------------------------------------------------
# The registry


def _eval_only(path: str) -> dict[str, tuple[str, ...]]:
    return {"test": (path,)}


_PQAL = ("pubmedqa/ori_pqal.json", "pubmedqa/test_ground_truth.json")
_ACI = {"test": tuple(f"clinical/aci-bench/{n}.csv" for n in ("clinicalnlp_taskB_test1", "clinicalnlp_taskC_test2",
                                                              "clef_taskC_test3")),
        "train": ("clinical/aci-bench/train.csv", "clinical/aci-bench/valid.csv")}
_MIMIC, _MIMIC_PLAIN = ({split: (file,) for split in ("test", "train")} for file in (MIMIC_FILE, MIMIC_FILE_PLAIN))
_BIOASQ_HELP = ("BioASQ data are given to registered participants only, so they are not downloaded: register at "
                "https://www.bioasq.org, download the Task B golden test files (participants area) "
                f"{', '.join(BIOASQ_TEST_BATCHES + BIOASQ_TRAIN_BATCHES)} (named like 12B1_golden.json) and put "
                "them in {dir}/bioasq/raw/ (or the derived file as {dir}/" + BIOASQ_DERIVED + ")")

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("pubmedqa", "yesno", "PubMedQA PQA-L (pubmedqa/pubmedqa): official 500-item test; train = the other 500",
         {"test": _PQAL, "train": _PQAL}, _pubmedqa),
    Task("bioasq", "yesno", "BioASQ Task B yes/no golden files (bioasq.org): test 12B1-12B4; train 9B5, 10B1-6, 11B2",
         {"test": tuple(f"bioasq/raw/{b}_golden.json" for b in BIOASQ_TEST_BATCHES),
          "train": tuple(f"bioasq/raw/{b}_golden.json" for b in BIOASQ_TRAIN_BATCHES)}, _bioasq,
         fallback={"test": (BIOASQ_DERIVED,), "train": (BIOASQ_DERIVED,)}, obtain=_BIOASQ_HELP),
    Task("arc_easy", "choice", "ARC-Easy test (AllenAI), llm-foundry local_data copy",
         _eval_only("mc/arc_easy.jsonl"), partial(_multiple_choice, name="arc_easy",
                                                  context=_query("Question: ", append="\nAnswer:"))),
    Task("arc_challenge", "choice", "ARC-Challenge test (AllenAI), llm-foundry local_data copy",
         _eval_only("mc/arc_challenge.jsonl"), partial(_multiple_choice, name="arc_challenge",
                                                       context=_query("Question: ", append="\nAnswer:"))),
    Task("hellaswag", "choice", "HellaSwag validation (rowanz), klosax/hellaswag_text_data text copy",
         _eval_only("mc/hellaswag_val_full.txt.bz2"), _hellaswag),
    Task("piqa", "choice", "PIQA validation (Bisk et al.), llm-foundry local_data copy",
         _eval_only("mc/piqa.jsonl"), partial(_multiple_choice, name="piqa",
                                              context=_query("Question: ", "\n", append="Answer:"))),
    Task("winogrande", "choice", "WinoGrande dev (xl, AllenAI), llm-foundry local_data copy, partial scoring",
         _eval_only("mc/winogrande.jsonl"), _winogrande),
    Task("openbookqa", "choice", "OpenBookQA test, no fact (AllenAI), llm-foundry local_data copy",
         _eval_only("mc/openbook_qa.jsonl"), partial(_multiple_choice, name="openbookqa", context=_query())),
    Task("lambada", "lambada", "LAMBADA, OpenAI's detokenized test, llm-foundry local_data copy",
         _eval_only("mc/lambada_openai.jsonl"), _lambada),
    Task("note_completion", "generate", "ACI-BENCH visit notes (wyim/aci-bench): complete the second half of a note",
         _ACI, partial(_clinical, name="note_completion", cut=_completion)),
    Task("note_summary", "generate", "ACI-BENCH visit notes (wyim/aci-bench): write the assessment and plan",
         _ACI, partial(_clinical, name="note_summary", cut=_summary)),
    Task("mimic_completion", "generate", "MIMIC-IV-Note discharge notes (PhysioNet, credentialed): complete a note",
         _MIMIC, partial(_mimic, name="mimic_completion", cut=_completion), fallback=_MIMIC_PLAIN, obtain=_MIMIC_HELP),
    Task("mimic_discharge", "generate", "MIMIC-IV-Note discharge notes: the discharge sections from the admission ones",
         _MIMIC, partial(_mimic, name="mimic_discharge", cut=_discharge), fallback=_MIMIC_PLAIN, obtain=_MIMIC_HELP),
)}


# named groups of tasks (eval.py --tasks qa,mc): the recipe's three kinds of downstream evaluation
GROUPS: dict[str, list[str]] = {
    "qa": ["pubmedqa", "bioasq"],  # biomedical yes/no question answering
    "mc": ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "lambada"],  # out of domain
    "clinical": ["note_completion", "note_summary"],  # generation, ROUGE
}
GROUPS["all"] = [name for group in GROUPS.values() for name in group]
# the recipe's own clinical data, which only credentialed users have: named, not part of "all"
GROUPS["mimic"] = ["mimic_completion", "mimic_discharge"]

def default_data_dir() -> Path:
    return Path(os.environ.get("MINIMAMBA_TASK_DATA") or "data/tasks")


def _task(task: "str | Task") -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise TaskDataError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return TASKS[task]


def _how_to_get(task: Task, data_dir: Path) -> str:
    if task.obtain:
        return task.obtain.format(dir=data_dir)
    return f"Download with: python -m minimamba.tasks download {task.name} --out {data_dir}"


def task_files(task: "str | Task", split: str = "test", data_dir: "str | Path | None" = None) -> list[Path]:
    """The files a split reads (its fallback where none of its own files is there); missing: TaskDataError."""
    task = _task(task)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if split not in task.files:
        raise TaskDataError(f"{task.name} has no {split!r} split (it has {', '.join(task.files)})"
                            + (": it is for evaluation only" if list(task.files) == ["test"] else ""))
    paths = [data_dir / p for p in task.files[split]]
    fallback = [data_dir / p for p in task.fallback.get(split, ())]
    if not any(p.exists() for p in paths) and fallback and all(p.exists() for p in fallback):
        paths = fallback
    if missing := [p for p in paths if not p.exists()]:
        raise TaskDataError(f"task {task.name} ({split}) needs {', '.join(map(str, missing))}, which "
                            f"{'is' if len(missing) == 1 else 'are'} not there. {_how_to_get(task, data_dir)}")
    return paths


def load_task(name: "str | Task", split: str = "test", data_dir: "str | Path | None" = None,
              limit: int | None = None, sample: int | None = None) -> list:
    """The items (Choice or Generation) of one split of a task, in file order; `limit`: the first N; `sample`:
    N drawn at random (`drawn`), still in file order.

    data_dir: where the files are (default $MINIMAMBA_TASK_DATA, else data/tasks), in the shared-data layout."""
    task = _task(name)
    for what, n in (("limit", limit), ("sample", sample)):
        if n is not None and n < 1:
            raise TaskDataError(f"{what} must be at least 1, got {n}")
    if limit is not None and sample is not None:
        raise TaskDataError("give limit (the first N items) or sample (N drawn at random), not both")
    with _read_items(task, split, data_dir) as items:  # (a generator, MIMIC-IV-Note's, is read as far as needed)
        return drawn(items, sample) if sample is not None else list(itertools.islice(items, limit))


def count_items(name: "str | Task", split: str = "test", data_dir: "str | Path | None" = None) -> int:
    """len(load_task(name, split, data_dir)), with the same checks, without keeping the items of a lazily read
    file (`python -m minimamba.tasks list` counts MIMIC-IV-Note's ~300k training notes)."""
    with _read_items(_task(name), split, data_dir) as items:
        return sum(1 for _ in items)


@contextlib.contextmanager
def _read_items(task: Task, split: str, data_dir):
    """The items of a split as its loader gives them (a list, or a generator closed after use), each id checked
    to be new as it is read; no item at all is an error."""
    paths = task_files(task, split, data_dir)
    where = ", ".join(map(str, paths))
    loaded = task.loader(paths, split)

    def checked(items):
        seen = set()
        for item in items:
            if item.id in seen:
                raise TaskDataError(f"task {task.name} ({split}): the id {item.id} appears twice in {where}")
            seen.add(item.id)
            yield item
        if not seen:
            raise TaskDataError(f"task {task.name} ({split}): no items in {where}")

    if isinstance(loaded, list):
        yield list(checked(loaded))
    else:
        with contextlib.closing(loaded):
            yield checked(loaded)


def drawn(items, n: int) -> list:
    """n of `items` drawn at random, in their own order: the n whose ids hash lowest. The same n on every run and
    machine, whatever the order of the file or the other items (a note added to MIMIC-IV-Note changes the draw by
    at most that note), and only n items are kept while a large file is read."""

    def rank(numbered):
        return hashlib.sha256(f"minimamba sample\0{numbered[1].id}".encode("utf-8")).digest()

    return [item for _, item in sorted(heapq.nsmallest(n, enumerate(items), key=rank), key=lambda p: p[0])]


def sft_example(task: "str | Task", item) -> tuple[str, str]:
    """(prompt, response) that SFT trains on (loss on the response only).

    yesno: (the gold option's context, its continuation, e.g. " yes"); generate: (prompt, " " + reference).
    prompt + response is the text evaluation scores (yesno) or the model's prompt followed by what it
    should write (generate). Multiple-choice and LAMBADA tasks are eval-only: an error."""
    task = _task(task)
    if task.kind == "yesno" and isinstance(item, Choice):
        return item.options[item.gold]
    if task.kind == "generate" and isinstance(item, Generation):
        return item.prompt, SFT_SEPARATOR + item.reference
    if task.kind in ("choice", "lambada"):
        trainable = ", ".join(n for n, t in TASKS.items() if t.kind in ("yesno", "generate"))
        raise TaskDataError(f"{task.name} is an evaluation-only benchmark ({task.kind}); SFT trains on the yesno "
                            f"and generate tasks: {trainable}")
    raise TaskDataError(f"{task.name} ({task.kind}) items are "
                        f"{'Choice' if task.kind == 'yesno' else 'Generation'}s, got a {type(item).__name__}")


# ----------------------------------------------------------------------------------------------------------
# Downloads: public GitHub files at pinned commits (sizes and sha256 of the files at those commits)

PUBMEDQA = "pubmedqa/pubmedqa", "1cbae8e92f72f20c8d3747cbb3bf5bc53554d997"
LLM_FOUNDRY = "mosaicml/llm-foundry", "8c8dd48f72168c5d51e2f7b151595892a8fba43d"
HELLASWAG_TEXT = "klosax/hellaswag_text_data", "1105d370f8340eac3c63a91fd1fa58e8999f9505"
ACI_BENCH = "wyim/aci-bench", "b909b2bb9cf1d19de08df15cddde7bd0179665e4"
_LF = "scripts/eval/local_data/"
_AB = "data/challenge_data/"

# file under the task data dir -> ((repo, commit), path in the repo, size in bytes, sha256)
DOWNLOADS: dict[str, tuple[tuple[str, str], str, int, str]] = {
    "pubmedqa/ori_pqal.json": (PUBMEDQA, "data/ori_pqal.json", 2584787,
                               "8b3276be8942ebbd77f3ddcda12c1749bf0e490045a736fd8438ee40cf37a41d"),
    "pubmedqa/test_ground_truth.json": (PUBMEDQA, "data/test_ground_truth.json", 11414,
                                        "939fe566f09017d13b1ca64d2ddfee0bc2374b366048152997669cccedc44d51"),
    "mc/arc_easy.jsonl": (LLM_FOUNDRY, _LF + "world_knowledge/arc_easy.jsonl", 636665,
                          "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5"),
    "mc/arc_challenge.jsonl": (LLM_FOUNDRY, _LF + "world_knowledge/arc_challenge.jsonl", 365606,
                               "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636"),
    "mc/piqa.jsonl": (LLM_FOUNDRY, _LF + "commonsense_reasoning/piqa.jsonl", 533992,
                      "d2870e73aec5154df3faf259b7700876e11608eebdf69e9d6667435673dbe4e0"),
    "mc/openbook_qa.jsonl": (LLM_FOUNDRY, _LF + "commonsense_reasoning/openbook_qa.jsonl", 88043,
                             "adb2e5c7f8db810ddad4d6b2bf53dcc86dcc545499f7aafcaf42a8e179476c09"),
    "mc/winogrande.jsonl": (LLM_FOUNDRY, _LF + "language_understanding/winogrande.jsonl", 312369,
                            "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7"),
    "mc/lambada_openai.jsonl": (LLM_FOUNDRY, _LF + "language_understanding/lambada_openai.jsonl", 1895241,
                                "411bfbe5b9054346b6a19299c0242670adbefb9162efd958593cbc0290b8c9dc"),
    "mc/hellaswag_val_full.txt.bz2": (HELLASWAG_TEXT, "hellaswag_val_full.txt.bz2", 1964544,
                                      "50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b"),
    "clinical/aci-bench/train.csv": (ACI_BENCH, _AB + "train.csv", 611240,
                                     "6c778d4ac5e6cc6f1964786f9286e8d765c210f22ed6b57f83aff8497409cea4"),
    "clinical/aci-bench/valid.csv": (ACI_BENCH, _AB + "valid.csv", 177400,
                                     "6629e89e3fb409d2b3eceab60dc7b32fe1d3fb8d4e07795039284965522aa4d0"),
    "clinical/aci-bench/clinicalnlp_taskB_test1.csv": (
        ACI_BENCH, _AB + "clinicalnlp_taskB_test1.csv", 349998,
        "5cc4008e68545f84913744a8e493a58bdf17ba7e1b7a0be46d6943d6bfca9471"),
    "clinical/aci-bench/clinicalnlp_taskC_test2.csv": (
        ACI_BENCH, _AB + "clinicalnlp_taskC_test2.csv", 385979,
        "599e3330a14e25a0e056aee1365ffac7ebe50058f15821eae42a5513c2bb5a4f"),
    "clinical/aci-bench/clef_taskC_test3.csv": (ACI_BENCH, _AB + "clef_taskC_test3.csv", 381908,
                                                "d3c18362a42124ea2bd1b2b4b66ba76a11bb123dfdb416471ae3b5924d1428ec"),
}


def github_raw() -> str:
    """$MINIMAMBA_GITHUB_RAW (default https://raw.githubusercontent.com) without a final "/"."""
    return (os.environ.get("MINIMAMBA_GITHUB_RAW") or "https://raw.githubusercontent.com").rstrip("/")


def download_task(name: str, data_dir: "str | Path | None" = None) -> list[Path]:
    """Download every file of a task (all its splits) into data_dir; returns their paths. Files already
    there are checked (size, sha256) and kept; an interrupted download resumes (minimamba.download)."""
    task = _task(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    names = list(dict.fromkeys(p for split in task.files.values() for p in split))
    if not all(n in DOWNLOADS for n in names):
        raise TaskDataError(f"{task.name} cannot be downloaded. {_how_to_get(task, data_dir)}")
    paths = []
    for rel in names:
        (repo, commit), path, size, sha256 = DOWNLOADS[rel]
        url = f"{github_raw()}/{repo}/{commit}/{path}"
        paths.append(download(url, data_dir / rel, desc=rel, expected_size=size, sha256=sha256))
    return paths


# ----------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimamba.tasks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("download", help="download tasks' public files (needs internet)")
    downloadable = [n for n, t in TASKS.items() if all(p in DOWNLOADS for s in t.files.values() for p in s)]
    d.add_argument("names", nargs="+", metavar="NAME", choices=[*TASKS, "all"],  # (bioasq: says how to get it)
                   help=f"{', '.join(downloadable)}, or all (BioASQ needs a registration)")
    d.add_argument("--out", type=Path, default=None, help="the task data dir (default $MINIMAMBA_TASK_DATA, "
                   "else data/tasks)")
    ls = commands.add_parser("list", help="the tasks, their kind, items per split (where the files are), source")
    ls.add_argument("--data", type=Path, default=None, help="the task data dir (default $MINIMAMBA_TASK_DATA, "
                    "else data/tasks)")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            out = args.out if args.out is not None else default_data_dir()
            for name in dict.fromkeys(downloadable if "all" in args.names else args.names):
                download_task(name, out)
            print(f"downloaded into {out}; evaluate with --task-data {out} (or MINIMAMBA_TASK_DATA={out})")
        else:
            data_dir = args.data if args.data is not None else default_data_dir()
            print(f"tasks in {data_dir} (items per split; -: its files are not there):")
            problems = []
            for task in TASKS.values():
                counts = []
                for split in task.files:
                    try:
                        counts.append(f"{split} {count_items(task, split, data_dir):,}")
                    except TaskDataError as e:
                        counts.append(f"{split} -" if "not there" in str(e) else f"{split} unreadable")
                        if "not there" not in str(e):
                            problems.append(f"{task.name} ({split}): {e}")
                print(f"  {task.name:16} {task.kind:9} {', '.join(counts):24} {task.source}")
            for problem in problems:  # (what "unreadable" means, after the table)
                print(f"unreadable: {problem}", file=sys.stderr)
    except (TaskDataError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

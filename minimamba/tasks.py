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
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

KINDS = ("choice", "yesno", "lambada", "generate")


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
    loader: Callable | None = None  # (list of paths, split) -> list of Choice or Generation

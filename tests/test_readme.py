"""The commands the README shows are the ones that work.

Every `python` command in the README (its bash blocks and inline code) and in the usage lines of the scripts'
and modules' docstrings must parse with the options of the script or module it runs: a renamed or removed
option, or a value its option refuses, fails here, naming the command. The offline part of the recipe runs as
written, on the shared sample corpora: the sample `prepare` block (its document and token counts are the ones
the README gives), then train.py's CPU quickstart on what it wrote (its held-out perplexities are the ones the
README gives). (sft.py's quickstart, 28 s, is parsed only: tests/test_finetune.py runs sft.py end to end.)
"""

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SCRIPTS = ("train.py", "sft.py", "eval.py")
MODULES = ("minimamba.data", "minimamba.tasks", "minimamba.bench", "minimamba.miniature", "kernels.bench",
           "kernels.offline")
needs_samples = pytest.mark.skipif(not (DATA / "tokenizer" / "tokenizer.json").exists(),
                                   reason=f"the shared sample corpora are not in {DATA} (set MINIMAMBA_DATA)")


# ----------------------------------------------------------------------------------------------------------
# finding the commands


def _join_continued_lines(text):
    """The lines of `text`, a line ending in a backslash joined to the next."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def _bash_commands(block):
    """The commands of a bash block, as argument lists: line continuations joined, comments dropped,
    commands split at `;`, and the block's own variables (`S=...; P="python ... $S/..."`) expanded; an
    unquoted `$P` that starts a command splits into words, as bash splits it."""
    env = {}
    for line in _join_continued_lines(block):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
        lexer.whitespace_split, lexer.commenters = True, "#"
        command = []
        for word in [*lexer, ";"]:
            if word != ";":
                expanded = re.sub(r"\$([A-Z_][A-Z0-9_]*)", lambda m: env.get(m[1], m[0]), word)
                command += shlex.split(expanded) if re.fullmatch(r"\$[A-Z_][A-Z0-9_]*", word) else [expanded]
                continue
            assignment = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", command[0]) if command else None
            if assignment and len(command) == 1:
                env[assignment[1]] = assignment[2]
            elif command:
                yield command
            command = []


def _synopsis_words(text):
    """The words of a command written as a synopsis: the brackets of optional parts dropped
    (`python -m kernels.offline [--arch 90]` is checked as `python -m kernels.offline --arch 90`), comments too."""
    return shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", " ".join(text.split())), comments=True)


def _inline_commands(text):
    """`python ...` in inline code (which may span lines)."""
    for m in re.finditer(r"`((?:[A-Z_][A-Z0-9_]*=\S* )*python3? [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        yield _synopsis_words(m[1])


def _docstring_commands():
    """The usage lines of the scripts' and modules' docstrings (those without a `...` placeholder), up to a
    `#` comment or a description set off by two or more spaces."""
    files = [ROOT / s for s in SCRIPTS] + [ROOT / (m.replace(".", "/") + ".py") for m in MODULES]
    files += [ROOT / "minimamba" / "finetune.py", ROOT / "minimamba" / "training.py"]  # (sft.py's and train.py's)
    for path in files:
        doc = re.match(r'r?"""(.*?)"""', path.read_text(encoding="utf-8"), re.S)[1]
        for line in _join_continued_lines(doc):
            line = re.split(r" {2,}(?=[A-Za-z(])", line.strip())[0]
            if re.match(r"(python3?|torchrun) ", line) and "..." not in line.split("#")[0]:
                yield path.name, _synopsis_words(line)


def _without_settings(words):
    """A command's words from its program on: leading VAR=value settings (`PYTHONPATH=... python3 ...`) dropped."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    return words


def _entry_point(words):
    """(script or module, its arguments) of a command that runs one of this project's entry points, else None.
    Leading VAR=value settings and torchrun (with its own options) are stepped over."""
    words = _without_settings(words)
    if words[:1] == ["torchrun"]:
        words = ["python", *words[next(i for i, w in enumerate(words) if w.endswith(".py")):]]
    if words[:1] not in (["python"], ["python3"]) or len(words) < 2:
        return None
    if words[1] in SCRIPTS:
        return words[1], words[2:]
    if words[1] == "-m" and words[2] in MODULES:
        return words[2], words[3:]
    return None


README_COMMANDS = [("README.md", w) for b in re.findall(r"```bash\n(.*?)```", README, re.S) for w in _bash_commands(b)]
README_COMMANDS += [("README.md", w) for w in _inline_commands(README)]
ALL_COMMANDS = README_COMMANDS + list(_docstring_commands())


# ----------------------------------------------------------------------------------------------------------
# running an entry point's option parsing only


def _run_main(entry):
    """Run a script of the project's root, or a module of it, as `python X.py` or `python -m X` would."""
    if entry.endswith(".py"):
        runpy.run_path(str(ROOT / entry), run_name="__main__")
        return
    with warnings.catch_warnings():  # (runpy warns that the module was imported before: the tests import it)
        warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
        runpy.run_module(entry, run_name="__main__")


class _Parsed(Exception):
    """Raised in place of returning from `parse_args`: the options parsed, and nothing else runs."""


def _parse_only(entry, args, monkeypatch):
    """Run `entry` (a script or `-m` module of this project) with `args` up to its `parse_args` call, and return the
    parsed namespace (None for -h); a parse error fails the test with argparse's message."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        self.allow_abbrev = False  # (a shortened option name would pass, and break once another shares it)
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [entry, *args])
    environ = dict(os.environ)  # (minimamba.miniature sets OMP_WAIT_POLICY on import)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            _run_main(entry)
    except _Parsed as parsed:
        return parsed.args[0]
    except SystemExit as e:
        if e.code == 0 and {"-h", "--help"} & set(args):
            assert "usage:" in out.getvalue()
            return None
        pytest.fail(f"{entry} {shlex.join(args)}: exit {e.code}: {err.getvalue().strip()}")
    finally:
        os.environ.clear()
        os.environ.update(environ)
    pytest.fail(f"{entry} {shlex.join(args)} returned without parsing its options")


def test_the_commands_are_found():
    """The extraction itself: every entry point is reached, the block variables are expanded, and
    nothing is found that is not a command."""
    entries = [_entry_point(w) for _, w in ALL_COMMANDS]
    assert {e[0] for e in entries if e} == {*SCRIPTS, *MODULES}
    assert len([e for e in entries if e]) >= 40
    sample_prepares = [args for entry, args in filter(None, entries) if entry == "minimamba.data"
                       and "../shared/data/tokenizer/tokenizer.json" in args]
    assert len(sample_prepares) == 5 and all(a[:3] == ["prepare", "--out", "data/tokens"] for a in sample_prepares)
    assert ["{title}\\n\\n{abstract}"] == [a[a.index("--template") + 1] for a in sample_prepares if "--template" in a]
    others = {_without_settings(w)[0] for _, w in ALL_COMMANDS if not _entry_point(w)}
    assert others <= {"pip", "python", "python3", "mkdir", "echo", "bash", "torchrun"}, others


def _runs_pytest(words):
    return _without_settings(words)[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"])


def _test_files(words):
    """The test files a pytest command names (tests/..., a ::test suffix dropped)."""
    return [w.split("::")[0] for w in words if w.startswith("tests/")]


CHECKED = [(where, words) for where, words in ALL_COMMANDS  # (a pytest command naming no file: nothing to check)
           if _entry_point(words) or _runs_pytest(words) and _test_files(words)]


@pytest.mark.parametrize("where, words", CHECKED, ids=[f"{w}:{' '.join(c)[:60]}" for w, c in CHECKED])
def test_every_command_shown_parses(where, words, monkeypatch):
    if _runs_pytest(words):  # the test files it names exist
        assert all(list(ROOT.glob(f)) for f in _test_files(words)), words  # (a glob: some file it matches)
    else:
        _parse_only(*_entry_point(words), monkeypatch)


def test_a_wrong_option_fails_the_check(monkeypatch):
    """The check can fail: an option train.py does not have, and a value its option refuses."""
    for args in (["--scale", "370m", "--no-such-option"], ["--scale", "37m"]):
        with pytest.raises(pytest.fail.Exception, match=r"(?s)train\.py .*exit 2: usage:.*error:"):
            _parse_only("train.py", args, monkeypatch)
    assert _parse_only("train.py", ["--scale", "370m"], monkeypatch).scale == "370m"


# ----------------------------------------------------------------------------------------------------------
# the offline quickstart, as written


def _block_with(text):
    [block] = [b for b in re.findall(r"```bash\n(.*?)```", README, re.S) if text in b]
    return list(_bash_commands(block))


def _run(entry, args):
    """Run an entry point as the command line would (in this process: torch is imported once) -> its stdout."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = [entry, *args]
    try:
        with contextlib.redirect_stdout(out):
            _run_main(entry)
    except SystemExit as e:
        assert e.code in (0, None), f"{entry} {shlex.join(args)}: exit {e.code}\n{out.getvalue()[-2000:]}"
    finally:
        sys.argv = argv
    return out.getvalue()


def _number(text):
    """'1,292' -> 1292, '1.68M' -> (1.68e6, 0.005e6): a count, or a rounded amount and half its last digit."""
    if text[-1] in "KM":
        scale = {"K": 1e3, "M": 1e6}[text[-1]]
        digits = text[:-1]
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        return float(digits) * scale, 0.5 * 10 ** -decimals * scale
    return int(text.replace(",", ""))


@needs_samples
def test_the_offline_quickstart_runs_as_written(tmp_path, monkeypatch):
    """The README's sample `prepare` block, then its train.py CPU quickstart and eval.py of the checkpoint it
    saves, word for word, from a clone beside `shared/data` (here a link to the shared data): the counts,
    perplexities and bits per byte it quotes."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA.resolve(), target_is_directory=True)
    (tmp_path / "clone").mkdir()
    monkeypatch.chdir(tmp_path / "clone")
    from minimamba.data import read_meta

    for words in _block_with("S=../shared/data"):
        _run(*_entry_point(words))
    said = re.search(r"On the samples this gives \(train / held-out documents, then tokens\) (.*?)\.\s*\n\n", README,
                     re.S)[1]
    quoted = re.findall(r"(PubMed|C4|Wikipedia)\s+([\d,]+) / ([\d,]+) \(([\d.]+[KM]) / ([\d.]+[KM]) tokens", said)
    assert [q[0] for q in quoted] == ["PubMed", "C4", "Wikipedia"], said
    for name, *numbers in quoted:
        splits = read_meta("data/tokens", name.lower())["splits"]
        docs = [splits[s]["documents"] for s in ("train", "heldout")]
        tokens = [splits[s]["tokens"] for s in ("train", "heldout")]
        assert docs == [_number(n) for n in numbers[:2]], (name, docs, numbers)
        for got, (amount, half_digit) in zip(tokens, map(_number, numbers[2:])):
            assert abs(got - amount) <= half_digit, (name, tokens, numbers)

    [train, evaluate] = [w for w in _block_with("python train.py --scale tiny") if _entry_point(w)]
    printed = _run(*_entry_point(train))
    measured = {(int(step), domain): float(ppl) for step, rest in re.findall(r"step (\d+): held-out perplexity (.*)", printed)
                for domain, ppl in re.findall(r"(\w+) ([\d.]+)", rest.split("|")[0])}
    said = re.search(r"Held-out perplexity, measured \([\d-]+\): (.*?)\): it learns", README, re.S)[1]
    pubmed = re.search(r"pubmed ([\d,]+) → ([\d,]+) → ([\d,]+) at steps (\d+), (\d+), (\d+)", said).groups()
    quoted = {(int(step), "pubmed"): _number(ppl) for ppl, step in zip(pubmed[:3], pubmed[3:])}
    for domain in ("c4", "wikipedia"):
        first, last = re.search(rf"{domain} ([\d,]+) → ([\d,]+)", said).groups()
        quoted |= {(0, domain): _number(first), (50, domain): _number(last)}
    assert len(quoted) == 7
    for key, ppl in quoted.items():
        # (float32 sums in another CPU's kernels may round otherwise, and 50 steps of training carry that on)
        assert measured[key] == pytest.approx(ppl, rel=1e-2, abs=0.5), (key, measured[key], ppl)
    bits = {(int(step), domain): float(bpb) for step, rest in re.findall(r"step (\d+): held-out perplexity (.*)", printed)
            for domain, bpb in re.findall(r"(\w+) [\d.]+ \(([\d.]+) bits/byte\)", rest)}
    said = re.search(r"In bits per byte \([\d-]+\): (.*?)\.\s", README, re.S)[1]
    quoted = {(int(step), "pubmed"): float(bpb) for bpb, step in zip(re.search(
        r"pubmed ([\d.]+) → ([\d.]+) → ([\d.]+)", said).groups(), pubmed[3:])}
    for domain in ("c4", "wikipedia"):
        first, last = re.search(rf"{domain} ([\d.]+) → ([\d.]+)", said).groups()
        quoted |= {(0, domain): float(first), (50, domain): float(last)}
    assert len(quoted) == 7
    for key, bpb in quoted.items():
        assert bits[key] == pytest.approx(bpb, rel=2e-3), (key, bits[key], bpb)
    # eval.py on the step-50 checkpoint: the same numbers as train.py's step-50 evaluation
    table = _run(*_entry_point(evaluate))
    scored = {(domain, what): float(v) for domain, what, v in re.findall(r"\| ppl_(\w+) \| (ppl|bpb) \| ([\d.]+) \|", table)}
    assert len(scored) == 6, table
    for domain in ("pubmed", "c4", "wikipedia"):
        assert scored[domain, "ppl"] == pytest.approx(measured[50, domain], rel=1e-5), (domain, table)
        assert scored[domain, "bpb"] == pytest.approx(bits[50, domain], rel=1e-3), (domain, table)


# ----------------------------------------------------------------------------------------------------------
# links inside the README and to the project's files


def _slug(heading):
    """The anchor GitHub gives a heading: lower case, characters other than letters, digits, spaces, '-' and '_'
    dropped (backticks, parentheses, '≥', '×', '.'), each space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_lead_somewhere():
    """Every `[...](#anchor)` names a heading of the README (a renamed heading broke the contents line before a
    reader would notice), and every relative link names a file or folder of the project."""
    text = re.sub(r"```.*?```", "", README, flags=re.S)  # (no headings or links inside code blocks)
    anchors = {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}
    assert "the-triton-kernel-kernels" in anchors and "cpu-quickstart" in anchors  # (the slugs as GitHub makes them)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) > 10
    for link in links:
        if link.startswith("#"):
            assert link[1:] in anchors, f"README links to {link}, which no heading is"
        elif not re.match(r"[a-z]+:", link):  # (http:, https:, mailto:)
            assert (ROOT / link.split("#")[0]).exists(), f"README links to {link}, which is not in the project"

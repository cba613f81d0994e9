"""minimamba.tokenizer against the reference: HF `tokenizers` reading the same tokenizer.json.

The real GPT-NeoX tokenizer.json and the corpora come from ../shared/data (or $MINIMAMBA_DATA);
the tests that need them skip, with the reason, when it is absent. The error-path and Hub tests
use a tiny byte-level tokenizer.json written here.
"""

import bz2
import csv
import functools
import json
import re
import threading
import unicodedata
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minimamba.tokenizer as tokenizer_module
from minimamba.tokenizer import (_AFTER_UNICODE_9, DEFAULT_TOKENIZER, Tokenizer, _byte_to_char, _nfc, checkpoint_tokenizer,
                                 load_tokenizer)
from tests.conftest import DATA

TOKENIZER_JSON = DATA / "tokenizer" / "tokenizer.json"
CORPORA = ("pubmed", "c4", "wiki", "pubmedqa", "mc")  # never holdout/

needs_data = pytest.mark.skipif(not TOKENIZER_JSON.is_file(), reason=f"no shared data at {DATA} (set MINIMAMBA_DATA)")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not TOKENIZER_JSON.is_file():
        pytest.skip(f"no shared data at {DATA} (set MINIMAMBA_DATA)")
    return load_tokenizer(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def ref():
    """The oracle; encode_special_tokens is switched per test and always switched back."""
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers (the test oracle) is not installed")
    if not TOKENIZER_JSON.is_file():
        pytest.skip(f"no shared data at {DATA} (set MINIMAMBA_DATA)")
    return tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))


def reference_ids(ref, texts, allow_special=True):
    ref.encode_special_tokens = not allow_special
    try:
        return [e.ids for e in ref.encode_batch(texts)]
    finally:
        ref.encode_special_tokens = False


def assert_same_ids(tok, ref, texts, allow_special=True, where=None):
    ours = tok.encode_batch(texts, allow_special=allow_special)
    theirs = reference_ids(ref, texts, allow_special)
    # (zip alone stops at the shorter list: an encode_batch that lost texts compared only those it kept)
    assert len(ours) == len(theirs) == len(texts), f"{len(ours)} id lists for {len(texts)} texts"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            k = next(k for k in range(min(len(a), len(b)) + 1) if k == min(len(a), len(b)) or a[k] != b[k])
            label = where[i] if where else f"text #{i}"
            pytest.fail(f"{label}: ids differ at token {k}: ours {a[k:k + 8]}, reference {b[k:k + 8]}; "
                        f"text {texts[i][:300]!r}")


# ---------------------------------------------------------------------------------------------
# the real GPT-NeoX tokenizer


@needs_data
def test_known_ids_and_attributes(tok):
    assert tok.encode("Hello world") == [12092, 1533]  # the sanity check in shared/data/SOURCES.md
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (50277, 0, 1)
    assert tok.encoding.n_vocab == 50277
    assert tok.encode("") == [] and tok.encode_batch([]) == []
    assert tok.encode("a   b") == [66, 50275, 67]  # 3 spaces: one added token, not split around the words
    assert tok.encode(" " * 30) == [50254, 50272]  # 24 + 6, longest first
    assert tok.encode("x<|endoftext|>y") == [89, 0, 90]
    assert 0 not in tok.encode("x<|endoftext|>y", allow_special=False)
    assert tok.decode(tok.encode("<|padding|>")) == "<|padding|>"


def corpus_documents(root: Path) -> tuple[list[str], list[str]]:
    """Every string of the corpora (JSON values, CSV cells, 50-line blocks of text files), once each,
    with where it was first seen."""
    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, (list, dict)):
            for v in x.values() if isinstance(x, dict) else x:
                yield from strings(v)

    def blocks(text):
        lines = text.splitlines(keepends=True)
        return ["".join(lines[i:i + 50]) for i in range(0, len(lines), 50)]

    found = {}
    for folder in CORPORA:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix == ".jsonl":
                lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 is no line end
                docs = [s for line in lines if line.strip() for s in strings(json.loads(line))]
            elif path.suffix == ".json":
                docs = list(strings(json.loads(path.read_text(encoding="utf-8"))))
            elif path.suffix == ".csv":
                with path.open(encoding="utf-8", newline="") as f:
                    docs = [cell for row in csv.reader(f) for cell in row]
            elif path.suffix == ".bz2":
                with bz2.open(path, "rt", encoding="utf-8") as f:
                    docs = blocks(f.read())
            elif path.is_file() and path.suffix != ".parquet":  # .txt, .raw, READMEs (the parquet is a jsonl's twin)
                docs = blocks(path.read_text(encoding="utf-8"))
            else:
                continue
            for i, doc in enumerate(docs):
                found.setdefault(doc, f"{path.relative_to(root)} document {i}")
    return list(found), list(found.values())


@needs_data
@pytest.mark.slow
def test_every_corpus_document_matches_the_reference(tok, ref):
    docs, where = corpus_documents(DATA)
    assert len(docs) > 100_000 and sum(map(len, docs)) > 30_000_000  # all the corpora were read
    assert_same_ids(tok, ref, docs, where=where)


# hypothesis: random text, biased towards the places where tokenizers disagree
FRAGMENTS = [
    "<|endoftext|>", "<|padding|>", "<|endoftext", "|>", "<|", "<|endoftext|>\u0338", "'s", "'S", "'ll", "'re",
    "don't", " ", "  ", "\t", "\n", "\r\n", "\n\n", " \n", "\u3000", "\xa0", "\u2028", "\x0b", "\x85", "\x00", "\x1b",
    "e\u0301", "\u0301", "\u0338", "\u0316", "Å", "\u212b", "ﬁ", "\u1100\u1161\u11a8", "가", "😀", "👨‍👩‍👧",
    "🇫🇷", "中文", "日本語", "العربية", "עברית", "हिन्दी", "ไทย", "Ελληνικά", "кириллица", "\u200d", "\ufeff",
    "\ufffd", "12,345.67", "½", "²", "٣", "p53", "IL-6", "α-synuclein", "β", "µg", "°C", "—", "…",
    "\U00011935\U00011930", "\U00016ff0", "\u1dfa", "\U0001e5ee",  # characters newer than Unicode 9.0
]
text_piece = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.integers(1, 60).map(lambda n: " " * n),  # long runs of spaces
    st.text(alphabet=" \t\n\r\x0b\x0c\x85\u2028\u3000\xa0", max_size=12),  # whitespace mixtures
    st.text(alphabet=st.characters(categories=["Mn", "Mc", "Me"]), min_size=1, max_size=4),  # combining marks
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "Co", "Cn"]), min_size=1, max_size=3),
    st.text(alphabet=st.characters(codec="ascii"), max_size=12),
    st.text(max_size=6),  # any code point but surrogates
)
unicode_text = st.one_of(st.lists(text_piece, max_size=25).map("".join), st.text(max_size=80))
example_settings = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@needs_data
@example_settings
@given(texts=st.lists(unicode_text, min_size=1, max_size=8))
def test_random_unicode_matches_the_reference(tok, ref, texts):
    assert_same_ids(tok, ref, texts)
    assert_same_ids(tok, ref, texts, allow_special=False)  # = the reference with encode_special_tokens


@needs_data
@example_settings
@given(text=unicode_text)
def test_decode_inverts_encode_up_to_nfc(tok, ref, text):
    # the normalisation is the reference's own (Unicode 9.0 NFC) ...
    assert tok.decode(tok.encode(text, allow_special=False)) == ref.normalizer.normalize_str(text)
    # ... which is Python's NFC on every character Unicode 9.0 already had
    if not _AFTER_UNICODE_9.search(text):
        assert tok.decode(tok.encode(text, allow_special=False)) == unicodedata.normalize("NFC", text)
    # special tokens are cut out before normalising, so a mark after one stays separate (as in the reference)
    parts = tok._special_split.split(text)
    assert tok.decode(tok.encode(text)) == "".join(p if i % 2 else _nfc(p) for i, p in enumerate(parts))


@needs_data
def test_nfc_agrees_with_the_reference_on_every_normalisation_relevant_character(tok, ref):
    # every character that Python's NFC can change or be changed by, and the newer ones that the
    # reference's Unicode 9.0 tables do not know, in positions that expose composition and reordering
    chars = [chr(c) for c in range(0x110000) if _AFTER_UNICODE_9.match(chr(c)) or unicodedata.combining(chr(c))
             or unicodedata.decomposition(chr(c))]
    assert len(chars) > 5000
    probes = [f"a{c}b {c}\u0301{c}\u0316 a{c}\u0301 e\u0301{c}\u0316 {c}{c}" for c in chars]
    assert [_nfc(p) for p in probes] == [ref.normalizer.normalize_str(p) for p in probes]
    assert_same_ids(tok, ref, probes)


@needs_data
@pytest.mark.slow
def test_pre_tokenizer_classes_agree_with_the_reference_on_every_code_point(tok, ref):
    # letters, digits and whitespace as each regex engine's Unicode tables see them: all of the
    # basic and supplementary planes, a sample of the others, each in a few contexts
    code_points = [*range(0x20000), *range(0x20000, 0x110000, 61)]
    chars = [chr(c) for c in code_points if not 0xD800 <= c < 0xE000]
    probes = ["".join(f"a{c}1{c} {c}.{c}\n" for c in chars[i:i + 256]) for i in range(0, len(chars), 256)]
    assert_same_ids(tok, ref, probes)


@needs_data
def test_every_vocab_token_encodes_to_itself_under_the_learnt_merges(ref):
    # Why tiktoken's merge-by-rank equals the reference's merge-by-pair (tokenizer.py, point 1): had
    # pieces a, b with a + b a token but not a learnt merge ever been adjacent in some word, the
    # reference's merges alone would stop at [a, b] on the text a + b, and this test would fail.
    vocab = json.loads(TOKENIZER_JSON.read_text(encoding="utf-8"))["model"]["vocab"]
    wrong = [s for s, i in vocab.items() if not s.startswith("<|") and [t.id for t in ref.model.tokenize(s)] != [i]]
    assert wrong == []


whitespace_text = st.lists(  # runs of whitespace of every kind, with words, digits, symbols between them
    st.tuples(st.sampled_from([" ", "\t", "\n", "\r\n", "\xa0", "\u3000", "\x0b", "\x1c", "x", "7", ".", "'s",
                               "\u0301", "<|endoftext|>"]), st.sampled_from([1, 1, 2, 3, 23, 24, 25, 26, 49, 50])),
    min_size=1, max_size=12).map(lambda runs: "".join(s * n for s, n in runs))


@needs_data
@example_settings
@given(texts=st.lists(whitespace_text, min_size=1, max_size=8))
def test_long_whitespace_runs_are_cut_as_the_regex_cuts_them(tok, ref, texts):
    """Runs too long for tiktoken's regex are cut into its pieces in Python (`Tokenizer._encode_ordinary`):
    with the threshold at 3 characters instead of 100 000, that path takes every run here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer_module, "_LONG_WHITESPACE_RUN", 3)
        mp.setattr(tokenizer_module, "_LONG_WHITESPACE", re.compile(f"[{tokenizer_module._WHITESPACE}]{{3,}}"))
        assert_same_ids(tok, ref, texts)


@needs_data
def test_a_million_whitespace_characters_encode_as_the_reference(tok, ref):
    # tiktoken's regex alone panics on ~1M whitespace characters other than spaces (a Rust panic, which no
    # `except Exception` catches: one such document stopped `data prepare`)
    texts = ["\t" * 1_100_000 + "x", "a" + " \n" * 600_000 + " b", "\r\n" * 600_000]
    assert_same_ids(tok, ref, texts)


@needs_data
def test_encode_batch_equals_encode_with_any_thread_count(tok):
    texts = ["Hello world", "", "<|endoftext|>", "a" * 1000, "x  y\n\n z", "é\u0301"] * 7
    expected = [tok.encode(t) for t in texts]
    for threads in (1, 2, 3):
        assert tok.encode_batch(texts, num_threads=threads) == expected
    assert tok.encode_batch(iter(texts)) == expected  # any iterable
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_threads must be a positive number"):
            tok.encode_batch(texts, num_threads=bad)


@needs_data
def test_decode_takes_arrays_and_tensors(tok):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    ids = tok.encode("Hello world")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == tok.decode(torch.tensor(ids)) == "Hello world"
    assert tok.decode([12092, 50277, 50287, 1533]) == "Hello world"  # the model's padding rows are skipped
    first, *rest = tok.encode("😀")  # 4 bytes in 3 tokens
    assert tok.decode([first]) == "\ufffd" and tok.decode([first, *rest]) == "😀"  # a partial character is U+FFFD


# ---------------------------------------------------------------------------------------------
# a tiny byte-level tokenizer.json: the loader's checks, errors and the Hub path


def tiny_tokenizer_json(**changes) -> dict:
    vocab = {"<|endoftext|>": 0, "<|padding|>": 1}
    for ch in _byte_to_char().values():  # the 256 bytes, written as GPT-2 stand-ins ("Ġ" is the space)
        vocab[ch] = len(vocab)
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    n = len(vocab)
    added = [{"id": 0, "content": "<|endoftext|>", "special": True, "normalized": False},
             {"id": 1, "content": "<|padding|>", "special": True, "normalized": False},
             {"id": n, "content": "   ", "special": False, "normalized": True},
             {"id": n + 1, "content": "  ", "special": False, "normalized": True}]
    for a in added:
        a.update(single_word=False, lstrip=False, rstrip=False)
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "vocab": vocab, "merges": merges},
    }
    spec.update(changes)
    return spec



def tiny_tokenizer_json_with_other_text() -> dict:
    """`tiny_tokenizer_json` with its merge "Ġ a" made "Ġ o": the same vocabulary size and EOS, and one id
    (" a" there) that stands for other text (" o")."""
    spec = tiny_tokenizer_json()
    spec["model"]["merges"][3] = "Ġ o"
    spec["model"]["vocab"] = {("Ġo" if k == "Ġa" else k): v for k, v in spec["model"]["vocab"].items()}
    return spec

def write_json(path: Path, spec) -> Path:
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def test_tiny_tokenizer_loads_from_a_file_or_its_folder(tmp_path):
    spec = tiny_tokenizer_json()
    write_json(tmp_path / "tokenizer.json", spec)
    vocab = spec["model"]["vocab"]
    for where in (tmp_path / "tokenizer.json", tmp_path, str(tmp_path)):
        tok = load_tokenizer(where)
        # "h e" merges; "t" + "he" has no merge (only "Ġt he", after a space) and " the" takes "Ġt he"
        assert tok.encode("the") == [vocab["t"], vocab["he"]]
        assert tok.encode(" the") == [vocab["Ġthe"]]
        assert tok.decode(tok.encode("he the  a   t<|endoftext|>")) == "he the  a   t<|endoftext|>"
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (2 + 256 + 4 + 2, 0, 1)


def test_decode_takes_one_id_or_one_sequence(tmp_path):
    import numpy as np
    import torch

    write_json(tmp_path / "tokenizer.json", tiny_tokenizer_json())
    tok = load_tokenizer(tmp_path)
    ids = tok.encode(" the he")
    assert tok.decode(torch.tensor(ids[0])) == tok.decode(np.int64(ids[0])) == tok.decode(ids[0]) == " the"
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == " the he"
    with pytest.raises(TypeError, match="decode each row"):
        tok.decode(torch.tensor([ids, ids]))


def test_encode_of_something_other_than_a_str_says_what_to_pass(tmp_path):
    """bytes gave "cannot use a string pattern on a bytes-like object" from deep inside, None an AttributeError."""
    tok = load_tokenizer(write_json(tmp_path / "tokenizer.json", tiny_tokenizer_json()))
    for text, says in [(b" the", r"got bytes: decode the bytes first \(data.decode\('utf-8'\)\)"),
                       (None, "got NoneType: pass a str"),
                       ([" the"], "got list: for a list of texts use encode_batch")]:
        with pytest.raises(TypeError, match=f"^encode takes one text \\(a str\\), {says}"):
            tok.encode(text)
    with pytest.raises(TypeError, match="got bytes: decode the bytes first"):
        tok.encode_batch([" the", b" he"], num_threads=2)
    assert tok.encode_batch([" the", " he"], num_threads=2) == [tok.encode(" the"), tok.encode(" he")]


def test_tiny_tokenizer_matches_the_reference(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers (the test oracle) is not installed")
    path = write_json(tmp_path / "tokenizer.json", tiny_tokenizer_json())
    tok, ref = load_tokenizer(path), tokenizers.Tokenizer.from_file(str(path))
    texts = ["the he  the   a", " the", "<|endoftext|>the", "t h e", " " * 8 + "a", "\n  \n"]
    assert tok.encode_batch(texts) == [e.ids for e in ref.encode_batch(texts)]


def test_a_special_token_inside_another_is_matched_longest_first_as_the_reference(tmp_path):
    """Special tokens "<|end|>" and "<|end|>x": where the longer one is there it wins (leftmost-longest, as
    HF tokenizers matches added tokens), which the GPT-NeoX file, whose two special tokens overlap nowhere,
    cannot show."""
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers (the test oracle) is not installed")
    spec = tiny_tokenizer_json()
    vocab = spec["model"]["vocab"]
    first = len(vocab) + 2  # (after the two space-run tokens)
    for i, content in enumerate(["<|end|>", "<|end|>x"]):
        spec["added_tokens"].append({"id": first + i, "content": content, "special": True, "normalized": False,
                                     "single_word": False, "lstrip": False, "rstrip": False})
        vocab[content] = first + i
    path = write_json(tmp_path / "tokenizer.json", spec)
    tok, ref = load_tokenizer(path), tokenizers.Tokenizer.from_file(str(path))
    texts = ["a<|end|>xb", "<|end|><|end|>x", "<|end|>", "the<|end|>x<|endoftext|>"]
    assert tok.encode_batch(texts) == [e.ids for e in ref.encode_batch(texts)]
    assert tok.encode("<|end|><|end|>x") == [first, first + 1]  # (by hand)


def test_unpaired_surrogates_and_a_text_for_a_batch_are_refused_as_the_reference_refuses_them(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers (the test oracle) is not installed")
    path = write_json(tmp_path / "tokenizer.json", tiny_tokenizer_json())
    tok, ref = load_tokenizer(path), tokenizers.Tokenizer.from_file(str(path))
    for text, where in [("a\ud800b", 1), ("é\udfff", 1), ("<|endoftext|>\ud83d", 13)]:  # (tiktoken: U+FFFD)
        with pytest.raises(TypeError):
            ref.encode(text)
        half = re.escape(ascii(text[where]))
        with pytest.raises(ValueError, match=f"unpaired surrogate \\({half}\\) at position {where}: half of a"):
            tok.encode(text)
        with pytest.raises(ValueError, match="unpaired surrogate"):
            tok.encode_batch(["fine", text], num_threads=2)
    assert tok.encode("é\U0001F600") == ref.encode("é\U0001F600").ids  # a whole pair is a character
    with pytest.raises(TypeError):
        ref.encode_batch("the")
    with pytest.raises(TypeError, match="takes a list of texts, got one text; use encode"):
        tok.encode_batch("the")


@pytest.mark.parametrize("problem, content, message", [
    ("missing file", None, "no tokenizer file at"),
    ("not JSON", "{not json", "is not valid JSON"),
    ("no model", json.dumps({"version": "1.0"}), "no byte-level BPE model"),
    ("a list", json.dumps([1, 2]), "no byte-level BPE model"),
    ("WordPiece", json.dumps(tiny_tokenizer_json(model={"type": "WordPiece", "vocab": {}})), "no byte-level BPE model"),
    ("prefix space", json.dumps(tiny_tokenizer_json(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True})),
     "is not supported"),
    ("lowercase", json.dumps(tiny_tokenizer_json(normalizer={"type": "Lowercase"})), "is not supported"),
    ("adds BOS", json.dumps(tiny_tokenizer_json(post_processor={"type": "TemplateProcessing"})), "is not supported"),
    ("truncates", json.dumps(tiny_tokenizer_json(truncation={"max_length": 8})), "is not supported"),
    *[(f"added token {flag}", json.dumps(tiny_tokenizer_json(added_tokens=[
        {**a, flag: a["content"] == "<|padding|>"} for a in tiny_tokenizer_json()["added_tokens"]])),
       "added token '<|padding|>' with lstrip/rstrip/single_word is not supported")
      for flag in ("lstrip", "rstrip", "single_word")],
    ("a gap in the space runs", json.dumps(tiny_tokenizer_json(added_tokens=[
        a for a in tiny_tokenizer_json()["added_tokens"] if a["content"] != "  "])),
     r"space-run added tokens of lengths \[3\] \(expected 2..n\) is not supported"),
])
def test_bad_tokenizer_files_give_clear_errors(tmp_path, problem, content, message):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises((FileNotFoundError, ValueError), match=message) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value) and "tokenizer.json" in str(err.value)


def test_a_folder_without_tokenizer_json_names_the_file_it_looked_for(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no tokenizer file at .*tokenizer.json"):
        load_tokenizer(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative paths that are not Hub names stay paths (no download)
    for relative in ("missing/tokenizer.json", "./missing", "missing"):
        with pytest.raises(FileNotFoundError, match="no tokenizer file at missing"):
            load_tokenizer(relative)


def test_merges_out_of_id_order_are_refused(tmp_path):
    spec = tiny_tokenizer_json()
    spec["model"]["merges"] = ["h e", "Ġ t", "Ġt he", "Ġ a"]  # ids of "Ġt" and "he" say the other order
    with pytest.raises(ValueError, match="merge #1 'Ġ' \\+ 't' does not create the next token in id order"):
        load_tokenizer(write_json(tmp_path / "tokenizer.json", spec))


def test_malformed_merge_is_refused(tmp_path):
    spec = tiny_tokenizer_json()
    spec["model"]["merges"].append("a b c")
    with pytest.raises(ValueError, match="merge #4 'a b c' is not two tokens"):
        load_tokenizer(write_json(tmp_path / "tokenizer.json", spec))


def test_non_byte_level_vocab_is_refused(tmp_path):
    spec = tiny_tokenizer_json()
    spec["model"]["vocab"]["中"] = len(spec["model"]["vocab"]) + 2  # not a GPT-2 byte stand-in (an id of its own:
    # the next two are the added space runs)
    with pytest.raises(ValueError, match="vocab entry '中' is not byte-level"):
        load_tokenizer(write_json(tmp_path / "tokenizer.json", spec))


def test_missing_byte_tokens_are_refused(tmp_path):
    spec = tiny_tokenizer_json()
    del spec["model"]["vocab"]["é"]  # the byte 0xE9, which starts many 3-byte characters
    with pytest.raises(ValueError, match="no token for the bytes \\[233\\]"):
        load_tokenizer(write_json(tmp_path / "tokenizer.json", spec))


def test_hub_name_downloads_once_into_the_cache(tmp_path, monkeypatch):
    served = tmp_path / "hub"
    repo_file = served / "EleutherAI" / "gpt-neox-20b" / "resolve" / "main" / "tokenizer.json"
    repo_file.parent.mkdir(parents=True)
    write_json(repo_file, tiny_tokenizer_json())
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("MINIMAMBA_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.chdir(tmp_path)  # no local folder called EleutherAI/ shadows the name
        first = load_tokenizer("EleutherAI/gpt-neox-20b")
        second = load_tokenizer()  # the default name, now from the cache
    finally:
        server.shutdown()
    assert first.encode("the he") == second.encode("the he")
    assert len(requests) == 1 and "/EleutherAI/gpt-neox-20b/resolve/main/tokenizer.json" in requests[0]
    assert list((tmp_path / "cache").rglob("tokenizer.json"))


def test_bench_tokenizer_command_runs_on_a_small_corpus(tmp_path, capsys):
    from minimamba import bench

    for folder in ("pubmed", "c4", "wiki", "tokenizer"):
        (tmp_path / folder).mkdir()
    write_json(tmp_path / "tokenizer" / "tokenizer.json", tiny_tokenizer_json())
    abstract = {"title": "The heart.", "abstract": "the  he   a\nthe"}
    (tmp_path / "pubmed" / "pubtator_corpora_abstracts.jsonl").write_text(json.dumps(abstract) + "\n")
    for name in ("c4_train_sample_1000", "c4_validation_2k", "llamafactory_c4_demo"):
        (tmp_path / "c4" / f"{name}.jsonl").write_text(json.dumps({"text": f"the {name}"}) + "\n")
    for name in ("wikitext-2-raw_wiki.test.raw", "wikitext-2_tokenized_valid.txt", "llamafactory_wiki_demo.txt"):
        (tmp_path / "wiki" / name).write_text(" = the = \n \n the he \n")
    bench.main(["tokenizer", "--data-root", str(tmp_path), "--repeat", "1"])
    out = capsys.readouterr().out
    assert "minimamba encode_batch" in out and "every row gave the same ids: yes" in out


def test_a_checkpoints_own_tokenizer_json_goes_with_it_else_the_recipes(tmp_path):
    """What eval.py's --model and sft.py's --init read without --tokenizer."""
    assert checkpoint_tokenizer(tmp_path) == DEFAULT_TOKENIZER  # (a folder without one: a public checkpoint)
    assert checkpoint_tokenizer("state-spaces/mamba2-370m") == DEFAULT_TOKENIZER  # (a Hub id)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert checkpoint_tokenizer(tmp_path) == str(tmp_path / "tokenizer.json")


# ---------------------------------------------------------------------------------------------
# the bytes each id stands for (bits per byte, and whether two tokenizers read ids alike)


def test_byte_lengths_of_the_tiny_tokenizer_by_hand(tmp_path):
    """Special tokens spell no text (0), a byte token 1 byte, a merge the bytes of its parts ("Ġthe" = " the",
    4), a space run its spaces; `token_bytes` gives the bytes themselves, the special tokens' strings included."""
    tok = load_tokenizer(write_json(tmp_path / "tokenizer.json", tiny_tokenizer_json()))
    lengths, spelled = tok.byte_lengths(), tok.token_bytes()
    assert len(lengths) == len(spelled) == tok.vocab_size == 2 + 256 + 4 + 2
    assert lengths[:2] == [0, 0] and spelled[:2] == [b"<|endoftext|>", b"<|padding|>"]
    assert lengths[2:258] == [1] * 256 and sorted(spelled[2:258]) == [bytes([i]) for i in range(256)]
    assert spelled[258:] == [b" t", b"he", b" the", b" a", b"   ", b"  "] and lengths[258:] == [2, 2, 4, 2, 3, 2]
    # made once and kept: a caller that changes the list it got does not change the tokenizer's
    spelled[258] = b"changed"
    assert tok.token_bytes()[258] == b" t" and tok.byte_lengths() == lengths
    calls = []
    decode = tok.encoding.decode_single_token_bytes
    tok.encoding = type("Counting", (), {"decode_single_token_bytes": lambda self, i: calls.append(i) or decode(i)})()
    assert tok.token_bytes()[258:] == [b" t", b"he", b" the", b" a", b"   ", b"  "] and calls == []  # (not made again)


@needs_data
def test_byte_lengths_add_up_to_the_texts_bytes(tok):
    """The byte lengths of a text's ids add up to its UTF-8 length (a fact about the text, for text already in
    NFC, which the tokenizer normalises to), over real abstracts and text with characters split between tokens;
    the EOS between documents adds 0."""
    lengths = tok.byte_lengths()
    with open(DATA / "pubmed" / "pubtator_corpora_abstracts.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["abstract"] for _, line in zip(range(300), f)]
    texts += ["naïve 😀 Ωmega — ünïcödé\u200b", "  leading spaces\tand\ttabs\n\n", "漢字かな交じり文"]
    for text in texts:
        assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8")), text[:80]
    two = tok.encode(texts[0] + "<|endoftext|>" + texts[1])
    assert sum(lengths[i] for i in two) == len((texts[0] + texts[1]).encode("utf-8"))
    assert len(lengths) == tok.vocab_size and lengths[tok.eos_id] == lengths[tok.pad_id] == 0

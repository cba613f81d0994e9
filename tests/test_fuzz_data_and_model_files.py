"""Fuzzing the readers of user-supplied files: whatever the bytes, a reader succeeds or raises its documented
error, whose message names the file (no KeyError / TypeError / RecursionError / Rust panic from deep inside).

    corpus files       minimamba.data.read_documents   DataError, or a problem reported against the file
    prepare + meta     minimamba.data.prepare/read_meta DataError naming meta.json
    tokenizer.json     minimamba.tokenizer.load_tokenizer   ValueError / FileNotFoundError naming the file
    config.json        Mamba2Config.load                ValueError naming the file
    checkpoints        minimamba.hub.from_pretrained    CheckpointError / ValueError naming the folder

Each fuzz test also has the inputs that once crashed a reader as @example's. The draws are the same on every
run (derandomized) unless MINIMAMBA_FUZZ_RANDOM=1. A bigger search, new inputs each time:
MINIMAMBA_FUZZ_DRAWS=2000 MINIMAMBA_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz_data_and_model_files.py
"""

import bz2
import copy
import gzip
import json
import lzma
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minimamba import Mamba2Config, Mamba2LM, from_pretrained
from minimamba.data import (COUNTS, DataError, check_one_tokenizer, check_prepared_with, load_split, prepare,
                            read_documents, read_meta)
from minimamba.hub import CheckpointError
from minimamba.tokenizer import load_tokenizer
from tests.conftest import scratch_folder
from tests.test_data import ByteTokenizer
from tests.test_tokenizer import tiny_tokenizer_json

DRAWS = int(os.environ.get("MINIMAMBA_FUZZ_DRAWS", "25"))
FUZZ = settings(max_examples=DRAWS, deadline=None, derandomize=not os.environ.get("MINIMAMBA_FUZZ_RANDOM"),
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# JSON values of every type, a little nested; "\ud800" (a lone surrogate, as a JSON escape can write) included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.just("\ud800"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
DEEP = "[" * 100_000  # JSON nested deeper than Python's parser goes (it raised RecursionError)


def names_file(error: BaseException, path: Path) -> bool:
    return str(path) in str(error)


# ----------------------------------------------------------------------------------------------------------
# corpus files


SUFFIXES = [".txt", ".jsonl", ".json", ".csv", ".xml", ".jsonl.gz", ".txt.gz", ".csv.bz2", ".xml.xz", ".parquet"]
json_line = st.one_of(
    st.builds(lambda v: json.dumps(v), json_values),  # any JSON value: a number, a list, null...
    st.builds(lambda v: json.dumps({"text": v}), json_values),  # the field holding a wrong type
    st.builds(lambda v: json.dumps({"title": v, "abstract": "a"}), json_values),  # the field missing
    st.text(max_size=20),  # not JSON
)
SOUP = ['"', ",", "text", "title", "abstract", "a b", "\n", "\r\n", '""', "\x00", " = T = ", " = = S = = ", "\ufeff",
        "\ud800", "\xe9", "{", "}", "[", ":", "<PubmedArticleSet>", "</PubmedArticleSet>", "<PubmedArticle>",
        "</PubmedArticle>", "<MedlineCitation><PMID>1</PMID><Article><ArticleTitle>", "</ArticleTitle>",
        "<Abstract><AbstractText Label='L'>", "</AbstractText></Abstract>", "</Article></MedlineCitation>", "&amp;",
        "&x;", "<![CDATA[", "]]>", '<?xml version="1.0" encoding="latin-1"?>', "BZh91AY&SY", "\x1f\x8b"]
corpus_bytes = st.one_of(
    st.binary(max_size=200),  # random bytes
    st.lists(json_line, max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
    st.lists(st.text(max_size=15), max_size=6).map(lambda rows: "\n".join(rows).encode("utf-8", "surrogatepass")),
    # a soup of the pieces each format gives meaning to (CSV quotes, WikiText titles, PubMed XML tags, BOMs...)
    st.lists(st.sampled_from(SOUP), max_size=40).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe\x00a", b"caf\xe9\n\xe9t\xe9", b"<PubmedArticleSet><Pubmed",
                     b'<?xml version="1.0" encoding="shift_jis"?><PubmedArticleSet/>', b'{"text": "\\ud800"}']),
)


def write_input(directory: Path, suffix: str, content: bytes, cut: int | None) -> Path:
    """`content` in a file named by `suffix`, compressed as its name says, then cut to `cut` bytes (a file that
    stops early)."""
    path = directory / f"input{suffix}"
    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}.get(path.suffix, lambda b: b)
    data = compress(content)
    path.write_bytes(data if cut is None else data[:cut])
    return path


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), content=corpus_bytes, cut=st.none() | st.integers(0, 60),
       field=st.sampled_from([None, "text", "title"]), template=st.sampled_from([None, "{title}\n\n{abstract}"]),
       unit=st.sampled_from(["block", "line", "file", "wikitext"]))
@example(suffix=".jsonl", content=b'{"text": "a"}\n{"text": ' + DEEP.encode(), cut=None, field=None, template=None,
         unit="block")  # RecursionError
@example(suffix=".xml", content=b'<?xml version="1.0" encoding="shift_jis"?><PubmedArticleSet/>', cut=None,
         field=None, template=None, unit="block")  # ValueError: multi-byte encodings are not supported
@example(suffix=".xml", content=b'<?xml version="1.0" encoding="nonesuch"?><a/>', cut=None, field=None,
         template=None, unit="block")  # LookupError: unknown encoding
def test_fuzz_corpus_files_give_documents_or_a_data_error_naming_the_file(suffix, content, cut, field, template,
                                                                          unit):
    if field and template:
        field = None
    with scratch_folder() as directory:
        if suffix == ".parquet":  # random bytes under a parquet name (pyarrow's own files are tested in test_data)
            path = directory / "input.parquet"
            path.write_bytes(content if cut is None else content[:cut])
        else:
            path = write_input(directory, suffix, content, cut)
        problems = []
        try:
            documents = list(read_documents(path, field, template, unit, on_problem=problems.append))
        except DataError as e:
            assert names_file(e, path), e
            return
        for document in documents:  # text that encodes (unpaired surrogates replaced, and reported)
            assert isinstance(document.text, str) and document.source == str(path)
            document.text.encode("utf-8")
        assert all(problem.source == str(path) and problem.kind in COUNTS for problem in problems)


@FUZZ
@given(lines=st.lists(json_line, max_size=8), field=st.sampled_from([None, "text", "title"]),
       template=st.sampled_from([None, "{title}: {abstract}"]))
@example(lines=['{"text": "a"}', '{"text": ' + DEEP], field=None, template=None)  # RecursionError
def test_fuzz_prepare_accounts_for_every_json_line(lines, field, template):
    """prepare() on JSON lines of any types: every non-blank line is a document read or a malformed record
    (nothing lost unaccounted), or the whole call is a DataError that names the file."""
    if field and template:
        field = None
    with scratch_folder() as directory:
        path = directory / "in.jsonl"
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        try:
            meta = prepare("fuzz", [path], ByteTokenizer(), directory / "out", field=field, template=template)
        except DataError as e:
            assert names_file(e, path), e
            return
        counts = meta["splits"]["train"]["prepared"]["counts"]
        non_blank = sum(1 for line in "\n".join(lines).split("\n") if line.strip())
        assert counts["read"] + counts["malformed"] == non_blank
        assert counts["read"] == counts["kept"] + counts["empty"] + counts["too_short"] + counts["duplicate"]


def test_templates_take_plain_field_names_only(tmp_path):
    """A digit name ("{0}": a positional index to str.format, an IndexError), a nested field ("{title:{x}}": a
    KeyError) or a format spec / conversion that fails on text ("{title:d}", "{title!x}": a ValueError) once
    crashed on the first record; they are refused as bad templates before reading."""
    path = tmp_path / "a.jsonl"
    path.write_text('{"title": "t", "abstract": "a", "0": "z"}\n', encoding="utf-8")
    for template in ("{0}", "{title:{abstract}}", "{title:d}", "{title!x}", "{title!r}"):
        with pytest.raises(DataError, match="bad template .*plain names only"):
            read_documents(path, template=template)
    assert [d.text for d in read_documents(path, template="{title}/{abstract}")] == ["t/a"]


def test_parquet_binary_and_map_columns_are_not_text(tmp_path):
    """Bytes and a map's (key, value) pairs once became their repr ("b'hello'", "('a', 1)") in the document;
    they are malformed records now, as a struct (a dict) was."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [b"hello", None], "n": [1, 2]}), path)
    problems = []
    assert [d.text for d in read_documents(path, on_problem=problems.append)] == [""]
    assert [(p.kind, p.line) for p in problems] == [("malformed", 1)] and "holds bytes" in problems[0].message
    pq.write_table(pa.table({"text": pa.array([[("a", 1)], None], type=pa.map_(pa.string(), pa.int64()))}), path)
    problems = []
    assert [d.text for d in read_documents(path, on_problem=problems.append)] == [""]
    assert [(p.kind, p.line) for p in problems] == [("malformed", 1)] and "holds list" in problems[0].message


# ----------------------------------------------------------------------------------------------------------
# meta.json


meta_values = st.one_of(
    json_values,
    st.builds(lambda tok, splits, preparing: {"tokenizer": tok, "splits": splits, "preparing": preparing},
              st.one_of(json_values, st.fixed_dictionaries({}, optional={
                  "name": json_values, "file": json_values, "vocab_size": json_values, "eos_id": json_values,
                  "vocabulary_sha256": json_values})),
              st.one_of(json_values, st.dictionaries(st.sampled_from(["train", "heldout", "x"]),
                                                     st.one_of(json_values, st.builds(lambda t: {"tokens": t},
                                                                                      json_values)))),
              st.one_of(json_values, st.lists(st.sampled_from(["train", "heldout", "x"]), max_size=2))),
)


@FUZZ
@given(meta=meta_values)
@example(meta=[1])  # AttributeError: 'list' object has no attribute 'get'
@example(meta={"preparing": 5})  # TypeError: 'int' object is not iterable
@example(meta={"splits": {"train": {"tokens": "12"}}})  # ValueError: Cannot specify ',' with 's'
@example(meta={"tokenizer": []})  # AttributeError (ids_needed)
def test_fuzz_meta_json_is_read_or_refused_naming_it(meta):
    with scratch_folder() as directory:
        (directory / "d").mkdir()
        path = directory / "d" / "meta.json"
        path.write_text(json.dumps(meta), encoding="utf-8")
        (directory / "d" / "train.bin").write_bytes(b"\x01\x00\x00\x00")
        text = directory / "in.txt"
        text.write_text("a document\n", encoding="utf-8")
        scoring = SimpleNamespace(name="bytes", vocab_size=257, eos_id=0, vocabulary_sha256=lambda: "0" * 64)
        calls = [lambda: read_meta(directory, "d"), lambda: load_split(directory, "d", "train"),
                 lambda: check_prepared_with(directory, "d", scoring),  # (eval.py, train.py: which tokenizer)
                 lambda: check_one_tokenizer(directory, ["d", "d"]),
                 lambda: prepare("d", [text], ByteTokenizer(), directory, split="heldout")]
        for call in calls:
            try:
                call()
            except DataError as e:
                assert names_file(e, path) or names_file(e, directory / "d"), e


@pytest.mark.parametrize("content", [b"\xff\xfe{\x00}\x00", DEEP.encode()], ids=["utf16", "deep"])
def test_a_meta_json_that_is_not_utf8_or_too_deep_is_a_data_error(tmp_path, content):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_bytes(content)  # (UnicodeDecodeError, RecursionError before)
    with pytest.raises(DataError, match=f"{tmp_path / 'd' / 'meta.json'} is not valid JSON"):
        read_meta(tmp_path, "d")


# ----------------------------------------------------------------------------------------------------------
# tokenizer.json


def _mutate(spec, where, value):
    """`spec` with the entry at the key path `where` set to `value` (a missing list index appends)."""
    spec = copy.deepcopy(spec)
    target = spec
    for key in where[:-1]:
        target = target[key]
    if isinstance(target, list) and where[-1] >= len(target):
        target.append(value)
    else:
        target[where[-1]] = value
    return spec


TOKENIZER_PLACES = [("model", "vocab"), ("model", "merges"), ("model", "merges", 0), ("model", "merges", 99),
                    ("model", "vocab", "Ġt"), ("model", "vocab", "Ġa"), ("model", "vocab", "a"), ("model", "type"),
                    ("model",),
                    ("added_tokens",), ("added_tokens", 0), ("added_tokens", 0, "id"), ("added_tokens", 2, "id"),
                    ("added_tokens", 1, "content"), ("pre_tokenizer",), ("post_processor",), ("normalizer",)]


@FUZZ
@given(where=st.sampled_from(TOKENIZER_PLACES),
       value=json_values | st.sampled_from([0, 1, 5, 100, 263, 264, -1, 2**32, 2**70, ["h", "e"], ["Ġ", 1]]))
@example(where=("model", "vocab", "Ġa"), value=2**33)  # OverflowError in tiktoken (its ids are 32-bit)
@example(where=("model", "vocab", "a"), value=100)  # two tokens with id 100: a Rust panic in tiktoken
@example(where=("added_tokens", 2, "id"), value=5)  # an added token with a byte token's id: the same panic
@example(where=("model", "vocab"), value=[1])  # AttributeError
@example(where=("model", "vocab", "a"), value="5")  # TypeError
@example(where=("model", "merges", 99), value=5)  # TypeError
@example(where=("pre_tokenizer",), value=[1])  # AttributeError
@example(where=("added_tokens", 0), value={"id": 0})  # KeyError
def test_fuzz_tokenizer_json_loads_or_names_the_file(where, value):
    with scratch_folder() as directory:
        path = directory / "tokenizer.json"
        path.write_text(json.dumps(_mutate(tiny_tokenizer_json(), where, value)), encoding="utf-8")
        try:
            tok = load_tokenizer(path)
        except ValueError as e:
            assert names_file(e, path), e
            return
        assert tok.decode(tok.encode("the cat")) == "the cat"


def test_a_tokenizer_json_nested_too_deeply_is_not_valid_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": ' + DEEP, encoding="utf-8")  # (a RecursionError before)
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        load_tokenizer(path)


# ----------------------------------------------------------------------------------------------------------
# config.json and checkpoints


def tiny_config() -> Mamba2Config:
    return Mamba2Config(d_model=32, n_layer=1, vocab_size=64, d_state=8, headdim=16, chunk_size=16)


CONFIG_KEYS = ["d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "ssm_cfg", "model_type",
               "tie_embeddings", "norm_epsilon", "d_intermediate", "rms_norm", "hidden_size", "time_step_limit",
               "num_heads", "n_groups"]
SSM_KEYS = ["layer", "d_state", "headdim", "ngroups", "expand", "A_init_range", "dt_limit", "chunk_size", "bias"]
config_values = json_values | st.sampled_from([0, -4, 3, 2**70, "8", 8.0, "Mamba2", "mamba2", [1], [0.0, 1.0]])


@FUZZ
@given(layout=st.sampled_from(["state-spaces", "hf"]),
       changes=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS + [f"ssm_cfg.{k}" for k in SSM_KEYS]),
                                  config_values), max_size=3))
@example(layout="state-spaces", changes=[("ssm_cfg.A_init_range", [1])])  # "not enough values to unpack"
@example(layout="hf", changes=[("num_heads", "8")])  # "num_heads=8 disagrees with ... = 8"
def test_fuzz_config_json_loads_or_names_the_file(layout, changes):
    config = tiny_config().to_dict(layout)
    for key, value in changes:
        if key.startswith("ssm_cfg."):
            if isinstance(config.get("ssm_cfg"), dict):
                config["ssm_cfg"][key.removeprefix("ssm_cfg.")] = value
        else:
            config[key] = value
    with scratch_folder() as directory:
        path = directory / "config.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        try:
            loaded = Mamba2Config.load(path)
        except ValueError as e:
            assert names_file(e, path), e
            assert "unpack" not in str(e) and "could not convert" not in str(e), e  # a message that names the problem
            return
        assert loaded.nheads * loaded.headdim == loaded.d_inner


@pytest.mark.parametrize("layout, change, message", [
    ("state-spaces", {"ssm_cfg": {"layer": "Mamba2", "A_init_range": [1]}},
     r"ssm_cfg.A_init_range must be \[min, max\], got \[1\]"),
    ("hf", {"num_heads": "4"}, "num_heads='4' disagrees with expand·hidden_size/head_dim = 4"),
    ("hf", {"time_step_limit": ["a"]}, r"unsupported Mamba2 option time_step_limit=\['a'\]"),
    ("hf", DEEP, "is not valid JSON"),
], ids=["A_init_range-not-a-pair", "num_heads-a-string", "time_step_limit-not-numbers", "deep"])
def test_config_json_errors_name_the_problem(tmp_path, layout, change, message):
    """Once: "not enough values to unpack", "num_heads=4 disagrees with ... = 4", "could not convert string to
    float", a RecursionError."""
    path = tmp_path / "config.json"
    config = DEEP if change == DEEP else json.dumps({**tiny_config().to_dict(layout), **change})
    path.write_text(config, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        Mamba2Config.load(path)
    assert names_file(error.value, path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt")
    Mamba2LM(tiny_config()).save_pretrained(directory)
    return directory, torch.load(directory / "pytorch_model.bin", weights_only=True)


KEYS = ["backbone.norm_f.weight", "backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.in_proj.weight",
        "backbone.embedding.weight", "lm_head.weight"]
tensors = st.one_of(
    st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
              st.lists(st.integers(0, 3), max_size=3).map(tuple),
              st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint8])),
    st.sampled_from(["text", 3, None, [1.0]]),  # not tensors
)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(KEYS + [7, "extra.weight"]), st.none() | tensors), max_size=3),
       cut=st.none() | st.integers(0, 4000), config=st.sampled_from([{}, {"d_model": 2**40}, {"vocab_size": 2**62}]))
@example(edits=[(7, torch.zeros(2))], cut=None, config={})  # TypeError: a key that is not a string
@example(edits=[], cut=None, config={"d_model": 2**40})  # RuntimeError: Storage size calculation overflowed
def test_fuzz_checkpoints_load_or_raise_a_checkpoint_error_naming_them(tiny_checkpoint, edits, cut, config):
    source, state = tiny_checkpoint
    with scratch_folder() as directory:
        sd = dict(state)
        for key, value in edits:  # None: delete the key
            sd.pop(key, None) if value is None else sd.__setitem__(key, value)
        torch.save(sd, directory / "pytorch_model.bin")
        if cut is not None:
            data = (directory / "pytorch_model.bin").read_bytes()
            (directory / "pytorch_model.bin").write_bytes(data[:cut])
        (directory / "config.json").write_text(json.dumps({**tiny_config().to_dict(), **config}), encoding="utf-8")
        try:
            model = from_pretrained(directory)
        except (CheckpointError, ValueError) as e:
            assert names_file(e, directory), e
            return
        for key, value in sd.items():  # what loaded is what the file holds
            name = key.removeprefix("backbone.")
            assert torch.equal(model.state_dict()[name], value), key


def test_a_checkpoint_of_meta_tensors_is_refused(tiny_checkpoint, tmp_path):
    """Tensors without data (saved from a model on the meta device) once loaded silently into a model that
    cannot run."""
    source, state = tiny_checkpoint
    torch.save({k: torch.empty(v.shape, device="meta") for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((source / "config.json").read_text(), encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'pytorch_model.bin'} holds tensors without data"):
        from_pretrained(tmp_path)

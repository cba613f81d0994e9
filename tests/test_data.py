"""minimamba.data: readers for every input format, cleaning, splitting, token files, meta.json, the CLI.

Most tests use a byte-level stand-in tokenizer (fast, and its tokens decode back to the exact text);
the tests on ../shared/data use the real GPT-NeoX tokenizer.json.
"""

import bz2
import codecs
import functools
import gzip
import hashlib
import io
import json
import lzma
import random
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from minimamba import data
from minimamba.data import DataError, load_split, main, prepare, read_documents, read_meta
from minimamba.files import write_text_atomically
from tests.conftest import DATA

TOKENIZER_JSON = DATA / "tokenizer" / "tokenizer.json"
NO_SHARED_DATA = f"shared data not found at {DATA} (set MINIMAMBA_DATA)"
needs_shared_data = pytest.mark.skipif(not TOKENIZER_JSON.exists(), reason=NO_SHARED_DATA)


class ByteTokenizer:
    """Token id = byte + 1, EOS = 0: stands in for the real tokenizer where only the plumbing is tested."""

    name, vocab_size, eos_id = "bytes", 257, 0

    def encode_batch(self, texts, num_threads=None, allow_special=True):
        return [[b + 1 for b in text.encode("utf-8")] for text in texts]


def documents_in(out, domain, split):
    """The texts stored in a split, cut at the EOS ids (ByteTokenizer files only)."""
    tokens = load_split(out, domain, split)
    assert tokens[-1] == 0, "every document ends with EOS"
    cuts = np.flatnonzero(tokens == 0)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [(tokens[a:b] - 1).astype(np.uint8).tobytes().decode("utf-8") for a, b in zip(starts, cuts, strict=True)]


def texts(path, **kwargs):
    problems = []
    found = [d.text for d in read_documents(path, on_problem=problems.append, **kwargs)]
    return found, problems


# ----------------------------------------------------------------------------------------------------------
# readers


def test_plain_text_units(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first block\nstill first\n\n\nsecond block\r\n \nthird\n")
    docs = list(read_documents(path))
    assert [d.text for d in docs] == ["first block\nstill first", "second block", "third"]
    assert [d.line for d in docs] == [1, 5, 7]
    assert texts(path, text_unit="line")[0] == ["first block", "still first", "second block", "third"]
    assert texts(path, text_unit="file")[0] == ["first block\nstill first\n\n\nsecond block\n \nthird"]

    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text(" = Alpha = \n Alpha text .\n = = Section = = \n more .\n = Beta = \n Beta text .\n")
    docs = list(read_documents(wiki, text_unit="wikitext"))
    assert [d.text.split("\n")[0] for d in docs] == [" = Alpha = ", " = Beta = "]
    assert [d.line for d in docs] == [1, 5] and "Section" in docs[0].text


def test_json_lines_field_template_and_malformed_lines(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    lines = [
        '{"title": "T1", "abstract": "A1", "n": 1}',
        "",
        '{"title": "T2", "abstract": ["s1", "s2"], "n": 2}',
        '{"title": "T3", "abstract": "A3"',  # cut short
        '["not", "an", "object"]',
        '{"title": "T4", "abstract": ""}',  # empty field: no document from the template
        '{"abstract": "A5"}',  # no title
        '{"title": {"en": "T6"}, "abstract": "A6"}',  # fields that are not text: not their Python repr
        '{"title": "T7", "abstract": ["s1", true], "n": false}',
    ]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    found, problems = texts(path, template="{title}\n\n{abstract}")
    assert found == ["T1\n\nA1", "T2\n\ns1\ns2", ""]
    assert [(p.kind, p.line) for p in problems] == [("malformed", line) for line in (4, 5, 7, 8, 9)]
    assert str(problems[0]).startswith(f"{path}:4: not valid JSON")
    assert [p.message for p in problems[3:]] == ["field 'title' holds dict \"{'en': 'T6'}\", not text",
                                                 "field 'abstract' holds list \"['s1', True]\", not text"]
    found, problems = texts(path, field="n")
    assert found == ["1", "2"] and [p.line for p in problems if "no field 'n'" in p.message] == [6, 7, 8]
    assert problems[-1].message == "field 'n' holds bool 'False', not text"


def test_a_json_array_or_pretty_printed_document_is_refused_with_the_command_that_converts_it(tmp_path):
    records = [{"text": "first document"}, {"text": "second document"}]
    for name, content, what in [("a.json", json.dumps(records), "array"),
                                ("b.json", json.dumps(records, indent=2), "array"),
                                ("c.json", json.dumps({"123": records[0]}, indent=2), "document")]:
        path = tmp_path / name
        path.write_text("\n" + content + "\n")
        with pytest.raises(DataError, match=rf"{name}:2: this file is one JSON {what}, not JSON Lines") as e:
            texts(path)
        assert f"jq -c '.[]' {path}" in str(e.value)


def test_unknown_field_names_the_available_ones(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"pmid": "1", "title": "t", "abstract": "a"}\n')
    with pytest.raises(DataError, match=r"no field 'text'.*pmid, title, abstract"):
        list(read_documents(path))
    with pytest.raises(DataError, match="'abstrct'"):
        list(read_documents(path, template="{title} {abstrct}"))
    with pytest.raises(DataError, match="input file not found"):
        read_documents(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="named fields"):
        read_documents(path, template="{} and {0}")


def test_csv_quoted_newlines_bom_and_bad_rows(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('\ufeffid,text\n1,"line one\nline two"\n2,too,many\n\n3,plain\n', encoding="utf-8")
    docs, problems = [], []
    docs = list(read_documents(path, on_problem=problems.append))
    assert [(d.text, d.line) for d in docs] == [("line one\nline two", 2), ("plain", 6)]
    assert [(p.kind, p.line) for p in problems] == [("malformed", 4)]
    assert texts(path, field="id")[0] == ["1", "3"]


def test_csv_cut_short_inside_a_quoted_field_is_reported(tmp_path):
    """A file that ends inside a quoted field (cut short mid-document): Python's csv module returns the row as
    far as it goes; the reader reports it instead of passing on a truncated document."""
    path = tmp_path / "cut.csv"
    path.write_text('id,text\n1,"whole"\n2,"the start of a\ndocument that never ends\n', encoding="utf-8")
    docs, problems = texts(path)
    assert docs == ["whole"]
    assert [(p.kind, p.line) for p in problems] == [("malformed", 3)]
    assert "a quoted field is not closed before the end of the file" in problems[0].message
    path.write_text('id,text\n1,"whole"\n2,"closed\non its last line"\n', encoding="utf-8")  # (no false alarm)
    assert texts(path) == (["whole", "closed\non its last line"], [])


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install pyarrow)")
    import pyarrow as pa

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["alpha", None, "gamma"]}), path)
    docs = list(read_documents(path))
    assert [(d.text, d.line) for d in docs] == [("alpha", 1), ("", 2), ("gamma", 3)]
    with pytest.raises(DataError, match="no field 'body'; the available fields are id, text"):
        list(read_documents(path, field="body"))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    assert [p.kind for p in texts(broken)[1]] == ["unreadable", "empty_file"]
    import datetime
    import decimal

    typed = tmp_path / "typed.parquet"  # a date and a decimal are text by their str(); a struct is not text
    pq.write_table(pa.table({"title": ["A study"], "date": [datetime.date(2020, 1, 2)],
                             "dose": pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2)),
                             "meta": [{"lang": "en"}]}), typed)
    assert texts(typed, template="{title} ({date}, {dose} mg)") == (["A study (2020-01-02, 1.50 mg)"], [])
    found, problems = texts(typed, field="meta")
    assert found == [] and problems[0].message == "field 'meta' holds dict \"{'lang': 'en'}\", not text"
    # parquet is read by seeking in the file: a compressed one is refused by name, with the command that helps
    packed = tmp_path / "a.parquet.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(DataError, match=rf"^{packed}: a parquet file cannot be read through .gz; decompress it "
                                        rf"first: gzip -dc {packed} > {tmp_path / 'a.parquet'}$"):
        list(read_documents(packed))


PUBMED_XML = """<?xml version="1.0" ?>
<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">
<PubmedArticleSet>
<PubmedArticle>
  <MedlineCitation Status="MEDLINE" Owner="NLM">
    <PMID Version="1">101</PMID>
    <Article PubModel="Print">
      <Journal><ISSN IssnType="Print">0006-2952</ISSN><Title>Biochemical pharmacology</Title></Journal>
      <ArticleTitle>Effect of <i>Escherichia coli</i> on CO<sub>2</sub> uptake.</ArticleTitle>
      <Pagination><MedlinePgn>1-5</MedlinePgn></Pagination>
      <Abstract>
        <AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">Why it
          matters.</AbstractText>
        <AbstractText Label="RESULTS" NlmCategory="RESULTS">Uptake rose &amp; fell.</AbstractText>
        <CopyrightInformation>Copyright 2024 Publisher.</CopyrightInformation>
      </Abstract>
      <AuthorList CompleteYN="Y">
        <Author ValidYN="Y"><LastName>Doe</LastName><ForeName>J</ForeName></Author>
      </AuthorList>
      <Language>eng</Language>
    </Article>
    <MeshHeadingList>
      <MeshHeading><DescriptorName UI="D000001">Calcimycin</DescriptorName></MeshHeading>
    </MeshHeadingList>
  </MedlineCitation>
  <PubmedData><PublicationStatus>ppublish</PublicationStatus>
    <ArticleIdList><ArticleId IdType="pubmed">101</ArticleId></ArticleIdList></PubmedData>
</PubmedArticle>
<PubmedArticle>
  <MedlineCitation Status="MEDLINE" Owner="NLM">
    <PMID Version="1">102</PMID>
    <Article PubModel="Print"><ArticleTitle>A title without an abstract.</ArticleTitle></Article>
  </MedlineCitation>
</PubmedArticle>
<PubmedArticle>
  <MedlineCitation Status="MEDLINE" Owner="NLM">
    <PMID Version="1">103</PMID>
    <Article PubModel="Print"><ArticleTitle>Plain.</ArticleTitle>
      <Abstract><AbstractText>One unlabelled paragraph.</AbstractText></Abstract></Article>
  </MedlineCitation>
</PubmedArticle>
</PubmedArticleSet>
"""


def test_pubmed_baseline_xml(tmp_path):
    path = tmp_path / "pubmed25n0001.xml.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(PUBMED_XML)
    found, problems = texts(path)
    assert found == [
        "Effect of Escherichia coli on CO2 uptake.\n\nBACKGROUND: Why it matters.\nRESULTS: Uptake rose & fell.",
        "",  # no abstract: dropped later, as the recipe drops empty abstracts
        "Plain.\n\nOne unlabelled paragraph.",
    ]
    assert problems == []
    assert texts(path, field="pmid")[0] == ["101", "102", "103"]
    meta = prepare("pubmed", [path], ByteTokenizer(), tmp_path / "out", split="train")
    assert meta["splits"]["train"]["documents"] == 2 and meta["splits"]["train"]["prepared"]["counts"]["empty"] == 1
    assert documents_in(tmp_path / "out", "pubmed", "train") == [found[0], found[2]]

    broken = tmp_path / "broken.xml"
    broken.write_text(PUBMED_XML[: PUBMED_XML.index("<PubmedArticle>", 200)] + "<PubmedArticle><oops></PubmedArticle>")
    found, problems = texts(broken)
    last_line = broken.read_text().count("\n") + 1  # where the parser notices the mismatched tag
    assert len(found) == 1 and (problems[0].kind, problems[0].line) == ("malformed", last_line)


def test_a_truncated_pubmed_file_keeps_every_article_that_is_whole(tmp_path, monkeypatch):
    """The XML is fed to the parser in pieces of _XML_FEED_CHARS (1 MB; 2,000 here): the articles of the
    piece being collected when the .gz stops are read too, then the file is reported as unreadable."""
    monkeypatch.setattr(data, "_XML_FEED_CHARS", 2000)
    rng = random.Random(0)
    articles = "".join(
        f"<PubmedArticle><MedlineCitation><PMID>{i}</PMID><Article><ArticleTitle>T{i}</ArticleTitle><Abstract>"
        f"<AbstractText>{rng.random()} {rng.random()}</AbstractText></Abstract></Article></MedlineCitation>"
        "</PubmedArticle>\n" for i in range(500))
    packed = gzip.compress(f"<PubmedArticleSet>\n{articles}</PubmedArticleSet>\n".encode())
    cut = packed[: len(packed) * 9 // 10]
    readable = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut).decode()
    whole = readable.count("</PubmedArticle>\n")  # the articles whose line is there whole
    path = tmp_path / "cut.xml.gz"
    path.write_bytes(cut)
    found, problems = texts(path)
    assert 400 < whole < 500 and len(found) == whole, (len(found), whole)
    assert [p.kind for p in problems] == ["unreadable"]


def test_non_utf8_empty_and_truncated_files_are_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 latin-1"}\n')
    found, problems = texts(bad)
    assert found == ["fine", "caf\ufffd latin-1"]
    assert [(p.kind, p.line) for p in problems] == [("non_utf8", 2)]
    assert str(problems[0]).startswith(f"{bad}:2: ")

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert texts(empty) == ([], [data.Problem("empty_file", str(empty), None, "no documents in this file")])
    assert [p.kind for p in texts(empty, text_unit="file")[1]] == ["empty_file"]

    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "one"}\n' * 2000)[:-40])
    found, problems = texts(truncated)
    assert len(found) > 0 and [p.kind for p in problems] == ["unreadable"]


def test_utf16_and_utf32_files_are_refused_with_the_command_that_converts_them(tmp_path):
    text = "First line.\nSecond line.\n\nA new block.\n"
    cases = [  # file, bytes, the encoding the message must name, the command it must give
        ("bom.txt", text.encode("utf-16"), "UTF-16",  # FF FE: UTF-16 LE with its byte order mark
         "iconv -f UTF-16 -t UTF-8 bom.txt > bom.utf8.txt"),
        ("be.jsonl", b"\xfe\xff" + '{"text": "x"}\n'.encode("utf-16-be"), "UTF-16",
         "iconv -f UTF-16 -t UTF-8 be.jsonl > be.utf8.jsonl"),
        ("wide.txt", text.encode("utf-32"), "UTF-32",  # FF FE 00 00
         "iconv -f UTF-32 -t UTF-8 wide.txt > wide.utf8.txt"),
        ("nobom.csv", "id,text\n1,hello\n".encode("utf-16-le"), "UTF-16LE",  # no mark: every other byte is NUL
         "iconv -f UTF-16LE -t UTF-8 nobom.csv > nobom.utf8.csv"),
        ("z.jsonl.gz", gzip.compress('{"text": "x"}\n'.encode("utf-16")), "UTF-16",
         "gzip -dc z.jsonl.gz | iconv -f UTF-16 -t UTF-8 > z.utf8.jsonl"),
        # PubMed XML: UTF-16 is read as XML declares it (below), but UTF-32 LE's mark starts like UTF-16 LE's
        ("wide.xml", '<?xml version="1.0" encoding="UTF-32"?>\n<PubmedArticleSet/>\n'.encode("utf-32"), "UTF-32",
         "iconv -f UTF-32 -t UTF-8 wide.xml > wide.utf8.xml"),
    ]
    for name, raw, encoding, command in cases:
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(DataError, match=f"{name} is not UTF-8: .*{encoding}") as err:
            list(read_documents(path))
        message = str(err.value).replace(str(tmp_path) + "/", "")
        assert command in message, message
    converted = tmp_path / "bom.utf8.txt"  # the command's output is read
    converted.write_text(text, encoding="utf-8")
    assert texts(converted) == (["First line.\nSecond line.", "A new block."], [])
    ok = tmp_path / "nul.txt"  # one NUL byte in UTF-8 text is text (U+0000), not another encoding
    ok.write_bytes(b"a line with one \x00 byte in it\n")
    assert texts(ok) == (["a line with one \x00 byte in it"], [])


def test_bz2_and_xz_files_are_read_and_compressed_data_under_another_name_is_refused(tmp_path):
    raw = b'{"text": "one"}\n{"text": "two"}\n'
    for name, packed in [("a.jsonl.gz", gzip.compress(raw)), ("a.jsonl.bz2", bz2.compress(raw)),
                         ("a.jsonl.xz", lzma.compress(raw))]:
        (tmp_path / name).write_bytes(packed)
        assert texts(tmp_path / name) == (["one", "two"], []), name
    cases = [  # file, bytes, what the message must say: the compression, and the fix
        ("b.jsonl", bz2.compress(raw), "bzip2-compressed data, not text: rename it to end in .bz2"),
        ("g.txt", gzip.compress(raw), "gzip-compressed data, not text: rename it to end in .gz"),
        ("x.csv", lzma.compress(raw), "xz-compressed data, not text: rename it to end in .xz"),
        ("twice.txt.gz", gzip.compress(bz2.compress(raw)), "bzip2-compressed data inside its .gz compression, "
                                                           "not text: decompress it first"),
        ("z.txt", b"\x28\xb5\x2f\xfd" + bytes(60), "zstd-compressed data, not text: decompress it first"),
        ("k.txt", b"PK\x03\x04" + bytes(60), "zip-compressed data, not text: decompress it first"),
    ]
    for name, packed, message in cases:
        (tmp_path / name).write_bytes(packed)
        with pytest.raises(DataError, match=f"{name} holds {message}"):
            list(read_documents(tmp_path / name))
    looks_like_it = tmp_path / "bzh.txt"  # ("BZh" without a bzip2 block's magic after it is text)
    looks_like_it.write_text("BZh9 starts this text.\n")
    assert texts(looks_like_it) == (["BZh9 starts this text."], [])
    truncated = tmp_path / "cut.jsonl.xz"
    records = "".join(json.dumps({"text": f"document {random.Random(i).random()}"}) + "\n" for i in range(2000))
    truncated.write_bytes(lzma.compress(records.encode())[:-400])
    found, problems = texts(truncated)
    assert 0 < len(found) < 2000 and [p.kind for p in problems] == ["unreadable"]


def test_a_non_utf8_byte_in_pubmed_xml_costs_one_character_not_the_rest_of_the_file(tmp_path):
    latin1 = PUBMED_XML.replace("A title without an abstract.", "Caf\u00e9 without an abstract.").encode("latin-1")
    path = tmp_path / "pubmed25n0002.xml"
    path.write_bytes(latin1)
    found, problems = texts(path, field="title")
    line = latin1[: latin1.index(b"Caf")].count(b"\n") + 1
    assert found == ["Effect of Escherichia coli on CO2 uptake.", "Caf\ufffd without an abstract.", "Plain."]
    assert [(p.kind, p.line) for p in problems] == [("non_utf8", line)]
    meta = prepare("pubmed", [path], ByteTokenizer(), tmp_path / "out", split="train")
    counts = meta["splits"]["train"]["prepared"]["counts"]
    assert (counts["read"], counts["kept"], counts["empty"], counts["non_utf8"], counts["malformed"]) == (3, 2, 1, 1, 0)


# ----------------------------------------------------------------------------------------------------------
# prepare


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pubmed_xml_in_a_declared_encoding_is_read_as_it_declares(tmp_path):
    def article(title):
        return (f"<PubmedArticle><MedlineCitation><PMID>1</PMID><Article><ArticleTitle>{title}</ArticleTitle>"
                f"<Abstract><AbstractText>on {title}</AbstractText></Abstract></Article></MedlineCitation></PubmedArticle>")

    latin = tmp_path / "latin.xml"
    latin.write_bytes(('<?xml version="1.0" encoding="ISO-8859-1"?>\n<PubmedArticleSet>\n' + article("café")
                       + "\n</PubmedArticleSet>\n").encode("latin-1"))
    utf16 = tmp_path / "utf16.xml.gz"
    with gzip.open(utf16, "wb") as f:
        f.write(codecs.BOM_UTF16_LE + ('<?xml version="1.0" encoding="UTF-16"?>\n<PubmedArticleSet>' + article("naïve")
                                       + "</PubmedArticleSet>").encode("utf-16-le"))
    assert texts(latin, template="{title}") == (["café"], [])
    assert texts(utf16, template="{title}") == (["naïve"], [])


def test_prepare_cleans_splits_and_counts(tmp_path, capsys):
    records = [{"text": f"document number {i}"} for i in range(200)]
    records += [{"text": "document number 7"}, {"text": "  "}, {"text": "tiny"}]  # duplicate, empty, short
    src = write_jsonl(tmp_path / "in.jsonl", records)
    (tmp_path / "in.jsonl").open("ab").write(b'{"text": "bad \xff byte"}\n{broken\n')
    meta = prepare("web", [src], ByteTokenizer(), tmp_path / "out", heldout_fraction=0.2, min_chars=5)

    train, heldout = documents_in(tmp_path / "out", "web", "train"), documents_in(tmp_path / "out", "web", "heldout")
    assert sorted(train + heldout) == sorted({r["text"] for r in records[:200]} | {"bad \ufffd byte"})
    # the documented rule: held out where the first 8 bytes of the text's 16-byte BLAKE2b, as a number, are below
    # 20% of 2**64 (about 20% of 201 documents)
    def held_out(text):
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest()[:8], "big") < 0.2 * 2**64

    assert sorted(heldout) == sorted(t for t in set(train + heldout) if held_out(t)) and 20 <= len(heldout) <= 60
    counts = meta["splits"]["train"]["prepared"]["counts"]
    assert counts == {"read": 204, "kept": 201, "empty": 1, "too_short": 1, "duplicate": 1, "non_utf8": 1,
                      "malformed": 1, "empty_file": 0, "unreadable": 0}
    assert meta["splits"]["train"]["prepared"]["problems"] == [
        f"{src}:204: not UTF-8 from column 15 (replaced by U+FFFD)",
        f"{src}:205: not valid JSON (Expecting property name enclosed in double quotes, column 2); "
        "expected one object per line",
    ]

    on_disk = read_meta(tmp_path / "out", "web")
    assert on_disk == meta
    assert on_disk["tokenizer"] == {"name": "bytes", "vocab_size": 257, "eos_id": 0, "file": None,
                                    "vocabulary_sha256": None}  # (a toy tokenizer: no fingerprint)
    for split, docs in (("train", train), ("heldout", heldout)):
        entry = on_disk["splits"][split]
        assert entry["documents"] == len(docs)
        assert entry["tokens"] == len(load_split(tmp_path / "out", "web", split))
    (source,) = on_disk["splits"]["heldout"]["prepared"]["inputs"]
    assert source["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert not list((tmp_path / "out" / "web").glob("*.tmp"))
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == ("  dropped {'empty': 1, 'too_short': 1, 'duplicate': 1, 'malformed': 1}; "
                          "file problems {'non_utf8': 1} (see meta.json)")
    # without a file problem, none is mentioned (it said "file problems none")
    prepare("web", [write_jsonl(tmp_path / "b.jsonl", records)], ByteTokenizer(), tmp_path / "b", min_chars=5)
    assert capsys.readouterr().out.splitlines()[1] == "  dropped {'empty': 1, 'too_short': 1, 'duplicate': 1} (see meta.json)"


def test_split_is_a_function_of_the_document_alone(tmp_path):
    records = [{"text": f"abstract {i}"} for i in range(300)]
    a = write_jsonl(tmp_path / "a.jsonl", records)
    random.Random(0).shuffle(records)
    b = write_jsonl(tmp_path / "b.jsonl", records[:250])  # other order, fewer documents
    prepare("d", [a], ByteTokenizer(), tmp_path / "A")
    prepare("d", [b], ByteTokenizer(), tmp_path / "B")
    held_a = set(documents_in(tmp_path / "A", "d", "heldout"))
    held_b = set(documents_in(tmp_path / "B", "d", "heldout"))
    assert held_b == held_a & {r["text"] for r in records[:250]} and len(held_a) > 5


def test_a_call_replaces_only_the_splits_it_writes(tmp_path):
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "train.jsonl", [{"text": f"train doc {i}"} for i in range(50)])
    other = write_jsonl(tmp_path / "valid.jsonl", [{"text": f"validation doc {i}"} for i in range(10)])
    prepare("c4", [first], ByteTokenizer(), out)
    train_bytes = (out / "c4" / "train.bin").read_bytes()

    meta = prepare("c4", [other], ByteTokenizer(), out, split="heldout")
    assert (out / "c4" / "train.bin").read_bytes() == train_bytes
    assert documents_in(out, "c4", "heldout") == [f"validation doc {i}" for i in range(10)]
    assert meta["splits"]["train"]["prepared"]["split"] == "auto"
    assert meta["splits"]["heldout"]["prepared"]["split"] == "heldout"
    assert meta["splits"]["heldout"]["documents"] == 10

    class OtherTokenizer(ByteTokenizer):
        vocab_size = 300

    with pytest.raises(DataError, match="another tokenizer"):
        prepare("c4", [other], OtherTokenizer(), out, split="heldout")  # train.bin would no longer match
    with pytest.raises(DataError, match="no field 'body'"):
        prepare("c4", [other], ByteTokenizer(), out, split="train", field="body")
    assert (out / "c4" / "train.bin").read_bytes() == train_bytes  # a failed call leaves the files alone
    assert not list((out / "c4").glob("*.tmp"))


def test_a_prepare_killed_between_its_renames_is_refused_then_redone(tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": f"first {i}"} for i in range(40)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": f"second {i}"} for i in range(40)])
    prepare("c4", [first], ByteTokenizer(), out)
    writes = []

    def killed_after_the_renames(path, text):  # the first meta.json write goes through, the final one is "killed"
        if writes:
            raise KeyboardInterrupt
        writes.append(path)
        write_text_atomically(path, text)

    monkeypatch.setattr(data, "write_text_atomically", killed_after_the_renames)
    with pytest.raises(KeyboardInterrupt):
        prepare("c4", [second], ByteTokenizer(), out)
    monkeypatch.undo()
    for split in ("train", "heldout"):  # the new .bin files are in place, meta.json still says "preparing"
        with pytest.raises(DataError, match="stopped while replacing train.bin and heldout.bin.*prepare the domain again"):
            load_split(out, "c4", split)
    prepare("c4", [second], ByteTokenizer(), out)  # doing it again repairs the domain
    assert sorted(documents_in(out, "c4", "train") + documents_in(out, "c4", "heldout")) == sorted(
        f"second {i}" for i in range(40))
    assert "preparing" not in read_meta(out, "c4")


def test_a_one_split_call_after_a_prepare_killed_between_its_renames_is_refused(tmp_path, monkeypatch):
    """Killed after train.bin was replaced but before heldout.bin was: a call that writes train only
    must not declare the domain finished while heldout.bin and its metadata disagree."""
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": f"first {i}"} for i in range(40)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": f"second {i}"} for i in range(40)])
    third = write_jsonl(tmp_path / "c.jsonl", [{"text": f"third {i}"} for i in range(5)])
    prepare("c4", [first], ByteTokenizer(), out, heldout_fraction=0.2)
    replace = Path.replace

    def killed_at_the_second_rename(self, target):
        if Path(target).name == "heldout.bin":
            raise KeyboardInterrupt
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        prepare("c4", [second], ByteTokenizer(), out, heldout_fraction=0.2)
    monkeypatch.undo()
    assert (out / "c4" / "heldout.bin.tmp").exists()
    with pytest.raises(DataError, match=r"stopped while replacing train.bin and heldout.bin, so heldout.bin may not match "
                       r"meta.json, and this call \(--split train\) would keep it. Run the stopped command again, "
                       r"or another prepare of this domain with --split auto$"):
        prepare("c4", [third], ByteTokenizer(), out, split="train")
    with pytest.raises(DataError, match=r"so train.bin may not match meta.json, and this call \(--split heldout\)"):
        prepare("c4", [third], ByteTokenizer(), out, split="heldout")
    with pytest.raises(DataError, match="stopped while replacing"):
        load_split(out, "c4", "heldout")  # still refused
    prepare("c4", [second], ByteTokenizer(), out, heldout_fraction=0.2)  # the stopped command, again
    meta = read_meta(out, "c4")
    for split in ("train", "heldout"):
        assert meta["splits"][split]["documents"] == len(documents_in(out, "c4", split))
        assert meta["splits"][split]["prepared"]["inputs"][0]["path"] == str(second)
    assert not list((out / "c4").glob("*.tmp"))
    prepare("c4", [third], ByteTokenizer(), out, split="train")  # now a one-split call is fine
    assert documents_in(out, "c4", "train") == [f"third {i}" for i in range(5)]


def test_meta_json_is_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    (tmp_path / "données").mkdir()
    src = write_jsonl(tmp_path / "données" / "a.jsonl", [{"text": "un résumé"}])
    prepare("fr", [src], ByteTokenizer(), tmp_path / "out", split="train")
    # pathlib asks io.text_encoding for the default encoding: a Latin-1 locale, as on some servers
    monkeypatch.setattr(io, "text_encoding", lambda encoding, stacklevel=2: encoding or "latin-1")
    assert read_meta(tmp_path / "out", "fr")["splits"]["train"]["prepared"]["inputs"][0]["path"] == str(src)


def test_tokenizer_without_an_eos_token_is_refused(tmp_path):
    class NoEos(ByteTokenizer):
        eos_id = None

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "a document"}])
    with pytest.raises(DataError, match="has no <\\|endoftext\\|> token"):
        prepare("c4", [src], NoEos(), tmp_path / "out")


def test_unpaired_surrogates_become_one_replacement_character_each(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "ok \\ud800 half \\udfff"}\n', encoding="utf-8")
    (doc,) = read_documents(src)
    assert doc.text == "ok \ufffd half \ufffd"


def test_real_tokenizer_never_writes_eos_inside_a_document(tmp_path):
    if not TOKENIZER_JSON.exists():
        pytest.skip(NO_SHARED_DATA)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "Hello world<|endoftext|>again"}, {"text": "Hello world"}])
    prepare("x", [src], _cached_load_tokenizer(str(TOKENIZER_JSON)), tmp_path, split="train")
    tokens = load_split(tmp_path, "x", "train").tolist()
    assert tokens[-3:] == [12092, 1533, 0] and tokens.count(0) == 2


def test_load_split_errors(tmp_path):
    with pytest.raises(DataError, match="prepare --domain pubmed"):
        load_split(tmp_path, "pubmed", "train")
    with pytest.raises(DataError, match="unknown split"):
        load_split(tmp_path, "pubmed", "test")
    with pytest.raises(DataError, match="meta.json not found"):
        read_meta(tmp_path, "pubmed")

    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document number {i}"} for i in range(20)])
    prepare("pubmed", [src], ByteTokenizer(), tmp_path, split="train")
    train = tmp_path / "pubmed" / "train.bin"
    tokens = read_meta(tmp_path, "pubmed")["splits"]["train"]["tokens"]
    assert len(load_split(tmp_path, "pubmed", "train")) == tokens
    whole = train.read_bytes()
    for cut in (2 * tokens - 2, 2 * tokens - 1):  # cut short (a full disk, a partial copy) by a token or a byte
        train.write_bytes(whole[:cut])
        with pytest.raises(DataError, match=f"holds {cut:,} bytes where meta.json says {tokens:,} tokens .* prepare "
                                            "the domain again"):
            load_split(tmp_path, "pubmed", "train")
    (tmp_path / "pubmed" / "meta.json").unlink()  # a token file alone: only its size can be checked
    with pytest.raises(DataError, match="an odd number: not a file of uint16 token ids"):
        load_split(tmp_path, "pubmed", "train")
    train.write_bytes(whole)
    assert len(load_split(tmp_path, "pubmed", "train")) == tokens


# ----------------------------------------------------------------------------------------------------------
# command line


def test_cli_prepare_and_errors(tmp_path, monkeypatch, capsys):
    records = [{"pmid": str(i), "title": f"T{i}", "abstract": f"A{i}"} for i in range(30)]
    src = write_jsonl(tmp_path / "pubmed.jsonl", records)
    # --tokenizer takes a path or a name; a ByteTokenizer stands in through load_tokenizer
    args = ["prepare", "--domain", "pubmed", "--input", str(src), "--out", str(tmp_path / "out"), "--tokenizer", "t"]
    monkeypatch.setattr(data, "load_tokenizer", lambda name: ByteTokenizer())
    assert main(args + ["--template", r"{title}\n\n{abstract}", "--split", "train", "--limit", "20"]) == 0
    assert documents_in(tmp_path / "out", "pubmed", "train") == [f"T{i}\n\nA{i}" for i in range(20)]
    assert "pubmed: read 20 documents" in capsys.readouterr().out

    assert main(args + ["--field", "summary"]) == 2
    assert "no field 'summary'; the available fields are pmid, title, abstract" in capsys.readouterr().err
    assert main(args[:4] + [str(tmp_path / "nope.jsonl")] + args[5:]) == 2
    assert "input file(s) not found" in capsys.readouterr().err
    # a folder (the download's, say) is not "not found": the error gives the glob of its files
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "b.xml.gz").write_bytes(b"")
    (tmp_path / "raw" / "a.xml.gz").write_bytes(b"")
    assert main(args[:4] + [str(tmp_path / "raw")] + args[5:]) == 2
    assert f"{tmp_path / 'raw'} is a folder: --input takes files; name them, e.g. --input {tmp_path / 'raw'}/*.xml.gz" \
        in capsys.readouterr().err
    with pytest.raises(DataError, match="is a folder"):
        read_documents(tmp_path / "raw")

    for option in ("--limit", "--threads"):
        for bad, why in (("-1", "must be at least 1, got -1"), ("0", "must be at least 1, got 0"),
                         ("ten", "expected a whole number, got 'ten'")):
            with pytest.raises(SystemExit) as exit_:
                main(args + [option, bad])
            assert exit_.value.code == 2 and f"argument {option}: {why}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["download", "--source", "c4", "--files", "0"])
    assert "argument --files: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(DataError, match="limit must be at least 1 document"):
        prepare("pubmed", [src], ByteTokenizer(), tmp_path / "out", limit=-1)


def test_cli_download_builds_the_recipe_urls(tmp_path, monkeypatch, capsys):
    fetched = []

    def fake_download(url, dest, **kwargs):
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if url.endswith("/baseline/"):
            dest.write_text('<a href="pubmed25n0002.xml.gz">x</a> <a href="pubmed25n0001.xml.gz">y</a> '
                            '<a href="pubmed25n0001.xml.gz.md5">z</a>')
        elif url.endswith(".md5"):
            dest.write_text(f"MD5(pubmed25n0001.xml.gz)= {hashlib.md5(b'xml').hexdigest()}\n")
        else:
            dest.write_bytes(b"xml")
        return dest

    monkeypatch.setattr(data, "download", fake_download)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.test")
    assert main(["download", "--source", "pubmed", "--out", str(tmp_path)]) == 0
    first = data.PUBMED_BASELINE + "pubmed25n0001.xml.gz"
    assert fetched[1:] == [first, first + ".md5"]
    next_step = f"prepare --domain pubmed --out data/tokens --input {tmp_path / 'pubmed' / 'pubmed25n0001.xml.gz'}"
    assert next_step in capsys.readouterr().out

    fetched.clear()
    assert main(["download", "--source", "c4", "--split", "validation", "--files", "2", "--out", str(tmp_path)]) == 0
    c4 = f"http://hub.test/datasets/allenai/c4/resolve/{data.C4[1]}/en"
    assert fetched == [f"{c4}/c4-validation.00000-of-00008.json.gz", f"{c4}/c4-validation.00001-of-00008.json.gz"]
    fetched.clear()
    assert main(["download", "--source", "wikipedia", "--out", str(tmp_path)]) == 0
    wikipedia = f"http://hub.test/datasets/wikimedia/wikipedia/resolve/{data.WIKIPEDIA[1]}/20231101.en"
    assert fetched == [f"{wikipedia}/train-00000-of-00041.parquet"]


def test_cli_download_in_offline_mode_touches_no_network(server, tmp_path, capsys, monkeypatch):
    """HF_HUB_OFFLINE (any value huggingface_hub takes as true) is obeyed by `data download` too: files
    already there are used, a missing one is an error naming where it goes; the server sees no request."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "On")
    assert main(["download", "--source", "c4", "--split", "validation", "--out", str(tmp_path)]) == 2
    shard = tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz"
    assert f"HF_HUB_OFFLINE is set and {shard} does not exist" in capsys.readouterr().err
    assert main(["download", "--source", "pubmed", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"prepare --domain pubmed --input {tmp_path / 'pubmed'}/*.xml.gz" in err
    assert f"the PubMed baseline listing ({data.PUBMED_BASELINE}) is not fetched" in err  # (not "put the listing at")
    assert not shard.parent.exists()  # nothing written either
    shard.parent.mkdir()
    shard.write_bytes(b"copied from another machine")
    assert main(["download", "--source", "c4", "--split", "validation", "--out", str(tmp_path)]) == 0
    assert f"--input {shard}" in capsys.readouterr().out
    assert server.requests == []


def test_cli_download_of_wikitext103_writes_its_lines_or_names_a_bad_file(server, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
    import pyarrow.parquet as pq

    path = f"/{data.WIKITEXT[0]}/resolve/{data.WIKITEXT[1]}/wikitext-103-raw-v1/test-00000-of-00001.parquet"
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": ["", " = Title = \n", " A line of the article . \n", ""]}), buffer)
    server.files[path] = buffer.getvalue()
    assert main(["download", "--source", "wikitext103", "--out", str(tmp_path / "good")]) == 0
    raw = tmp_path / "good" / "wikitext103" / "wiki.test.raw"
    assert raw.read_text(encoding="utf-8") == " = Title = \n A line of the article . \n"  # (blank rows dropped)
    assert f"--input {raw}" in capsys.readouterr().out

    blank = io.BytesIO()
    pq.write_table(pa.table({"text": ["", ""]}), blank)
    for name, body, problem in [("html", b"<html>Too many requests</html>", "not a readable parquet file"),
                                ("blank", blank.getvalue(), "no text in it")]:
        server.files[path] = body
        assert main(["download", "--source", "wikitext103", "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"test-00000-of-00001.parquet: {problem}" in err and "Delete it and run again" in err, err
        assert not (tmp_path / name / "wikitext103" / "wiki.test.raw").exists()


def test_the_wikitext103_hint_is_the_readme_recipe_and_the_papers_protocol(tmp_path):
    """The paper's Wikipedia held-out: WikiText-103 test lines longer than 100 characters once stripped."""
    raw = tmp_path / "wiki.test.raw"
    hint = data._next_step("wikitext103", [raw], "train")
    options = hint.split(" --out ")[0].removeprefix("python -m minimamba.data prepare ")
    assert options == "--domain wikipedia --split heldout --text-unit line --min-chars 101"
    readme = (Path(data.__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert "$P --domain wikipedia --input $R/wikitext103/wiki.test.raw --split heldout --text-unit line " \
           "--min-chars 101" in readme
    raw.write_text(" = Title = \n" + " " + "x" * 100 + " \n" + "y" * 101 + "\n", encoding="utf-8")
    meta = prepare("wikipedia", [raw], ByteTokenizer(), tmp_path / "out", split="heldout", text_unit="line",
                   min_chars=101)
    assert documents_in(tmp_path / "out", "wikipedia", "heldout") == ["y" * 101]
    assert meta["splits"]["heldout"]["prepared"]["counts"]["too_short"] == 2


# ----------------------------------------------------------------------------------------------------------
# the real files in ../shared/data (PubMed JSON lines, C4 JSON lines and parquet, WikiText raw text)

_cached_load_tokenizer = functools.lru_cache(data.load_tokenizer)


@needs_shared_data
@pytest.mark.parametrize(
    "domain, file, options",
    [
        ("pubmed", "pubmed/pubtator_corpora_abstracts.jsonl",
         ["--template", r"{title}\n\n{abstract}", "--heldout-fraction", "0.3"]),
        ("c4", "c4/c4_train_sample_1000.jsonl", ["--split", "train", "--min-chars", "100"]),
        ("c4", "c4/c4_validation_2k.parquet", ["--split", "heldout"]),
        ("wikipedia", "wiki/wikitext-2-raw_wiki.test.raw", ["--split", "heldout", "--text-unit", "wikitext"]),
    ],
)
def test_prepare_shared_data(tmp_path, monkeypatch, domain, file, options):
    if file.endswith(".parquet"):
        pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
    monkeypatch.setattr(data, "load_tokenizer", _cached_load_tokenizer)  # build it once for all four
    out = tmp_path / "tokens"
    limit = "8" if "wikitext" in options else "40"  # WikiText articles are long
    argv = ["prepare", "--domain", domain, "--input", str(DATA / file), "--tokenizer", str(TOKENIZER_JSON),
            "--out", str(out), "--limit", limit, *options]
    assert main(argv) == 0
    meta = read_meta(out, domain)
    assert meta["tokenizer"]["vocab_size"] == 50277 and meta["tokenizer"]["eos_id"] == 0
    assert meta["tokenizer"]["file"] == str(TOKENIZER_JSON.resolve())  # (for train.py's checkpoints)
    written = {name: entry for name, entry in meta["splits"].items()}
    assert sum(entry["documents"] for entry in written.values()) >= int(limit) // 2
    for name, entry in written.items():
        tokens = load_split(out, domain, name)
        assert len(tokens) == entry["tokens"] and int((tokens == 0).sum()) == entry["documents"]
        assert tokens.max() < 50277 and tokens[-1] == 0
        counts = entry["prepared"]["counts"]
        assert counts["malformed"] == counts["non_utf8"] == counts["unreadable"] == 0


def test_cli_download_of_pubmed_without_a_route_says_to_copy_the_xml_files(server, tmp_path, capsys, monkeypatch):
    """The listing is fetched anew every time, so the generic advice (copy the file to
    .../baseline-listing.html, or set HF_ENDPOINT) could not help: the message says to copy the .xml.gz files
    and prepare them; a Hub file's message still names HF_ENDPOINT."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(data, "PUBMED_BASELINE", f"http://127.0.0.1:{port}/pubmed/baseline/")
    assert main(["download", "--source", "pubmed", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach 127.0.0.1:{port}" in err
    assert f"prepare --domain pubmed --input {tmp_path / 'pubmed'}/*.xml.gz" in err
    assert "baseline-listing.html" not in err and "HF_ENDPOINT" not in err
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert main(["download", "--source", "c4", "--split", "validation", "--out", str(tmp_path)]) == 2
    assert "set HF_ENDPOINT to a reachable mirror" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# prepare: what a mutation audit found untested (each test names the change it catches)


def test_meta_json_records_the_options_and_the_input_sizes_of_each_call(tmp_path):
    """meta.json's "prepared" holds the call's options as given (heldout_fraction only for --split auto: it
    decides nothing otherwise) and each input's size in bytes (it recorded min_chars 0, the fraction of a
    one-split call, or any byte count, and every test passed)."""
    src = write_jsonl(tmp_path / "a.jsonl", [{"body": f"document {i}"} for i in range(9)])
    meta = prepare("d", [src], ByteTokenizer(), tmp_path / "out", split="train", heldout_fraction=0.3,
                   field="body", min_chars=3, limit=7)
    prepared = meta["splits"]["train"]["prepared"]
    assert {k: prepared[k] for k in ("split", "heldout_fraction", "field", "template", "text_unit", "min_chars",
                                     "limit")} == {"split": "train", "heldout_fraction": None, "field": "body",
                                                   "template": None, "text_unit": "block", "min_chars": 3,
                                                   "limit": 7}
    assert prepared["inputs"] == [{"path": str(src), "bytes": len(src.read_bytes()),
                                   "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}]
    meta = prepare("d", [src], ByteTokenizer(), tmp_path / "out", heldout_fraction=0.3, field="body")
    assert meta["splits"]["heldout"]["prepared"]["heldout_fraction"] == 0.3


def test_min_chars_keeps_a_document_of_exactly_that_length_and_duplicates_are_found_after_stripping(tmp_path, capsys):
    """--min-chars N drops documents *shorter* than N (the wikitext103 hint's 101 means "more than 100"); the
    duplicate check hashes the stripped text that is written, so "  x " repeats "x"."""
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "12345"}, {"text": "1234"}, {"text": "  12345 \n"},
                                             {"text": "abcdef"}])
    meta = prepare("d", [src], ByteTokenizer(), tmp_path / "out", split="train", min_chars=5)
    assert documents_in(tmp_path / "out", "d", "train") == ["12345", "abcdef"]
    counts = meta["splits"]["train"]["prepared"]["counts"]
    assert (counts["too_short"], counts["duplicate"], counts["kept"]) == (1, 1, 2)
    # the summary: documents read (4), then written (2: 5 + 1 and 6 + 1 tokens with their EOS)
    assert capsys.readouterr().out.splitlines()[0] == "d: read 4 documents -> train 2 documents / 13 tokens"


def test_heldout_fraction_0_holds_out_nothing_and_1_is_refused(tmp_path, capsys):
    """[0, 1): 0 writes every document to train.bin (and warns that heldout.bin is empty); 1 would leave
    train.bin empty and is refused."""
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": f"document {i}"} for i in range(30)])
    meta = prepare("d", [src], ByteTokenizer(), tmp_path / "out", heldout_fraction=0.0)
    assert sorted(documents_in(tmp_path / "out", "d", "train")) == sorted(f"document {i}" for i in range(30))
    assert meta["splits"]["heldout"]["documents"] == 0 == (tmp_path / "out" / "d" / "heldout.bin").stat().st_size
    assert f"warning: {tmp_path / 'out' / 'd' / 'heldout'}.bin has no documents" in capsys.readouterr().err
    with pytest.raises(DataError, match="heldout.bin has no tokens: its inputs held no usable document"):
        load_split(tmp_path / "out", "d", "heldout")
    with pytest.raises(DataError, match=r"heldout_fraction must be in \[0, 1\), got 1"):
        prepare("d", [src], ByteTokenizer(), tmp_path / "out", heldout_fraction=1)


def test_a_vocabulary_must_fit_uint16_and_the_domain_name_must_be_one_folder(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "a document"}])

    class Vocab(ByteTokenizer):
        vocab_size = 2**16  # ids 0 … 65535: every one fits a uint16

    prepare("d", [src], Vocab(), tmp_path / "out", split="train")
    Vocab.vocab_size = 2**16 + 1
    with pytest.raises(DataError, match="a vocabulary of 65537 ids does not fit the uint16 token files"):
        prepare("d", [src], Vocab(), tmp_path / "out2", split="train")
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(DataError, match="bad domain name"):
            prepare(bad, [src], ByteTokenizer(), tmp_path / "out3" / "inner", split="train")
    assert not (tmp_path / "out3").exists() and not (tmp_path / "escape").exists()


def test_the_first_50_problems_are_kept_and_the_first_10_printed(tmp_path, capsys):
    """Problems of every kind count towards both limits: 5 non-UTF-8 lines (lines 2-6), then 53 malformed ones."""
    lines = [json.dumps({"text": "a good one"}).encode()] + [b'{"text": "bad \xff %d"}' % i for i in range(5)]
    lines += [f"{{broken {i}".encode() for i in range(53)]
    src = tmp_path / "a.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    meta = prepare("d", [src], ByteTokenizer(), tmp_path / "out", split="train")
    prepared = meta["splits"]["train"]["prepared"]
    assert (prepared["counts"]["malformed"], prepared["counts"]["non_utf8"]) == (53, 5)
    assert [p.split(": ")[0] for p in prepared["problems"]] == [f"{src}:{n}" for n in range(2, 52)]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert [w.split(": ")[1] for w in warnings[:10]] == [f"{src}:{n}" for n in range(2, 12)]
    assert warnings[10:] == ["warning: further problems are only counted (see meta.json)"]


def test_another_tokenizer_is_refused_for_one_split_but_fine_for_both(tmp_path):
    """A one-split call must use the tokenizer (vocabulary size *and* EOS id) of the split it keeps; a --split
    auto call replaces both, so any tokenizer will do."""
    out = tmp_path / "out"
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    prepare("d", [src], ByteTokenizer(), out)

    class OtherEos(ByteTokenizer):  # the same vocabulary size, another EOS id
        eos_id = 256

    with pytest.raises(DataError, match="another tokenizer"):
        prepare("d", [src], OtherEos(), out, split="heldout")

    class Bigger(ByteTokenizer):
        name, vocab_size = "bigger", 300

    meta = prepare("d", [src], Bigger(), out)  # (both splits written again)
    assert meta["tokenizer"]["vocab_size"] == 300 == read_meta(out, "d")["tokenizer"]["vocab_size"]


def test_token_files_longer_than_meta_json_says_are_refused_and_ids_needed_without_meta_json(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    prepare("d", [src], ByteTokenizer(), tmp_path, split="train")
    train = tmp_path / "d" / "train.bin"
    assert data.ids_needed(tmp_path, "d", "train")[0] == 257  # (the tokenizer's vocabulary, from meta.json)
    whole = train.read_bytes()
    train.write_bytes(whole + b"\x01\x00")  # one token more than meta.json's count
    with pytest.raises(DataError, match=f"holds {len(whole) + 2:,} bytes where meta.json says"):
        load_split(tmp_path, "d", "train")
    (tmp_path / "d" / "meta.json").unlink()
    np.array([5, 300, 7], dtype=np.uint16).tofile(train)  # no meta.json: the largest id + 1
    assert data.ids_needed(tmp_path, "d", "train") == (301, "its train.bin holds ids up to 300")


def test_a_meta_json_whose_token_count_is_true_or_that_is_preparing_no_split_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text(json.dumps({"splits": {"train": {"tokens": True}}}))
    with pytest.raises(DataError, match=r'"splits"."train"."tokens" is True, not a count'):
        read_meta(tmp_path, "d")
    (tmp_path / "d" / "meta.json").write_text(json.dumps({"splits": {}, "preparing": ["test"]}))
    with pytest.raises(DataError, match=r"\"preparing\" is \['test'\], not a list of splits"):
        read_meta(tmp_path, "d")


def test_a_stopped_one_split_prepare_is_redone_with_that_split(tmp_path):
    """A `prepare --split heldout` stopped between its renames: a --split train call is refused, and the
    error says to redo --split heldout (not --split auto, which would replace train.bin too)."""
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    prepare("d", [src], ByteTokenizer(), tmp_path)
    meta = read_meta(tmp_path, "d")
    (tmp_path / "d" / "meta.json").write_text(json.dumps({**meta, "preparing": ["heldout"]}))
    with pytest.raises(DataError, match=r"stopped while replacing heldout.bin.*with --split heldout$"):
        prepare("d", [src], ByteTokenizer(), tmp_path, split="train")


def test_prepare_refuses_a_limit_of_0_no_inputs_and_names_every_missing_input_before_reading(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "a document"}])
    with pytest.raises(DataError, match="limit must be at least 1 document .* got 0"):
        prepare("d", [src], ByteTokenizer(), tmp_path / "out", limit=0)
    with pytest.raises(DataError, match="no input files"):
        prepare("d", [], ByteTokenizer(), tmp_path / "out")
    missing = re.escape(f"input file(s) not found: {tmp_path / 'b.jsonl'}, {tmp_path / 'c.jsonl'}")
    with pytest.raises(DataError, match=f"^{missing}$"):
        prepare("d", [src, tmp_path / "b.jsonl", tmp_path / "c.jsonl"], ByteTokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_literal_endoftext_in_a_text_never_becomes_eos_without_the_shared_tokenizer(tmp_path):
    """test_real_tokenizer_never_writes_eos_inside_a_document needs ../shared/data; this stand-in encodes the
    literal "<|endoftext|>" as EOS where special tokens are allowed (as the real tokenizer does), so a prepare
    that allowed them would write an EOS inside the document."""

    class SpecialAware(ByteTokenizer):
        def encode_batch(self, texts, num_threads=None, allow_special=True):
            out = []
            for text in texts:
                parts = text.split("<|endoftext|>") if allow_special else [text]
                ids = [b + 1 for b in parts[0].encode()]
                for part in parts[1:]:
                    ids += [self.eos_id] + [b + 1 for b in part.encode()]
                out.append(ids)
            return out

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "before<|endoftext|>after"}, {"text": "plain"}])
    prepare("d", [src], SpecialAware(), tmp_path / "out", split="train")
    assert documents_in(tmp_path / "out", "d", "train") == ["before<|endoftext|>after", "plain"]


# ----------------------------------------------------------------------------------------------------------
# which tokenizer made a domain's token files (eval.py --ppl-data checks it before scoring them)


def _edit_tokenizer_entry(meta_file, edit):
    """Rewrite meta.json's "tokenizer" entry with edit(entry) (as an older `prepare`, or damage, leaves it)."""
    meta = json.loads(meta_file.read_text())
    meta["tokenizer"] = edit(dict(meta["tokenizer"]))
    meta_file.write_text(json.dumps(meta))


def test_check_prepared_with_compares_what_each_id_stands_for(tmp_path):
    """meta.json keeps the fingerprint of what every id stands for: the same tokenizer, or a copy written otherwise
    elsewhere, passes; one whose ids spell other text (a merge changed: same vocabulary size and EOS) is refused
    with the fix, also once its file is gone. An older meta.json without the fingerprint is compared through the
    tokenizer.json it names while that is there, else by vocabulary size and EOS id, and a note says so; a
    meta.json that names no tokenizer, or none at all, gives a note that nothing was checked."""
    from minimamba.tokenizer import load_tokenizer
    from tests.test_tokenizer import tiny_tokenizer_json, tiny_tokenizer_json_with_other_text

    spec = tiny_tokenizer_json()
    for name, tokenizer_spec, indent in (("a", spec, None), ("b", spec, 2)):  # b: the same vocabulary, another file
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(tokenizer_spec, indent=indent))
    other = tiny_tokenizer_json_with_other_text()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer.json").write_text(json.dumps(other))
    made_with, copy, changed = (load_tokenizer(tmp_path / name) for name in "abc")
    assert made_with.vocabulary_sha256() == copy.vocabulary_sha256() != changed.vocabulary_sha256()
    raw = tmp_path / "doc.txt"
    raw.write_text("the hat\n\nhe ate a tea\n", encoding="utf-8")
    prepare("pubmed", [raw], made_with, tmp_path / "tok", split="heldout")
    meta_file = tmp_path / "tok" / "pubmed" / "meta.json"
    assert json.loads(meta_file.read_text())["tokenizer"]["vocabulary_sha256"] == made_with.vocabulary_sha256()
    check = lambda tokenizer: data.check_prepared_with(tmp_path / "tok", "pubmed", tokenizer)  # noqa: E731
    assert check(made_with) is None and check(copy) is None
    refused = (r"pubmed's token files were prepared with .*a/tokenizer\.json, whose ids stand for other text than "
               r".*c's: give the tokenizer that prepared them \(--tokenizer .*a/tokenizer\.json\), or prepare "
               r"pubmed again with this one")
    with pytest.raises(DataError, match=refused):
        check(changed)
    (tmp_path / "a" / "tokenizer.json").rename(tmp_path / "a" / "moved.json")  # the fingerprint is in meta.json
    with pytest.raises(DataError, match=refused):
        check(changed)

    # an older meta.json, without the fingerprint
    _edit_tokenizer_entry(meta_file, lambda e: {k: v for k, v in e.items() if k != "vocabulary_sha256"})
    (tmp_path / "a" / "moved.json").rename(tmp_path / "a" / "tokenizer.json")
    with pytest.raises(DataError, match=refused):  # (read from the file it names)
        check(changed)
    (tmp_path / "a" / "tokenizer.json").write_text("{")  # damaged since: said, not compared by size instead
    with pytest.raises(DataError, match=r"pubmed/meta.json names the tokenizer that prepared it, which cannot be "
                                        r"read now: .*a/tokenizer\.json.*Put the file back, or prepare pubmed again"):
        check(made_with)
    (tmp_path / "a" / "tokenizer.json").unlink()  # gone: only the sizes and EOS ids can be compared
    note = check(changed)
    assert re.fullmatch(r"pubmed: the tokenizer file that prepared it \(.*a/tokenizer\.json\) is not here: only its "
                        r"vocabulary size and EOS id were compared", note), note
    bigger = tiny_tokenizer_json()
    bigger["model"]["merges"].append("a t")
    bigger["model"]["vocab"]["at"] = 264  # (after the two space runs, 262 and 263)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tokenizer.json").write_text(json.dumps(bigger))
    with pytest.raises(DataError, match=r"prepared with .*a/tokenizer\.json \(264 ids, EOS 0\), not with .*d "
                                        r"\(265 ids, EOS 0\)"):
        check(load_tokenizer(tmp_path / "d"))
    eos_elsewhere = tiny_tokenizer_json()  # the same size, the EOS at id 1
    for token in eos_elsewhere["added_tokens"][:2]:
        token["id"] = 1 - token["id"]
    eos_elsewhere["model"]["vocab"] |= {"<|endoftext|>": 1, "<|padding|>": 0}
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "tokenizer.json").write_text(json.dumps(eos_elsewhere))
    with pytest.raises(DataError, match=r"\(264 ids, EOS 0\), not with .*e \(264 ids, EOS 1\)"):
        check(load_tokenizer(tmp_path / "e"))
    for damaged in ("x" * 5000, "a\x00b"):  # (names no filesystem takes: as gone, not a traceback)
        _edit_tokenizer_entry(meta_file, lambda e: e | {"file": damaged})
        assert "only its vocabulary size and EOS id were compared" in check(changed)
    _edit_tokenizer_entry(meta_file, lambda e: e | {"file": None})
    assert check(changed) == (f"pubmed: its meta.json names no tokenizer file ({made_with.name}): only its "
                              "vocabulary size and EOS id were compared")
    _edit_tokenizer_entry(meta_file, lambda e: {})
    assert check(changed) == f"{meta_file} does not say which tokenizer made pubmed's token files (not checked)"
    meta_file.unlink()
    assert check(made_with) == f"{meta_file} is missing: the tokenizer that made pubmed's token files is not known " \
                               "(not checked)"

"""Corpus preparation: text files in -> flat token files out, one folder per domain of the training mix.

    python -m minimamba.data download --source pubmed --out data/raw        # the recipe's real sources
    python -m minimamba.data prepare --domain pubmed --input data/raw/pubmed/*.xml.gz --out data/tokens

What `prepare` writes (nanoGPT-style: one flat file of token ids per split, read back with np.memmap):
    DIR/NAME/train.bin     uint16 token ids; every document's tokens are followed by EOS (id 0), so the
    DIR/NAME/heldout.bin   document boundaries are exactly the EOS positions (text never encodes to EOS)
    DIR/NAME/meta.json     tokenizer; per split: documents, tokens, the input files with their sha256, the
                           options used, the counts below and the first problems found (as file:line: ...)

Readers, chosen by file name (".gz", ".bz2" or ".xz" after it: read through that decompressor; not parquet):
    .jsonl .json   JSON lines, one record per line          .csv       one record per row, header first
    .parquet       one record per row (needs pyarrow)       .xml       PubMed baseline XML, one record per
    anything else  plain text, see TEXT_UNITS                          article: pmid, title, abstract
A record becomes a document through `field` (default "text"; PubMed XML: `template` PUBMED_TEMPLATE) or
`template`, e.g. "{title}\\n\\n{abstract}";
a record with an empty template field gives an empty document (the recipe drops abstracts without text).

Exact duplicates are dropped within one call. Nothing is dropped silently; meta.json counts, per call:
    read        documents read from the inputs (at most --limit)
    kept        documents written (train + held-out)
    empty       documents that are empty after stripping whitespace
    too_short   documents shorter than --min-chars characters
    duplicate   exact repeats of an earlier document of the same call
    non_utf8    lines with bytes that are not UTF-8 (kept, with those bytes replaced by U+FFFD; in PubMed
                XML too, where the rest of the file is read on), and records whose text holds unpaired
                surrogates (JSON escapes such as "\\ud800", replaced the same way); a UTF-16 or UTF-32 file is refused
                (but PubMed XML in UTF-16, or in another encoding its <?xml?> declares, is read as it declares)
    malformed   records that could not be parsed, lack the field or hold no text in it (an object, true/false)
                (skipped; invalid XML: the rest of its file)
    empty_file  input files that held no document
    unreadable  input files that stopped reading early (truncated gzip, broken parquet, ...)
"""

import argparse
import bz2
import codecs
import csv
import gzip
import hashlib
import itertools
import json
import lzma
import os
import re
import string
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minimamba.download import DownloadError, download, hub_url, offline
from minimamba.files import parse_json, sha256_of, write_text_atomically
from minimamba.tokenizer import DEFAULT_TOKENIZER, SURROGATE, load_tokenizer

SPLITS = ("train", "heldout")
TEXT_UNITS = {
    "block": "one document per block of lines separated by blank lines",
    "line": "one document per non-blank line",
    "file": "the whole file is one document",
    "wikitext": "one document per WikiText article (an article starts at a ' = Title = ' line)",
}
PUBMED_TEMPLATE = "{title}\n\n{abstract}"  # the recipe's f"{title}\n\n{content}"
COUNTS = ("read", "kept", "empty", "too_short", "duplicate", "non_utf8", "malformed", "empty_file", "unreadable")
MAX_PROBLEMS_KEPT = 50  # problems listed in meta.json (all of them are counted)
MAX_PROBLEMS_SHOWN = 10  # problems printed while preparing
BATCH_DOCUMENTS = 512  # documents per call to the tokenizer


def shared_data_dir() -> Path:
    """The project's shared data folder (the tokenizer.json and the small public corpora and task files that
    benchmarks, the miniature experiment and tests read): $MINIMAMBA_DATA when it is set, else shared/data
    beside the clone (../shared/data from its root), wherever the command runs from."""
    return Path(os.environ.get("MINIMAMBA_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


class DataError(ValueError):
    """Bad input or arguments; the message names the file, field or option, and what to do."""


@dataclass
class Document:
    text: str
    source: str  # the input file
    line: int  # where it starts: the line (text, JSON lines, CSV), the record number (parquet, XML)


@dataclass
class Problem:
    kind: str  # one of COUNTS: "non_utf8", "malformed", "empty_file" or "unreadable"
    source: str
    line: int | None  # None: the whole file
    message: str

    def __str__(self):
        return f"{self.source}{'' if self.line is None else f':{self.line}'}: {self.message}"


def _print_problem(problem: Problem) -> None:
    print(f"warning: {problem}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Readers
#
# read_lines, jsonl_records and csv_records are minimamba.tasks' readers too (one place that decompresses,
# decodes, refuses what is not UTF-8 text and numbers the lines). A problem in a line or record goes to
# report(kind, line, message), which sets the policy: here it is counted and reading goes on (a corpus keeps
# its good documents); tasks.py's report raises (a benchmark with a dropped or altered item is another one).


def _folder_given(folder: Path) -> str:
    """The error for a folder given where input files are expected, with the glob that names its files."""
    suffixes = Counter("".join(f.suffixes[-2:]) for f in folder.iterdir() if f.is_file() and f.suffix)
    pattern = f"{folder}/*{suffixes.most_common(1)[0][0]}" if suffixes else f"{folder}/*"
    return f"{folder} is a folder: --input takes files; name them, e.g. --input {pattern}"


def read_documents(
    path: str | Path,
    field: str | None = None,
    template: str | None = None,
    text_unit: str = "block",
    on_problem: Callable[[Problem], None] | None = None,
) -> Iterator[Document]:
    """The documents of one input file, in file order (empty ones included: the caller decides).

    Problems in the data (bad UTF-8, malformed records, unreadable or empty files) go to `on_problem`
    (default: a warning on stderr) and reading goes on; mistakes in the arguments (a missing file,
    a field the records do not have, a file in UTF-16 or UTF-32 instead of UTF-8) raise DataError.
    """
    path = Path(path)
    on_problem = on_problem or _print_problem

    def report(kind: str, line: int | None, message: str) -> None:
        on_problem(Problem(kind, str(path), line, message))

    if path.is_dir():
        raise DataError(_folder_given(path))
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    if text_unit not in TEXT_UNITS:
        raise DataError(f"unknown text unit {text_unit!r}; choose from {', '.join(TEXT_UNITS)}")
    if field and template:
        raise DataError("give a field or a template, not both")
    kind = _file_kind(path)
    if kind == "text":
        return _checked(path, _text_documents(path, text_unit, report), report)
    if not (field or template):
        field, template = (None, PUBMED_TEMPLATE) if kind == "xml" else ("text", None)
    names = [field] if field else _template_fields(template)
    if kind == "jsonl":
        records = jsonl_records(path, report)
    elif kind == "csv":
        records = csv_records(path, report)
    elif kind == "parquet":
        records = _parquet_records(path, names, report)
    else:
        records = _pubmed_xml_records(path, report)
    return _checked(path, _record_documents(records, str(path), field, template, names, report), report)


# what reading a file that stops early raises (a truncated .gz/.bz2/.xz, a read error)
STOPPED_EARLY = (OSError, EOFError, zlib.error, lzma.LZMAError)


def _checked(path: Path, documents: Iterator[Document], report) -> Iterator[Document]:
    """`documents`, reporting a file that stops early (e.g. a truncated .gz) or holds no document at all."""
    found = 0
    try:
        for document in documents:
            found += 1
            yield document
    except (*STOPPED_EARLY, csv.Error) as e:
        report("unreadable", None, f"stopped reading after {found} documents: {e}")
    if found == 0:
        report("empty_file", None, "no documents in this file")


def _file_kind(path: Path) -> str:
    name = _plain_name(path).lower()
    kinds = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".xml": "xml"}
    return next((kind for suffix, kind in kinds.items() if name.endswith(suffix)), "text")


# the compressions a file name may end with: the module that reads it and the command that decompresses it
_DECOMPRESSORS = {".gz": (gzip, "gzip -dc"), ".bz2": (bz2, "bzip2 -dc"), ".xz": (lzma, "xz -dc")}
# what compressed data starts with (the "magic number" of each format), to refuse it where the name hides it
_COMPRESSED_MAGIC = {b"\x1f\x8b": ("gzip", ".gz"), b"BZh": ("bzip2", ".bz2"), b"\xfd7zXZ\x00": ("xz", ".xz"),
                     b"\x28\xb5\x2f\xfd": ("zstd", None), b"PK\x03\x04": ("zip", None),
                     b"7z\xbc\xaf\x27\x1c": ("7z", None)}
_BZIP2_BLOCK = re.compile(rb"[1-9](1AY&SY|\x17rE8P\x90)")  # after "BZh": the level, then a block's (or the end's)
# magic, so that a text that starts with "BZh" is read as text


def _compression(path: Path) -> str:
    """The compression suffix of `path`'s name (".gz", ".bz2", ".xz"), or "" for an uncompressed name."""
    return next((suffix for suffix in _DECOMPRESSORS if path.name.lower().endswith(suffix)), "")


def _plain_name(path: Path) -> str:
    """`path`'s name without its compression suffix."""
    return path.name[:len(path.name) - len(_compression(path))]


def _open_bytes(path: Path):
    """The bytes of `path`, decompressed as its name says (`_DECOMPRESSORS`)."""
    suffix = _compression(path)
    return _DECOMPRESSORS[suffix][0].open(path, "rb") if suffix else open(path, "rb")


def _refuse_compressed(path: Path, head: bytes) -> None:
    """Raise DataError if the bytes read from `path` (decompressed as its name says) start like compressed
    data: read as text they would be garbage (a few "non-UTF-8 lines" each holding thousands of bytes)."""
    for magic, (name, suffix) in _COMPRESSED_MAGIC.items():
        if head.startswith(magic) and (name != "bzip2" or _BZIP2_BLOCK.match(head, 3)):
            inside = f" inside its {_compression(path)} compression" if _compression(path) else ""
            fix = (f"rename it to end in {suffix} (read as {name} then)" if suffix and not inside
                   else f"decompress it first (e.g. with {name}) and give the decompressed file")
            raise DataError(f"{path} holds {name}-compressed data{inside}, not text: {fix}")


# byte order marks of the encodings that are not UTF-8 (UTF-32 LE first: it starts like UTF-16 LE's)
_OTHER_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
               (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _refuse_other_encodings(path: Path, head: bytes) -> None:
    """Raise DataError if the first bytes of `path` are UTF-16 or UTF-32 text (a byte order mark, or NUL
    bytes in more than a quarter of them): read as UTF-8 it would be garbage, not a few bad characters."""
    encoding = next((name for bom, name in _OTHER_BOMS if head.startswith(bom)), None)
    if encoding:
        why = f"it starts with the {encoding} byte order mark"
    elif head.count(0) * 4 > len(head):
        nul_at_odd = head[1::2].count(0) > head[0::2].count(0)  # "a\0b\0": little-endian
        width = "32" if head.count(0) * 3 > len(head) * 2 else "16"
        encoding = f"UTF-{width}{'LE' if nul_at_odd else 'BE'}"
        why = f"{head.count(0)} of its first {len(head)} bytes are NUL, as in {encoding} (or it is not text at all)"
    else:
        return
    plain = _plain_name(path)
    converted = path.with_name(f"{Path(plain).stem}.utf8{Path(plain).suffix}")
    command = f"iconv -f {encoding} -t UTF-8 {path} > {converted}"
    if plain != path.name:
        command = f"{_DECOMPRESSORS[_compression(path)][1]} {path} | iconv -f {encoding} -t UTF-8 > {converted}"
    raise DataError(f"{path} is not UTF-8: {why}. Convert it to UTF-8 first, e.g. {command}, and give that "
                    "file instead")


REPLACED = "(replaced by U+FFFD)"  # ends a non_utf8 report: what reading goes on with, if report returns


def read_lines(path: Path, report) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) for each line of `path` (decompressed as its name says; lines
    end at "\\n", a "\\r" before it is dropped, so is a byte order mark); bytes that are not UTF-8 are
    reported (non_utf8), then replaced by U+FFFD. A UTF-16 or UTF-32 file, or compressed data under a name
    that does not say so, is refused (DataError) before its first line."""
    with _open_bytes(path) as f:
        head = f.peek(4096)[:4096]
        _refuse_compressed(path, head)
        _refuse_other_encodings(path, head)
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report("non_utf8", number, f"not UTF-8 from column {e.start + 1} {REPLACED}")
                line = raw.decode("utf-8", errors="replace")
            if number == 1:
                line = line.removeprefix("\ufeff")  # byte order mark
            yield number, line.rstrip("\r\n")


def _text_documents(path: Path, unit: str, report) -> Iterator[Document]:
    source, lines = str(path), read_lines(path, report)
    if unit == "file":
        text = "\n".join(line for _, line in lines)
        if text.strip():
            yield Document(text, source, 1)
    elif unit == "line":
        yield from (Document(line, source, number) for number, line in lines if line.strip())
    else:  # "block": a blank line ends a document; "wikitext": an article's title line starts one
        chunk, start = [], 1
        for number, line in lines:
            if unit == "block":
                boundary = not line.strip()
            else:
                # an article title " = Title = ", not a section title " = = Section = = "
                boundary = bool(re.fullmatch(r"= [^=].* =", line.strip()))
            if boundary:
                if "".join(chunk).strip():
                    yield Document("\n".join(chunk), source, start)
                chunk = []
                if unit == "block":
                    continue
            if not chunk:
                start = number
            chunk.append(line)
        if "".join(chunk).strip():
            yield Document("\n".join(chunk), source, start)


def jsonl_records(path: Path, report) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSON lines file; a line that is not a JSON object
    is reported (malformed) and skipped. A file that is one JSON array or object is refused (DataError)."""
    first = True
    for number, line in read_lines(path, report):
        if not line.strip():
            continue
        if first and (line.lstrip().startswith("[") or line.strip() == "{"):
            # one JSON document (an array of records, or an object spread over lines): every line of it
            # would be "malformed" here
            raise DataError(
                f"{path}:{number}: this file is one JSON {'array' if line.lstrip()[0] == '[' else 'document'}, "
                f"not JSON Lines (one object per line). Convert it, e.g. with jq: "
                f"jq -c '.[]' {path} > {path.with_suffix('.jsonl').name}")
        first = False
        try:
            record = parse_json(line)
        except json.JSONDecodeError as e:
            report("malformed", number, f"not valid JSON ({e.msg}, column {e.colno}); expected one object per line")
            continue
        except ValueError as e:  # (nested too deeply)
            report("malformed", number, f"{e}; expected one flat object per line")
            continue
        if not isinstance(record, dict):
            report("malformed", number, f"expected a JSON object, got {type(record).__name__}")
            continue
        yield number, record


def csv_records(path: Path, report) -> Iterator[tuple[int, dict]]:
    """(line the row starts on, {header name: field}) for each row after the header; a row that is not valid
    CSV or has another number of fields than the header is reported (malformed) and skipped, and so is a last
    row whose quoted field the file ends in (Python's csv module would return it cut short). A quoted field
    may span lines; its line breaks are "\\n" (read_lines drops the "\\r" of "\\r\\n")."""
    csv.field_size_limit(2**31 - 1)  # the default (131,072 characters) is too small for long documents
    ended = []  # not empty once the csv reader has asked for a line after the last one

    def lines():
        yield from (line + "\n" for _, line in read_lines(path, report))
        ended.append(True)

    rows = csv.reader(lines())
    header = next(rows, None)
    end = rows.line_num  # the line where the last row read ends (a quoted field may span lines)
    while header is not None:
        start = end + 1
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            report("malformed", start, f"not valid CSV ({e})")
            row = None
        end = rows.line_num
        if row and ended:  # the reader asked for a line after the last one: a quoted field was still open
            report("malformed", start, "a quoted field is not closed before the end of the file (a file cut "
                   "short?)")
            continue
        if not row:  # a blank line, or a row reported above
            continue
        if len(row) != len(header):
            fields = f"{len(row)} field{'' if len(row) == 1 else 's'}"
            report("malformed", start, f"{fields} where the header has {len(header)}")
            continue
        yield start, dict(zip(header, row, strict=True))


def _parquet_records(path: Path, names: list[str], report) -> Iterator[tuple[int, dict]]:
    if suffix := _compression(path):  # (pyarrow reads a parquet file by seeking in it, so not through a decompressor)
        raise DataError(f"{path}: a parquet file cannot be read through {suffix}; decompress it first: "
                        f"{_DECOMPRESSORS[suffix][1]} {path} > {path.with_suffix('')}")
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pyarrow.parquet.ParquetFile(path)
        columns = table.schema_arrow.names
        missing = [name for name in names if name not in columns]
        if missing:  # found from the schema, before reading anything
            raise DataError(f"{path}: no field {missing[0]!r}; the available fields are {', '.join(columns)}")
        number = 0
        for batch in table.iter_batches(batch_size=1024, columns=names):
            for record in batch.to_pylist():
                number += 1
                yield number, record
    except pyarrow.ArrowException as e:
        report("unreadable", None, f"not a readable parquet file ({e})")


def _pubmed_xml_records(path: Path, report) -> Iterator[tuple[int, dict]]:
    """PubMed baseline files: a <PubmedArticleSet> of <PubmedArticle>s, streamed (a file holds ~30,000).

    A file in UTF-8 (what PubMed writes, and XML's default) is fed to the parser as the text of read_lines(), so
    a byte that is not UTF-8 costs one U+FFFD (reported as non_utf8 with its line), not the rest of the file;
    the parser's line numbers are the file's. A file that declares another encoding
    (<?xml ... encoding="ISO-8859-1"?>) or starts with a UTF-16 byte order mark is fed as bytes, for the
    parser to decode as it declares."""
    parser = ET.XMLPullParser(events=("end",))  # "end" events: the element is complete
    number = 0

    def articles():
        nonlocal number
        for _, element in parser.read_events():
            if element.tag == "PubmedArticle":
                number += 1
                yield number, _pubmed_article(element)
                element.clear()  # free the article's subtree

    try:
        if _xml_declares_other_encoding(path):
            with _open_bytes(path) as f:
                while block := f.read(_XML_FEED_CHARS):
                    try:
                        parser.feed(block)
                    except (LookupError, ValueError) as e:  # an unknown encoding, or a multi-byte one (Shift_JIS)
                        raise DataError(f"{path} declares an encoding that Python's XML parser cannot read ({e}). "
                                        f"Convert it to UTF-8 first (e.g. with iconv -t UTF-8), change its "
                                        f"<?xml ... encoding=...?> to UTF-8, and give that file instead") from None
                    yield from articles()
        else:
            chunk, size = [], 0
            try:
                for _, line in read_lines(path, report):
                    chunk.append(line)
                    size += len(line) + 1
                    if size >= _XML_FEED_CHARS:  # (~1 MB pieces of a ~150 MB file; a file with no line breaks is one)
                        parser.feed("\n".join(chunk) + "\n")  # text, not bytes: the parser takes it as decoded
                        chunk, size = [], 0
                        yield from articles()
            except STOPPED_EARLY:  # (a truncated file) the articles that are whole before it stops, then the error
                parser.feed("\n".join(chunk))
                yield from articles()
                raise
            parser.feed("\n".join(chunk))
        yield from articles()
        parser.close()  # raises ParseError if the file ends inside an element
        yield from articles()  # (any events the parser held back until the end)
    except ET.ParseError as e:
        report("malformed", e.position[0], f"not valid XML ({e}); skipped the rest of the file")


_XML_FEED_CHARS = 1 << 20
_XML_ENCODING = re.compile(rb"""^<\?xml[^>]*?\sencoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


def _xml_declares_other_encoding(path: Path) -> bool:
    """Whether the XML file at `path` says it is not UTF-8: a UTF-16 byte order mark, or an encoding other
    than UTF-8 in its declaration. (A file with neither is UTF-8, as XML defines; a UTF-32 one is neither,
    and read_lines refuses it.)"""
    with _open_bytes(path) as f:
        head = f.read(200)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not head.startswith(codecs.BOM_UTF32_LE):
        return True  # (UTF-32 LE's mark, FF FE 00 00, starts like UTF-16 LE's: not a UTF-16 file)
    declared = _XML_ENCODING.match(head.removeprefix(codecs.BOM_UTF8))
    return declared is not None and declared.group(1).decode().lower().replace("_", "-") not in ("utf-8", "utf8")


def _pubmed_article(article: ET.Element) -> dict:
    def text(element):  # the text of an element and of its inline markup (<i>, <sup>, ...), spaces normalised
        return "" if element is None else " ".join("".join(element.itertext()).split())

    sections = []  # a structured abstract has one AbstractText per labelled section
    for section in article.iterfind("MedlineCitation/Article/Abstract/AbstractText"):
        label, body = section.get("Label"), text(section)
        if body:
            sections.append(f"{label}: {body}" if label else body)
    return {
        "pmid": article.findtext("MedlineCitation/PMID", ""),
        "title": text(article.find("MedlineCitation/Article/ArticleTitle")),
        "abstract": "\n".join(sections),
    }


def _template_fields(template: str) -> list[str]:
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:
        raise DataError(f"bad template {template!r}: {e}") from None
    names = [name for name, _, _ in fields]
    # a name of digits is a positional index to str.format, and a format spec or conversion ("{title:>9}",
    # "{title!r}") can fail on a record's text (or name another field, "{title:{width}}"): plain names only
    if not names or any(not name or "." in name or "[" in name or name.isdigit() or spec or conversion
                        for name, spec, conversion in fields):
        raise DataError(f"bad template {template!r}: it needs named fields such as {{title}} (plain names only, "
                        "without a format spec or conversion such as {title:>9} or {title!r})")
    return names


def _as_text(value) -> str | None:
    """A field's value as text: nothing (None) is "", a list is its items one per line (e.g. sentences or
    paragraphs), anything else its str() (a string, a number, a parquet date or decimal); None for an object
    (a parquet struct, or a map's (key, value) pairs), true/false or bytes (a parquet binary column): their
    Python repr, "{'en': ...}", "('en', ...)", "True" or "b'...'", is not the document's text."""
    if value is None:
        return ""
    if isinstance(value, list):
        items = [_as_text(item) for item in value]
        return None if None in items else "\n".join(items)
    return None if isinstance(value, (dict, tuple, bool, bytes)) else str(value)


def _record_documents(records, source, field, template, names, report) -> Iterator[Document]:
    for index, (number, record) in enumerate(records):
        missing = [name for name in names if name not in record]
        if missing and index == 0:  # the first record lacks it: a wrong field name, not a bad record
            raise DataError(
                f"{source}:{number}: no field {missing[0]!r}; the available fields are {', '.join(record)} "
                "(choose with --field NAME or --template)"
            )
        if missing:
            report("malformed", number, f"no field {missing[0]!r} in this record")
            continue
        values = {name: _as_text(record[name]) for name in names}
        bad = next((name for name, value in values.items() if value is None), None)
        if bad is not None:  # (its repr, "{'en': ...}" or "True", would have been trained on as text)
            report("malformed", number, f"field {bad!r} holds {type(record[bad]).__name__} "
                                        f"{str(record[bad])[:40]!r}, not text")
            continue
        if template is None:
            text = values[field]
        elif all(value.strip() for value in values.values()):
            text = template.format_map(values)
        else:
            text = ""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON escapes such as "\ud800" can encode half of a character
            report("non_utf8", number, f"unpaired surrogates {REPLACED}")
            text = SURROGATE.sub("\ufffd", text)  # one U+FFFD per unpaired surrogate
        yield Document(text, source, number)


# ----------------------------------------------------------------------------------------------------------
# prepare: documents -> token files


def prepare(
    domain: str,
    inputs: Iterable[str | Path],
    tokenizer,
    out_dir: str | Path,
    *,
    split: str = "auto",
    heldout_fraction: float = 0.05,
    field: str | None = None,
    template: str | None = None,
    text_unit: str = "block",
    min_chars: int = 0,
    limit: int | None = None,
    num_threads: int | None = None,
) -> dict:
    """Read, clean, split and tokenize `inputs` into out_dir/domain/{train,heldout}.bin; returns meta.json.

    split="auto" puts a document in held-out when a hash of its text falls below `heldout_fraction`:
    the same document always lands in the same split, whatever the order or the other documents.
    split="train" or "heldout" writes every document to that split. A call replaces the split files it
    writes and keeps the other one. `tokenizer` is a Tokenizer or a name/path for load_tokenizer().
    """
    inputs = [Path(p) for p in inputs]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", domain):
        raise DataError(f"bad domain name {domain!r}: use letters, digits, '_', '-' and '.'")
    if split not in ("auto", *SPLITS):
        raise DataError(f"unknown split {split!r}; choose from auto, train, heldout")
    if split == "auto" and not 0 <= heldout_fraction < 1:
        raise DataError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1 document (or None: all of them), got {limit}")
    if not inputs:
        raise DataError("no input files")
    folders = [p for p in inputs if p.is_dir()]
    if folders:
        raise DataError(_folder_given(folders[0]))
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise DataError(f"input file(s) not found: {', '.join(missing)}")
    if isinstance(tokenizer, (str, Path)):
        try:
            tokenizer_name, tokenizer = str(tokenizer), load_tokenizer(tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"cannot load the tokenizer {tokenizer}: {e}") from None
    else:
        tokenizer_name = getattr(tokenizer, "name", type(tokenizer).__name__)
    if tokenizer.vocab_size > 2**16:
        raise DataError(f"a vocabulary of {tokenizer.vocab_size} ids does not fit the uint16 token files")
    if tokenizer.eos_id is None:
        raise DataError(f"the tokenizer {tokenizer_name} has no <|endoftext|> token, which ends every document "
                        "in the token files; use a GPT-NeoX-style tokenizer.json that has it")

    out = Path(out_dir) / domain
    writes = SPLITS if split == "auto" else (split,)
    meta = _meta_to_update(out, writes, tokenizer, tokenizer_name)
    out.mkdir(parents=True, exist_ok=True)

    counts = dict.fromkeys(COUNTS, 0)
    problems = []

    def on_problem(problem: Problem) -> None:
        counts[problem.kind] += 1
        if len(problems) < MAX_PROBLEMS_KEPT:
            problems.append(str(problem))
        shown = sum(counts[kind] for kind in ("non_utf8", "malformed", "empty_file", "unreadable"))
        if shown <= MAX_PROBLEMS_SHOWN:
            tqdm.write(f"warning: {problem}", file=sys.stderr)
        if shown == MAX_PROBLEMS_SHOWN:
            tqdm.write("warning: further problems are only counted (see meta.json)", file=sys.stderr)

    files = {name: open(out / f"{name}.bin.tmp", "wb") for name in writes}
    sizes = {name: {"documents": 0, "tokens": 0} for name in writes}
    seen = set()  # 16-byte hashes of the documents kept so far
    batch = []  # (split, text) waiting for the tokenizer

    def tokenize_and_write():
        # allow_special=False: a literal "<|endoftext|>" in a text stays text, so EOS only ends documents
        texts = [text for _, text in batch]
        token_lists = tokenizer.encode_batch(texts, num_threads=num_threads, allow_special=False)
        for (name, _), tokens in zip(batch, token_lists, strict=True):
            tokens.append(tokenizer.eos_id)
            np.asarray(tokens, dtype=np.uint16).tofile(files[name])
            sizes[name]["documents"] += 1
            sizes[name]["tokens"] += len(tokens)
        progress.set_postfix(tokens=f"{sum(s['tokens'] for s in sizes.values()):,}", refresh=False)
        progress.update(len(batch))
        batch.clear()

    documents = itertools.chain.from_iterable(
        read_documents(path, field, template, text_unit, on_problem) for path in inputs
    )
    with tqdm(desc=f"tokenizing {domain}", unit=" docs") as progress:
        try:
            for document in itertools.islice(documents, limit):
                counts["read"] += 1
                text = document.text.strip()
                if not text:
                    counts["empty"] += 1
                    continue
                if len(text) < min_chars:
                    counts["too_short"] += 1
                    continue
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if digest in seen:
                    counts["duplicate"] += 1
                    continue
                seen.add(digest)
                name = split
                if split == "auto":  # the first 8 bytes of the hash, as a number in [0, 1), decide
                    held_out = int.from_bytes(digest[:8], "big") < heldout_fraction * 2**64
                    name = "heldout" if held_out else "train"
                batch.append((name, text))
                if len(batch) == BATCH_DOCUMENTS:
                    tokenize_and_write()
            if batch:
                tokenize_and_write()
        except BaseException:  # e.g. a DataError about the second input: leave the existing files alone
            for name in writes:
                files[name].close()
                (out / f"{name}.bin.tmp").unlink()
            raise
    for f in files.values():
        f.close()
    counts["kept"] = sum(s["documents"] for s in sizes.values())

    prepared = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "inputs": [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in inputs],
        "split": split,
        "heldout_fraction": heldout_fraction if split == "auto" else None,
        "field": field,
        "template": template,
        "text_unit": text_unit,
        "min_chars": min_chars,
        "limit": limit,
        "counts": counts,
        "problems": problems,
    }
    for name in writes:
        meta["splits"][name] = {"file": f"{name}.bin", **sizes[name], "prepared": prepared}
    # meta.json first says which files are being replaced: a kill between the renames and its final
    # version leaves a domain that readers refuse, saying what to do, not files that disagree with it
    write_text_atomically(out / "meta.json", _meta_json({**meta, "preparing": list(writes)}))
    for name in writes:
        (out / f"{name}.bin.tmp").replace(out / f"{name}.bin")  # the old file stays until the new one is whole
    write_text_atomically(out / "meta.json", _meta_json(meta))
    _print_summary(domain, out, writes, sizes, counts)
    return meta


def _meta_to_update(out: Path, writes, tokenizer, tokenizer_name: str) -> dict:
    """The domain's meta.json without the splits that this call writes (a fresh one if there is none)."""
    file = getattr(tokenizer, "path", None)  # (its tokenizer.json, for train.py's checkpoints; None: no file)
    fingerprint = getattr(tokenizer, "vocabulary_sha256", None)  # (what every id stands for; none: the tests' toys)
    info = {"name": tokenizer_name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "file": None if file is None else str(Path(file).resolve()),
            "vocabulary_sha256": fingerprint() if fingerprint else None}
    meta = read_meta(out.parent, out.name, unfinished_ok=True) if (out / "meta.json").exists() else {"splits": {}}
    meta.setdefault("splits", {})
    kept = [name for name in meta["splits"] if name not in writes]
    unfinished = [name for name in meta.get("preparing", ()) if name not in writes]
    if unfinished:  # this call would keep a split whose file may not be the one its metadata describes
        stopped = _being_replaced(meta)
        redo = "--split auto" if len(meta["preparing"]) == len(SPLITS) else f"--split {meta['preparing'][0]}"
        raise DataError(
            f"{out}/meta.json: an earlier `prepare` stopped while replacing {stopped}, so "
            f"{unfinished[0]}.bin may not match meta.json, and this call (--split {writes[0]}) would keep it. "
            f"Run the stopped command again, or another prepare of this domain with {redo}"
        )
    old = meta.get("tokenizer", {})  # (read_meta checked its types: the sha256 is a string or None)
    if kept and not _read_alike((old, old.get("vocabulary_sha256")), (info, info["vocabulary_sha256"])):
        raise DataError(
            f"{out}/{kept[0]}.bin was made with another tokenizer ({old.get('name')}); "
            "prepare all splits again with --split auto, or use the same tokenizer"
        )
    return {
        "domain": out.name,
        "format": "uint16 token ids; every document is followed by the EOS id",
        "tokenizer": info,
        "splits": {name: meta["splits"][name] for name in kept},
    }


def _print_summary(domain, out, writes, sizes, counts) -> None:
    written = [f"{n} {sizes[n]['documents']:,} documents / {sizes[n]['tokens']:,} tokens" for n in writes]
    print(f"{domain}: read {counts['read']:,} documents -> {', '.join(written)}")
    dropped = {k: counts[k] for k in ("empty", "too_short", "duplicate", "malformed") if counts[k]}
    repaired = {k: counts[k] for k in ("non_utf8", "empty_file", "unreadable") if counts[k]}
    said = [f"{what} {found}" for what, found in (("dropped", dropped), ("file problems", repaired)) if found]
    if said:  # (meta.json has the counts, and the first MAX_PROBLEMS_KEPT problems with their lines)
        print(f"  {'; '.join(said)} (see meta.json)")
    print(f"  wrote {', '.join(str(out / f'{n}.bin') for n in writes)} and {out / 'meta.json'}")
    for name in writes:
        if sizes[name]["documents"] == 0:
            print(f"  warning: {out / name}.bin has no documents", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Reading prepared data back


_PREPARE_HINT = "python -m minimamba.data prepare --domain {} --input FILE... --out {}"


def _meta_json(meta: dict) -> str:
    return json.dumps(meta, indent=2, ensure_ascii=False) + "\n"


def read_meta(data_dir: str | Path, domain: str, unfinished_ok: bool = False) -> dict:
    """A domain's meta.json. One left by a `prepare` that stopped while replacing token files is an
    error (its files and meta.json may disagree), unless `unfinished_ok` (prepare itself, redoing it)."""
    path = Path(data_dir) / domain / "meta.json"
    if not path.exists():
        raise DataError(f"{path} not found; prepare the domain first ({_PREPARE_HINT.format(domain, data_dir)})")
    try:
        meta = parse_json(path.read_text(encoding="utf-8"))  # written as UTF-8, whatever the locale
    except ValueError as e:  # (not UTF-8, not JSON, nested too deeply)
        raise DataError(f"{path} is not valid JSON ({e}); delete the folder and prepare it again") from None
    if wrong := _meta_problem(meta):
        raise DataError(f"{path} is not a meta.json that `prepare` writes: {wrong}; delete the folder and prepare "
                        f"it again ({_PREPARE_HINT.format(domain, data_dir)})")
    if meta.get("preparing") and not unfinished_ok:
        raise DataError(f"{path}: `prepare` stopped while replacing {_being_replaced(meta)}, so the "
                        f"token files and meta.json may disagree; prepare the domain again "
                        f"({_PREPARE_HINT.format(domain, data_dir)})")
    return meta


def _meta_problem(meta) -> str | None:
    """What is wrong with the types of the meta.json entries that readers use, or None."""
    def count(value, least):  # (true and false are ints to Python, not counts)
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    if not isinstance(meta, dict):
        return f"it holds a JSON {type(meta).__name__}, not an object"
    tokenizer, splits = meta.get("tokenizer", {}), meta.get("splits", {})
    if not isinstance(tokenizer, dict):
        return f'"tokenizer" is {tokenizer!r}, not an object'
    ok = {"name": isinstance(tokenizer.get("name", ""), str),
          "file": tokenizer.get("file") is None or isinstance(tokenizer["file"], str),
          "vocab_size": count(tokenizer.get("vocab_size", 1), 1),
          "eos_id": tokenizer.get("eos_id") is None or count(tokenizer["eos_id"], 0),
          "vocabulary_sha256": tokenizer.get("vocabulary_sha256") is None or isinstance(tokenizer["vocabulary_sha256"], str)}
    if bad := next((key for key, fine in ok.items() if not fine), None):
        return f'"tokenizer"."{bad}" is {tokenizer[bad]!r}'
    if not isinstance(splits, dict) or not all(isinstance(split, dict) for split in splits.values()):
        return f'"splits" is {str(splits)[:80]}, not an object of objects (one per split)'
    if bad := next((name for name, split in splits.items() if not count(split.get("tokens", 0), 0)), None):
        return f'"splits"."{bad}"."tokens" is {splits[bad]["tokens"]!r}, not a count'
    preparing = meta.get("preparing", [])
    if not isinstance(preparing, list) or not all(isinstance(name, str) and name in SPLITS for name in preparing):
        return f'"preparing" is {preparing!r}, not a list of splits'
    return None


def _being_replaced(meta: dict) -> str:
    """The token files a stopped `prepare` was replacing, as meta.json's "preparing" lists them."""
    return " and ".join(f"{name}.bin" for name in meta["preparing"])


def _prepared_with(data_dir, domain, loaded=None) -> tuple[dict, str | None]:
    """(meta.json's "tokenizer" entry, the `vocabulary_sha256` of the tokenizer that prepared the domain, or None
    where it is not known): the one meta.json keeps, else that of the tokenizer.json it names where that file is
    still there (meta.json of an older `prepare`). `loaded` {file: sha256} keeps a file's for the next domain."""
    info = read_meta(data_dir, domain).get("tokenizer", {})  # (its types checked: the sha256 is a string or None)
    if info.get("vocabulary_sha256") is not None:
        return info, info["vocabulary_sha256"]
    file = info.get("file")
    try:
        here = bool(file) and Path(file).is_file()
    except (OSError, ValueError):  # (a name too long for the filesystem, a NUL byte: a damaged meta.json)
        here = False
    if not here:
        return info, None
    loaded = {} if loaded is None else loaded
    if file not in loaded:
        try:
            loaded[file] = load_tokenizer(file).vocabulary_sha256()
        except (OSError, ValueError) as e:  # (the loader's errors name the file and what is wrong with it)
            raise DataError(f"{Path(data_dir) / domain / 'meta.json'} names the tokenizer that prepared it, which "
                            f"cannot be read now: {e}. Put the file back, or prepare {domain} again") from None
    return info, loaded[file]


def _read_alike(a, b) -> bool:
    """Whether two tokenizers, each (meta.json's "tokenizer" entry, vocabulary sha256 or None) as `_prepared_with`
    gives them, read every id as the same text: by the sha256 where both are known, else by vocabulary size; and
    with the same EOS id."""
    (info_a, sha_a), (info_b, sha_b) = a, b
    same_ids = sha_a == sha_b if sha_a is not None and sha_b is not None else \
        info_a.get("vocab_size") == info_b.get("vocab_size")
    return same_ids and info_a.get("eos_id") == info_b.get("eos_id")


def _tokenizer_known(info) -> bool:
    """Whether meta.json's "tokenizer" entry says enough to compare it (an older or hand-made one may not)."""
    return isinstance(info.get("vocab_size"), int)


def check_prepared_with(data_dir: str | Path, domain: str, tokenizer) -> str | None:
    """Refuse (DataError) the token files of `domain` when meta.json says another tokenizer made them: scoring
    them with `tokenizer` would read each id as another text. Every id must stand for the same bytes in both
    (`Tokenizer.vocabulary_sha256`: a copy of the same tokenizer.json, or the same vocabulary written otherwise,
    passes) where meta.json keeps that fingerprint or names a tokenizer.json that is still there; elsewhere the
    vocabulary size and the EOS id must agree. Returns a note when less than that could be checked, else None."""
    meta_path = Path(data_dir) / domain / "meta.json"
    if not meta_path.exists():
        return f"{meta_path} is missing: the tokenizer that made {domain}'s token files is not known (not checked)"
    theirs = _prepared_with(data_dir, domain)
    info = theirs[0]
    if not _tokenizer_known(info):
        return f"{meta_path} does not say which tokenizer made {domain}'s token files (not checked)"
    made_with = info.get("file") or info.get("name") or "its tokenizer"
    ours = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}, tokenizer.vocabulary_sha256()
    if not _read_alike(theirs, ours):
        why = (f", whose ids stand for other text than {tokenizer.name}'s" if theirs[1] is not None else
               f" ({info.get('vocab_size')} ids, EOS {info.get('eos_id')}), not with {tokenizer.name} "
               f"({tokenizer.vocab_size} ids, EOS {tokenizer.eos_id})")
        raise DataError(f"{meta_path}: {domain}'s token files were prepared with {made_with}{why}: give the tokenizer "
                        f"that prepared them (--tokenizer {made_with}), or prepare {domain} again with this one "
                        f"({tokenizer.name})")
    if theirs[1] is None:
        where = (f"the tokenizer file that prepared it ({info['file']}) is not here" if info.get("file") else
                 f"its meta.json names no tokenizer file ({made_with})")
        return f"{domain}: {where}: only its vocabulary size and EOS id were compared"
    return None


def check_one_tokenizer(data_dir: str | Path, domains) -> None:
    """Refuse (DataError) domains whose token files different tokenizers made, as their meta.json files tell:
    trained on together, one's ids would be read as the other's text. Every pair is compared as `_read_alike`
    compares (a pair of known fingerprints exactly, even where a third domain's is not known). Domains whose
    tokenizer meta.json does not name are not compared."""
    loaded, seen = {}, {}
    for domain in domains:
        if not (Path(data_dir) / domain / "meta.json").exists():
            continue
        this = _prepared_with(data_dir, domain, loaded)
        if not _tokenizer_known(this[0]):
            continue
        for other, that in seen.items():
            if not _read_alike(that, this):
                names = [info.get("file") or info.get("name") for info, _ in (that, this)]
                raise DataError(f"{Path(data_dir) / other} and {Path(data_dir) / domain} were prepared with "
                                f"different tokenizers ({names[0]}, {names[1]}): a model would read one's ids as the "
                                "other's text. Prepare them with the same --tokenizer")
        seen[domain] = this


def ids_needed(data_dir: str | Path, domain: str, split: str) -> tuple[int, str]:
    """How many token ids a model must have to read a split's token file, and where that number comes from:
    the vocabulary size of the tokenizer that prepared it (meta.json), or for a token file without a
    meta.json, its largest id + 1 (read through once)."""
    if (Path(data_dir) / domain / "meta.json").exists():
        tokenizer = read_meta(data_dir, domain).get("tokenizer", {})
        if isinstance(tokenizer.get("vocab_size"), int):
            name = tokenizer.get("name", "its tokenizer")
            return tokenizer["vocab_size"], f"it was prepared with {name}, {tokenizer['vocab_size']} ids (meta.json)"
    ids = load_split(data_dir, domain, split)
    largest = int(ids.max())
    return largest + 1, f"its {split}.bin holds ids up to {largest}"


def load_split(data_dir: str | Path, domain: str, split: str) -> np.memmap:
    """The token ids of one split as a read-only uint16 memmap (documents end with the EOS id)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    path = Path(data_dir) / domain / f"{split}.bin"
    if not path.exists():
        raise DataError(f"{path} not found; prepare it first ({_PREPARE_HINT.format(domain, data_dir)})")
    if path.stat().st_size == 0:
        raise DataError(f"{path} has no tokens: its inputs held no usable document (see meta.json)")
    size = path.stat().st_size
    if (path.parent / "meta.json").exists():
        meta = read_meta(data_dir, domain)  # refuses a domain that `prepare` left half replaced
        tokens = meta.get("splits", {}).get(split, {}).get("tokens")
        if tokens is not None and size != 2 * tokens:  # (cut short by a full disk or a partial copy)
            raise DataError(f"{path} holds {size:,} bytes where meta.json says {tokens:,} tokens "
                            f"({2 * tokens:,} bytes): the file was changed or cut short since it was prepared; "
                            f"prepare the domain again ({_PREPARE_HINT.format(domain, data_dir)})")
    elif size % 2:
        raise DataError(f"{path} holds {size:,} bytes, an odd number: not a file of uint16 token ids (cut short?)")
    return np.memmap(path, dtype=np.uint16, mode="r")


# ----------------------------------------------------------------------------------------------------------
# download: the recipe's real sources (needs internet; resumable, with progress bars)

PUBMED_BASELINE = "https://ftp.ncbi.nlm.nih.gov/pubmed/baseline/"  # pubmedYYnNNNN.xml.gz, ~30,000 citations
C4 = ("datasets/allenai/c4", "1588ec454efa1a09f29cd18ddd04fe05fc8653a2")  # the recipe's revision
WIKIPEDIA = ("datasets/wikimedia/wikipedia", "b04c8d1ceb2f5cd4588862100d08de323dccfbaa")  # the recipe's revision
WIKITEXT = ("datasets/Salesforce/wikitext", "main")
SOURCES = ("pubmed", "c4", "wikipedia", "wikitext103")


def download_source(source: str, out_dir: str | Path, files: int = 1, split: str = "train") -> list[Path]:
    """Download the first `files` files of one source into out_dir/source/; returns their paths.

    pubmed: NCBI PubMed baseline XML (checked against NCBI's .md5 files); c4: allenai/c4 "en" json.gz
    shards of `split` (train or validation); wikipedia: wikimedia/wikipedia 20231101.en parquet shards;
    wikitext103: the WikiText-103 (raw) test set, written as plain text wiki.test.raw.
    """
    out = Path(out_dir) / source
    if files < 1:
        raise DataError(f"files must be at least 1, got {files}")
    if source == "pubmed":
        by_hand = (f"  Copy pubmedYYnNNNN.xml.gz files from it into {out} on a machine with internet, then prepare "
                   f"them directly: python -m minimamba.data prepare --domain pubmed --input {out}/*.xml.gz "
                   "--out data/tokens")
        if offline():  # download() would refuse too, but the listing is never kept: say what to do instead
            raise DownloadError(f"HF_HUB_OFFLINE is set, so the PubMed baseline listing ({PUBMED_BASELINE}) is not "
                                f"fetched.\n{by_hand}")
        (out / "baseline-listing.html").unlink(missing_ok=True)  # (one left by a run killed before its unlink)
        try:
            listing = download(PUBMED_BASELINE, out / "baseline-listing.html", desc="PubMed baseline listing")
        except DownloadError as e:  # (its advice to copy the listing there would not help: it is fetched anew)
            raise DownloadError(f"{str(e).splitlines()[0]}\n{by_hand}") from e
        # an HTML page: only the ASCII file names in it are used
        names = sorted(set(re.findall(r'href="(pubmed\d+n\d{4}\.xml\.gz)"',
                                      listing.read_text(encoding="utf-8", errors="replace"))))
        listing.unlink()  # the listing changes every year: never serve it from a cache
        if not names:
            raise DownloadError(f"found no pubmed*.xml.gz files listed at {PUBMED_BASELINE}")
        paths = []
        for name in names[:files]:
            path = download(PUBMED_BASELINE + name, out / name)
            md5 = download(PUBMED_BASELINE + name + ".md5", out / (name + ".md5"))
            expected = md5.read_text(encoding="utf-8").split()[-1]  # "MD5(pubmed25n0001.xml.gz)= 0123abcd..."
            if hashlib.md5(path.read_bytes()).hexdigest() != expected:
                path.unlink()
                raise DownloadError(f"{path} does not match NCBI's md5 checksum; deleted it, run again to retry")
            paths.append(path)
        return paths
    if source == "c4":
        if split not in ("train", "validation"):
            raise DataError(f"C4 has splits train and validation, not {split!r}")
        shards = 1024 if split == "train" else 8
        names = [f"en/c4-{split}.{i:05d}-of-{shards:05d}.json.gz" for i in range(min(files, shards))]
        return [download(hub_url(C4[0], name, C4[1]), out / Path(name).name) for name in names]
    if source == "wikipedia":
        names = [f"20231101.en/train-{i:05d}-of-00041.parquet" for i in range(min(files, 41))]
        return [download(hub_url(WIKIPEDIA[0], name, WIKIPEDIA[1]), out / Path(name).name) for name in names]
    if source == "wikitext103":
        raw = out / "wiki.test.raw"
        if not raw.exists():
            name = "wikitext-103-raw-v1/test-00000-of-00001.parquet"
            parquet = download(hub_url(WIKITEXT[0], name, WIKITEXT[1]), out / Path(name).name)

            def unreadable(kind, line, message):  # (a wiki.test.raw from part of the file would be wrong)
                raise DataError(f"{parquet}: {message}. Delete it and run again (a server or proxy may have "
                                "sent an error page in its place)")

            rows = [record["text"] for _, record in _parquet_records(parquet, ["text"], unreadable)]
            if not any(rows):
                unreadable(None, None, "no text in it (WikiText-103's test set has 4,358 rows)")
            # a row per line of wiki.test.raw; blank lines are empty rows (dropped, as in shared/data)
            write_text_atomically(raw, "".join(row.rstrip("\n") + "\n" for row in rows if row))
        return [raw]
    raise DataError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")


# ----------------------------------------------------------------------------------------------------------
# Command line


def _next_step(source: str, paths: list[Path], split: str) -> str:
    """How the recipe prepares what was just downloaded."""
    options = {
        "pubmed": "--domain pubmed",  # default template {title}\n\n{abstract}, 5% held out
        "c4": "--domain c4 --split train --min-chars 100" if split == "train" else "--domain c4 --split heldout",
        "wikipedia": "--domain wikipedia --split train --min-chars 100",
        # the paper's Wikipedia held-out set: the test lines of more than 100 characters, stripped
        "wikitext103": "--domain wikipedia --split heldout --text-unit line --min-chars 101",
    }[source]
    return f"python -m minimamba.data prepare {options} --out data/tokens --input {' '.join(map(str, paths))}"


def _at_least_one(text: str) -> int:
    """argparse type of a count: a whole number >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimamba.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="tokenize text files into DIR/NAME/{train,heldout}.bin + meta.json")
    p.add_argument("--domain", required=True, help="this part of the mix, e.g. pubmed, c4, wikipedia")
    p.add_argument("--input", required=True, nargs="+", type=Path,
                   help="input files: .txt (or any other name), .jsonl/.json, .csv, .xml (PubMed), each may be "
                   ".gz, .bz2 or .xz; .parquet")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help=f"tokenizer.json, its folder, or a Hub repo id (default {DEFAULT_TOKENIZER})")
    p.add_argument("--out", required=True, type=Path, help="output folder DIR; files go to DIR/NAME/")
    p.add_argument("--split", default="auto", choices=("auto", *SPLITS),
                   help="auto (default): by a hash of each document; train, heldout: all of it")
    p.add_argument("--heldout-fraction", type=float, default=0.05,
                   help="share of the documents held out by --split auto (default 0.05)")
    record = p.add_mutually_exclusive_group()
    record.add_argument("--field", help="the record field holding the text (default: text)")
    record.add_argument("--template",
                        help=r'build each document from record fields, e.g. "{title}\n\n{abstract}" (the default '
                        r"for PubMed XML); \n and \t are understood")
    units = "; ".join(f"{unit}: {meaning}" for unit, meaning in TEXT_UNITS.items())
    p.add_argument("--text-unit", default="block", choices=TEXT_UNITS, help=f"plain-text files only: {units}")
    p.add_argument("--doc-per-file", action="store_const", dest="text_unit", const="file",
                   help="same as --text-unit file")
    p.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this (default 0)")
    p.add_argument("--limit", type=_at_least_one, help="read only the first N documents of the inputs")
    p.add_argument("--threads", type=_at_least_one, help="tokenizer threads (default: one per CPU)")

    d = commands.add_parser("download", help="download the recipe's sources (needs internet)")
    d.add_argument("--source", required=True, choices=SOURCES)
    d.add_argument("--out", type=Path, default=Path("data/raw"), help="into OUT/SOURCE/ (default data/raw)")
    d.add_argument("--files", type=_at_least_one, default=1,
                   help="how many files: PubMed has ~30,000 citations per file, C4 ~356,000 documents per train "
                   "shard, Wikipedia ~156,000 articles per shard (default 1)")
    d.add_argument("--split", default="train", choices=("train", "validation"), help="C4's split (default train)")

    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template else None
            prepare(
                args.domain, args.input, args.tokenizer, args.out, split=args.split,
                heldout_fraction=args.heldout_fraction, field=args.field, template=template,
                text_unit=args.text_unit, min_chars=args.min_chars, limit=args.limit, num_threads=args.threads,
            )
        else:
            paths = download_source(args.source, args.out, files=args.files, split=args.split)
            print(f"next: {_next_step(args.source, paths, args.split)}")
    except (DataError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

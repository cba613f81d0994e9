r"""The GPT-NeoX-20B tokenizer of the public Mamba2 checkpoints, rebuilt on tiktoken.

    tok = load_tokenizer()                      # "EleutherAI/gpt-neox-20b", or a tokenizer.json / its folder
    ids = tok.encode("Hello world")             # [12092, 1533]
    tok.decode(ids)                             # "Hello world"
    tok.encode_batch(docs)                      # many documents, on every core
    tok.encode("<|endoftext|>")                 # [0]: special-token strings become special ids ...
    tok.encode("<|endoftext|>", allow_special=False)  # ... unless asked not to: [29, 93, 423, 1171, 1156, 49651]

The ids are identical to those of the reference (HF `tokenizers` reading the same tokenizer.json,
`Tokenizer.from_file(path).encode(text).ids`), which the tests check on every document of the shared
corpora and on random Unicode text. HF `tokenizers` itself is only a test-time oracle.

How byte-level BPE works
------------------------
Text is first turned into UTF-8 bytes, so every string is representable and there is no "unknown"
token: the 256 byte values are the smallest tokens. Training then repeatedly found the most frequent
pair of adjacent tokens and merged it into a new token ("t" + "h" -> "th", "th" + "e" -> "the"),
recording the merges in order. Encoding replays them: split the bytes into single-byte tokens, then
merge the adjacent pair that was learnt *earliest*, again and again, until no adjacent pair is a
learnt merge. Two conventions of the GPT-2 family complete the picture: tokens are stored in
tokenizer.json as printable stand-ins for bytes (byte 0x20, the space, is written "Ġ"), and merging
never crosses the boundaries drawn by a pre-tokenizer regex, so " the" and "the" are words of
their own and the merges stay linguistically sensible.

tiktoken runs the same algorithm in Rust, from a table `mergeable_ranks: bytes -> rank`: it merges
the adjacent pair whose concatenation has the lowest rank, and the rank is the token id. Four
pieces of the reference must be reproduced for the ids to be identical:

1. The ranks. GPT-NeoX numbers its tokens in merge order (merge i creates id 245 + i), so the
   vocabulary id, used as the rank, replays the merges in the learnt order; `_mergeable_ranks`
   walks the merges list and refuses a file where this does not hold. Merging by the *result*
   differs from merging by the *pair* in one way: tiktoken would also join pieces a and b whose
   concatenation is a token that the merges build from another split. That cannot happen here.
   Were a and b ever adjacent while encoding some word, the merges applied inside a + b up to
   then would be exactly those that encoding the text a + b alone applies, and that would stop
   at [a, b]; but every token encodes to itself under the merges (the tests check all 50,254).
2. The pre-tokenizer regex. HF's ByteLevel pre-tokenizer (use_regex=true) splits text with GPT-2's
   regex into contractions, an optional space + letters, an optional space + digits, an optional
   space + other symbols, and whitespace, where `\s+(?!\S)` leaves the last space of a run to
   the word after it. add_prefix_space=false: no space is put in front of the text; trim_offsets
   changes character offsets only, never ids. See `_pattern`.
3. The normalisation. The reference applies Unicode NFC (canonical composition: "e" + U+0301
   becomes "é") before pre-tokenizing, so decomposed and precomposed text give the same ids.
   Its NFC tables are those of Unicode 9.0: a character assigned since then is unknown to it,
   left alone, and nothing composes or reorders across it. `_nfc` reproduces this with Python's
   newer tables by normalising the text between such characters separately.
4. The added tokens, matched before pre-tokenizing and never merged with their neighbours.
   `<|endoftext|>` (id 0, the end of a document) and `<|padding|>` (id 1) are cut out of the raw
   text, longest first, before NFC, which then normalises each part between them on its own.
   The 23 tokens made of 2 to 24 spaces (ids 50276 down to 50254, for indented code) are found
   in the normalised text, longest first, so 30 spaces are 24 + 6, and the text around them is
   pre-tokenized apart. Their flags lstrip / rstrip / single_word (absorb neighbouring
   whitespace, match whole words only) are all off. Rather than cutting the space runs out
   first, `_pattern` adds ` {2,24}` (greedy: longest first) to the regex and keeps its
   whitespace alternatives from consuming a space followed by another; this yields the same
   pieces and keeps all of the splitting in tiktoken's Rust (but for whitespace runs of 100,000+
   characters, which its regex engine cannot take: see `Tokenizer._encode_ordinary`).

So encode(text) = cut out the special tokens; NFC each part; tiktoken: regex pieces, then BPE.
"""

import hashlib
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tiktoken

from minimamba.files import parse_json

DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
SURROGATE = re.compile("[\ud800-\udfff]")  # halves of a character (UTF-16's), which a str can hold


class Tokenizer:
    """Text <-> token ids, as the reference gives them. `encoding` is the tiktoken.Encoding underneath:
    its encode_ordinary() wants text that is already NFC and holds no special tokens (encode() sees to both)."""

    def __init__(self, encoding: tiktoken.Encoding, special_tokens: dict[str, int], name: str = "",
                 longest_space_run: int = 1, path: Path | None = None):
        self.encoding = encoding
        self.path = path  # the tokenizer.json it was built from (load_tokenizer: the Hub's cached copy for an id)
        self.longest_space_run = longest_space_run  # the longest space-run added token (24 for GPT-NeoX)
        self.special_tokens = special_tokens  # matched in the raw text, before normalisation
        self.name = name
        self.vocab_size = encoding.n_vocab  # 50277 for GPT-NeoX (the model's embedding is padded to 50288)
        self.eos_id = special_tokens.get("<|endoftext|>")
        self.pad_id = special_tokens.get("<|padding|>")
        # longest first, so that a special token that contains another one wins (leftmost-longest)
        alternatives = sorted(special_tokens, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        self._token_bytes = None  # (token_bytes, made on first use)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`. Special-token strings ("<|endoftext|>") become their special id, as in
        the reference; with allow_special=False they are encoded as ordinary text instead. Text with
        an unpaired surrogate (half of a character, e.g. from a JSON escape "\\ud800") is refused, as
        the reference refuses it: it is not Unicode text, and has no UTF-8 bytes to encode."""
        if not isinstance(text, str):  # (bytes: "cannot use a string pattern on a bytes-like object"; None: no isascii)
            fix = "decode the bytes first (data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else (
                "for a list of texts use encode_batch" if isinstance(text, (list, tuple)) else "pass a str")
            raise TypeError(f"encode takes one text (a str), got {type(text).__name__}: {fix}")
        if not text.isascii() and (half := SURROGATE.search(text)):
            raise ValueError(f"text holds an unpaired surrogate ({half.group()!a}) at position {half.start()}: half "
                             "of a character, not Unicode text. Replace such halves first, e.g. "
                             "minimamba.tokenizer.SURROGATE.sub('\\ufffd', text)")
        if allow_special and self.special_tokens:
            parts = self._special_split.split(text)  # [text, special, text, special, ..., text]
            if len(parts) > 1:
                ids = []
                for i, part in enumerate(parts):
                    if i % 2:
                        ids.append(self.special_tokens[part])
                    elif part:
                        ids.extend(self._encode_ordinary(_nfc(part)))
                return ids
        return self._encode_ordinary(_nfc(text))

    def _encode_ordinary(self, text: str) -> list[int]:
        r"""encoding.encode_ordinary(text), also for text with whitespace runs too long for tiktoken's regex.

        Its regex engine gives up (a Rust panic, which no `except Exception` catches) on a run of about a
        million whitespace characters other than spaces, which the look-ahead alternative `\s+(?!\S)`
        walks back through. Such runs (`_LONG_WHITESPACE`, far shorter than that) are cut here into the
        pieces the regex would cut them into (`_whitespace_pieces`), each merged by tiktoken's BPE
        alone; the text around them goes through the regex as usual. Every cut is one the regex makes
        too, so the ids are those of the whole text (tests/test_tokenizer.py compares with the reference)."""
        if len(text) < _LONG_WHITESPACE_RUN or not (runs := list(_LONG_WHITESPACE.finditer(text))):
            return self.encoding.encode_ordinary(text)  # (almost always)
        ids, start = [], 0
        for run in runs:  # (each a whole run: it starts after a non-whitespace character, or the text)
            ids += self.encoding.encode_ordinary(text[start:run.start()])
            pieces, end = _whitespace_pieces(run.group(), self.longest_space_run), run.end()
            if end < len(text) and not pieces[-1].startswith("  "):
                # the last stretch meets the text after it: the regex ends it one character early
                # (`(?!\S)`), and that character is a piece of its own or, a space, joins the word after
                # it. Both happen when the regex reads it with that text.
                last = pieces.pop()
                pieces += [last[:-1]] if len(last) > 1 else []
                end -= 1
            for piece in pieces:
                ids += self.encoding._encode_single_piece(piece)  # BPE without the regex
            start = end
        return ids + self.encoding.encode_ordinary(text[start:])

    def encode_batch(self, texts, num_threads: int | None = None, allow_special: bool = True) -> list[list[int]]:
        """[encode(text, allow_special) for text in texts], in parallel threads (tiktoken releases the
        GIL while it splits and merges, so the threads really run at the same time)."""
        if isinstance(texts, (str, bytes)):  # (a list of its characters would be encoded, one text each)
            raise TypeError("encode_batch takes a list of texts, got one text; use encode(text) for one")
        texts = list(texts)
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive number of threads (or None: one per CPU), "
                             f"got {num_threads!r}")
        num_threads = num_threads or os.cpu_count() or 1
        if num_threads == 1 or len(texts) < 2:
            return [self.encode(t, allow_special) for t in texts]
        # a few large tasks per thread rather than one per text: per-task overhead matters for short texts
        size = -(-len(texts) // (8 * num_threads))  # ceil: about 8 tasks per thread
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(num_threads) as pool:
            done = pool.map(lambda chunk: [self.encode(t, allow_special) for t in chunk], chunks)
            return [ids for chunk_ids in done for ids in chunk_ids]

    def decode(self, ids) -> str:
        """Text of `ids` (one id, a list, or anything with .tolist() such as a 0-d or 1-d tensor or array).
        Special tokens are kept as their strings; bytes that are not valid UTF-8 become U+FFFD; ids outside
        the vocabulary (such as the model's padding rows, 50277..50287) are skipped, as in the reference."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], (list, tuple)):
            raise TypeError("decode takes one sequence of ids; for a batch, decode each row "
                            "([tok.decode(row) for row in ids])")
        try:
            return self.encoding.decode(ids)
        except (KeyError, OverflowError):
            return self.encoding.decode([i for i in ids if 0 <= i < self.vocab_size])

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for, by id (a special token: its string's UTF-8; an id the vocabulary
        leaves unused: b""). Two tokenizers with the same list read every id as the same text."""
        if self._token_bytes is None:  # (~20 ms for GPT-NeoX; eval.py asks for it once per domain, and once more)
            out = []
            for i in range(self.vocab_size):
                try:
                    out.append(self.encoding.decode_single_token_bytes(i))
                except KeyError:  # (no token has this id)
                    out.append(b"")
            self._token_bytes = tuple(out)
        return list(self._token_bytes)  # (a new list: the caller may change it)

    def vocabulary_sha256(self) -> str:
        """A fingerprint of what every id stands for (`token_bytes`, in id order): two tokenizers with the same one
        read every id as the same text. `prepare` keeps it in meta.json; train.py and eval.py compare it."""
        return hashlib.sha256("\n".join(b.hex() for b in self.token_bytes()).encode("ascii")).hexdigest()

    def byte_lengths(self) -> list[int]:
        """The UTF-8 bytes of text each id stands for, by id: 0 for special tokens (a document boundary is
        no text) and unused ids. What a token adds to the denominator of bits per byte."""
        special = set(self.special_tokens.values())
        return [0 if i in special else len(b) for i, b in enumerate(self.token_bytes())]

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_TOKENIZER) -> Tokenizer:
    """The tokenizer described by a HF tokenizer.json: a path to the file, a directory holding it, or
    a Hub repo id such as "EleutherAI/gpt-neox-20b" (downloaded once into the weights' cache)."""
    path = tokenizer_file(name_or_path)
    spec = _read_tokenizer_json(path)
    return _build(spec, name=str(name_or_path), path=path)


def checkpoint_tokenizer(checkpoint: str | os.PathLike) -> str:
    """The tokenizer that goes with a model checkpoint when none is named (eval.py's --model, sft.py's --init):
    the tokenizer.json in its folder (train.py and sft.py put there the one their data were made with), else
    the recipe's DEFAULT_TOKENIZER (the public checkpoints come without one)."""
    local = Path(checkpoint).expanduser() / "tokenizer.json"
    return str(local) if local.is_file() else DEFAULT_TOKENIZER


def tokenizer_file(name_or_path: str | os.PathLike) -> Path:
    """Where the tokenizer.json that `load_tokenizer` reads for `name_or_path` is: the path itself, the file in
    a directory, or a Hub repo's (downloaded once into the weights' cache). Not checked to exist or be valid."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path / "tokenizer.json"
    if not path.exists() and _looks_like_repo_id(str(name_or_path)):
        from minimamba.download import hub_file_or_local  # only Hub users need the network code

        return hub_file_or_local(str(name_or_path), "tokenizer.json")
    return path


def _looks_like_repo_id(name: str) -> bool:
    """ "owner/name" as the Hub spells repo ids; "dir/tokenizer.json" or "./x" stay local paths."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) is not None and not name.endswith(".json")


# ---------------------------------------------------------------------------------------------
# tokenizer.json -> tiktoken.Encoding

EXPECTED = (
    "expected a Hugging Face tokenizer.json (a JSON object with a byte-level BPE 'model' holding "
    "'vocab' and 'merges', as in EleutherAI/gpt-neox-20b)"
)


def _read_tokenizer_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}: {EXPECTED}, or a directory holding one")
    try:
        spec = parse_json(path.read_text(encoding="utf-8"))
    except ValueError as e:  # (not UTF-8, not JSON, nested too deeply)
        raise ValueError(f"{path} is not valid JSON ({e}): {EXPECTED}") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not {"vocab", "merges"} <= model.keys():
        raise ValueError(f"{path} has no byte-level BPE model with 'vocab' and 'merges': {EXPECTED}")
    if wrong := _structure_problem(spec):
        raise ValueError(f"{path}: {wrong}: {EXPECTED}")
    return spec


def _structure_problem(spec: dict) -> str | None:
    """What is wrong with the JSON types of the entries that `_build` reads, or None. (Also two tokens with
    one id, which tiktoken would not refuse but abort the whole program on: a Rust panic.)"""
    def is_id(value):  # (true and false are ints to Python, not ids; tiktoken keeps ids in 32 bits)
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32

    for key in ("normalizer", "pre_tokenizer", "post_processor"):
        if not isinstance(spec.get(key) or {}, dict):
            return f"{key} is {spec[key]!r}, not a JSON object"
    model = spec["model"]
    vocab, merges, added = model["vocab"], model["merges"], spec.get("added_tokens") or []
    if not isinstance(vocab, dict) or not all(is_id(id_) for id_ in vocab.values()):
        return "model.vocab is not a JSON object of token -> id (a whole number from 0 to 2**32 - 1)"
    if not isinstance(merges, list) or not all(
            isinstance(m, str) or isinstance(m, list) and all(isinstance(part, str) for part in m) for m in merges):
        return "model.merges is not a list of merges, each \"left right\" or [\"left\", \"right\"]"
    if not isinstance(added, list) or not all(
            isinstance(tok, dict) and isinstance(tok.get("content"), str) and is_id(tok.get("id")) for tok in added):
        return "added_tokens is not a list of objects with a \"content\" string and an \"id\" (0 to 2**32 - 1)"
    tokens_of = {}  # id -> the tokens with that id (an added token is in the vocab too, with the same id)
    for token, id_ in [*vocab.items(), *((tok["content"], tok["id"]) for tok in added)]:
        tokens_of.setdefault(id_, set()).add(token)
    if (shared := next((id_ for id_, tokens in tokens_of.items() if len(tokens) > 1), None)) is not None:
        return f"id {shared} belongs to several tokens: {sorted(tokens_of[shared])[:3]}"
    return None


def _build(spec: dict, name: str, path: Path) -> Tokenizer:
    def unsupported(what):
        return ValueError(f"{path}: {what} is not supported: minimamba reproduces GPT-NeoX's byte-level BPE ({EXPECTED})")

    # the pieces of the pipeline that must be exactly GPT-NeoX's
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise unsupported(f"normalizer {spec['normalizer']}")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise unsupported(f"pre_tokenizer {pre}")
    post = spec.get("post_processor") or {}
    if post.get("type", "ByteLevel") != "ByteLevel":  # e.g. a template that adds BOS/EOS tokens
        raise unsupported(f"post_processor {post}")
    if spec.get("truncation") or spec.get("padding"):
        raise unsupported("truncation / padding in the file")
    model = spec["model"]
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise unsupported("BPE dropout / subword prefix / word suffix")
    ranks = _mergeable_ranks(model, path)
    added_ids = {tok["id"] for tok in spec.get("added_tokens") or []}
    if orphans := set(model["vocab"].values()) - set(ranks.values()) - added_ids:
        raise ValueError(f"{path}: vocab ids {sorted(orphans)[:5]}... are neither bytes, merges nor added tokens")

    special_tokens, space_runs = {}, {}
    for tok in spec.get("added_tokens") or []:
        content, id_ = tok["content"], tok["id"]
        if tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
            raise unsupported(f"added token {content!r} with lstrip/rstrip/single_word")
        if not tok.get("normalized", True) and tok.get("special"):
            special_tokens[content] = id_  # matched in the raw text
        elif content.strip(" ") == "" and len(content) >= 2:
            space_runs[len(content)] = id_  # matched after NFC, inside the regex (see _pattern)
        else:
            raise unsupported(f"added token {content!r} (only special tokens and runs of spaces are)")
    if space_runs and sorted(space_runs) != list(range(2, max(space_runs) + 1)):
        raise unsupported(f"space-run added tokens of lengths {sorted(space_runs)} (expected 2..n)")
    for n, id_ in space_runs.items():
        ranks[b" " * n] = id_  # reached only as a whole regex piece, never by merging

    encoding = tiktoken.Encoding(
        name=f"minimamba:{name}",
        pat_str=_pattern(max(space_runs, default=1)),
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
    )
    return Tokenizer(encoding, special_tokens, name=name, longest_space_run=max(space_runs, default=1), path=path)


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as written in tokenizer.json: printable Latin-1
    bytes stand for themselves, the other 68 bytes (controls, space, ...) map to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(stand_ins)) for b in range(256)}


def _mergeable_ranks(model: dict, path: Path) -> dict[bytes, int]:
    """tiktoken's table (token bytes -> rank = id), checked to replay the merges list in order."""
    char_to_byte = {c: b for b, c in _byte_to_char().items()}

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(char_to_byte[c] for c in token)
        except KeyError:
            raise ValueError(f"{path}: vocab entry {token!r} is not byte-level (GPT-2 byte stand-ins)") from None

    vocab = model["vocab"]
    ranks = {to_bytes(tok): id_ for tok, id_ in vocab.items() if len(tok) == 1}  # the single bytes
    # every byte of valid UTF-8 needs a token (C0, C1 and F5..FF never occur, and GPT-NeoX has none)
    if missing := set(range(256)) - {0xC0, 0xC1, *range(0xF5, 256)} - {b for b, in ranks}:
        raise ValueError(f"{path}: the vocab has no token for the bytes {sorted(missing)}: some text could not be encoded")
    last_id = max(ranks.values(), default=-1)
    for i, merge in enumerate(model["merges"]):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if len(parts) != 2:
            raise ValueError(f"{path}: merge #{i} {merge!r} is not two tokens: {EXPECTED}")
        left, right = parts
        id_ = vocab.get(left + right)
        if id_ is None or id_ <= last_id or to_bytes(left) not in ranks or to_bytes(right) not in ranks:
            raise ValueError(
                f"{path}: merge #{i} {left!r} + {right!r} does not create the next token in id order; "
                "tiktoken needs token ids that follow the merge order"
            )
        ranks[to_bytes(left + right)] = last_id = id_
    return ranks


def _pattern(longest_space_run: int) -> str:
    r"""tiktoken's pat_str: the pre-tokenizer regex of HF ByteLevel (use_regex=true), which is GPT-2's

        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+

    with the space-run tokens folded in. A regex takes the first alternative that matches, so the
    order matters only where two alternatives can match at the same place. Words come first (most
    pieces are words), and the alternatives without a look-ahead are grouped, so that tiktoken's
    regex library hands them to its fast engine in one go: 1.5-2x faster than in GPT-2's order.
    """
    ws = r"\s"
    if longest_space_run >= 2:
        ws = r"(?:(?! {2})\s)"  # a whitespace character that does not start a run of spaces
    simple = [
        r" ?\p{L}+",  # a word, with the space before it
        r" ?\p{N}+",  # a number, with the space before it
        r"'s|'t|'re|'ve|'m|'ll|'d",  # a contraction; before the next line, which also matches "'"
        r" ?[^\s\p{L}\p{N}]+",  # other symbols, with the space before them
    ]
    if longest_space_run >= 2:
        simple.append(f" {{2,{longest_space_run}}}")  # a space-run token, longest first
    whitespace = [
        rf"{ws}+(?!\S)",  # whitespace, but the last space before a word goes with the word
        r"\s+",  # reached only for one whitespace character before a non-space
    ]
    return "|".join([f"(?:{'|'.join(simple)})", *whitespace])


# Runs of at least this many whitespace characters are split into pieces in Python (`_encode_ordinary`);
# \s as the regex means it: Unicode's White_Space (Python's str \s adds U+001C..U+001F, which are not)
_LONG_WHITESPACE_RUN = 100_000
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_LONG_WHITESPACE = re.compile(f"[{_WHITESPACE}]{{{_LONG_WHITESPACE_RUN},}}")


def _whitespace_pieces(run: str, longest_space_run: int) -> list[str]:
    r"""The pieces `_pattern`'s regex cuts `run` into, for a run of whitespace characters that starts the
    text or follows a non-whitespace character, if it ends the text. No alternative that takes a letter,
    digit or symbol can match in it, and `(?!\S)` holds everywhere in it, so what is left is: a run of 2
    to `longest_space_run` spaces is a piece (the space-run tokens, longest first, and no look-ahead),
    and so is every stretch between them. (With no space-run tokens, the whole run is one piece.)
    Where text follows the run, only the last piece can differ: see `Tokenizer._encode_ordinary`."""
    if longest_space_run < 2:
        return [run]
    pieces, i = [], 0
    while i < len(run):
        j = i
        if run.startswith("  ", i):  # a space-run token
            while j < len(run) and run[j] == " " and j - i < longest_space_run:
                j += 1
        else:  # whitespace up to the next two spaces
            while j < len(run) and not run.startswith("  ", j):
                j += 1
        pieces.append(run[i:j])
        i = j
    return pieces


# ---------------------------------------------------------------------------------------------
# NFC as the reference computes it


def _nfc(text: str) -> str:
    """NFC as the reference computes it, with Unicode 9.0's tables, here from Python's newer ones.

    A character's normalisation data never changes once it is assigned (Unicode's stability
    policy), so the two agree on characters that Unicode 9.0 already had. One assigned later is
    unknown to the reference: no decomposition, combining class 0, so nothing composes or
    reorders across it and the text on either side is normalised on its own; we do the same.
    Text that Python finds already NFC is returned as is: the reference agrees, because every
    piece of NFC text is NFC (the tests check every character that normalisation can touch).
    """
    if text.isascii() or unicodedata.is_normalized("NFC", text):  # fast checks, true for most text
        return text
    parts = _AFTER_UNICODE_9.split(text)  # [part, newer char, part, newer char, ..., part]
    return "".join(p if i % 2 else unicodedata.normalize("NFC", p) for i, p in enumerate(parts))


# The characters assigned in Unicode 10.0 to 16.0 that take part in canonical normalisation (a
# nonzero combining class, or in a canonical decomposition), from Unicode 16.0's UnicodeData.txt and
# DerivedAge.txt. Python 3.11 knows those up to 14.0 and 3.14 all of them; a Python with Unicode 17
# may need more, which the NFC test would show.
_AFTER_UNICODE_9 = re.compile(
    "(["
    "\u07fd\u0897-\u089f\u08ca-\u08d3\u09fe\u0c3c\u0d3b-\u0d3c\u0eba\u1715\u1abf-\u1ace\u1df6-\u1dfa\ua82c"
    "\U000105c9\U000105d2\U000105da\U000105e4\U00010d24-\U00010d27\U00010d69-\U00010d6d\U00010eab-\U00010eac"
    "\U00010efd-\U00010eff\U00010f46-\U00010f50\U00010f82-\U00010f85\U00011070\U0001133b\U00011382-\U00011385"
    "\U0001138b\U0001138e\U00011390-\U00011391\U000113b8\U000113bb\U000113c2\U000113c5\U000113c7-\U000113c9"
    "\U000113ce-\U000113d0\U0001145e\U00011839-\U0001183a\U00011930\U00011935\U00011938\U0001193d-\U0001193e"
    "\U00011943\U000119e0\U00011a34\U00011a47\U00011a99\U00011d42\U00011d44-\U00011d45\U00011d97"
    "\U00011f41-\U00011f42\U0001611e-\U00016129\U0001612f\U00016d63\U00016d67-\U00016d6a\U00016ff0-\U00016ff1"
    "\U0001e08f\U0001e130-\U0001e136\U0001e2ae\U0001e2ec-\U0001e2ef\U0001e4ec-\U0001e4ef\U0001e5ee-\U0001e5ef"
    "])"
)

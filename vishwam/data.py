"""Text data for training: sources -> tokens -> packed rows -> a resumable iterator.

The flow, one stage per section of this file::

    Source        default corpus | .txt files | .jsonl/.parquet/.csv (DuckDB) | in-memory texts
      -> tokenize_source()   batch-encode, EOS after every document, cached as .npy
      -> split_documents()   hash-based train/validation split by document
      -> PackedRows          rows of seq_len + 1 tokens cut on demand from the token stream
      -> DataIterator        shuffled batches, state()/restore(), process sharding, prefetch

`make_datasets()` runs all of it for the trainer and returns `(train, val)` iterators.

A batch is a dict of numpy arrays, each `[batch, seq_len]`:

- `tokens` (int32): model inputs; `targets` (int32): the next token of each input;
- `segment_ids` (int32): which document piece of the row a token belongs to (1, 2, ...;
  0 is padding), so `model(tokens, segment_ids=..., positions=...)` never attends
  across documents;
- `positions` (int32): index of the token inside its document piece (restarts at 0);
- `loss_mask` (float32): 1 where the target is the next token of the same document
  piece, 0 where it belongs to another piece or is padding.
"""

import abc
import codecs
import dataclasses
import glob
import hashlib
import json
import os
import queue
import re
import shutil
import threading
import uuid
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np

Batch = dict[str, np.ndarray]
"""`tokens, targets, segment_ids, positions` (int32) and `loss_mask` (float32), all `[batch, seq]`."""

_TABLE_READERS = {
    ".jsonl": "read_json_auto",
    ".ndjson": "read_json_auto",
    ".json": "read_json_auto",
    ".parquet": "read_parquet",
    ".csv": "read_csv_auto",
    ".tsv": "read_csv_auto",
}


# ============================================================================ sources


def default_corpus() -> list[str]:
    """The built-in corpus: one document per topic of CPython's `pydoc_data.topics`.

    About 0.5 MB of English (the language reference's topic pages), present in
    every CPython install, so nothing is downloaded. Documents are ordered by
    topic name, so the list is identical across runs and machines with the same
    Python version. Empty topics are skipped.
    """
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics) if topics[name].strip()]


class SourceText(NamedTuple):
    """What a `Source` read: its documents and how many undecodable bytes were replaced."""

    documents: list[str]
    replaced: int


class Source(abc.ABC):
    """A collection of text documents.

    `fingerprint()` is a sha256 hex digest of everything that decides the
    documents (file contents and reading options, not file names or times); it
    keys the token cache, so it must change whenever `read()` would return
    something different. `read()` returns the documents in a deterministic order;
    empty documents are skipped.
    """

    @abc.abstractmethod
    def fingerprint(self) -> str: ...

    @abc.abstractmethod
    def read(self) -> SourceText: ...


@dataclasses.dataclass(frozen=True)
class DefaultCorpus(Source):
    """`default_corpus()` as a source."""

    def fingerprint(self) -> str:
        return _hash_texts("DefaultCorpus", default_corpus())

    def read(self) -> SourceText:
        return SourceText(default_corpus(), 0)


@dataclasses.dataclass(frozen=True)
class Texts(Source):
    """Documents held in memory, one string each."""

    texts: tuple[str, ...]

    def __init__(self, texts: Sequence[str]):
        if isinstance(texts, str):
            raise TypeError("Texts(texts) takes a sequence of documents, got one string; "
                            "wrap it in a list: Texts([text]).")
        object.__setattr__(self, "texts", tuple(texts))

    def __repr__(self) -> str:
        return f"Texts(<{len(self.texts)} documents>)"

    def fingerprint(self) -> str:
        return _hash_texts("Texts", self.texts)

    def read(self) -> SourceText:
        return SourceText([t for t in self.texts if t], 0)


@dataclasses.dataclass(frozen=True)
class TextFiles(Source):
    """Plain-text files: one document per file, or per `separator`-delimited piece.

    Arguments:
        patterns: file paths or globs (`**` recurses); matches are sorted per
            pattern and a file matched twice is read once.
        separator: if given, each file is split on this exact string (e.g.
            `"\\n\\n"` or `"<|endoftext|>"`) and every non-empty piece is a document.
        encoding: the files' text encoding.
        errors: `"replace"` turns each undecodable byte into U+FFFD, counts them
            (`SourceText.replaced`, `TokenizedCorpus.replaced`) and warns;
            `"strict"` raises a `ValueError` naming the file and byte offset.
    """

    patterns: tuple[str, ...]
    separator: str | None = None
    encoding: str = "utf-8"
    errors: Literal["replace", "strict"] = "replace"

    def __init__(self, patterns: "str | os.PathLike | Sequence[str | os.PathLike]", *,
                 separator: str | None = None, encoding: str = "utf-8",
                 errors: Literal["replace", "strict"] = "replace"):
        if errors not in ("replace", "strict"):
            raise ValueError(f"TextFiles(errors={errors!r}): choose 'replace' or 'strict'.")
        if separator == "":
            raise ValueError("TextFiles(separator=''): an empty separator cannot split; "
                             "pass None for one document per file.")
        codecs.lookup(encoding)
        object.__setattr__(self, "patterns", _patterns(patterns))
        object.__setattr__(self, "separator", separator)
        object.__setattr__(self, "encoding", encoding)
        object.__setattr__(self, "errors", errors)

    def _files(self) -> list[str]:
        files = _expand(self.patterns)
        tables = [f for f in files if Path(f).suffix.lower() in _TABLE_READERS]
        if tables:
            raise ValueError(f"TextFiles{self.patterns} matched table files {tables[:3]}; "
                             "read those with TableFiles(...) (DuckDB) or narrow the glob to text files.")
        return files

    def fingerprint(self) -> str:
        options = {"kind": "TextFiles", "separator": self.separator, "encoding": self.encoding,
                   "errors": self.errors}
        return _hash_files(options, self._files())

    def read(self) -> SourceText:
        documents, replaced, per_file = [], 0, []
        for path in self._files():
            text, bad = _decode(Path(path).read_bytes(), self.encoding, self.errors, path)
            if bad:
                replaced += bad
                per_file.append(f"{path}: {bad}")
            pieces = [text] if self.separator is None else text.split(self.separator)
            documents.extend(p for p in pieces if p)
        if replaced:
            warnings.warn(f"TextFiles: replaced {replaced} undecodable byte(s) with U+FFFD "
                          f"({'; '.join(per_file[:5])}{' ...' if len(per_file) > 5 else ''}). "
                          f"Pass encoding=... if the files are not {self.encoding}, or errors='strict' "
                          "to fail instead.", stacklevel=2)
        return SourceText(documents, replaced)


@dataclasses.dataclass(frozen=True)
class TableFiles(Source):
    """`.jsonl`/`.json`/`.ndjson`, `.parquet` or `.csv`/`.tsv` files read through DuckDB.

    Every matched file (all of one format) is exposed as a view named `data`
    (`read_json_auto`, `read_parquet` or `read_csv_auto` over the file list).
    Without `query`, the documents are the `text_column` of `data`; with
    `query`, any SQL over `data` whose result has a column named `text_column`
    or exactly one column, e.g.
    `"SELECT title || '\\n\\n' || body AS text FROM data WHERE lang = 'en' ORDER BY id"`.
    Rows come in file order then row order unless the query orders them.
    NULL and empty values are skipped. DuckDB validates UTF-8 itself, so
    undecodable bytes in these files are always an error (re-encode the file,
    or read it as text with `TextFiles`).
    """

    patterns: tuple[str, ...]
    text_column: str = "text"
    query: str | None = None

    def __init__(self, patterns: "str | os.PathLike | Sequence[str | os.PathLike]", *,
                 text_column: str = "text", query: str | None = None):
        object.__setattr__(self, "patterns", _patterns(patterns))
        object.__setattr__(self, "text_column", text_column)
        object.__setattr__(self, "query", query)

    def _files(self) -> tuple[list[str], str]:
        files = _expand(self.patterns)
        readers = {Path(f).suffix.lower(): _TABLE_READERS.get(Path(f).suffix.lower()) for f in files}
        unknown = sorted(ext or "(none)" for ext, reader in readers.items() if reader is None)
        if unknown:
            raise ValueError(f"TableFiles{self.patterns}: cannot read extension(s) {unknown}; "
                             f"supported: {sorted(_TABLE_READERS)}. Use TextFiles for plain text.")
        if len(set(readers.values())) > 1:
            raise ValueError(f"TableFiles{self.patterns} matched files of several formats "
                             f"({sorted(readers)}); use one TableFiles per format.")
        return files, next(iter(readers.values()))

    def fingerprint(self) -> str:
        options = {"kind": "TableFiles", "text_column": self.text_column, "query": self.query}
        return _hash_files(options, self._files()[0])

    def read(self) -> SourceText:
        import duckdb

        files, reader = self._files()
        file_list = "[" + ", ".join(_sql_string(f) for f in files) + "]"
        with duckdb.connect() as con:
            try:
                con.execute(f"CREATE VIEW data AS SELECT * FROM {reader}({file_list})")
                sql = self.query if self.query is not None else "SELECT * FROM data"
                schema = con.execute(f"DESCRIBE {sql}").fetchall()
            except duckdb.Error as e:
                raise ValueError(f"TableFiles{self.patterns}: DuckDB could not read {files[:3]} "
                                 f"with {reader}{' and the query ' + repr(self.query) if self.query else ''}: "
                                 f"{e}. Check the file format and encoding (UTF-8 only) and the SQL.") from e
            columns = {name: kind for name, kind, *_ in schema}
            if self.text_column in columns:
                column = self.text_column
            elif self.query is not None and len(columns) == 1:
                column = next(iter(columns))
            else:
                where = "the query result" if self.query is not None else f"{files[0]}"
                raise ValueError(f"TableFiles: no column {self.text_column!r} in {where}; its columns are "
                                 f"{list(columns)}. Pass text_column=<one of those>, or a query "
                                 "selecting the text.")
            if columns[column] != "VARCHAR":
                raise ValueError(f"TableFiles: column {column!r} has type {columns[column]}, not text "
                                 f"(VARCHAR); choose a text column or cast it in query=...")
            rows = con.execute(f"SELECT {_sql_identifier(column)} FROM ({sql})").fetchall()
        return SourceText([value for (value,) in rows if value], 0)


def as_source(source: "Source | str | os.PathLike | Sequence[str | os.PathLike] | None") -> Source:
    """Turns what a user passes as `source` into a `Source`.

    `None` is the default corpus; a `Source` is itself; a path or glob (or a
    list of them) is `TableFiles` when its extension is one DuckDB reads
    (`.jsonl .ndjson .json .parquet .csv .tsv`), otherwise `TextFiles`.
    In-memory documents must be wrapped: `Texts([...])`.
    """
    if source is None:
        return DefaultCorpus()
    if isinstance(source, Source):
        return source
    patterns = _patterns(source)
    tables = [Path(p).suffix.lower() in _TABLE_READERS for p in patterns]
    if all(tables):
        return TableFiles(patterns)
    if any(tables):
        raise ValueError(f"as_source({list(patterns)}): mixes table files and text files; "
                         "build a TextFiles and a TableFiles separately.")
    return TextFiles(patterns)


def _patterns(value) -> tuple[str, ...]:
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, Sequence):
        raise TypeError(f"expected a path, a glob or a list of them, got {type(value).__name__}; "
                        "wrap in-memory documents as Texts([...]).")
    patterns = tuple(os.fspath(v) for v in value)
    if not patterns:
        raise ValueError("no file patterns given; pass a path or a glob such as 'data/*.txt'.")
    return patterns


def _expand(patterns: tuple[str, ...]) -> list[str]:
    files: dict[str, None] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            raise IsADirectoryError(f"{pattern!r} is a directory; pass a glob such as "
                                    f"{os.path.join(pattern, '*.txt')!r}.")
        matches = sorted(m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m))
        if not matches:
            raise FileNotFoundError(f"no files match {pattern!r} (working directory {os.getcwd()}); "
                                    "check the path or the glob.")
        files.update(dict.fromkeys(matches))
    return list(files)


def _decode(raw: bytes, encoding: str, errors: str, path: str) -> tuple[str, int]:
    try:
        return raw.decode(encoding), 0
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise ValueError(f"{path}: bytes {e.start}-{e.end} are not valid {encoding} ({e.reason}). "
                             "Pass encoding=... for the file's real encoding, or errors='replace'.") from e
    # surrogateescape maps each undecodable byte to one lone surrogate, which valid
    # text never contains, so the substitutions can be counted exactly.
    text = raw.decode(encoding, "surrogateescape")
    return re.subn("[\udc80-\udcff]", "\ufffd", text)


def _hash_texts(kind: str, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(kind.encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _hash_files(options: dict[str, Any], files: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in files:
        digest.update(os.path.getsize(path).to_bytes(8, "little"))
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_identifier(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


# ====================================================================== tokenisation


@runtime_checkable
class TokenizerLike(Protocol):
    """What the pipeline needs from a tokenizer (`VishwamAITokenizer` has it)."""

    eos_id: int
    pad_id: int
    vocab_size: int
    fingerprint: str

    def batch_encode(self, texts: list[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """A tokenised source: every document's tokens followed by EOS, back to back.

    Document `i` is `tokens[offsets[i]:offsets[i + 1]]` (its last token is
    `eos_id`). Arrays read from the cache are read-only memory maps.
    """

    tokens: np.ndarray
    """`[num_tokens]` uint16 when the vocabulary fits, else int32."""
    offsets: np.ndarray
    """`[num_documents + 1]` int64 document boundaries."""
    doc_hashes: np.ndarray
    """`[num_documents]` uint64 hash of each document's text: the split key."""
    eos_id: int
    pad_id: int
    vocab_size: int
    key: str
    """sha256 of the source fingerprint, tokenizer fingerprint and tokenising options."""
    replaced: int
    """Undecodable bytes the source replaced with U+FFFD."""
    from_cache: bool
    """True when the tokens were read from an existing cache entry."""

    @property
    def num_documents(self) -> int:
        return len(self.doc_hashes)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


_CACHE_VERSION = 1


def tokenize_source(source: "Source | str | os.PathLike | Sequence[str | os.PathLike] | None",
                    tokenizer: object, *, cache_dir: "str | os.PathLike | None" = None,
                    add_bos: bool = False, chunk_chars: int = 1 << 20) -> TokenizedCorpus:
    """Tokenises every document of `source` (see `as_source`), appending EOS to each.

    `tokenizer` is a `TokenizerLike` (checked here, with a message naming what
    is missing). Documents are encoded with `tokenizer.batch_encode` in chunks of about
    `chunk_chars` characters. With `cache_dir`, the result is stored once in
    `cache_dir/<key>/` (`tokens.npy`, `offsets.npy`, `doc_hashes.npy`,
    `meta.json`), where `key` hashes the source fingerprint, the tokenizer
    fingerprint and `add_bos`; the entry is written in a temporary folder and
    renamed into place, so a crash never leaves half an entry. A later call with
    the same key memory-maps it instead of tokenising; an entry whose metadata
    does not match (another tokenizer, another source, corruption) is discarded
    with a warning and rebuilt. Packing options are not part of the key: the
    cache holds document tokens, which any `seq_len` reuses.
    """
    source = as_source(source)
    if not isinstance(tokenizer, TokenizerLike):
        missing = [a for a in ("batch_encode", "eos_id", "pad_id", "vocab_size", "fingerprint")
                   if not hasattr(tokenizer, a)]
        raise TypeError(f"tokenize_source: the tokenizer ({type(tokenizer).__name__}) lacks {missing}; "
                        "pass a VishwamAITokenizer or an object with the same attributes.")
    vocab_size = int(tokenizer.vocab_size)
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)
    meta = {
        "version": _CACHE_VERSION,
        "source": source.fingerprint(),
        "tokenizer": str(tokenizer.fingerprint),
        "add_bos": bool(add_bos),
        "dtype": dtype.name,
        "eos_id": int(tokenizer.eos_id),
        "pad_id": int(tokenizer.pad_id),
        "vocab_size": vocab_size,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    meta["key"] = key

    if cache_dir is not None:
        entry = Path(cache_dir) / key
        if entry.exists():
            try:
                return _load_entry(entry, meta)
            except (OSError, ValueError, KeyError) as e:
                warnings.warn(f"ignoring the token cache entry {entry}: {e}; re-tokenising.", stacklevel=2)
                shutil.rmtree(entry, ignore_errors=True)

    text = source.read()
    if not text.documents:
        raise ValueError(f"{source!r} produced no documents (every file or value was empty); "
                         "check the files or the query.")
    tokens, offsets = _encode(text.documents, tokenizer, add_bos, dtype, vocab_size, chunk_chars)
    doc_hashes = np.array([_doc_hash(d) for d in text.documents], dtype=np.uint64)
    meta |= {"num_documents": len(text.documents), "num_tokens": int(len(tokens)),
             "replaced": text.replaced, "source_repr": repr(source)}
    if cache_dir is None:
        return _corpus(tokens, offsets, doc_hashes, meta, from_cache=False)

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(cache_dir) / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, array in (("tokens", tokens), ("offsets", offsets), ("doc_hashes", doc_hashes)):
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.rename(tmp, entry)
        except OSError:
            # Another process renamed its identical entry first: keep theirs.
            if not entry.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    corpus = _load_entry(entry, meta)
    return dataclasses.replace(corpus, from_cache=False)


def _encode(documents: list[str], tokenizer: TokenizerLike, add_bos: bool, dtype: np.dtype,
            vocab_size: int, chunk_chars: int) -> tuple[np.ndarray, np.ndarray]:
    eos, flat, lengths = int(tokenizer.eos_id), [], []
    start = 0
    while start < len(documents):
        stop, size = start, 0
        while stop < len(documents) and (stop == start or size + len(documents[stop]) <= chunk_chars):
            size += len(documents[stop])
            stop += 1
        for ids in tokenizer.batch_encode(documents[start:stop], add_bos=add_bos, add_eos=False):
            flat.extend(ids)
            flat.append(eos)
            lengths.append(len(ids) + 1)
        start = stop
    tokens = np.array(flat, dtype=np.int64)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"the tokenizer produced ids in [{low}, {high}], outside its vocab_size="
                         f"{vocab_size}; the tokenizer model and its vocab_size disagree.")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return tokens.astype(dtype), offsets


def _doc_hash(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _load_entry(entry: Path, expected: dict[str, Any]) -> TokenizedCorpus:
    meta = json.loads((entry / "meta.json").read_text())
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"metadata mismatch (stored, expected): {wrong}")
    tokens = np.load(entry / "tokens.npy", mmap_mode="r", allow_pickle=False)
    offsets = np.load(entry / "offsets.npy", allow_pickle=False)
    doc_hashes = np.load(entry / "doc_hashes.npy", allow_pickle=False)
    if (tokens.dtype.name != meta["dtype"] or len(tokens) != meta["num_tokens"]
            or len(doc_hashes) != meta["num_documents"] or len(offsets) != len(doc_hashes) + 1
            or offsets[-1] != len(tokens)):
        raise ValueError(f"arrays do not match meta.json (tokens {tokens.dtype}{tokens.shape}, "
                         f"offsets {offsets.shape}, doc_hashes {doc_hashes.shape})")
    return _corpus(tokens, offsets, doc_hashes, meta, from_cache=True)


def _corpus(tokens, offsets, doc_hashes, meta, *, from_cache: bool) -> TokenizedCorpus:
    return TokenizedCorpus(tokens=tokens, offsets=offsets, doc_hashes=doc_hashes,
                           eos_id=meta["eos_id"], pad_id=meta["pad_id"], vocab_size=meta["vocab_size"],
                           key=meta["key"], replaced=meta["replaced"], from_cache=from_cache)


# ============================================================================= split


def split_documents(doc_hashes: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split by document.

    A document goes to validation when its text hash, read as a number in
    [0, 1), is below `val_fraction`. The decision depends on the document's
    text alone, so adding, removing or reordering other documents never moves
    it, and duplicated documents land on the same side. When `val_fraction > 0`
    but no document falls below it (tiny corpora), the document with the
    smallest hash becomes the validation set, so validation is never empty.

    Returns:
        `(train_indices, val_indices)`, int64 document indices in ascending order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    hashes = np.asarray(doc_hashes, dtype=np.uint64)
    unit = (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53
    is_val = unit < val_fraction
    if val_fraction > 0 and not is_val.any() and len(hashes) > 1:
        is_val[np.argmin(hashes)] = True
    train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(train) == 0:
        raise ValueError(f"the split left no training documents ({len(hashes)} document(s), "
                         f"val_fraction={val_fraction}); lower val_fraction or add documents.")
    return train, val


# =========================================================================== packing


class PackedRows:
    """Rows of `seq_len + 1` tokens cut from the token stream of some documents.

    The chosen documents (each already ending in EOS) are concatenated in
    order; row `r` is tokens `[r * (seq_len + 1), (r + 1) * (seq_len + 1))` of
    that stream, so every token appears in exactly one row, in order. A
    document longer than the rest of a row continues at the start of the next
    row. Only the last row can be short: it is padded with `pad_id` (segment 0,
    masked out), or dropped with `drop_remainder=True`.

    Inside a row, each document piece gets a segment id (1, 2, ...) and
    positions 0, 1, ... that restart at every piece, including the continuation
    of a document from the previous row: a piece cannot attend to its earlier
    part, so counting on would give it positions the model never sees with
    that context at inference. Rows are built on demand (`batch`) from the
    token array, which may be a read-only memory map.
    """

    def __init__(self, corpus: TokenizedCorpus, documents: "np.ndarray | None" = None, *,
                 seq_len: int, drop_remainder: bool = False):
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
        docs = np.arange(corpus.num_documents) if documents is None else np.asarray(documents, np.int64)
        if len(docs) == 0:
            raise ValueError("PackedRows: no documents selected; the split or the source is empty.")
        lengths = corpus.offsets[docs + 1] - corpus.offsets[docs]
        self.corpus = corpus
        self.seq_len = seq_len
        self._doc_start = corpus.offsets[docs]
        self._stream_start = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._stream_start[1:])
        self.num_tokens = int(self._stream_start[-1])
        """Tokens in the chosen documents (EOS included), padding excluded."""
        row = seq_len + 1
        self.num_rows = self.num_tokens // row if drop_remainder else -(-self.num_tokens // row)
        if self.num_rows == 0:
            raise ValueError(f"PackedRows: {self.num_tokens} tokens do not fill one row of seq_len + 1 = "
                             f"{row}; use a smaller seq_len, more data, or drop_remainder=False.")
        self.fingerprint = hashlib.sha256(
            f"{corpus.key}:{seq_len}:{drop_remainder}:".encode() + docs.tobytes()).hexdigest()
        """Identifies the rows: corpus key, chosen documents and packing options."""

    def __len__(self) -> int:
        return self.num_rows

    def batch(self, rows: np.ndarray) -> Batch:
        """The packed rows `rows` (int indices; -1 gives an all-padding row) as a `Batch`."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (len(rows) and (rows.min() < -1 or rows.max() >= self.num_rows)):
            raise IndexError(f"row indices must be a 1-D array in [-1, {self.num_rows}), got "
                             f"shape {rows.shape} with range [{rows.min(initial=0)}, {rows.max(initial=0)}].")
        width = self.seq_len + 1
        row_start = rows * width  # (B,)
        index = row_start[:, None] + np.arange(width)  # (B, L+1): stream positions
        valid = (rows[:, None] >= 0) & (index < self.num_tokens)
        index = np.clip(index, 0, self.num_tokens - 1)
        doc = np.searchsorted(self._stream_start, index, side="right") - 1  # (B, L+1)
        within = index - self._stream_start[doc]
        tokens = np.asarray(self.corpus.tokens[self._doc_start[doc] + within], dtype=np.int32)
        piece_start = np.maximum(self._stream_start[doc], row_start[:, None])
        positions = (index - piece_start).astype(np.int32)
        segments = (doc - doc[:, :1] + 1).astype(np.int32)
        tokens = np.where(valid, tokens, np.int32(self.corpus.pad_id))
        segments = np.where(valid, segments, 0)
        positions = np.where(valid, positions, 0)
        same_piece = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
        return {
            "tokens": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": segments[:, :-1],
            "positions": positions[:, :-1],
            "loss_mask": same_piece.astype(np.float32),
        }


# ========================================================================== iterator


class _End:
    """Queue marker: a finite iterator has no more batches."""


class _Schedule:
    """Which rows make up each batch: the pure function behind `DataIterator`.

    The prefetch thread gets its own copy (its own permutation cache), so it
    shares no mutable state with the consumer.
    """

    def __init__(self, rows: PackedRows, batch_size: int, local_batch_size: int, seed: int,
                 shuffle: bool, repeat: bool, process_index: int):
        self.rows, self.batch_size, self.local_batch_size = rows, batch_size, local_batch_size
        self.seed, self.shuffle, self.repeat, self.process_index = seed, shuffle, repeat, process_index
        self._orders: dict[int, np.ndarray] = {}

    def copy(self) -> "_Schedule":
        return _Schedule(self.rows, self.batch_size, self.local_batch_size, self.seed, self.shuffle,
                         self.repeat, self.process_index)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            n = self.rows.num_rows
            self._orders[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n)
                                   if self.shuffle else np.arange(n))
        return self._orders[epoch]

    def exhausted(self, position: int) -> bool:
        return not self.repeat and position * self.batch_size >= self.rows.num_rows

    def batch(self, position: int) -> Batch:
        first = position * self.batch_size + self.process_index * self.local_batch_size
        slots = first + np.arange(self.local_batch_size)
        n = self.rows.num_rows
        if self.repeat:
            epochs = slots // n
            rows = np.empty_like(slots)
            for epoch in np.unique(epochs):
                here = epochs == epoch
                rows[here] = self._order(int(epoch))[slots[here] % n]
        else:
            rows = np.where(slots < n, slots, -1)
        return self.rows.batch(rows)


class DataIterator:
    """Deterministic, resumable batches of `PackedRows`, prefetched on a thread.

    Global batch `b` is made of the rows at slots `b * batch_size ...
    (b + 1) * batch_size - 1` of an endless sequence of epochs; epoch `e` lists
    every row once, in the order `np.random.default_rng([seed, e]).permutation`
    (or in order without `shuffle`). A batch may straddle two epochs, so no row
    is ever skipped. This process yields the `batch_size // process_count` rows
    of slot range `process_index`, so the processes together see each global
    batch exactly once. Every batch is a pure function of its index, which is
    why `state()` is just that index plus the settings it must match.

    With `repeat=False` (validation) the iterator walks one unshuffled epoch and
    stops; the last batch is filled with all-padding rows (`loss_mask` 0), so
    every batch has the same shape and every row is seen once. `len()` is the
    number of batches; `reset()` starts over.

    `prefetch > 0` computes that many batches ahead on a daemon thread (a
    bounded queue); an exception there is re-raised by `next()` (with a note),
    and the next call restarts from the failed batch. `close()` (or leaving a
    `with` block, or dropping the iterator) stops the thread.
    """

    def __init__(self, rows: PackedRows, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 repeat: bool = True, process_index: int | None = None, process_count: int | None = None,
                 prefetch: int = 2):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is the global batch and must be divisible by "
                             f"process_count={process_count}; use a multiple of {process_count}.")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}.")
        self.rows = rows
        self.batch_size = batch_size
        """Global batch size (all processes); each batch here has `local_batch_size` rows."""
        self.local_batch_size = batch_size // process_count
        self.seed, self.shuffle, self.repeat = int(seed), bool(shuffle), bool(repeat)
        self.process_index, self.process_count = process_index, process_count
        self.prefetch = prefetch
        self._schedule = _Schedule(rows, batch_size, self.local_batch_size, self.seed, self.shuffle,
                                   self.repeat, process_index)
        self._position = 0
        self._worker: tuple[threading.Thread, threading.Event, queue.Queue, weakref.finalize] | None = None
        self._closed = False

    def __len__(self) -> int:
        if self.repeat:
            raise TypeError("a repeating DataIterator is endless; len() exists only with repeat=False.")
        return -(-self.rows.num_rows // self.batch_size)

    @property
    def position(self) -> int:
        """Index of the next global batch."""
        return self._position

    @property
    def epoch(self) -> int:
        """Epoch of the first row of the next batch."""
        return self._position * self.batch_size // self.rows.num_rows

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one local batch, padding included."""
        return self.local_batch_size * self.rows.seq_len

    def batch_at(self, position: int) -> Batch:
        """This process's batch number `position` (what `next()` yields there)."""
        return self._schedule.batch(position)

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("this DataIterator is closed; build a new one (and restore() its "
                               "state) to continue.")
        if self.prefetch == 0:
            if self._schedule.exhausted(self._position):
                raise StopIteration
            batch = self._schedule.batch(self._position)
        else:
            if self._worker is None:
                self._start()
            item = self._worker[2].get()
            if isinstance(item, BaseException):
                self._stop()
                item.add_note(f"(raised in the vishwam.data prefetch thread at batch {self._position})")
                raise item
            if item is _End:
                self._stop()
                raise StopIteration
            position, batch = item
            assert position == self._position, (position, self._position)
        self._position += 1
        return batch

    def _start(self):
        stop, buffer = threading.Event(), queue.Queue(maxsize=self.prefetch)
        # The thread holds no reference to `self`, so an iterator dropped
        # without close() is collected and the finalizer stops its thread.
        thread = threading.Thread(target=_produce, args=(self._schedule.copy(), self._position, stop, buffer),
                                  name="vishwam-data-prefetch", daemon=True)
        self._worker = (thread, stop, buffer, weakref.finalize(self, stop.set))
        thread.start()

    def _stop(self):
        if self._worker is None:
            return
        thread, stop, _, finalizer = self._worker
        stop.set()
        thread.join()
        finalizer.detach()
        self._worker = None

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position; `restore` on an iterator over the same rows continues here."""
        return {"format": "vishwam.data.DataIterator/1", "position": self._position, "seed": self.seed,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "repeat": self.repeat,
                "rows": self.rows.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from `state()` of an iterator over the same rows and settings.

        The process index and count may differ (resuming on another number of
        hosts): the position counts global batches.
        """
        mine = self.state()
        wrong = {k: (state.get(k), mine[k]) for k in mine if k != "position" and state.get(k) != mine[k]}
        if wrong:
            raise ValueError(f"DataIterator.restore: the state was saved with other data or settings "
                             f"(saved, current): {wrong}. Rebuild the iterator with the same source, "
                             "tokenizer, seq_len, split, seed and batch_size, or start afresh.")
        position = state.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ValueError(f"DataIterator.restore: position must be an integer >= 0, got {position!r}.")
        self._stop()
        self._position = position

    def reset(self) -> None:
        """Back to batch 0 (e.g. before each validation pass)."""
        self._stop()
        self._position = 0

    def close(self) -> None:
        """Stops the prefetch thread; the iterator cannot be used afterwards."""
        self._stop()
        self._closed = True

    def __enter__(self) -> "DataIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _produce(schedule: _Schedule, position: int, stop: threading.Event, buffer: queue.Queue):
    def put(item) -> bool:
        # Polls `stop` so close() never waits on a full queue.
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    try:
        while not stop.is_set():
            if schedule.exhausted(position):
                put(_End)
                return
            if not put((position, schedule.batch(position))):
                return
            position += 1
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
        put(e)


# =========================================================================== builder


def make_datasets(tokenizer: object,
                  source: "Source | str | os.PathLike | Sequence[str | os.PathLike] | None" = None, *,
                  seq_len: int, batch_size: int, val_fraction: float = 0.05, seed: int = 0,
                  cache_dir: "str | os.PathLike | None" = None, val_batch_size: int | None = None,
                  add_bos: bool = False, drop_remainder: bool = False, process_index: int | None = None,
                  process_count: int | None = None, prefetch: int = 2) -> tuple[DataIterator, DataIterator | None]:
    """Train and validation iterators over `source` (default corpus when None).

    `tokenizer` is a `TokenizerLike` such as `VishwamAITokenizer`. Tokenises
    (or loads from `cache_dir`, see `tokenize_source`), splits by document hash
    (`split_documents`), packs each split (`PackedRows`) and wraps them:
    training repeats and reshuffles every epoch from `seed`; validation is one
    ordered pass (`len(val)` batches, `val.reset()` before each pass), or None
    when `val_fraction == 0`. `batch_size` and `val_batch_size` (default
    `batch_size`) are global; each process (default: `jax.process_index()` of
    `jax.process_count()`) gets its share.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
    for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    corpus = tokenize_source(source, tokenizer, cache_dir=cache_dir, add_bos=add_bos)
    train_docs, val_docs = split_documents(corpus.doc_hashes, val_fraction)
    common = dict(seed=seed, process_index=process_index, process_count=process_count, prefetch=prefetch)
    train = DataIterator(PackedRows(corpus, train_docs, seq_len=seq_len, drop_remainder=drop_remainder),
                         batch_size=batch_size, **common)
    if len(val_docs) == 0:
        return train, None
    val = DataIterator(PackedRows(corpus, val_docs, seq_len=seq_len),
                       batch_size=val_batch_size or batch_size, shuffle=False, repeat=False, **common)
    return train, val

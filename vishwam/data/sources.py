"""Sources: where documents come from (the built-in corpus, text files, DuckDB tables, memory)."""

import abc
import codecs
import dataclasses
import glob
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ..errors import InvalidTypeError, InvalidValueError

_TABLE_READERS = {
    ".jsonl": "read_json_auto",
    ".ndjson": "read_json_auto",
    ".json": "read_json_auto",
    ".parquet": "read_parquet",
    ".csv": "read_csv_auto",
    ".tsv": "read_csv_auto",
}
_FETCH_ROWS = 512  # rows per DuckDB fetch when streaming


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
    empty documents are skipped. `stream()` yields the same documents in the same
    order in pieces of about `chunk_chars` characters, holding about one piece in
    memory (the library's sources; a subclass that does not override it yields
    `read()` whole). `num_documents()` is the count when it is cheap to know (for
    a progress bar's ETA), else None.
    """

    @abc.abstractmethod
    def fingerprint(self) -> str: ...

    @abc.abstractmethod
    def read(self) -> SourceText: ...

    def stream(self, chunk_chars: int = 1 << 20) -> Iterator[SourceText]:
        yield self.read()

    def num_documents(self) -> int | None:
        return None


@dataclasses.dataclass(frozen=True)
class DefaultCorpus(Source):
    """`default_corpus()` as a source."""

    def fingerprint(self) -> str:
        return _hash_texts("DefaultCorpus", default_corpus())

    def read(self) -> SourceText:
        return SourceText(default_corpus(), 0)

    def stream(self, chunk_chars: int = 1 << 20) -> Iterator[SourceText]:
        yield from _pieces(iter(default_corpus()), chunk_chars)

    def num_documents(self) -> int:
        return len(default_corpus())


@dataclasses.dataclass(frozen=True)
class Texts(Source):
    """Documents held in memory, one string each."""

    texts: tuple[str, ...]

    def __init__(self, texts: Sequence[str]):
        if isinstance(texts, str):
            raise InvalidTypeError("Texts(texts) takes a sequence of documents, got one string; "
                                   "wrap it in a list: Texts([text]).")
        object.__setattr__(self, "texts", tuple(texts))

    def __repr__(self) -> str:
        return f"Texts(<{len(self.texts)} documents>)"

    def fingerprint(self) -> str:
        return _hash_texts("Texts", self.texts)

    def read(self) -> SourceText:
        return SourceText([t for t in self.texts if t], 0)

    def stream(self, chunk_chars: int = 1 << 20) -> Iterator[SourceText]:
        yield from _pieces((t for t in self.texts if t), chunk_chars)

    def num_documents(self) -> int:
        return sum(1 for t in self.texts if t)


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
            raise InvalidValueError(f"TextFiles(errors={errors!r}): choose 'replace' or 'strict'.")
        if separator == "":
            raise InvalidValueError("TextFiles(separator=''): an empty separator cannot split; "
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
            raise InvalidValueError(f"TextFiles{self.patterns} matched table files {tables[:3]}; "
                                    "read those with TableFiles(...) (DuckDB) or narrow the glob to text files.")
        return files

    def fingerprint(self) -> str:
        options = {"kind": "TextFiles", "separator": self.separator, "encoding": self.encoding,
                   "errors": self.errors}
        return _hash_files(options, self._files())

    def read(self) -> SourceText:
        documents, replaced, per_file = [], 0, []
        for path in self._files():
            raw = Path(path).read_bytes()
            _refuse_binary(raw, path)
            text, bad = _decode(raw, self.encoding, self.errors, path)
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

    def stream(self, chunk_chars: int = 1 << 20) -> Iterator[SourceText]:
        """Like `read()`, reading each file in blocks; a document is held whole (one file
        without `separator`, one piece with it), so the bound is the largest document."""
        per_file = []
        for path in self._files():
            bad = 0
            for documents, replaced in _pieces(self._file_documents(path, chunk_chars), chunk_chars):
                bad += replaced
                yield SourceText(documents, replaced)
            if bad:
                per_file.append((path, bad))
        if per_file:
            warnings.warn(f"TextFiles: replaced {sum(n for _, n in per_file)} undecodable byte(s) with U+FFFD "
                          f"({'; '.join(f'{p}: {n}' for p, n in per_file[:5])}"
                          f"{' ...' if len(per_file) > 5 else ''}). Pass encoding=... if the files are not "
                          f"{self.encoding}, or errors='strict' to fail instead.", stacklevel=2)

    def num_documents(self) -> int | None:
        return len(self._files()) if self.separator is None else None

    def _file_documents(self, path: str, block_bytes: int) -> Iterator[tuple[str, int]]:
        """`(document, replaced bytes)` of one file, decoded block by block."""
        strict = self.errors == "strict"
        decoder = codecs.getincrementaldecoder(self.encoding)("strict" if strict else "surrogateescape")
        carry, fed = "", 0
        with open(path, "rb") as f:
            _refuse_binary(f.read(8192), path)  # the same check as `read()`, on the file's head
            f.seek(0)
            while True:
                block = f.read(max(block_bytes, 1 << 16))
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    start = fed - pending + e.start
                    raise InvalidValueError(f"{path}: bytes {start}-{fed - pending + e.end} are not valid {self.encoding} "
                                            f"({e.reason}). Pass encoding=... for the file's real encoding, or "
                                            "errors='replace'.") from e
                fed += len(block)
                text, bad = (text, 0) if strict else re.subn("[\udc80-\udcff]", "\ufffd", text)
                carry += text
                if self.separator is not None:
                    *done, carry = carry.split(self.separator)
                    for piece in done:
                        if piece:
                            yield piece, bad
                            bad = 0
                if bad:
                    yield "", bad  # counted now; empty documents are dropped by `_pieces`
                if not block:
                    break
        if carry:
            yield carry, 0


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
            raise InvalidValueError(f"TableFiles{self.patterns}: cannot read extension(s) {unknown}; "
                                    f"supported: {sorted(_TABLE_READERS)}. Use TextFiles for plain text.")
        if len(set(readers.values())) > 1:
            raise InvalidValueError(f"TableFiles{self.patterns} matched files of several formats "
                                    f"({sorted(readers)}); use one TableFiles per format.")
        return files, next(iter(readers.values()))

    def fingerprint(self) -> str:
        options = {"kind": "TableFiles", "text_column": self.text_column, "query": self.query}
        return _hash_files(options, self._files()[0])

    def read(self) -> SourceText:
        import duckdb

        with duckdb.connect() as con:
            rows = con.execute(self._select(con)).fetchall()
        return SourceText([value for (value,) in rows if value], 0)

    def stream(self, chunk_chars: int = 1 << 20) -> Iterator[SourceText]:
        """Like `read()`, fetching rows in batches (DuckDB streams a plain scan; an
        `ORDER BY` in `query` makes it sort first, spilling to disk if it must)."""
        import duckdb

        def rows():
            with duckdb.connect() as con:
                result = con.execute(self._select(con))
                while batch := result.fetchmany(_FETCH_ROWS):
                    for (value,) in batch:
                        if value:
                            yield value, 0

        yield from _pieces(rows(), chunk_chars)

    def num_documents(self) -> int | None:
        import duckdb

        with duckdb.connect() as con:
            return con.execute(f'SELECT count(*) FROM ({self._select(con)}) WHERE length("text") > 0').fetchone()[0]

    def _select(self, con) -> str:
        """Creates the `data` view on `con`, checks the text column; returns the SQL of the texts."""
        import duckdb

        files, reader = self._files()
        file_list = "[" + ", ".join(_sql_string(f) for f in files) + "]"
        try:
            con.execute(f"CREATE VIEW data AS SELECT * FROM {reader}({file_list})")
            sql = self.query if self.query is not None else "SELECT * FROM data"
            schema = con.execute(f"DESCRIBE {sql}").fetchall()
        except duckdb.Error as e:
            raise InvalidValueError(f"TableFiles{self.patterns}: DuckDB could not read {files[:3]} "
                                    f"with {reader}{' and the query ' + repr(self.query) if self.query else ''}: "
                                    f"{e}. Check the file format and encoding (UTF-8 only) and the SQL.") from e
        columns = {name: kind for name, kind, *_ in schema}
        if self.text_column in columns:
            column = self.text_column
        elif self.query is not None and len(columns) == 1:
            column = next(iter(columns))
        else:
            where = "the query result" if self.query is not None else f"{files[0]}"
            raise InvalidValueError(f"TableFiles: no column {self.text_column!r} in {where}; its columns are "
                                    f"{list(columns)}. Pass text_column=<one of those>, or a query "
                                    "selecting the text.")
        if columns[column] != "VARCHAR":
            raise InvalidValueError(f"TableFiles: column {column!r} has type {columns[column]}, not text "
                                    f"(VARCHAR); choose a text column or cast it in query=...")
        return f'SELECT {_sql_identifier(column)} AS "text" FROM ({sql})'


def as_source(source: "Source | str | os.PathLike | Sequence[str | os.PathLike] | None", *,
              separator: str | None = None) -> Source:
    """Turns what a user passes as `source` into a `Source`.

    `None` is the default corpus; a `Source` is itself; a path or glob (or a
    list of them) is `TableFiles` when its extension is one DuckDB reads
    (`.jsonl .ndjson .json .parquet .csv .tsv`), otherwise `TextFiles` (split into
    documents at `separator`, else one document per file); a list mixing both is
    `Sources([TableFiles(...), TextFiles(...)])`. In-memory documents must be
    wrapped: `Texts([...])`.
    """
    if source is None:
        return DefaultCorpus()
    if isinstance(source, Source):
        return source
    patterns = _patterns(source)
    tables = [p for p in patterns if Path(p).suffix.lower() in _TABLE_READERS]
    texts = [p for p in patterns if Path(p).suffix.lower() not in _TABLE_READERS]
    if not texts:
        return TableFiles(tables)
    if not tables:
        return TextFiles(texts, separator=separator)
    return Sources([TableFiles(tables), TextFiles(texts, separator=separator)])


@dataclasses.dataclass(frozen=True)
class Sources(Source):
    """Several sources read one after the other, as one."""

    parts: tuple[Source, ...]

    def __init__(self, parts: Sequence[Source]):
        if not parts or not all(isinstance(p, Source) for p in parts):
            raise InvalidTypeError(f"Sources(parts) takes a non-empty sequence of Source objects, got {parts!r}.")
        object.__setattr__(self, "parts", tuple(parts))

    def fingerprint(self) -> str:
        return _hash_texts("Sources", [part.fingerprint() for part in self.parts])

    def read(self) -> SourceText:
        texts = [part.read() for part in self.parts]
        return SourceText([d for t in texts for d in t.documents], sum(t.replaced for t in texts))

    def stream(self, chunk_chars: int = 1 << 20) -> Iterator[SourceText]:
        for part in self.parts:
            yield from part.stream(chunk_chars)

    def num_documents(self) -> int | None:
        counts = [part.num_documents() for part in self.parts]
        return None if None in counts else sum(counts)


def _pieces(documents: Iterator, chunk_chars: int) -> Iterator[SourceText]:
    """Groups documents (strings, or `(string, replaced)` pairs) into `SourceText`s of about
    `chunk_chars` characters (at least one document each); empty documents are dropped."""
    batch, size, replaced = [], 0, 0
    for item in documents:
        text, bad = (item, 0) if isinstance(item, str) else item
        replaced += bad
        if text:
            batch.append(text)
            size += len(text)
        if size >= chunk_chars:
            yield SourceText(batch, replaced)
            batch, size, replaced = [], 0, 0
    if batch or replaced:
        yield SourceText(batch, replaced)


def _patterns(value) -> tuple[str, ...]:
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, Sequence):
        raise InvalidTypeError(f"expected a path, a glob or a list of them, got {type(value).__name__}; "
                               "wrap in-memory documents as Texts([...]).")
    patterns = tuple(os.fspath(v) for v in value)
    if not patterns:
        raise InvalidValueError("no file patterns given; pass a path or a glob such as 'data/*.txt'.")
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


def _refuse_binary(raw: bytes, path: str) -> None:
    """Text has no NUL bytes; a file with some is a database, an archive or an image, not a corpus."""
    if raw[8:12] == b"DUCK":
        raise InvalidValueError(f"{path} is a DuckDB database file, not a text or table file; export the table "
                                "first (in duckdb: COPY my_table TO 'corpus.parquet') and pass that.")
    if b"\x00" in raw[:8192]:
        raise InvalidValueError(f"{path} is a binary file (it holds NUL bytes), not text; pass text files, or "
                                ".jsonl/.parquet/.csv tables.")


def _decode(raw: bytes, encoding: str, errors: str, path: str) -> tuple[str, int]:
    try:
        return raw.decode(encoding), 0
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise InvalidValueError(f"{path}: bytes {e.start}-{e.end} are not valid {encoding} ({e.reason}). "
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
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_identifier(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'

"""Tokenisation and the on-disk token cache: a source's documents as one EOS-separated token array."""

import collections
import dataclasses
import hashlib
import io
import itertools
import json
import os
import queue
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vishwam.data.encode_pool import EncodePool, encode_chunk, usable_cores, worker_spec
from vishwam.data.handoff import put_unless_stopped
from vishwam.data.sources import Source, SourceText, as_source
from vishwam.tokenizer.protocol import TokenizerLike as TokenizerLike

from ..errors import InvalidTypeError, InvalidValueError


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
                    add_bos: bool = False, chunk_chars: int = 1 << 20, progress: bool = False,
                    workers: int | None = None) -> TokenizedCorpus:
    """Tokenises every document of `source` (see `as_source`), appending EOS to each.

    `tokenizer` is a `TokenizerLike` (checked here, with a message naming what
    is missing). The source is streamed (`Source.stream`): pieces of about
    `chunk_chars` characters are read, encoded with one `tokenizer.batch_encode`
    call each while the next piece is read on a thread, and appended to the output,
    so memory holds a few pieces, not the corpus. A source of more than one piece is
    encoded by `workers` processes (None: one per usable core; 1: in this process
    with SentencePiece's threads), each taking whole pieces in turn, the order kept;
    the output does not depend on `workers`. With `cache_dir`, the output is the cache entry
    `cache_dir/<key>/` (`tokens.npy`, `offsets.npy`, `doc_hashes.npy`,
    `meta.json`), where `key` hashes the source fingerprint, the tokenizer
    fingerprint and `add_bos`; the entry is written in a temporary folder and
    renamed into place, so a crash never leaves half an entry (a later call
    removes the dead process's folder and starts again). A later call with the
    same key memory-maps it instead of tokenising; an entry whose metadata does
    not match (another tokenizer, another source, corruption) is discarded with a
    warning and rebuilt. Packing options are not part of the key: the cache holds
    document tokens, which any `seq_len` reuses. Without `cache_dir` the arrays
    are built in memory. `progress` shows a tqdm bar (documents, tokens/s, and an
    ETA when the source knows its document count).
    """
    source = as_source(source)
    meta = _entry_meta(source, tokenizer, add_bos)
    if cache_dir is None:
        return _corpus(*_encode_stream(source, tokenizer, meta, chunk_chars, progress, _MemoryArrays(), workers),
                       from_cache=False)
    entry = Path(cache_dir) / meta["key"]
    if entry.exists():
        try:
            return _load_entry(entry, meta)
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"ignoring the token cache entry {entry}: {e}; re-tokenising.", stacklevel=2)
            shutil.rmtree(entry, ignore_errors=True)
    _write_entry(entry, source, tokenizer, meta, chunk_chars, progress, workers=workers)
    return dataclasses.replace(_load_entry(entry, meta), from_cache=False)


def prepare_corpus(source: "Source | str | os.PathLike | Sequence[str | os.PathLike] | None", tokenizer: object,
                   out_dir: "str | os.PathLike", *, add_bos: bool = False, chunk_chars: int = 1 << 20,
                   progress: bool = False, overwrite: bool = False, workers: int | None = None) -> TokenizedCorpus:
    """Tokenises `source` once into `out_dir` (a token cache entry plus `tokenizer/`) for many runs.

    Streams like `tokenize_source` (`workers` as there) and commits by renaming a temporary sibling
    folder, so `out_dir` either does not exist or is complete. Load it with
    `load_prepared(out_dir, tokenizer)` (or `scripts/train.py --data out_dir`).

    Raises:
        FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out, or pass overwrite=True "
                              "(--overwrite) to replace it.")
    source = as_source(source)
    meta = _entry_meta(source, tokenizer, add_bos)

    def finish(tmp: Path) -> None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp / "tokenizer")
        if out.exists():
            shutil.rmtree(out)

    _write_entry(out, source, tokenizer, meta, chunk_chars, progress, before_commit=finish, workers=workers)
    return dataclasses.replace(_load_entry(out, meta), from_cache=False)


def is_prepared(path: "str | os.PathLike") -> bool:
    """True when `path` is a directory written by `prepare_corpus`."""
    return (Path(path) / "meta.json").is_file() and (Path(path) / "tokens.npy").is_file()


def load_prepared(directory: "str | os.PathLike", tokenizer: object | None = None) -> TokenizedCorpus:
    """The corpus `prepare_corpus` wrote to `directory`, memory-mapped.

    With `tokenizer`, its fingerprint must be the one the corpus was made with.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise InvalidValueError(f"{directory} is not a prepared corpus ({e}); make one with vishwam-prepare-data.") from e
    if tokenizer is not None and str(getattr(tokenizer, "fingerprint", None)) != meta.get("tokenizer"):
        raise InvalidValueError(f"{directory} was prepared with another tokenizer (fingerprint {meta.get('tokenizer')}); "
                                f"train with its own ({directory / 'tokenizer'}) or prepare the data again.")
    expected = {k: meta[k] for k in ("version", "key", "dtype", "eos_id", "pad_id", "vocab_size") if k in meta}
    if expected.get("version") != _CACHE_VERSION:
        raise InvalidValueError(f"{directory}: prepared-corpus version {meta.get('version')}, this vishwam reads "
                                f"{_CACHE_VERSION}; prepare the data again.")
    return _load_entry(directory, expected)


def _entry_meta(source: Source, tokenizer: object, add_bos: bool) -> dict[str, Any]:
    if not isinstance(tokenizer, TokenizerLike):
        missing = [a for a in ("batch_encode", "eos_id", "pad_id", "vocab_size", "fingerprint")
                   if not hasattr(tokenizer, a)]
        raise InvalidTypeError(f"tokenize_source: the tokenizer ({type(tokenizer).__name__}) lacks {missing}; "
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
    meta["key"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return meta


def _write_entry(entry: Path, source: Source, tokenizer: TokenizerLike, meta: dict[str, Any], chunk_chars: int,
                 progress: bool, before_commit: Callable[[Path], None] | None = None,
                 workers: int | None = None) -> None:
    """Streams `source` into a temporary folder beside `entry`, then renames it to `entry`
    (`before_commit(folder)` runs just before)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(entry)
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        with _NpyAppender(tmp / "tokens.npy", np.dtype(meta["dtype"])) as tokens, \
                _NpyAppender(tmp / "offsets.npy", np.dtype(np.int64)) as offsets, \
                _NpyAppender(tmp / "doc_hashes.npy", np.dtype(np.uint64)) as doc_hashes:
            _, _, _, meta = _encode_stream(source, tokenizer, meta, chunk_chars, progress,
                                           _FileArrays(tokens, offsets, doc_hashes), workers)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if before_commit is not None:
            before_commit(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            # Another process renamed its identical entry first: keep theirs.
            if not entry.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_temporaries(entry: Path) -> None:
    # `.<key>.tmp-<pid>-<random>` of a process that no longer runs (killed mid-write on this machine).
    for tmp in entry.parent.glob(f".{entry.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(tmp, ignore_errors=True)
            except PermissionError:
                pass  # alive, another user's


class _NpyAppender:
    """A 1-D `.npy` file written by appending chunks; the header gets the length at the end.

    NumPy pads every header for the largest length it could hold, so rewriting it
    in place keeps the data offset, and the file equals what `np.save` writes.
    """

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.count = path, dtype, 0
        self._file = open(path, "wb")
        self._header = self._header_bytes(0)
        self._file.write(self._header)

    def _header_bytes(self, count: int) -> bytes:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buffer, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (count,)})
        return buffer.getvalue()

    def append(self, values: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.count += len(values)

    def __enter__(self) -> "_NpyAppender":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            header = self._header_bytes(self.count)
            if len(header) != len(self._header):
                raise AssertionError(f"npy header grew from {len(self._header)} to {len(header)} bytes")
            self._file.seek(0)
            self._file.write(header)
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()


class _MemoryArrays:
    """Where `_encode_stream` puts chunks without a cache: lists, joined at the end."""

    def __init__(self):
        self.tokens: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = [np.zeros(1, np.int64)]
        self.doc_hashes: list[np.ndarray] = []

    def add(self, tokens: np.ndarray, ends: np.ndarray, hashes: np.ndarray) -> None:
        self.tokens.append(tokens)
        self.offsets.append(ends)
        self.doc_hashes.append(hashes)

    def result(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.concatenate(self.tokens).astype(dtype, copy=False), np.concatenate(self.offsets),
                np.concatenate(self.doc_hashes))


class _FileArrays:
    """Where `_encode_stream` puts chunks for a cache entry: appended to the `.npy` files."""

    def __init__(self, tokens: _NpyAppender, offsets: _NpyAppender, doc_hashes: _NpyAppender):
        self.tokens, self.offsets, self.doc_hashes = tokens, offsets, doc_hashes
        offsets.append(np.zeros(1, np.int64))

    def add(self, tokens: np.ndarray, ends: np.ndarray, hashes: np.ndarray) -> None:
        self.tokens.append(tokens)
        self.offsets.append(ends)
        self.doc_hashes.append(hashes)

    def result(self, dtype: np.dtype) -> tuple[None, None, None]:
        return None, None, None


def _encode_stream(source: Source, tokenizer: TokenizerLike, meta: dict[str, Any], chunk_chars: int,
                   progress: bool, sink, workers: int | None = None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Encodes `source.stream(chunk_chars)` piece by piece into `sink`; returns its arrays and
    the finished metadata (counts). The next piece is read on a thread meanwhile; see
    `_encoded` for where the encoding runs."""
    dtype = np.dtype(meta["dtype"])
    num_docs, num_tokens, replaced = 0, 0, 0
    bar = _progress_bar(source, progress)
    started = time.perf_counter()
    try:
        for text, (flat, lengths, hashes) in _encoded(_read_ahead(source.stream(chunk_chars)), tokenizer, meta,
                                                      workers):
            replaced += text.replaced
            if not text.documents:
                continue
            sink.add(flat, num_tokens + np.cumsum(lengths), hashes)
            num_docs, num_tokens = num_docs + len(lengths), num_tokens + len(flat)
            if bar is not None:
                bar.update(len(lengths))
                bar.set_postfix({"tok/s": f"{num_tokens / max(time.perf_counter() - started, 1e-9):,.0f}"},
                                refresh=False)
    finally:
        if bar is not None:
            bar.close()
    if num_docs == 0:
        raise InvalidValueError(f"{source!r} produced no documents (every file or value was empty); "
                                "check the files or the query.")
    meta = meta | {"num_documents": num_docs, "num_tokens": num_tokens, "replaced": replaced,
                   "source_repr": repr(source)}
    return (*sink.result(dtype), meta)


def _encoded(pieces: Iterator[SourceText], tokenizer: TokenizerLike, meta: dict[str, Any],
             workers: int | None) -> Iterator[tuple[SourceText, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Each piece with its `encode_chunk` result, in order.

    A source of one piece is encoded here (SentencePiece's threads use every core).
    From the second piece on, with `workers` > 1 (None: one per usable core) and a
    tokenizer a worker can rebuild (`VishwamAITokenizer`), the pieces go to an
    `EncodePool`: each worker encodes a whole piece on its own core. Workers that do
    not start (no usable Python executable, a model file replaced since the tokenizer
    was loaded) are a warning and this process encodes; a worker that dies mid-stream
    is an error (RuntimeError naming it).
    """
    dtype, eos, add_bos = np.dtype(meta["dtype"]), meta["eos_id"], meta["add_bos"]
    workers = usable_cores() if workers is None else workers
    if workers < 1:
        raise InvalidValueError(f"workers must be None (one per core) or >= 1, got {workers}.")
    first = next(pieces, None)
    second = next(pieces, None) if first is not None else None
    pool = None
    if second is not None and workers > 1 and worker_spec(tokenizer) is not None:
        try:
            pool = EncodePool(tokenizer, workers, add_bos=add_bos, dtype=dtype)
        except (RuntimeError, OSError) as e:
            # This process encodes the same ids, only slower.
            warnings.warn(f"data preparation: encoding worker processes did not start ({e}); "
                          "encoding in this process instead.", stacklevel=4)
    if pool is None:
        for text in itertools.chain(filter(None, [first, second]), pieces):
            yield text, encode_chunk(tokenizer, text.documents, add_bos, eos, dtype)
        return
    with pool:
        order: collections.deque[SourceText] = collections.deque()

        def chunks() -> Iterator[list[str]]:
            for text in itertools.chain([first, second], pieces):
                order.append(text)
                yield text.documents

        for result in pool.imap(chunks()):
            yield order.popleft(), result


def _progress_bar(source: Source, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=source.num_documents(), unit="doc", desc="tokenising", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)


def _read_ahead(pieces: Iterator[SourceText], depth: int = 1) -> Iterator[SourceText]:
    """`pieces`, read `depth` ahead on a thread (reading overlaps encoding; order kept)."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        return put_unless_stopped(buffer, item, stop)

    def produce():
        try:
            for piece in pieces:
                if not put(piece):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 -- re-raised by the consumer
            put(e)

    thread = threading.Thread(target=produce, name="vishwam-data-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _load_entry(entry: Path, expected: dict[str, Any]) -> TokenizedCorpus:
    meta = json.loads((entry / "meta.json").read_text())
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise InvalidValueError(f"metadata mismatch (stored, expected): {wrong}")
    tokens = np.load(entry / "tokens.npy", mmap_mode="r", allow_pickle=False)
    offsets = np.load(entry / "offsets.npy", allow_pickle=False)
    doc_hashes = np.load(entry / "doc_hashes.npy", allow_pickle=False)
    if (tokens.dtype.name != meta["dtype"] or len(tokens) != meta["num_tokens"]
            or len(doc_hashes) != meta["num_documents"] or len(offsets) != len(doc_hashes) + 1
            or offsets[-1] != len(tokens)):
        raise InvalidValueError(f"arrays do not match meta.json (tokens {tokens.dtype}{tokens.shape}, "
                                f"offsets {offsets.shape}, doc_hashes {doc_hashes.shape})")
    return _corpus(tokens, offsets, doc_hashes, meta, from_cache=True)


def _corpus(tokens, offsets, doc_hashes, meta, *, from_cache: bool) -> TokenizedCorpus:
    return TokenizedCorpus(tokens=tokens, offsets=offsets, doc_hashes=doc_hashes,
                           eos_id=meta["eos_id"], pad_id=meta["pad_id"], vocab_size=meta["vocab_size"],
                           key=meta["key"], replaced=meta["replaced"], from_cache=from_cache)

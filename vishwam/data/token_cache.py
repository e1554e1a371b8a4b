"""Tokenisation and the on-disk token cache: a source's documents as one EOS-separated token array."""

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vishwam.data.sources import Source, as_source


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

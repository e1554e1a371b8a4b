"""`make_datasets`: source -> tokens -> split -> packed rows -> train and validation iterators."""

import os
import warnings
from collections.abc import Sequence

from vishwam.data.iterator import DataIterator
from vishwam.data.packing import PackedRows
from vishwam.data.sources import Source
from vishwam.data.split import split_documents
from vishwam.data.token_cache import TokenizedCorpus, tokenize_source

from ..errors import InvalidValueError


def make_datasets(tokenizer: object,
                  source: "Source | TokenizedCorpus | str | os.PathLike | Sequence[str | os.PathLike] | None" = None,
                  *,
                  seq_len: int, batch_size: int, val_fraction: float = 0.05, seed: int = 0,
                  cache_dir: "str | os.PathLike | None" = None, val_batch_size: int | None = None,
                  add_bos: bool = False, drop_remainder: bool = False, process_index: int | None = None,
                  process_count: int | None = None, prefetch: int = 2) -> tuple[DataIterator, DataIterator | None]:
    """Train and validation iterators over `source` (default corpus when None).

    `tokenizer` is a `TokenizerLike` such as `VishwamAITokenizer`. Tokenises
    (or loads from `cache_dir`, see `tokenize_source`; a `TokenizedCorpus`, e.g.
    from `load_prepared`, is used as it is), splits by document hash
    (`split_documents`), packs each split (`PackedRows`) and wraps them:
    training repeats and reshuffles every epoch from `seed`; validation is one
    ordered pass (`len(val)` batches, `val.reset()` before each pass), or None
    when `val_fraction == 0`. `batch_size` and `val_batch_size` (default
    `batch_size`) are global; each process (default: `jax.process_index()` of
    `jax.process_count()`) gets its share.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise InvalidValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
    for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidValueError(f"{name} must be an integer >= 1, got {value!r}.")
    corpus = (source if isinstance(source, TokenizedCorpus)
              else tokenize_source(source, tokenizer, cache_dir=cache_dir, add_bos=add_bos))
    train_docs, val_docs = split_documents(corpus.doc_hashes, val_fraction)
    common = dict(seed=seed, process_index=process_index, process_count=process_count, prefetch=prefetch)
    train = DataIterator(PackedRows(corpus, train_docs, seq_len=seq_len, drop_remainder=drop_remainder),
                         batch_size=batch_size, **common)
    if len(val_docs) == 0:
        if val_fraction > 0:
            warnings.warn(f"make_datasets: no validation data: the source has {len(corpus.doc_hashes)} document(s), "
                          "too few to hold any out; training runs without evaluation. Split text files into "
                          "documents (TextFiles(separator=...); --separator of vishwam-train) or add files.",
                          stacklevel=2)
        return train, None
    val = DataIterator(PackedRows(corpus, val_docs, seq_len=seq_len),
                       batch_size=val_batch_size or batch_size, shuffle=False, repeat=False, **common)
    return train, val

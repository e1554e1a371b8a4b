"""Text data for training: sources -> tokens -> packed rows -> a resumable iterator.

The flow, one stage per module of this package::

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

from vishwam.data.datasets import make_datasets
from vishwam.data.iterator import DataIterator
from vishwam.data.packing import Batch, PackedRows
from vishwam.data.sources import (DefaultCorpus, Source, SourceText, TableFiles, TextFiles, Texts, as_source,
                                  default_corpus)
from vishwam.data.split import split_documents
from vishwam.data.token_cache import (TokenizedCorpus, TokenizerLike, is_prepared, load_prepared, prepare_corpus,
                                      tokenize_source)

__all__ = [
    "Batch", "DataIterator", "DefaultCorpus", "PackedRows", "Source", "SourceText", "TableFiles", "TextFiles",
    "Texts", "TokenizedCorpus", "TokenizerLike", "as_source", "default_corpus", "is_prepared", "load_prepared",
    "make_datasets", "prepare_corpus", "split_documents", "tokenize_source",
]

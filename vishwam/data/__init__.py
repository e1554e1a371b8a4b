"""Text data for training: sources -> tokens -> packed rows -> a resumable iterator.

    Source, as_source            where text comes from: DefaultCorpus / default_corpus() (the built-in
                                 corpus), TextFiles, TableFiles (.jsonl/.parquet/.csv via DuckDB), Texts,
                                 Sources (several as one);
                                 each yields SourceText documents
    tokenize_source              batch-encode with EOS after every document -> TokenizedCorpus (cached);
                                 TokenizerLike is what it needs of a tokenizer
    prepare_corpus, load_prepared, is_prepared   a streamed on-disk token cache for large corpora
    split_documents              hash-based train/validation split by document
    PackedRows, Batch            rows of seq_len + 1 tokens cut from the token stream; a batch
    DataIterator                 shuffled batches, state()/restore(), process sharding, prefetch
    make_datasets                all of it for the trainer: `(train, val)` iterators

A batch is a dict of `[batch, seq_len]` numpy arrays: `tokens`, `targets` (int32),
`segment_ids` (int32, the document piece of each token, 0 = padding), `positions` (int32,
restarting per piece) and `loss_mask` (float32, 1 where the target continues the same piece).
"""

from vishwam.data.datasets import make_datasets
from vishwam.data.iterator import DataIterator
from vishwam.data.packing import Batch, PackedRows
from vishwam.data.sources import (
                                  DefaultCorpus,
                                  Source,
                                  Sources,
                                  SourceText,
                                  TableFiles,
                                  TextFiles,
                                  Texts,
                                  as_source,
                                  default_corpus,
)
from vishwam.data.split import split_documents
from vishwam.data.token_cache import (
                                  TokenizedCorpus,
                                  TokenizerLike,
                                  is_prepared,
                                  load_prepared,
                                  prepare_corpus,
                                  tokenize_source,
)

__all__ = [
    "Batch", "DataIterator", "DefaultCorpus", "PackedRows", "Source", "Sources", "SourceText", "TableFiles", "TextFiles",
    "Texts", "TokenizedCorpus", "TokenizerLike", "as_source", "default_corpus", "is_prepared", "load_prepared",
    "make_datasets", "prepare_corpus", "split_documents", "tokenize_source",
]

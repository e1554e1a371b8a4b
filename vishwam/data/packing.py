"""Packing: rows of `seq_len + 1` tokens cut from a tokenised corpus, built on demand as batches."""

import hashlib

import numpy as np

from vishwam.data.token_cache import TokenizedCorpus

from ..errors import InvalidValueError

Batch = dict[str, np.ndarray]
"""`tokens, targets, segment_ids, positions` (int32) and `loss_mask` (float32), all `[batch, seq]`."""


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
            raise InvalidValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
        docs = np.arange(corpus.num_documents) if documents is None else np.asarray(documents, np.int64)
        if len(docs) == 0:
            raise InvalidValueError("PackedRows: no documents selected; the split or the source is empty.")
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
            raise InvalidValueError(f"PackedRows: {self.num_tokens} tokens do not fill one row of seq_len + 1 = "
                                    f"{row}; use a smaller seq_len, more data, or drop_remainder=False.")
        self.fingerprint = hashlib.sha256(
            f"{corpus.key}:{seq_len}:{drop_remainder}:".encode() + docs.tobytes()).hexdigest()
        """Identifies the rows: corpus key, chosen documents and packing options."""

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        """Row `row` as a dict of `[seq_len]` arrays: with `len()` this is grain's
        random-access data source protocol (`grain.python.DataLoader(data_source=rows, ...)`)."""
        if not -self.num_rows <= row < self.num_rows:
            raise IndexError(f"row {row} is out of range for {self.num_rows} packed rows.")
        return {name: value[0] for name, value in self.batch(np.array([row % self.num_rows])).items()}

    def __repr__(self) -> str:
        # grain compares a checkpoint's repr(data_source) with the loader's before restoring.
        return f"PackedRows(seq_len={self.seq_len}, num_rows={self.num_rows}, fingerprint={self.fingerprint[:16]})"

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

"""The tokenizer protocols: what the rest of vishwam needs from a tokenizer.

`VishwamAITokenizer` and `JsonTokenizer` have both. The data pipeline
(`vishwam.data.tokenize_source`) needs a `TokenizerLike`; `VishwamAIPipeline` a
`PipelineTokenizer`. They differ on purpose: a tokenizer used only to prepare data needs no
`decode` or `save_pretrained`, and the tests hand the data pipeline such minimal ones.
"""

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class IdArray(Protocol):
    """A numpy or JAX array of token ids."""

    ndim: int

    def tolist(self) -> Any: ...


@runtime_checkable
class _TokenIds(Protocol):
    """What both protocols need: the vocabulary size and the pad and EOS ids."""

    vocab_size: int
    pad_id: int
    eos_id: int


@runtime_checkable
class TokenizerLike(_TokenIds, Protocol):
    """What the data pipeline needs from a tokenizer: batch encoding and a fingerprint that
    changes whenever the encoding does (part of the token cache's key)."""

    fingerprint: str

    def batch_encode(self, texts: list[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]: ...


@runtime_checkable
class PipelineTokenizer(_TokenIds, Protocol):
    """What `VishwamAIPipeline` needs from a tokenizer: encoding, decoding, BOS and saving."""

    bos_id: int

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def save_pretrained(self, directory: str | os.PathLike) -> Any: ...

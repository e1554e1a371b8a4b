"""Tokenizers: a lossless SentencePiece tokenizer, a HuggingFace ``tokenizer.json`` one, and
the HF tokenizer files of both.

Example:
    tok = VishwamAITokenizer.train(documents, "out/tok.model", vocab_size=4096)
    batch = tok(["hello", "a longer text"], padding="longest", return_tensors="np")
    tok.save_pretrained("out/hf")  # tokenizer.model + tokenizer_config.json + special_tokens_map.json

Public API:
    VishwamAITokenizer      a lossless SentencePiece tokenizer (train, encode, decode, HF files).
    JsonTokenizer           an HF ``tokenizer.json`` (BPE, byte-level BPE, WordPiece, Unigram).
    TokenizerBase           what both share: the encode cache and the HF-style ``__call__``.
    TokenizerLike           what the data pipeline needs from a tokenizer (batch encoding, fingerprint).
    PipelineTokenizer       what `VishwamAIPipeline` needs from a tokenizer (encode, decode, save).
    IdArray                 a numpy or JAX array of token ids (accepted by ``decode``).
    load_hf_tokenizer       the tokenizer of an HF checkpoint directory, with transformers' ids.
    has_hf_tokenizer        whether a directory holds tokenizer files ``load_hf_tokenizer`` reads.
    generation_eos_ids      the ids an HF model stops generating at.
    pretrained_settings     constructor arguments from an HF directory's tokenizer config files.
    hf_prepend_scheme       the ``prepend_scheme`` transformers' LlamaTokenizer reads a directory with.
    write_tokenizer_files   write a tokenizer's files, atomic as a set.
    PAD_ID, UNK_ID, BOS_ID, EOS_ID  the fixed special ids of models `VishwamAITokenizer.train` makes.
    PREPEND_SCHEMES         transformers' Metaspace prepend schemes ("always", "first", "never").
    PREPEND_SCHEME_KEY      the tokenizer_config.json key recording a saved ``prepend_scheme``.
    CACHE_MAX_CHARS         texts longer than this are encoded but never cached.
    TOKENIZER_FILE          "tokenizer.json".
    GENERATION_CONFIG_FILE  "generation_config.json".
"""

from ._format import BOS_ID as BOS_ID
from ._format import EOS_ID as EOS_ID
from ._format import PAD_ID as PAD_ID
from ._format import UNK_ID as UNK_ID
from ._llama_rules import PREPEND_SCHEMES as PREPEND_SCHEMES
from .base import CACHE_MAX_CHARS as CACHE_MAX_CHARS
from .base import TokenizerBase as TokenizerBase
from .hf_files import PREPEND_SCHEME_KEY as PREPEND_SCHEME_KEY
from .hf_files import hf_prepend_scheme as hf_prepend_scheme
from .hf_files import pretrained_settings as pretrained_settings
from .hf_files import write_tokenizer_files as write_tokenizer_files
from .json_backend import TOKENIZER_FILE as TOKENIZER_FILE
from .json_backend import JsonTokenizer as JsonTokenizer
from .loading import GENERATION_CONFIG_FILE as GENERATION_CONFIG_FILE
from .loading import generation_eos_ids as generation_eos_ids
from .loading import has_hf_tokenizer as has_hf_tokenizer
from .loading import load_hf_tokenizer as load_hf_tokenizer
from .protocol import IdArray as IdArray
from .protocol import PipelineTokenizer as PipelineTokenizer
from .protocol import TokenizerLike as TokenizerLike
from .sentencepiece_backend import VishwamAITokenizer as VishwamAITokenizer

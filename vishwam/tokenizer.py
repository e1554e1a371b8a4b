"""VishwamAITokenizer: a lossless SentencePiece tokenizer with an LRU cache and HF-compatible files.

Models trained here use the identity normaliser, keep whitespace runs and fall back to
UTF-8 bytes for characters outside the vocabulary, so ``decode(encode(s)) == s`` for any
text. Special ids are fixed: ``[PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3``, user symbols after.
Other lossless SentencePiece models (Llama's ``tokenizer.model``) load with the special
ids they define; with ``prepend_scheme`` set (as `vishwam.hf.load_hf_tokenizer` does) they
encode and decode as transformers' ``LlamaTokenizer`` does instead. `TokenizerBase` holds
what this backend shares with `vishwam.tokenizer_json.JsonTokenizer` (``tokenizer.json`` files): the encode cache and
the HF-style ``__call__``.

Example:
    tok = VishwamAITokenizer.train(documents, "out/tok.model", vocab_size=4096)
    batch = tok(["hello", "a longer text"], padding="longest", return_tensors="np")
    tok.save_pretrained("out/hf")  # tokenizer.model + tokenizer_config.json + special_tokens_map.json
"""

import abc
import collections
import hashlib
import io
import json
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from .files import atomic_directory, atomic_write_bytes, read_json_object

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_SPECIAL_NAMES = ("pad", "unk", "bos", "eos")  # index == fixed id
_DEFAULT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

# SentencePiece's whitespace marker. Text spaces become it, and sp renders it back as a
# space, so a literal U+2581 in the input needs the byte-level escape in `_encode_meta`.
_META = "\u2581"

# transformers' Metaspace prepend schemes (`VishwamAITokenizer`'s ``prepend_scheme``), and the
# tokenizer_config.json key in which `save_pretrained` records the one in use.
PREPEND_SCHEMES = ("always", "first", "never")
PREPEND_SCHEME_KEY = "vishwam_prepend_scheme"

# Texts longer than this are encoded but not cached: the cache is for frequent short lines,
# and a few long documents would otherwise hold most of its memory.
CACHE_MAX_CHARS = 8192

# Trainer options that define the format (lossless, fixed ids); the caller may not change them.
_LOSSLESS_TRAINER_OPTIONS = {
    "pad_id": PAD_ID,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_piece": _DEFAULT_SPECIAL_TOKENS[0],
    "unk_piece": _DEFAULT_SPECIAL_TOKENS[1],
    "bos_piece": _DEFAULT_SPECIAL_TOKENS[2],
    "eos_piece": _DEFAULT_SPECIAL_TOKENS[3],
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "byte_fallback": True,
    "add_dummy_prefix": True,
}
_RESERVED_TRAINER_OPTIONS = frozenset(_LOSSLESS_TRAINER_OPTIONS) | {
    "input",
    "model_prefix",
    "model_writer",
    "sentence_iterator",
    "sentence_reader",
    "vocab_size",
    "model_type",
    "user_defined_symbols",
    "control_symbols",
    "hard_vocab_limit",
    "normalization_rule_tsv",
}
# Llama-style defaults the caller may override through **sentencepiece_options.
_DEFAULT_TRAINER_OPTIONS = {
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "max_sentence_length": 4192,
    "minloglevel": 2,
}

_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
# Probe used to reject models whose normaliser would change text.
_LOSSLESS_PROBE = "  two  spaces\tand\ttabs  "


@runtime_checkable
class IdArray(Protocol):
    """A numpy or JAX array of token ids."""

    ndim: int

    def tolist(self) -> Any: ...


class TokenizerBase(abc.ABC):
    """What every tokenizer backend shares: the thread-safe LRU encode cache, `encode` /
    `batch_encode`, the HuggingFace-style `__call__` (truncation, padding, tensors) and the
    special-token properties.

    A backend sets ``_pad_id``, ``_unk_id``, ``_bos_id``, ``_eos_id`` (ids of its own model),
    calls `_init_common`, and implements ``_encode_text(text)`` (one text),
    ``_encode_uncached(texts)`` (a batch), ``decode``, ``batch_decode`` and ``vocab_size``.
    """

    _pad_id: int
    _unk_id: int | None
    _bos_id: int
    _eos_id: int

    def _init_common(
        self, max_length: int, cache_size: int, add_bos_token: bool, add_eos_token: bool, padding_side: str
    ) -> None:
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0 (0 turns the cache off), got {cache_size!r}.")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        _check_max_length(max_length, bool(add_bos_token) + bool(add_eos_token), "max_length")
        self._max_length = max_length
        self._add_bos_token = bool(add_bos_token)
        self._add_eos_token = bool(add_eos_token)
        self._padding_side = padding_side
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[str, tuple[int, ...]] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Fresh list of the ids of one text (no cache)."""

    @abc.abstractmethod
    def _encode_uncached(self, texts: list[str]) -> list[list[int]]:
        """Fresh lists of the ids of many texts (no cache)."""

    def _add_specials(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids.insert(0, self._bos_id)
        if add_eos:
            ids.append(self._eos_id)
        return ids

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of one text, as a fresh list."""
        if not isinstance(text, str):
            raise TypeError(_text_type_error("encode", text))
        return self._add_specials(self._encode_one(text), add_bos, add_eos)

    def batch_encode(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Token ids of many texts (one multi-threaded SentencePiece call), as fresh lists."""
        texts = _check_texts("batch_encode", texts)
        ids = self._encode_many(texts)
        if add_bos or add_eos:
            for row in ids:
                self._add_specials(row, add_bos, add_eos)
        return ids

    def _encode_one(self, text: str) -> list[int]:
        """Fresh list of the ids of `text` (the caller may mutate it)."""
        if not self._cache_size or len(text) > CACHE_MAX_CHARS:
            return self._encode_text(text)
        with self._cache_lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                self._hits += 1
                return list(cached)
            self._misses += 1
        ids = self._encode_text(text)
        self._store([text], [ids])
        return ids

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """Fresh lists of ids, one per text; a text repeated in the batch is encoded once.

        Counters: a miss is a text SentencePiece had to encode, every other text is a hit.
        """
        if not self._cache_size:
            return self._encode_uncached(texts)
        out: list[Any] = [None] * len(texts)
        missing: dict[str, None] = {}
        with self._cache_lock:
            cache = self._cache
            for i, text in enumerate(texts):
                cached = cache.get(text)
                if cached is None:
                    missing[text] = None
                else:
                    cache.move_to_end(text)
                    out[i] = list(cached)
            self._misses += len(missing)
            self._hits += len(texts) - len(missing)
        if not missing:
            return out
        new_texts = list(missing)
        new_ids = self._encode_uncached(new_texts)
        self._store(new_texts, new_ids)
        if len(new_texts) == len(texts):  # all distinct and all new: already in order
            return new_ids
        fresh = dict(zip(new_texts, new_ids))
        given: set[str] = set()
        for i, ids in enumerate(out):
            if ids is None:
                text = texts[i]
                # The first occurrence takes sp's own list; repeats get copies.
                out[i] = list(fresh[text]) if text in given else fresh[text]
                given.add(text)
        return out

    def _store(self, texts: list[str], ids: list[list[int]]) -> None:
        # Only the newest `cache_size` entries can survive the insertion, so skip the rest.
        start = max(0, len(texts) - self._cache_size)
        with self._cache_lock:
            cache = self._cache
            for text, text_ids in zip(texts[start:], ids[start:]):
                if len(text) <= CACHE_MAX_CHARS:
                    cache[text] = tuple(text_ids)
            while len(cache) > self._cache_size:
                cache.popitem(last=False)

    # ------------------------------------------------------------------ HF-style call

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: str | bool = "longest",
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = None,
        *,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ) -> dict[str, Any]:
        """Encode, truncate and pad like a HuggingFace tokenizer.

        Arguments:
            texts: one text or a list of texts.
            padding: ``"longest"``/True (to the longest in the batch), ``"max_length"`` (to
                ``max_length``) or ``False``/``"do_not_pad"``.
            truncation: cut sequences to ``max_length`` (keeping BOS/EOS).
            max_length: defaults to the tokenizer's ``max_length``.
            return_tensors: ``None`` (lists), ``"np"`` or ``"jax"`` (int32 ``[batch, len]``).
            add_bos, add_eos: default to ``add_bos_token``/``add_eos_token``.

        Returns:
            ``{"input_ids": ..., "attention_mask": ...}``; with ``return_tensors=None`` and a
            single text, flat lists (as in HF).
        """
        single = isinstance(texts, str)
        batch = [texts] if single else _check_texts("__call__", texts)
        bos = self._add_bos_token if add_bos is None else bool(add_bos)
        eos = self._add_eos_token if add_eos is None else bool(add_eos)
        limit = self._max_length if max_length is None else max_length
        _check_max_length(limit, bos + eos, "max_length")
        mode = _padding_mode(padding)
        if return_tensors not in (None, "np", "jax"):
            raise ValueError(f"return_tensors must be None, 'np' or 'jax', got {return_tensors!r}.")

        room = limit - bos - eos
        input_ids = self._encode_many(batch)
        for ids in input_ids:
            if truncation:
                del ids[room:]
            self._add_specials(ids, bos, eos)
        lengths = [len(ids) for ids in input_ids]
        target = {"longest": max(lengths, default=0), "max_length": limit, None: 0}[mode]
        attention_mask = []
        for ids, n in zip(input_ids, lengths):
            pad = max(0, target - n)
            if self._padding_side == "right":
                attention_mask.append([1] * n + [0] * pad)
                ids.extend([self._pad_id] * pad)
            else:
                attention_mask.append([0] * pad + [1] * n)
                ids[:0] = [self._pad_id] * pad

        if return_tensors is None:
            if single:
                return {"input_ids": input_ids[0], "attention_mask": attention_mask[0]}
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if len(set(len(ids) for ids in input_ids)) > 1:
            raise ValueError(
                f"cannot make a {return_tensors!r} tensor from sequences of lengths {sorted(set(lengths))}; "
                "pass padding='longest' or padding='max_length' (with truncation=True)."
            )
        width = len(input_ids[0]) if input_ids else target
        arrays = {
            "input_ids": np.array(input_ids, dtype=np.int32).reshape(len(input_ids), width),
            "attention_mask": np.array(attention_mask, dtype=np.int32).reshape(len(input_ids), width),
        }
        if return_tensors == "jax":
            import jax.numpy as jnp

            return {name: jnp.asarray(array) for name, array in arrays.items()}
        return arrays

    # ------------------------------------------------------------------ properties

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @property
    def padding_side(self) -> str:
        return self._padding_side

    def cache_info(self) -> dict[str, int]:
        with self._cache_lock:
            size = len(self._cache)
            return {"hits": self._hits, "misses": self._misses, "size": size, "maxsize": self._cache_size}

    def cache_clear(self) -> None:
        with self._cache_lock:
            self._cache.clear()
            self._hits = self._misses = 0


class VishwamAITokenizer(TokenizerBase):
    """A lossless SentencePiece tokenizer with a thread-safe LRU cache.

    Models trained here (`VishwamAITokenizer.train`) have the fixed ids ``[PAD]=0,
    [UNK]=1, [BOS]=2, [EOS]=3``. Any other lossless SentencePiece model with byte
    fallback loads too (Llama, Mistral, TinyLlama: ``<unk>=0, <s>=1, </s>=2``, no pad),
    with the special ids the model itself defines.

    Arguments:
        model_path: a SentencePiece ``.model`` file (identity normalisation and byte fallback).
        max_length: default length limit of `__call__` (truncation and ``"max_length"`` padding).
        pad_token, unk_token, bos_token, eos_token: ``None`` takes the model's own piece. A
            token the model defines must equal its piece (a check that the files agree). For
            a special the model does not define (Llama has no pad), a piece of the vocabulary
            to use for it; a pad given nowhere becomes the model's unk piece: with byte
            fallback, encoding never produces unk, so a pad is never a real token of any text
            (and decoding drops it). The losses never look at pad ids anyway: the data
            pipeline masks padding by segment, `__call__` returns an ``attention_mask``.
        cache_size: entries of the encode cache; ``0`` turns the cache (and its counters) off.
            Texts longer than `CACHE_MAX_CHARS` characters are never cached.
        num_threads: SentencePiece threads for batch calls; ``None`` uses every core.
        prepend_scheme: ``None`` (the default) encodes as SentencePiece does: the model's
            dummy prefix (a space) before every text, a literal U+2581 kept; lossless.
            ``"always"``, ``"first"`` or ``"never"`` give the ids of transformers' (5.x)
            ``LlamaTokenizer`` over the same ``tokenizer.model`` (a Metaspace pre-tokenizer
            with that prepend scheme; `vishwam.hf.load_hf_tokenizer` picks it from
            ``legacy`` and ``add_prefix_space``, see `hf_prepend_scheme`). Then the text is
            first split at the special, control and user-defined pieces (``"<s>"`` in a text
            is the BOS id); each part is encoded without the dummy prefix, after a space is
            put before it where it does not already begin with a space or U+2581 (which
            reads as a space): ``"always"`` every part, ``"first"`` only a part that begins
            the text, ``"never"`` none. Decoding drops one leading space (not with
            ``"never"``). So the round trip loses one leading space,
            ``decode(encode(" a")) == "a"``, and special-token text comes back as itself
            only with ``skip_special_tokens=False``.
        add_bos_token, add_eos_token: whether `__call__` adds BOS/EOS (HF's ``add_bos_token``).
        padding_side: ``"right"`` or ``"left"``, where `__call__` pads.

    Encoding results are cached as tuples; every public method returns fresh lists that the
    caller may mutate without affecting the cache.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        max_length: int = 512,
        pad_token: str | None = None,
        unk_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        *,
        cache_size: int = 4096,
        num_threads: int | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        padding_side: str = "right",
        prepend_scheme: str | None = None,
    ):
        if prepend_scheme is not None and prepend_scheme not in PREPEND_SCHEMES:
            raise ValueError(
                f"prepend_scheme must be None (SentencePiece's own dummy prefix) or one of {PREPEND_SCHEMES} "
                f"(transformers' LlamaTokenizer), got {prepend_scheme!r}."
            )
        path = Path(model_path)
        self._sp = _load_processor(path)
        self._model_path = path
        given = dict(zip(_SPECIAL_NAMES, (pad_token, unk_token, bos_token, eos_token)))
        specials = _special_tokens(self._sp, path, given)  # name -> (id, piece)
        _check_lossless(self._sp, path)
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be None (all cores) or an int >= 1, got {num_threads!r}.")
        self._init_common(max_length, cache_size, add_bos_token, add_eos_token, padding_side)

        (self._pad_id, _), (self._unk_id, _), (self._bos_id, _), (self._eos_id, _) = specials.values()
        self._special_tokens = tuple(piece for _, piece in specials.values())
        self._special_pieces = {i: piece for i, piece in specials.values()}
        self._num_threads = -1 if num_threads is None else num_threads
        proto = self._sp.serialized_model_proto()
        self._prepend_scheme = prepend_scheme
        if prepend_scheme is not None:
            self._init_hf_rules(proto)
            proto += f"\0prepend_scheme={prepend_scheme}".encode()  # other ids, another fingerprint
        self._fingerprint = hashlib.sha256(proto).hexdigest()

        self._meta_id = self._sp.piece_to_id(_META)
        self._byte_ids = tuple(self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256))
        # A character that falls back to bytes emits one lead byte and 0-3 continuation bytes.
        self._lead_byte_ids = frozenset(i for b, i in enumerate(self._byte_ids) if b & 0xC0 != 0x80)

    def _init_hf_rules(self, proto: bytes) -> None:
        """What ``prepend_scheme`` needs: a copy of the model without the dummy prefix, the
        pieces transformers matches in raw text (its added tokens: the special tokens and the
        model's control and user-defined pieces, longest first at each position), and the
        ids its decode skips or shows as their piece."""
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(proto)
        model.normalizer_spec.add_dummy_prefix = False
        self._sp_plain = spm.SentencePieceProcessor()
        self._sp_plain.LoadFromSerializedProto(model.SerializeToString())
        kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
        control = {i: p.piece for i, p in enumerate(model.pieces) if p.type == kinds.CONTROL}
        user = {i: p.piece for i, p in enumerate(model.pieces) if p.type == kinds.USER_DEFINED}
        self._hf_specials = {**control, **self._special_pieces}
        self._hf_added = {piece: i for i, piece in {**user, **self._hf_specials}.items()}
        alternatives = sorted(self._hf_added, key=len, reverse=True)
        self._hf_split = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        input: Iterable[str] | Iterable[str | os.PathLike] | str | os.PathLike,
        output_path: str | os.PathLike,
        *,
        vocab_size: int = 131072,
        model_type: str = "bpe",
        user_symbols: Sequence[str] = (),
        hard_vocab_limit: bool = True,
        max_length: int = 512,
        input_kind: str = "auto",
        progress: bool = False,
        **sentencepiece_options: Any,
    ) -> "VishwamAITokenizer":
        """Train a lossless SentencePiece model, write it atomically and load it.

        Arguments:
            input: documents (an iterable of str) or text files (a path, or a list of paths).
                With ``input_kind="auto"`` a list is read as files when every item is a
                `Path` or a str naming an existing file; pass ``input_kind`` to be explicit.
                Documents are split into lines, as SentencePiece reads files, so a newline
                is never a learned piece: it encodes as the byte piece ``<0x0A>`` (one token,
                as in Llama). Lines longer than ``max_sentence_length`` bytes are cut into
                pieces (SentencePiece would drop them).
            output_path: the ``.model`` file to write; parent directories are created.
            vocab_size: pieces in the model, specials and byte pieces included.
            model_type: ``"bpe"`` or ``"unigram"``.
            user_symbols: strings always kept as one piece, with ids from 4 on.
            hard_vocab_limit: if False, a corpus too small for ``vocab_size`` yields a
                smaller vocabulary instead of an error.
            max_length: passed to the returned tokenizer.
            progress: a tqdm bar on stderr: lines read, then the time SentencePiece spends
                training (it reports no finer progress).
            **sentencepiece_options: other `SentencePieceTrainer` options (e.g.
                ``character_coverage``, ``input_sentence_size``, ``num_threads``).

        Returns:
            The tokenizer loaded from ``output_path``.
        """
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}.")
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
        reserved = sorted(_RESERVED_TRAINER_OPTIONS.intersection(sentencepiece_options))
        if reserved:
            raise ValueError(
                f"SentencePiece options {reserved} are fixed by VishwamAITokenizer.train (lossless "
                "normalisation, special ids 0-3) or are its own arguments (vocab_size, model_type, "
                "user_symbols, hard_vocab_limit, input); remove them."
            )
        symbols = _check_user_symbols(user_symbols)
        output = Path(output_path)
        if output.is_dir():
            raise IsADirectoryError(f"output_path {output} is a directory; pass the .model file to write.")

        options = {**_DEFAULT_TRAINER_OPTIONS, **sentencepiece_options}
        bar = _TrainingProgress() if progress else None
        feed = _SentenceFeed(_training_sentences(input, input_kind), int(options["max_sentence_length"]), bar)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(feed),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                user_defined_symbols=list(symbols),
                hard_vocab_limit=hard_vocab_limit,
                **_LOSSLESS_TRAINER_OPTIONS,
                **options,
            )
        except RuntimeError as error:
            raise _training_error(error, feed, vocab_size, model_type) from None
        finally:
            if bar is not None:
                bar.close()
        atomic_write_bytes(output, model.getvalue())
        return cls(output, max_length=max_length)

    def _worker_spec(self) -> dict[str, Any]:
        """JSON constructor arguments that rebuild this tokenizer's encoding in another
        process (`vishwam.data.encode_pool`; the worker checks the fingerprint)."""
        pad, unk, bos, eos = self._special_tokens
        return {"class": "VishwamAITokenizer",
                "arguments": {"model_path": str(self._model_path.resolve()), "pad_token": pad, "unk_token": unk,
                              "bos_token": bos, "eos_token": eos, "prepend_scheme": self._prepend_scheme}}

    # ------------------------------------------------------------------ encoding

    def _encode_text(self, text: str) -> list[int]:
        if self._prepend_scheme is not None:
            return self._encode_hf([text])[0]
        # sp's single-text call: its batch call costs a thread-pool round trip per call.
        return self._encode_meta(text) if _META in text else self._sp.encode(text)

    def _encode_uncached(self, texts: list[str]) -> list[list[int]]:
        if self._prepend_scheme is not None:
            return self._encode_hf(texts)
        ids = self._sp.encode(texts, num_threads=self._num_threads)
        for i, text in enumerate(texts):
            if _META in text:
                ids[i] = self._encode_meta(text)
        return ids

    def _encode_hf(self, texts: list[str]) -> list[list[int]]:
        """transformers' ids of `texts` (``prepend_scheme``): added-token ids, and the parts
        between them encoded by the no-dummy-prefix model, all parts in one sp call."""
        split = [self._hf_parts(text) for text in texts]
        strings = [part for parts in split for part in parts if type(part) is str]
        if not strings:
            encoded = iter(())
        elif len(strings) == 1:  # sp's single-text call: no thread-pool round trip
            encoded = iter([self._sp_plain.encode(strings[0])])
        else:
            encoded = iter(self._sp_plain.encode(strings, num_threads=self._num_threads))
        out = []
        for parts in split:
            if len(parts) == 1 and type(parts[0]) is str:
                out.append(next(encoded))
                continue
            ids: list[int] = []
            for part in parts:
                if type(part) is str:
                    ids.extend(next(encoded))
                else:
                    ids.append(part)
            out.append(ids)
        return out

    def _hf_parts(self, text: str) -> list[str | int]:
        """`text` as transformers' pre-tokenizer sees it: the id of each added token, and
        each non-empty text between them with the space its prepend scheme puts first."""
        parts: list[str | int] = []
        start = 0
        for match in self._hf_split.finditer(text) if self._hf_split is not None else ():
            self._hf_part(text[start : match.start()], start == 0, parts)
            parts.append(self._hf_added[match.group()])
            start = match.end()
        self._hf_part(text[start:], start == 0, parts)
        return parts

    def _hf_part(self, part: str, begins_text: bool, parts: list[str | int]) -> None:
        if not part:
            return
        scheme = self._prepend_scheme
        if (scheme == "always" or (scheme == "first" and begins_text)) and not part.startswith((" ", _META)):
            part = " " + part
        parts.append(part)

    def _encode_meta(self, text: str) -> list[int]:
        """Encode a text containing a literal U+2581, which sp would decode as a space.

        The pieces whose source text holds a literal U+2581 are re-spelt character by
        character, the literal marker as its three UTF-8 byte pieces; all others are kept.
        """
        result = self._sp.encode(text, out_type="offset_mapping")
        ids: list[int] = []
        for piece_id, piece, (begin, end) in zip(result["ids"], result["pieces"], result["offsets"]):
            surface = text[begin:end]
            if _META not in surface:
                ids.append(piece_id)
                continue
            # The piece carries one marker per space or literal marker in its surface,
            # plus one for the dummy prefix when it starts the text.
            if piece.count(_META) > surface.count(" ") + surface.count(_META):
                ids.append(self._meta_id)
            for char in surface:
                if char == " ":
                    ids.append(self._meta_id)
                elif char != _META and not self._sp.is_unknown(char_id := self._sp.piece_to_id(char)):
                    ids.append(char_id)
                else:
                    ids.extend(self._byte_ids[b] for b in char.encode("utf-8"))
        return ids

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int] | IdArray, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence (list, tuple or 1-D numpy/JAX array).

        With ``skip_special_tokens=False`` the special tokens appear as their text, so
        ``decode(encode(s, add_bos=True), False) == "[BOS]" + s``.
        """
        if type(ids) is not list or (ids and type(ids[0]) is not int):  # the common case skips this
            ids = _as_id_list(ids, 1, "decode")
        if self._prepend_scheme is not None:
            return self._decode_hf(ids, skip_special_tokens)
        if skip_special_tokens:
            return self._sp_decode(_without(ids, self._unk_id), "decode")
        return self._decode_showing_specials(ids)

    def batch_decode(
        self, batch_ids: Sequence[Sequence[int]] | IdArray, skip_special_tokens: bool = True
    ) -> list[str]:
        """Texts of many id sequences (a list of sequences or a 2-D numpy/JAX array)."""
        batch = _as_id_list(batch_ids, 2, "batch_decode")
        if not batch:  # sp would read [] as one empty sequence and return ""
            return []
        if self._prepend_scheme is not None:
            return [self._decode_hf(ids, skip_special_tokens) for ids in batch]
        if not skip_special_tokens:
            return [self._decode_showing_specials(ids) for ids in batch]
        return self._sp_decode([_without(ids, self._unk_id) for ids in batch], "batch_decode")

    def _decode_showing_specials(self, ids: list[int]) -> str:
        specials = self._special_pieces
        if specials.keys().isdisjoint(ids):
            return self._sp_decode(ids, "decode")
        parts: list[str] = []
        run: list[int] = []
        first_run = True
        for i in [*ids, None]:  # None flushes the last run
            if i is not None and i not in specials:
                run.append(i)
                continue
            if run:
                # sp drops the dummy-prefix space at the start of what it decodes, right for
                # the first run only; a leading marker piece (decoded to "") absorbs it for the rest.
                parts.append(self._sp_decode(run if first_run else [self._meta_id, *run], "decode"))
                first_run, run = False, []
            if i is not None:
                parts.append(specials[i])
        return "".join(parts)

    def _decode_hf(self, ids: list[int], skip_special_tokens: bool) -> str:
        """transformers' decode (``prepend_scheme``): the special and control pieces skipped
        or shown as their text, the rest as the no-dummy-prefix model spells it, then one
        leading space dropped (its Strip decoder; none with ``"never"``)."""
        specials = self._hf_specials
        if skip_special_tokens or specials.keys().isdisjoint(ids):
            kept = [i for i in ids if i not in specials] if skip_special_tokens else ids
            text = self._sp_decode(kept, "decode", self._sp_plain)
        else:
            parts, run = [], []
            for i in [*ids, None]:  # None flushes the last run
                if i is not None and i not in specials:
                    run.append(i)
                    continue
                if run:
                    parts.append(self._sp_decode(run, "decode", self._sp_plain))
                    run = []
                if i is not None:
                    parts.append(specials[i])
            text = "".join(parts)
        return text[1:] if self._prepend_scheme != "never" and text.startswith(" ") else text

    def _sp_decode(self, ids: list, method: str, processor: spm.SentencePieceProcessor | None = None) -> Any:
        """sp's decode of one id list or a batch of them. Pad, BOS and EOS are control
        pieces that sp decodes to "", so only unk needs removing to skip special tokens."""
        try:
            return (processor or self._sp).decode(ids, num_threads=self._num_threads)
        except IndexError:
            rows = ids if method == "batch_decode" else [ids]
            for row in rows:
                self._check_range(row)
            raise
        except TypeError as error:
            raise TypeError(f"{method} expects int ids ({error}).") from None

    def _check_range(self, ids: list[int]) -> None:
        n = self._sp.vocab_size()
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary [0, {n}); were the ids made by another tokenizer?"
            )

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def __len__(self) -> int:
        return self._sp.vocab_size()

    @property
    def special_tokens(self) -> dict[str, str]:
        """``{"pad_token": "[PAD]", ...}``."""
        return {f"{name}_token": token for name, token in zip(_SPECIAL_NAMES, self._special_tokens)}

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of the serialized model proto: equal digests, equal encodings."""
        return self._fingerprint

    @property
    def model_path(self) -> Path:
        return self._model_path

    @property
    def prepend_scheme(self) -> str | None:
        """``None`` (SentencePiece's own, lossless encoding) or transformers' scheme."""
        return self._prepend_scheme

    def coverage(self, texts: Sequence[str]) -> float:
        """Fraction of the characters of ``texts`` that are encoded by vocabulary pieces
        rather than byte fallback or ``[UNK]`` (1.0 for empty input)."""
        texts = _check_texts("coverage", texts)
        total = sum(len(text) for text in texts)
        if total == 0:
            return 1.0
        lead, fallback = self._lead_byte_ids, 0
        for ids in self._encode_many(texts):
            fallback += sum(1 for i in ids if i in lead or i == self._unk_id)
        return 1.0 - fallback / total

    def __repr__(self) -> str:
        return (
            f"VishwamAITokenizer(model_path={str(self._model_path)!r}, vocab_size={self.vocab_size}, "
            f"max_length={self._max_length})"
        )

    # ------------------------------------------------------------------ HF files

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[Path, Path, Path]:
        """Write ``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        The layout is the one transformers' ``LlamaTokenizer`` reads. ``legacy`` and
        ``add_prefix_space`` name this tokenizer's ``prepend_scheme`` (``None``: ``legacy=True``,
        whose ids there equal SentencePiece's except for texts that begin with a space or
        U+2581 or hold special-token text, see ``prepend_scheme``), and the scheme itself is
        recorded under ``"vishwam_prepend_scheme"`` so that `from_pretrained` and
        `vishwam.hf.load_hf_tokenizer` load this very tokenizer back. The three files are
        atomic as a set (`write_tokenizer_files`).
        """
        folder = Path(directory)
        specials = self.special_tokens
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": self._add_bos_token,
            "add_eos_token": self._add_eos_token,
            "legacy": self._prepend_scheme != "first",
            **({"add_prefix_space": False} if self._prepend_scheme == "never" else {}),
            PREPEND_SCHEME_KEY: self._prepend_scheme,
            "model_max_length": self._max_length,
            "padding_side": self._padding_side,
            "clean_up_tokenization_spaces": False,
            "sp_model_kwargs": {},
            **specials,
            "added_tokens_decoder": {
                str(i): {
                    "content": token,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for i, token in sorted(self._special_pieces.items())
            },
        }
        names = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
        contents = (self._sp.serialized_model_proto(), _json_bytes(config), _json_bytes(specials))
        return write_tokenizer_files(folder, dict(zip(names, contents)))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> "VishwamAITokenizer":
        """Load a directory written by `save_pretrained`, or an HF directory with a SentencePiece
        ``tokenizer.model`` (Llama, Mistral); ``kwargs`` override the saved settings. The
        ``prepend_scheme`` is the one `save_pretrained` recorded, else ``None`` (SentencePiece's
        own ids; `vishwam.hf.load_hf_tokenizer` gives transformers' instead)."""
        folder = Path(directory)
        model = folder / "tokenizer.model"
        if not model.is_file():
            raise FileNotFoundError(
                f"{model} not found: from_pretrained expects a directory written by save_pretrained "
                "(tokenizer.model, tokenizer_config.json, special_tokens_map.json)."
            )
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path)
        saved = {"prepend_scheme": _saved_prepend_scheme(config, config_path)} if PREPEND_SCHEME_KEY in config else {}
        return cls(model, **{**pretrained_settings(folder), **saved, **kwargs})


# ---------------------------------------------------------------------- helpers


# transformers writes model_max_length=int(1e30) for "no limit"; such values are not a length.
_NO_LIMIT = 10**12


def pretrained_settings(folder: Path) -> dict[str, Any]:
    """Constructor arguments from an HF directory's ``tokenizer_config.json`` and
    ``special_tokens_map.json`` (the map wins, as in transformers): the special tokens,
    ``model_max_length``, ``add_bos_token``/``add_eos_token`` and ``padding_side``.
    Null values are left out, so the constructor's defaults apply."""
    config = _read_json(folder / "tokenizer_config.json")
    config.update({k: v for k, v in _read_json(folder / "special_tokens_map.json").items() if v is not None})
    settings: dict[str, Any] = {}
    for name in _SPECIAL_NAMES:
        token = config.get(f"{name}_token")
        if token is not None:
            settings[f"{name}_token"] = token["content"] if isinstance(token, dict) else token
    for key, name in (
        ("model_max_length", "max_length"),
        ("add_bos_token", "add_bos_token"),
        ("add_eos_token", "add_eos_token"),
        ("padding_side", "padding_side"),
    ):
        if config.get(key) is not None and not (key == "model_max_length" and config[key] >= _NO_LIMIT):
            settings[name] = config[key]
    return settings


def hf_prepend_scheme(folder: Path) -> str | None:
    """The ``prepend_scheme`` `vishwam.hf.load_hf_tokenizer` reads the ``tokenizer.model`` of
    HF directory `folder` with: the one `VishwamAITokenizer.save_pretrained` recorded in its
    ``tokenizer_config.json`` (so such files load as the tokenizer that wrote them), else the
    rule of transformers' (5.x) ``LlamaTokenizer``, which gives its ids: ``"never"`` where
    ``add_prefix_space`` is false (absent or null reads true), else ``"always"`` where
    ``legacy`` is true, else ``"first"`` (absent or null reads false). The last two differ
    only on texts holding special-token text: ``"first"`` puts no space after a special token."""
    path = folder / "tokenizer_config.json"
    config = _read_json(path)
    if PREPEND_SCHEME_KEY in config:
        return _saved_prepend_scheme(config, path)
    add_prefix_space = config.get("add_prefix_space")
    if add_prefix_space is not None and not add_prefix_space:
        return "never"
    return "always" if config.get("legacy") else "first"


def _saved_prepend_scheme(config: dict[str, Any], path: Path) -> str | None:
    scheme = config[PREPEND_SCHEME_KEY]
    if scheme is not None and scheme not in PREPEND_SCHEMES:
        raise ValueError(
            f"{path}: {PREPEND_SCHEME_KEY} is {scheme!r}, expected null or one of {list(PREPEND_SCHEMES)}; "
            "re-save the tokenizer with save_pretrained or remove the key."
        )
    return scheme


def _load_processor(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(
            f"SentencePiece model file not found: {path}. Train one with VishwamAITokenizer.train(...) "
            "or scripts/train_tokenizer.py."
        )
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(path.read_bytes())
    except RuntimeError as error:
        raise ValueError(
            f"{path} is not a valid SentencePiece model ({error}). The file is corrupt or of another "
            "format; re-train it or copy it again."
        ) from None
    return processor


def _special_tokens(
    processor: spm.SentencePieceProcessor, path: Path, given: dict[str, str | None]
) -> dict[str, tuple[int, str]]:
    """``{name: (id, piece)}`` for pad, unk, bos, eos (see `VishwamAITokenizer` for the rules)."""
    model_ids = {"pad": processor.pad_id(), "unk": processor.unk_id(), "bos": processor.bos_id(),
                 "eos": processor.eos_id()}
    unk = processor.unk_id()
    out: dict[str, tuple[int, str]] = {}
    for name in _SPECIAL_NAMES:
        token, model_id = given[name], model_ids[name]
        if model_id >= 0:
            piece = processor.id_to_piece(model_id)
            if token is not None and token != piece:
                raise ValueError(
                    f"{path}: {name}_token={token!r} disagrees with the model, whose {name} id {model_id} is "
                    f"{piece!r}; pass {name}_token={piece!r} (or None)."
                )
            out[name] = (model_id, piece)
        elif token is None and name == "pad":
            out[name] = (unk, processor.id_to_piece(unk))
        elif token is None:
            raise ValueError(
                f"{path}: the model defines no {name} token ({name} id -1) and no {name}_token was given; "
                f"pass {name}_token=PIECE naming a piece of its vocabulary."
            )
        else:
            token_id = processor.piece_to_id(token)
            if token_id == unk and token != processor.id_to_piece(unk):
                raise ValueError(
                    f"{path}: {name}_token={token!r} is not a piece of the model's vocabulary; pass a piece it "
                    f"has (e.g. {processor.id_to_piece(unk)!r}) or None."
                )
            out[name] = (token_id, token)
    return out


def _check_lossless(processor: spm.SentencePieceProcessor, path: Path) -> None:
    if processor.decode(processor.encode(_LOSSLESS_PROBE)) != _LOSSLESS_PROBE:
        raise ValueError(
            f"{path}: the model's normaliser changes text (whitespace is not kept), so decode(encode(s)) "
            "!= s. Re-train it with VishwamAITokenizer.train (identity normalisation)."
        )
    if processor.piece_to_id("<0xFF>") == processor.unk_id():
        raise ValueError(
            f"{path}: the model has no byte-fallback pieces, so characters outside its vocabulary "
            "become [UNK]. Re-train it with VishwamAITokenizer.train (byte_fallback=True)."
        )


def _check_max_length(max_length: object, n_special: int, name: str) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool):
        raise TypeError(f"{name} must be an int, got {type(max_length).__name__}.")
    if max_length < n_special + 1:
        what = ["nothing", "BOS or EOS", "BOS and EOS"][n_special]
        raise ValueError(
            f"{name}={max_length} is too small to hold {what} plus one token; pass {name}>={n_special + 1}."
        )


def _check_user_symbols(symbols: object) -> tuple[str, ...]:
    if isinstance(symbols, str):
        raise TypeError(f"user_symbols must be a sequence of str, got the str {symbols!r}; put it in a list.")
    symbols = tuple(symbols)
    for symbol in symbols:
        if not isinstance(symbol, str):
            raise TypeError(f"user_symbols must hold str, got {type(symbol).__name__} {symbol!r}.")
        if not symbol:
            raise ValueError("user_symbols may not contain the empty string.")
        if symbol in _DEFAULT_SPECIAL_TOKENS:
            raise ValueError(f"user symbol {symbol!r} is already a special token (ids 0-3).")
    if len(set(symbols)) != len(symbols):
        duplicates = sorted({s for s in symbols if symbols.count(s) > 1})
        raise ValueError(f"user_symbols has duplicates: {duplicates}.")
    return symbols


def _text_type_error(method: str, value: object) -> str:
    return f"{method} expects str, got {type(value).__name__}: {value!r:.80}"


def _check_texts(method: str, texts: object) -> list[str]:
    if isinstance(texts, (str, bytes)):
        kind = type(texts).__name__
        raise TypeError(f"{method} expects a list of str, got a single {kind}; put it in a list.")
    if not isinstance(texts, list):
        if not isinstance(texts, (tuple, Sequence)):
            raise TypeError(f"{method} expects a list of str, got {type(texts).__name__}.")
        texts = list(texts)
    if not all(isinstance(text, str) for text in texts):
        index, value = next((i, t) for i, t in enumerate(texts) if not isinstance(t, str))
        kind = type(value).__name__
        raise TypeError(f"{method} expects a list of str, but item {index} is {kind}: {value!r:.80}")
    return texts


def _as_id_list(ids: object, ndim: int, method: str) -> list:
    """`ids` as a list (of lists), without copying lists; sp checks the element types."""
    if hasattr(ids, "tolist") and hasattr(ids, "ndim"):  # numpy / JAX arrays
        if ids.ndim != ndim:
            raise ValueError(f"{method} expects a {ndim}-D array of ids, got shape {tuple(ids.shape)}.")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{method} expects integer ids, got dtype {ids.dtype}.")
        return ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{method} expects a sequence of int ids, got {type(ids).__name__}.")
    if ndim == 1:
        rows = [ids if type(ids) is list else list(ids)]
    else:
        rows = [row if type(row) is list else _as_id_list(row, 1, method) for row in ids]
    # sp reads a sequence that starts with a str as pieces, not ids.
    first = next((row[0] for row in rows if row), None)
    if isinstance(first, (str, bytes)):
        raise TypeError(f"{method} expects int ids, got {type(first).__name__}: {first!r:.80}")
    return rows[0] if ndim == 1 else rows


def _without(ids: list[int], token: int | None) -> list[int]:
    return [i for i in ids if i != token] if token in ids else ids


def _padding_mode(padding: object) -> str | None:
    if padding is True or padding == "longest":
        return "longest"
    if padding is False or padding == "do_not_pad":
        return None
    if padding == "max_length":
        return "max_length"
    raise ValueError(
        f"padding must be 'longest' (or True), 'max_length' or False ('do_not_pad'), got {padding!r}."
    )


def _training_sentences(input: Any, input_kind: str) -> Iterator[str]:
    """Lines of the training documents or files, in order (files are checked here, eagerly)."""
    if input_kind not in ("auto", "documents", "files"):
        raise ValueError(f"input_kind must be 'auto', 'documents' or 'files', got {input_kind!r}.")
    if isinstance(input, (str, os.PathLike)) and input_kind != "documents":
        if isinstance(input, str) and not _names_file(input):
            raise FileNotFoundError(
                f"training file not found: {input!r:.80}. To train on text, pass a list of documents."
            )
        return _file_lines(_check_files([input]))
    if isinstance(input, (str, bytes)):
        raise TypeError("input_kind='documents' needs an iterable of str; put the single document in a list.")
    if input_kind == "files":
        return _file_lines(_check_files(list(input)))
    if input_kind == "auto" and isinstance(input, (list, tuple)) and input:
        named = [isinstance(x, os.PathLike) or (isinstance(x, str) and _names_file(x)) for x in input]
        if all(named):
            return _file_lines(_check_files(list(input)))
        if any(isinstance(x, os.PathLike) for x in input):
            index = named.index(False)
            raise ValueError(
                f"input mixes file paths and documents: item {index} ({input[index]!r:.80}) is not an "
                "existing file. Pass input_kind='files' or 'documents'."
            )
    return _document_lines(input)


def _names_file(text: str) -> bool:
    return "\n" not in text and len(text) < 4096 and os.path.isfile(text)


def _document_lines(documents: Iterable[str]) -> Iterator[str]:
    for index, document in enumerate(documents):
        if not isinstance(document, str):
            raise TypeError(
                f"training input item {index} is {type(document).__name__}, expected str "
                "(a document) or pass input_kind='files' with paths."
            )
        yield from document.split("\n")


def _check_files(paths: list) -> list[Path]:
    for raw in paths:
        if not isinstance(raw, (str, os.PathLike)):
            raise TypeError(f"training file paths must be str or Path, got {type(raw).__name__}.")
        if not Path(raw).is_file():
            raise FileNotFoundError(f"training file not found: {raw}")
    return [Path(raw) for raw in paths]


def _file_lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        try:
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    yield line.rstrip("\n")
        except UnicodeDecodeError as error:
            raise ValueError(f"training file {path} is not UTF-8 text ({error}).") from None


class _SentenceFeed:
    """The sentences handed to SentencePiece, counted; long ones cut to fit.

    SentencePiece turns an exception raised in the iterator into a bare RuntimeError and
    reports empty input with an empty message, so both are kept here for `_training_error`.
    """

    def __init__(self, sentences: Iterator[str], max_bytes: int, progress: "_TrainingProgress | None" = None):
        self._sentences = sentences
        self._max_chars = max(1, max_bytes // 4)  # UTF-8 uses at most 4 bytes a character
        self._progress = progress
        self.count = 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for sentence in self._sentences:
                if not sentence.strip():
                    continue
                for start in range(0, len(sentence), self._max_chars):
                    self.count += 1
                    if self._progress is not None:
                        self._progress.update()
                    yield sentence[start : start + self._max_chars]
        except Exception as error:
            self.error = error
            raise
        if self._progress is not None:
            self._progress.training()


class _TrainingProgress:
    """A tqdm bar on stderr for `VishwamAITokenizer.train`: lines read, then (SentencePiece
    trains in C++ and reports nothing countable) the elapsed time, refreshed by a thread."""

    def __init__(self):
        from tqdm.auto import tqdm

        self._bar = tqdm(desc="tokenizer: reading", unit=" lines", file=sys.stderr, mininterval=0.5,
                         dynamic_ncols=True)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def update(self) -> None:
        self._bar.update()

    def training(self) -> None:
        self._bar.set_description("tokenizer: training on the lines read", refresh=True)

        def tick():
            while not self._stop.wait(0.5):
                self._bar.refresh()

        self._ticker = threading.Thread(target=tick, daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self._bar.close()


def _training_error(error: RuntimeError, feed: _SentenceFeed, vocab_size: int, model_type: str) -> Exception:
    if feed.error is not None:
        return feed.error
    if feed.count == 0:
        return ValueError(
            "training input is empty: no line with non-whitespace text was found. Pass documents "
            "(a list of str) or text files with content."
        )
    message = str(error)
    if match := _TOO_HIGH.search(message):
        largest = int(match.group(2))
        return ValueError(
            f"vocab_size={vocab_size} is more than this corpus supports with model_type={model_type!r}: "
            f"the largest that works is {largest}. Pass vocab_size<={largest}, add text, or pass "
            "hard_vocab_limit=False to accept a smaller vocabulary."
        )
    if match := _TOO_SMALL.search(message):
        needed = int(match.group(2))
        return ValueError(
            f"vocab_size={vocab_size} is too small: this corpus needs at least {needed} pieces (4 special "
            "tokens, user symbols, 256 byte-fallback pieces and its characters). Pass "
            f"vocab_size>={needed} or a lower character_coverage."
        )
    return RuntimeError(f"SentencePiece training failed: {message}")


def write_tokenizer_files(folder: Path, files: dict[str, bytes]) -> tuple[Path, ...]:
    """Write a tokenizer's files, atomic as a set where the directory allows: a directory
    holding nothing else (a fresh one, or an earlier tokenizer) is staged whole and swapped
    in; in a directory shared with other files (an HF export) each file is replaced atomically."""
    others = [p.name for p in folder.iterdir() if p.name not in files] if folder.is_dir() else []
    if others:
        for name, data in files.items():
            atomic_write_bytes(folder / name, data)
    else:
        with atomic_directory(folder, overwrite=True) as staging:
            for name, data in files.items():
                (staging / name).write_bytes(data)
    return tuple(folder / name for name in files)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    """A tokenizer's optional JSON file: `{}` when absent."""
    return read_json_object(path, fix="re-save it with save_pretrained") if path.is_file() else {}

"""`TokenizerBase`: the encode cache, `encode`/`batch_encode`, the HF-style `__call__` and the
special-token properties that every tokenizer backend shares."""

import abc
import collections
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidTypeError, InvalidValueError
from ._inputs import _check_texts, _text_type_error

# Texts longer than this are encoded but not cached: the cache is for frequent short lines,
# and a few long documents would otherwise hold most of its memory.
CACHE_MAX_CHARS = 8192


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
            raise InvalidValueError(f"cache_size must be an int >= 0 (0 turns the cache off), got {cache_size!r}.")
        if padding_side not in ("right", "left"):
            raise InvalidValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
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
            raise InvalidTypeError(_text_type_error("encode", text))
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
            raise InvalidValueError(f"return_tensors must be None, 'np' or 'jax', got {return_tensors!r}.")

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
            raise InvalidValueError(
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


def _check_max_length(max_length: object, n_special: int, name: str) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool):
        raise InvalidTypeError(f"{name} must be an int, got {type(max_length).__name__}.")
    if max_length < n_special + 1:
        what = ["nothing", "BOS or EOS", "BOS and EOS"][n_special]
        raise InvalidValueError(
            f"{name}={max_length} is too small to hold {what} plus one token; pass {name}>={n_special + 1}."
        )


def _padding_mode(padding: object) -> str | None:
    if padding is True or padding == "longest":
        return "longest"
    if padding is False or padding == "do_not_pad":
        return None
    if padding == "max_length":
        return "max_length"
    raise InvalidValueError(
        f"padding must be 'longest' (or True), 'max_length' or False ('do_not_pad'), got {padding!r}."
    )

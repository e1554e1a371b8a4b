"""`VishwamAITokenizer`: a lossless SentencePiece tokenizer with an LRU cache and HF-compatible files.

Models trained here use the identity normaliser, keep whitespace runs and fall back to
UTF-8 bytes for characters outside the vocabulary, so ``decode(encode(s)) == s`` for any
text. Special ids are fixed: ``[PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3``, user symbols after.
Other lossless SentencePiece models (Llama's ``tokenizer.model``) load with the special
ids they define; with ``prepend_scheme`` set (as `load_hf_tokenizer` does) they encode and
decode as transformers' ``LlamaTokenizer`` does instead.
"""

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from ..errors import InvalidTypeError, InvalidValueError
from ._format import META as _META
from ._format import SPECIAL_NAMES
from ._inputs import _as_id_list, _check_texts
from ._llama_rules import PREPEND_SCHEMES, LlamaRules
from .base import TokenizerBase
from .hf_files import (
    PREPEND_SCHEME_KEY,
    _json_bytes,
    _read_json,
    _saved_prepend_scheme,
    pretrained_settings,
    write_tokenizer_files,
)
from .protocol import IdArray
from .training import train_sentencepiece

# Probe used to reject models whose normaliser would change text.
_LOSSLESS_PROBE = "  two  spaces\tand\ttabs  "


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
            with that prepend scheme; `vishwam.tokenizer.load_hf_tokenizer` picks it from
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
            raise InvalidValueError(
                f"prepend_scheme must be None (SentencePiece's own dummy prefix) or one of {PREPEND_SCHEMES} "
                f"(transformers' LlamaTokenizer), got {prepend_scheme!r}."
            )
        path = Path(model_path)
        self._sp = _load_processor(path)
        self._model_path = path
        given = dict(zip(SPECIAL_NAMES, (pad_token, unk_token, bos_token, eos_token)))
        specials = _special_tokens(self._sp, path, given)  # name -> (id, piece)
        _check_lossless(self._sp, path)
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise InvalidValueError(f"num_threads must be None (all cores) or an int >= 1, got {num_threads!r}.")
        self._init_common(max_length, cache_size, add_bos_token, add_eos_token, padding_side)

        (self._pad_id, _), (self._unk_id, _), (self._bos_id, _), (self._eos_id, _) = specials.values()
        self._special_tokens = tuple(piece for _, piece in specials.values())
        self._special_pieces = {i: piece for i, piece in specials.values()}
        self._num_threads = -1 if num_threads is None else num_threads
        proto = self._sp.serialized_model_proto()
        self._prepend_scheme = prepend_scheme
        self._llama: LlamaRules | None = None
        if prepend_scheme is not None:
            self._llama = LlamaRules(proto, self._special_pieces, prepend_scheme, self._num_threads)
            proto += f"\0prepend_scheme={prepend_scheme}".encode()  # other ids, another fingerprint
        self._fingerprint = hashlib.sha256(proto).hexdigest()

        self._meta_id = self._sp.piece_to_id(_META)
        self._byte_ids = tuple(self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256))
        # A character that falls back to bytes emits one lead byte and 0-3 continuation bytes.
        self._lead_byte_ids = frozenset(i for b, i in enumerate(self._byte_ids) if b & 0xC0 != 0x80)

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
        output = train_sentencepiece(
            input,
            output_path,
            vocab_size=vocab_size,
            model_type=model_type,
            user_symbols=user_symbols,
            hard_vocab_limit=hard_vocab_limit,
            input_kind=input_kind,
            progress=progress,
            **sentencepiece_options,
        )
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
            return self._llama.encode([text])[0]
        # sp's single-text call: its batch call costs a thread-pool round trip per call.
        return self._encode_meta(text) if _META in text else self._sp.encode(text)

    def _encode_uncached(self, texts: list[str]) -> list[list[int]]:
        if self._prepend_scheme is not None:
            return self._llama.encode(texts)
        ids = self._sp.encode(texts, num_threads=self._num_threads)
        for i, text in enumerate(texts):
            if _META in text:
                ids[i] = self._encode_meta(text)
        return ids

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
        """transformers' decode (``prepend_scheme``), see `LlamaRules.decode`."""
        plain = self._llama.plain
        return self._llama.decode(ids, skip_special_tokens, lambda run: self._sp_decode(run, "decode", plain))

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
            raise InvalidTypeError(f"{method} expects int ids ({error}).") from None

    def _check_range(self, ids: list[int]) -> None:
        n = self._sp.vocab_size()
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise InvalidValueError(
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
        return {f"{name}_token": token for name, token in zip(SPECIAL_NAMES, self._special_tokens)}

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
        `vishwam.tokenizer.load_hf_tokenizer` load this very tokenizer back. The three files are
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
        own ids; `vishwam.tokenizer.load_hf_tokenizer` gives transformers' instead)."""
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


def _load_processor(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(
            f"SentencePiece model file not found: {path}. Train one with VishwamAITokenizer.train(...) "
            "or vishwam-train-tokenizer."
        )
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(path.read_bytes())
    except RuntimeError as error:
        raise InvalidValueError(
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
    for name in SPECIAL_NAMES:
        token, model_id = given[name], model_ids[name]
        if model_id >= 0:
            piece = processor.id_to_piece(model_id)
            if token is not None and token != piece:
                raise InvalidValueError(
                    f"{path}: {name}_token={token!r} disagrees with the model, whose {name} id {model_id} is "
                    f"{piece!r}; pass {name}_token={piece!r} (or None)."
                )
            out[name] = (model_id, piece)
        elif token is None and name == "pad":
            out[name] = (unk, processor.id_to_piece(unk))
        elif token is None:
            raise InvalidValueError(
                f"{path}: the model defines no {name} token ({name} id -1) and no {name}_token was given; "
                f"pass {name}_token=PIECE naming a piece of its vocabulary."
            )
        else:
            token_id = processor.piece_to_id(token)
            if token_id == unk and token != processor.id_to_piece(unk):
                raise InvalidValueError(
                    f"{path}: {name}_token={token!r} is not a piece of the model's vocabulary; pass a piece it "
                    f"has (e.g. {processor.id_to_piece(unk)!r}) or None."
                )
            out[name] = (token_id, token)
    return out


def _check_lossless(processor: spm.SentencePieceProcessor, path: Path) -> None:
    if processor.decode(processor.encode(_LOSSLESS_PROBE)) != _LOSSLESS_PROBE:
        raise InvalidValueError(
            f"{path}: the model's normaliser changes text (whitespace is not kept), so decode(encode(s)) "
            "!= s. Re-train it with VishwamAITokenizer.train (identity normalisation)."
        )
    if processor.piece_to_id("<0xFF>") == processor.unk_id():
        raise InvalidValueError(
            f"{path}: the model has no byte-fallback pieces, so characters outside its vocabulary "
            "become [UNK]. Re-train it with VishwamAITokenizer.train (byte_fallback=True)."
        )


def _without(ids: list[int], token: int | None) -> list[int]:
    return [i for i in ids if i != token] if token in ids else ids

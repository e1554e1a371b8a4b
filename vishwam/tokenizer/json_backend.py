"""`JsonTokenizer`: a HuggingFace ``tokenizer.json`` (BPE, byte-level BPE, WordPiece, Unigram)
behind the interface of `VishwamAITokenizer`.

Checkpoints whose tokenizer ships only as a ``tokenizer.json`` (Llama 3, Mistral-Nemo,
Qwen, GPT-2 style byte-level BPE) are read with the ``tokenizers`` library, the Rust
tokenizer transformers itself runs for its "fast" tokenizers, so the ids are the ones
transformers computes from the same file. The special tokens come from the HF config
files (``tokenizer_config.json``, ``special_tokens_map.json``), as in transformers.

Example:
    tok = JsonTokenizer.from_pretrained("Qwen2-0.5B/")
    batch = tok(["hello", "a longer text"], return_tensors="np")
"""

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..errors import InvalidTypeError, InvalidValueError
from ._inputs import _as_id_list
from .base import TokenizerBase
from .hf_files import _json_bytes, pretrained_settings, write_tokenizer_files
from .protocol import IdArray

TOKENIZER_FILE = "tokenizer.json"


class JsonTokenizer(TokenizerBase):
    """A ``tokenizer.json`` tokenizer with a thread-safe LRU cache and HF-style calls.

    Arguments:
        path: the ``tokenizer.json`` file.
        max_length: default length limit of `__call__`.
        pad_token, unk_token, bos_token, eos_token: the special tokens (their text, which
            must be in the vocabulary). ``eos_token`` is required; ``bos_token`` may be
            ``None`` (Qwen has none: then ``add_bos`` is an error). A missing pad becomes
            the unk token when there is one, else the EOS token: padding is marked by
            ``attention_mask`` (and by segment ids in the data pipeline), never by
            comparing ids with ``pad_id``, so it cannot hide a real EOS from the loss.
        cache_size: entries of the encode cache; ``0`` turns it off.
        add_bos_token, add_eos_token: whether `__call__` adds BOS/EOS; ``None`` follows the
            file's post-processor (what transformers adds with ``add_special_tokens=True``).
        padding_side: ``"right"`` or ``"left"``.

    `encode` never runs the post-processor: it returns the ids of the text alone, and
    ``add_bos``/``add_eos`` add the special ids, as in `VishwamAITokenizer`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = 512,
        pad_token: str | None = None,
        unk_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        *,
        cache_size: int = 4096,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        padding_side: str = "right",
    ):
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}; pass the tokenizer.json of an HF directory.")
        try:
            self._tk = Tokenizer.from_str(file.read_text(encoding="utf-8"))
        except Exception as error:  # noqa: BLE001 - the library raises plain Exceptions for bad files
            raise InvalidValueError(f"{file} is not a valid tokenizer.json ({error}); copy it again from the checkpoint.") from None
        # A tokenizer.json may carry padding/truncation settings; ids here are always the text's alone.
        self._tk.no_padding()
        self._tk.no_truncation()
        self._path = file
        given = {"pad": pad_token, "unk": unk_token, "bos": bos_token, "eos": eos_token}
        ids = {name: self._token_id(file, name, token) for name, token in given.items()}
        if ids["eos"] is None:
            raise InvalidValueError(f"{file}: no eos_token given; pass eos_token=TEXT (the checkpoint's tokenizer_config.json "
                                    "names it).")
        if ids["pad"] is None:
            name = "unk" if ids["unk"] is not None else "eos"
            ids["pad"], given["pad"] = ids[name], given[name]
        self._pad_id, self._unk_id, self._bos_id, self._eos_id = ids["pad"], ids["unk"], ids["bos"], ids["eos"]
        self._special_tokens = given
        if add_bos_token is None or add_eos_token is None:
            bos, eos = self._post_processor_adds()
            add_bos_token = bos if add_bos_token is None else add_bos_token
            add_eos_token = eos if add_eos_token is None else add_eos_token
        if add_bos_token and self._bos_id is None:
            raise InvalidValueError(f"{file}: add_bos_token=True but there is no bos_token; pass bos_token=TEXT.")
        self._init_common(max_length, cache_size, add_bos_token, add_eos_token, padding_side)
        serialized = self._tk.to_str()
        self._fingerprint = hashlib.sha256(serialized.encode("utf-8")).hexdigest()
        self._vocab_size = max(self._tk.get_vocab(with_added_tokens=True).values()) + 1

    def _token_id(self, file: Path, name: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tk.token_to_id(token)
        if token_id is None:
            raise InvalidValueError(f"{file}: {name}_token={token!r} is not in the vocabulary; pass a token it has.")
        return token_id

    def _post_processor_adds(self) -> tuple[bool, bool]:
        """Whether the file's post-processor puts BOS first / EOS last (probed on one text)."""
        plain = self._tk.encode("a", add_special_tokens=False).ids
        full = self._tk.encode("a", add_special_tokens=True).ids
        bos = self._bos_id is not None and len(full) > len(plain) and full[0] == self._bos_id != plain[0]
        eos = len(full) > len(plain) and full[-1] == self._eos_id != plain[-1]
        return bos, eos

    # ------------------------------------------------------------------ encoding

    def _add_specials(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self._bos_id is None:
            raise InvalidValueError(f"{self._path}: add_bos=True, but this tokenizer has no BOS token.")
        return super()._add_specials(ids, add_bos, add_eos)

    def _encode_text(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def _encode_uncached(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int] | IdArray, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence (list, tuple or 1-D numpy/JAX array)."""
        if type(ids) is not list or (ids and type(ids[0]) is not int):
            ids = _as_id_list(ids, 1, "decode")
        self._check_range(ids)
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, batch_ids: Sequence[Sequence[int]] | IdArray, skip_special_tokens: bool = True
    ) -> list[str]:
        """Texts of many id sequences (a list of sequences or a 2-D numpy/JAX array)."""
        batch = _as_id_list(batch_ids, 2, "batch_decode")
        for ids in batch:
            self._check_range(ids)
        return self._tk.decode_batch(batch, skip_special_tokens=skip_special_tokens)

    def _check_range(self, ids: list) -> None:
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool):
                raise InvalidTypeError(f"decode expects int ids, got {type(i).__name__}: {i!r:.80}")
            if not 0 <= i < self._vocab_size:
                raise InvalidValueError(f"token id {i} is outside the vocabulary [0, {self._vocab_size}); were the ids "
                                 "made by another tokenizer?")

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, str]:
        """``{"pad_token": ..., "eos_token": ...}`` (absent specials left out)."""
        return {f"{name}_token": token for name, token in self._special_tokens.items() if token is not None}

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of the serialized tokenizer: equal digests, equal encodings."""
        return self._fingerprint

    @property
    def model_path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"JsonTokenizer(path={str(self._path)!r}, vocab_size={self.vocab_size}, max_length={self._max_length})"

    # ------------------------------------------------------------------ HF files

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[Path, Path, Path]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
        (atomic as a set: `write_tokenizer_files`), the files `from_pretrained` and transformers'
        ``PreTrainedTokenizerFast`` read."""
        folder = Path(directory)
        specials = self.special_tokens
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self._add_bos_token,
            "add_eos_token": self._add_eos_token,
            "model_max_length": self._max_length,
            "padding_side": self._padding_side,
            "clean_up_tokenization_spaces": False,
            **specials,
        }
        return write_tokenizer_files(folder, {TOKENIZER_FILE: self._tk.to_str(pretty=True).encode("utf-8"),
                                              "tokenizer_config.json": _json_bytes(config),
                                              "special_tokens_map.json": _json_bytes(specials)})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> "JsonTokenizer":
        """Load an HF directory's ``tokenizer.json`` with the special tokens and settings of
        its ``tokenizer_config.json`` / ``special_tokens_map.json``; ``kwargs`` override them."""
        folder = Path(directory)
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: JsonTokenizer.from_pretrained expects an HF directory with "
                                    "a tokenizer.json.")
        return cls(file, **{**pretrained_settings(folder), **kwargs})

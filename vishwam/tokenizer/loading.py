"""Loading the tokenizer of an HF checkpoint directory, and the token ids its model
generation config names (`generation_config.json`, else `config.json`)."""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import Tokenizer

from ..errors import InvalidValueError
from ..files import read_json_object
from .hf_files import hf_prepend_scheme, pretrained_settings
from .json_backend import TOKENIZER_FILE, JsonTokenizer
from .sentencepiece_backend import VishwamAITokenizer

# An HF directory's model config (transformers' `config.json`) and its generation settings.
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def has_hf_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds tokenizer files `load_hf_tokenizer` reads (a SentencePiece
    `tokenizer.model` or a `tokenizer.json`)."""
    folder = Path(directory)
    return (folder / "tokenizer.model").is_file() or (folder / TOKENIZER_FILE).is_file()


def load_hf_tokenizer(directory: str | os.PathLike, **kwargs: Any) -> VishwamAITokenizer | JsonTokenizer:
    """The tokenizer of an HF directory: a `VishwamAITokenizer` over its SentencePiece
    `tokenizer.model` (Llama, Mistral, TinyLlama), or a `JsonTokenizer` over its
    `tokenizer.json` (Llama 3, Qwen, GPT-2 style BPE) when there is no usable
    `tokenizer.model`. Either gives the ids transformers' `AutoTokenizer` gives for the
    same files: a `tokenizer.model` is read with the `prepend_scheme` of
    `vishwam.tokenizer.hf_prepend_scheme` (transformers' `LlamaTokenizer` rules, from
    `legacy` and `add_prefix_space`; a text that begins with a space gets no extra one,
    and decoding drops one leading space), except for files `VishwamAITokenizer.save_pretrained`
    wrote, which load as the tokenizer that wrote them.

    The special tokens, `add_bos_token`/`add_eos_token` and `model_max_length` come from
    `tokenizer_config.json` and `special_tokens_map.json`; a pad, BOS or EOS those files
    leave out is taken from the ids of `generation_config.json` (the first of an
    `eos_token_id` list: the others are stop ids, see `generation_eos_ids`). `kwargs`
    override all of them.
    """
    folder = Path(directory)
    sp_file, json_file = folder / "tokenizer.model", folder / TOKENIZER_FILE
    if not has_hf_tokenizer(folder):
        found = sorted(p.name for p in folder.glob("tokenizer*")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"load_hf_tokenizer: {folder} has neither a SentencePiece tokenizer.model nor a tokenizer.json "
            f"(found {found}); copy the tokenizer files of the checkpoint too."
        )
    generation = _generation_config(folder)
    refusal = None
    if sp_file.is_file():
        try:
            settings = _with_generation_ids(pretrained_settings(folder), generation, lambda: _sp_piece(sp_file))
            settings["prepend_scheme"] = hf_prepend_scheme(folder)
            return VishwamAITokenizer(sp_file, **{**settings, **kwargs})
        except ValueError as error:
            refusal = f"the tokenizer.model in {folder} is not usable by VishwamAITokenizer: {error}"
            if not json_file.is_file():
                raise InvalidValueError(f"load_hf_tokenizer: {refusal}") from None
    try:
        settings = _with_generation_ids(pretrained_settings(folder), generation, lambda: _json_token(json_file))
        return JsonTokenizer(json_file, **{**settings, **kwargs})
    except ValueError as error:
        also = f" ({refusal})" if refusal else ""
        raise InvalidValueError(f"load_hf_tokenizer: the tokenizer.json in {folder} is not usable: {error}{also}") from None


def generation_eos_ids(directory: str | os.PathLike) -> list[int]:
    """The ids an HF model stops generating at: `eos_token_id` (an int or a list) of its
    `generation_config.json`, else of its `config.json`; `[]` when neither names one."""
    folder = Path(directory)
    stop = _stop_ids(_generation_config(folder).get("eos_token_id"))
    if not stop and (folder / CONFIG_FILE).is_file():
        stop = _stop_ids(read_json_object(folder / CONFIG_FILE).get("eos_token_id"))
    return stop


def _generation_config(folder: Path) -> dict[str, Any]:
    path = folder / GENERATION_CONFIG_FILE
    return read_json_object(path) if path.is_file() else {}


def _stop_ids(value: Any) -> list[int]:
    """`eos_token_id` of an HF config: an int, a list of ints, or absent."""
    ids = [value] if isinstance(value, int) else value if isinstance(value, list) else []
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def _with_generation_ids(settings: dict[str, Any], generation: Mapping[str, Any], lookup) -> dict[str, Any]:
    """`settings` plus the tokens of generation_config.json's pad/bos/eos ids the tokenizer
    files do not name; `lookup()` gives the id -> token function (built only when needed)."""
    wanted = {}
    for name in ("pad", "bos", "eos"):
        ids = _stop_ids(generation.get(f"{name}_token_id"))
        if ids and f"{name}_token" not in settings:
            wanted[name] = ids[0]
    if not wanted:
        return settings
    token_of = lookup()
    return {**settings, **{f"{name}_token": token_of(i) for name, i in wanted.items()}}


def _sp_piece(path: Path):
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(path.read_bytes())
    return processor.id_to_piece


def _json_token(path: Path):
    return Tokenizer.from_file(str(path)).id_to_token

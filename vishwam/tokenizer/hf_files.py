"""The HuggingFace tokenizer files: settings read from `tokenizer_config.json` and
`special_tokens_map.json`, transformers' prepend-scheme rule, and writing a tokenizer's
files atomically."""

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidValueError
from ..files import atomic_directory, atomic_write_bytes, read_json_object
from ._format import SPECIAL_NAMES
from ._llama_rules import PREPEND_SCHEMES

# The tokenizer_config.json key in which `VishwamAITokenizer.save_pretrained` records its
# ``prepend_scheme``.
PREPEND_SCHEME_KEY = "vishwam_prepend_scheme"

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
    for name in SPECIAL_NAMES:
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
    """The ``prepend_scheme`` `load_hf_tokenizer` reads the ``tokenizer.model`` of
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
        raise InvalidValueError(
            f"{path}: {PREPEND_SCHEME_KEY} is {scheme!r}, expected null or one of {list(PREPEND_SCHEMES)}; "
            "re-save the tokenizer with save_pretrained or remove the key."
        )
    return scheme


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

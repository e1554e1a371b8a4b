"""transformers `config.json` <-> `ModelConfig`: what every family shares (shapes, RoPE,
dtype, the features no family has); each family's own rules are in `vishwam.hf.families`."""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from ..config import ModelConfig
from ..errors import InvalidValueError
from ..files import read_json_object
from ..tokenizer import BOS_ID, EOS_ID, PAD_ID
from ..tokenizer.loading import CONFIG_FILE
from .families import FAMILIES, Family, family_for, family_of

_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}
# Token ids of `VishwamAITokenizer` (fixed by its format), written into config.json.
DEFAULT_TOKEN_IDS = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def config_from_hf(hf: Mapping[str, Any], *, dtype: Any = None) -> ModelConfig:
    """The `ModelConfig` of a transformers `config.json` (as a dict).

    Arguments:
        hf: the parsed `config.json` of a supported family (`SUPPORTED_ARCHITECTURES`).
        dtype: parameter and compute dtype (`"float32"`, `"bfloat16"`, `"float16"`
            or a numpy/jax dtype); `None` keeps the checkpoint's `dtype`/`torch_dtype`
            (float32 if it names none).

    A family's one window for every layer (`Family.sliding_window`: Mistral's, Mixtral's)
    becomes `ModelConfig.sliding_window` (`None` when it is at least
    `max_position_embeddings`, where it hides nothing); the rest is the family's own
    (`vishwam.hf.families`: Qwen2's q/k/v biases, Mixtral's routing).
    """
    family = family_of(hf)
    defaults = family.defaults

    def get(name):
        value = hf.get(name)
        return defaults.get(name) if value is None else value

    missing = [name for name in _SHAPE_FIELDS if hf.get(name) is None]
    if missing:
        raise InvalidValueError(f"HF config: {missing} missing; a {family.model_type} config.json must give {list(_SHAPE_FIELDS)}.")
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (vishwam's MLPs are SwiGLU: 'silu')")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            unsupported.append(f"{name}=true (vishwam's projections have no bias but Qwen2's q/k/v ones)")
    unsupported += family.unsupported(hf)
    if unsupported:
        raise InvalidValueError(f"HF config: unsupported {'; '.join(unsupported)}.")

    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads == hf["hidden_size"]:
        head_dim = None  # the default: keeps the config equal to one built by hand
    max_seq_len = get("max_position_embeddings")
    # An explicit null means no window; Mistral's default (absent) is 4096, as in transformers.
    window = hf.get("sliding_window", defaults.get("sliding_window")) if family.sliding_window else None
    if window is not None and window >= max_seq_len:
        window = None
    dtype_name = _dtype_name((hf.get("dtype") or hf.get("torch_dtype") or "float32") if dtype is None else dtype)
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads"), head_dim=head_dim,
        ffn_dim=hf["intermediate_size"], norm_type="rms", norm_eps=float(get("rms_norm_eps")),
        rope_theta=_rope_theta(hf, defaults["rope_theta"]), max_seq_len=max_seq_len,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), param_dtype=dtype_name, compute_dtype=dtype_name,
        sliding_window=window, qkv_bias=family.qkv_bias,
    )
    if family.moe_fields is None:
        fields.update(num_experts=1, experts_per_token=1)
    else:
        fields.update(family.moe_fields(hf, get))
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig, *, token_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The transformers `config.json` (as a dict) of a model with `config`.

    The family is the one whose `Family.writes` holds (`family_for`): MoE configs become
    `MixtralForCausalLM`; dense ones `Qwen2ForCausalLM` with `qkv_bias`,
    `MistralForCausalLM` with a `sliding_window`, else `LlamaForCausalLM`.
    Raises `ValueError` listing every feature the family lacks.
    `token_ids` (`pad_token_id`, `bos_token_id`, `eos_token_id`) default to
    `VishwamAITokenizer`'s fixed ids.
    """
    family = family_for(config)
    _check_exportable(config, family)
    hf: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        # Top-level rope_theta with rope_scaling null is read the same by transformers 4 and 5.
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": config.param_dtype,
        "use_cache": True,
        **DEFAULT_TOKEN_IDS,
        **(token_ids or {}),
    }
    hf.update(family.hf_fields(config))
    return hf


def _rope_theta(hf: Mapping[str, Any], default: float) -> float:
    """`rope_theta` from the top level or from transformers 5's `rope_parameters`;
    any RoPE scaling other than the default rotary embedding is refused."""
    params = hf.get("rope_parameters")
    scaling = params if params is not None else hf.get("rope_scaling")
    rope_type = "default"
    if scaling is not None:
        if not isinstance(scaling, Mapping):
            raise InvalidValueError(f"HF config: rope_parameters/rope_scaling must be an object, got {scaling!r}.")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        raise InvalidValueError(
            f"HF config: RoPE type {rope_type!r} ({scaling}) is not implemented; vishwam implements only the "
            "default rotary embedding ('default', no scaling). Use a checkpoint without RoPE scaling."
        )
    theta = (params or {}).get("rope_theta", hf.get("rope_theta"))
    return float(default if theta is None else theta)


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        if dtype in _DTYPE_NAMES:
            return _DTYPE_NAMES[dtype]
    else:
        name = jnp.dtype(dtype).name
        if name in _DTYPE_NAMES:
            return name
    raise InvalidValueError(f"Unsupported dtype {dtype!r}; choose 'float32', 'bfloat16' or 'float16'.")


def _check_exportable(config: ModelConfig, family: Family) -> None:
    names = "/".join(f.name for f in FAMILIES)
    problems = []
    if config.qkv_bias and (config.is_moe or config.sliding_window is not None):
        problems.append("qkv_bias=True with MoE or a sliding_window (only Qwen2, dense and windowless, has q/k/v "
                        "biases)")
    if config.norm_type != "rms":
        problems.append(f"norm_type={config.norm_type!r} (HF {names} use RMSNorm: 'rms')")
    problems += family.export_problems(config)
    if problems:
        raise InvalidValueError(f"save_hf_checkpoint: the config has features no HF {names} has: "
                                f"{'; '.join(problems)}.")


def is_hf_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` looks like a transformers checkpoint (its config.json names an
    architecture or a model_type), as opposed to a vishwam directory (whose config.json
    is a `ModelConfig`). For CLIs that accept either, e.g. a distillation teacher."""
    path = Path(directory) / CONFIG_FILE
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(hf, dict) and ("architectures" in hf or "model_type" in hf)


def _read_hf_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"load_hf_checkpoint: {folder} is not a directory.")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"load_hf_checkpoint: {path} not found; an HF checkpoint directory has a config.json.")
    return read_json_object(path)

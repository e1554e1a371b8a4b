"""transformers `config.json` <-> `ModelConfig`: what every family shares (shapes, RoPE,
dtype, the features no family has); each family's own rules are in `vishwam.hf.families`."""

import json
import math
import os
import warnings
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
    (`vishwam.hf.families`: Qwen2's q/k/v biases, the MoE families' routing, Qwen3-MoE's and
    OLMoE's q/k norms). RoPE scaling (`linear`, `dynamic`, `llama3`, `yarn`) becomes the
    `ModelConfig.rope_*` fields, yarn's `mscale`/`mscale_all_dim` its attention factor.
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
        max_seq_len=max_seq_len, **_rope_fields(hf, defaults["rope_theta"], max_seq_len),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), param_dtype=dtype_name, compute_dtype=dtype_name,
        sliding_window=window, qkv_bias=family.qkv_bias, qk_norm=family.qk_norm,
    )
    if family.moe_fields is None:
        fields.update(num_experts=1, experts_per_token=1)
    else:
        fields.update(family.moe_fields(hf, get))
    if family.own_fields is not None:
        fields.update(family.own_fields(hf, get))
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig, *, token_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The transformers `config.json` (as a dict) of a model with `config`.

    The family is the one whose `Family.writes` holds (`family_for`): MoE configs become
    `Qwen3MoeForCausalLM` with `qk_norm="head"`, `OlmoeForCausalLM` with `"full"`,
    `Qwen2MoeForCausalLM` with shared experts or `qkv_bias`, else `MixtralForCausalLM`;
    dense ones `Qwen3ForCausalLM` with `qk_norm="head"`, `Qwen2ForCausalLM` with `qkv_bias`, `MistralForCausalLM` with a
    `sliding_window`, else `LlamaForCausalLM`. RoPE scaling is written as `rope_scaling`.
    Raises `ValueError` listing every feature the family lacks.
    `token_ids` (`pad_token_id`, `bos_token_id`, `eos_token_id`) default to
    `VishwamAITokenizer`'s fixed ids.
    """
    family = family_for(config)
    _check_exportable(config, family)
    if config.is_moe and family.balance_loss is not None and config.load_balance_loss != family.balance_loss:
        warnings.warn(f"config_to_hf: the model trained with load_balance_loss={config.load_balance_loss!r}; its "
                      f"router_aux_loss_coef={config.router_aux_loss_coef} is written as it is, and transformers "
                      "weighs its own definition ('hf') with it.", stacklevel=2)
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
        # Top-level rope_theta with rope_scaling is read the same by transformers 4 and 5.
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling_to_hf(config),
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": config.param_dtype,
        "use_cache": True,
        **DEFAULT_TOKEN_IDS,
        **(token_ids or {}),
    }
    hf.update(family.hf_fields(config))
    return hf


_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _rope_fields(hf: Mapping[str, Any], default_theta: float, max_seq_len: int) -> dict[str, Any]:
    """The `ModelConfig.rope_*` fields of transformers 5's `rope_parameters` or the top-level
    `rope_theta` + `rope_scaling` of transformers 4, read as `modeling_rope_utils` reads them."""
    params = hf.get("rope_parameters")
    scaling = params if params is not None else hf.get("rope_scaling")
    scaling = {} if scaling is None else scaling
    if not isinstance(scaling, Mapping):
        raise InvalidValueError(f"HF config: rope_parameters/rope_scaling must be an object, got {scaling!r}.")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise InvalidValueError(
            f"HF config: RoPE type {rope_type!r} ({dict(scaling)}) is not implemented; vishwam implements "
            f"{list(_ROPE_TYPES)}."
        )
    partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise InvalidValueError(f"HF config: partial_rotary_factor={partial} is not implemented; vishwam rotates the "
                                "whole head (1.0).")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta"))
    fields: dict[str, Any] = {"rope_theta": float(default_theta if theta is None else theta)}
    if rope_type == "default":
        return fields
    # llama3 and yarn: transformers gives a top-level original_max_position_embeddings priority.
    original = hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    original = max_seq_len if original is None else int(original)
    factor = scaling.get("factor")
    if factor is None and rope_type == "yarn":
        factor = max_seq_len / original
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise InvalidValueError(f"HF config: RoPE type {rope_type!r} needs a numeric 'factor', got {factor!r}.")
    fields.update(rope_scaling=rope_type, rope_factor=float(factor))
    if rope_type == "dynamic":
        fields["rope_original_max_seq_len"] = max_seq_len  # transformers: max_position_embeddings
    elif rope_type == "llama3":
        missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in scaling]
        if missing:
            raise InvalidValueError(f"HF config: RoPE type 'llama3' needs {missing} in {dict(scaling)}.")
        fields.update(rope_original_max_seq_len=original, rope_low_freq_factor=float(scaling["low_freq_factor"]),
                      rope_high_freq_factor=float(scaling["high_freq_factor"]))
    elif rope_type == "yarn":
        attention_factor = scaling.get("attention_factor")
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim:
            def get_mscale(m):
                return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
            attention_factor = get_mscale(mscale) / get_mscale(mscale_all_dim)
        fields.update(rope_original_max_seq_len=original, rope_beta_fast=float(scaling.get("beta_fast") or 32),
                      rope_beta_slow=float(scaling.get("beta_slow") or 1),
                      rope_truncate=bool(scaling.get("truncate", True)),
                      rope_attention_factor=None if attention_factor is None else float(attention_factor))
    return fields


def _rope_scaling_to_hf(config: ModelConfig) -> dict[str, Any] | None:
    """transformers' `rope_scaling` object of `config` (`None` for plain RoPE)."""
    if config.rope_scaling == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": config.rope_scaling, "factor": config.rope_factor}
    original = config.max_seq_len if config.rope_original_max_seq_len is None else config.rope_original_max_seq_len
    if config.rope_scaling == "llama3":
        scaling.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                       original_max_position_embeddings=original)
    elif config.rope_scaling == "yarn":
        scaling.update(original_max_position_embeddings=original, beta_fast=config.rope_beta_fast,
                       beta_slow=config.rope_beta_slow, truncate=config.rope_truncate)
        if config.rope_attention_factor is not None:
            scaling["attention_factor"] = config.rope_attention_factor
        if config.rope_mscale_all_dim:
            scaling["mscale_all_dim"] = config.rope_mscale_all_dim
    return scaling


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
    if (config.rope_scaling == "dynamic"
            and config.rope_original_max_seq_len not in (None, config.max_seq_len)):
        problems.append(f"rope_original_max_seq_len={config.rope_original_max_seq_len} with dynamic RoPE (HF's "
                        f"dynamic scaling starts at max_position_embeddings: set it to max_seq_len={config.max_seq_len} "
                        "or None)")
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

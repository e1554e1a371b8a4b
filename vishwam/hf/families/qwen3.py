"""Qwen3 (`Qwen3ForCausalLM`): dense Llama without biases whose queries and keys are
RMS-normalised per head before RoPE (`qk_norm="head"`: `self_attn.{q,k}_norm.weight`,
`[head_dim]`). Its windows on some layers only (`use_sliding_window=true`) are refused."""

from typing import Any

from ...config import ModelConfig
from ._family import Family
from ._moe import refuse_windows


def _writes(config: ModelConfig) -> bool:
    return not config.is_moe


def _hf_fields(config: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": config.num_layers}


def _export_problems(config: ModelConfig) -> list[str]:
    problems = []
    if config.qkv_bias:
        problems.append("qkv_bias=True (Qwen3's projections have no biases)")
    if config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window} (Qwen3 is written without windows)")
    return problems


QWEN3 = Family(
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    writes=_writes,
    hf_fields=_hf_fields,
    qk_norm="head",
    unsupported=refuse_windows,
    export_problems=_export_problems,
)

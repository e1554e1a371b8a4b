"""Qwen2 (`Qwen2ForCausalLM`): Llama with q/k/v biases (`ModelConfig.qkv_bias`). Its
windows on some layers only (`use_sliding_window=true`) are refused."""

from collections.abc import Mapping
from typing import Any

from ...config import ModelConfig
from ._family import Family


def _writes(config: ModelConfig) -> bool:
    return not config.is_moe and config.qkv_bias


def _hf_fields(config: ModelConfig) -> dict[str, Any]:
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.num_layers}


def _unsupported(hf: Mapping[str, Any]) -> list[str]:
    if hf.get("use_sliding_window"):
        return ["use_sliding_window=true (Qwen2's windows on some layers only; vishwam has one window for every "
                "layer)"]
    return []


def _export_problems(config: ModelConfig) -> list[str]:
    if config.sliding_window is not None:
        return [f"sliding_window={config.sliding_window} with qkv_bias=True (Qwen2 is written without windows)"]
    return []


QWEN2 = Family(
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    writes=_writes,
    hf_fields=_hf_fields,
    qkv_bias=True,
    unsupported=_unsupported,
    export_problems=_export_problems,
)

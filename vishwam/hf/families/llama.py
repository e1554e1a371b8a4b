"""Llama (`LlamaForCausalLM`): dense, grouped-query attention, no biases, no window."""

from typing import Any

from ...config import ModelConfig
from ._family import Family


def _writes(config: ModelConfig) -> bool:
    return not config.is_moe and not config.qkv_bias and config.sliding_window is None


def _hf_fields(config: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


LLAMA = Family(
    architecture="LlamaForCausalLM",
    model_type="llama",
    defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    writes=_writes,
    hf_fields=_hf_fields,
)

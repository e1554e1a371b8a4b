"""Mistral (`MistralForCausalLM`): Llama with one sliding attention window for every layer
(`ModelConfig.sliding_window`; 4096 when config.json leaves it out, as in transformers)."""

from typing import Any

from ...config import ModelConfig
from ._family import Family


def _writes(config: ModelConfig) -> bool:
    return not config.is_moe and not config.qkv_bias and config.sliding_window is not None


def _hf_fields(config: ModelConfig) -> dict[str, Any]:
    return {"sliding_window": config.sliding_window}


MISTRAL = Family(
    architecture="MistralForCausalLM",
    model_type="mistral",
    defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32,
              "sliding_window": 4096},
    writes=_writes,
    hf_fields=_hf_fields,
    sliding_window=True,
)

"""Qwen3-MoE (`Qwen3MoeForCausalLM`): no biases; queries and keys RMS-normalised per head
before RoPE (`qk_norm="head"`: `self_attn.{q,k}_norm.weight`, `[head_dim]`); MoE layers of
softmax top-k experts (`moe_intermediate_size` wide, renormalised when `norm_topk_prob`),
no shared expert; dense layers (`intermediate_size`) where `decoder_sparse_step` and
`mlp_only_layers` say."""

from collections.abc import Callable, Mapping
from typing import Any

from ...config import ModelConfig
from . import _moe
from ._family import Family


def _writes(config: ModelConfig) -> bool:
    return config.is_moe


def _moe_fields(hf: Mapping[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
    return dict(_moe.routing_fields(hf, get, "qwen3_moe"), **_moe.layer_pattern(hf, get, hf["num_hidden_layers"]),
                moe_ffn_dim=get("moe_intermediate_size"))


def _hf_fields(config: ModelConfig) -> dict[str, Any]:
    return dict(_moe.routing_hf_fields(config), **_moe.layer_pattern_hf_fields(config),
                moe_intermediate_size=config.expert_ffn_dim, attention_bias=False, use_sliding_window=False,
                sliding_window=None)


def _export_problems(config: ModelConfig) -> list[str]:
    problems = _moe.routing_problems(config, "Qwen3-MoE")
    if config.num_shared_experts:
        problems.append(f"num_shared_experts={config.num_shared_experts} (Qwen3-MoE has none)")
    if config.qkv_bias:
        problems.append("qkv_bias=True (Qwen3-MoE's projections have no biases)")
    return problems


QWEN3_MOE = Family(
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
              "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
              "norm_topk_prob": False, "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1},
    writes=_writes,
    hf_fields=_hf_fields,
    qk_norm="head",
    unsupported=_moe.refuse_windows,
    moe_fields=_moe_fields,
    export_problems=_export_problems,
    router=_moe.ROUTER,
    experts=_moe.EXPERTS,
)

"""OLMoE (`OlmoeForCausalLM`): no biases; queries and keys RMS-normalised over their whole
projected width before RoPE (`qk_norm="full"`: `self_attn.q_norm.weight` `[H * hd]`,
`self_attn.k_norm.weight` `[KV * hd]`); every layer MoE, softmax top-k experts
`intermediate_size` wide (renormalised when `norm_topk_prob`), no shared expert.
`clip_qkv` (clamping q, k and v) is refused."""

from collections.abc import Callable, Mapping
from typing import Any

from ...config import ModelConfig
from . import _moe
from ._family import Family


def _writes(config: ModelConfig) -> bool:
    return config.is_moe


def _moe_fields(hf: Mapping[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
    return _moe.routing_fields(hf, get, "olmoe")


def _hf_fields(config: ModelConfig) -> dict[str, Any]:
    return dict(_moe.routing_hf_fields(config), attention_bias=False, clip_qkv=None)


def _unsupported(hf: Mapping[str, Any]) -> list[str]:
    problems = []
    if hf.get("clip_qkv") is not None:
        problems.append(f"clip_qkv={hf['clip_qkv']} (vishwam does not clamp q, k and v)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf.get("num_attention_heads", 0) != hf.get("hidden_size"):
        problems.append(f"head_dim={head_dim} (OLMoE's q_norm is hidden_size wide: head_dim must be "
                        "hidden_size / num_attention_heads)")
    return problems


def _export_problems(config: ModelConfig) -> list[str]:
    problems = _moe.routing_problems(config, "OLMoE")
    if config.first_dense_layers or config.moe_every != 1:
        problems.append(f"first_dense_layers={config.first_dense_layers}, moe_every={config.moe_every} "
                        "(every OLMoE layer is MoE: 0 and 1)")
    if config.num_shared_experts:
        problems.append(f"num_shared_experts={config.num_shared_experts} (OLMoE has none)")
    if config.expert_ffn_dim != config.ffn_dim:
        problems.append(f"moe_ffn_dim={config.moe_ffn_dim} (OLMoE's experts are ffn_dim={config.ffn_dim} wide)")
    if config.qkv_bias:
        problems.append("qkv_bias=True (OLMoE's projections have no biases)")
    if config.dim_per_head * config.num_heads != config.hidden_size:
        problems.append(f"head_dim={config.head_dim} (OLMoE's heads are hidden_size / num_heads wide)")
    return problems


OLMOE = Family(
    architecture="OlmoeForCausalLM",
    model_type="olmoe",
    defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
              "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "router_aux_loss_coef": 0.01},
    writes=_writes,
    hf_fields=_hf_fields,
    qk_norm="full",
    unsupported=_unsupported,
    moe_fields=_moe_fields,
    export_problems=_export_problems,
    router=_moe.ROUTER,
    experts=_moe.EXPERTS,
)

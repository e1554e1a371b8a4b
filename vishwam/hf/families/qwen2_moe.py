"""Qwen2-MoE (`Qwen2MoeForCausalLM`): q/k/v biases; MoE layers of softmax top-k experts
(`moe_intermediate_size` wide, renormalised when `norm_topk_prob`) plus one shared expert
(`shared_expert_intermediate_size` wide) scaled per token by a sigmoid gate; dense layers
(`intermediate_size`) where `decoder_sparse_step`/`mlp_only_layers` say.

Its own tensors, within `model.layers.N.` (the routed experts' in `vishwam.hf.families._moe`):

    mlp.shared_expert.{gate,up,down}_proj.weight  [out, in]  the shared expert
    mlp.shared_expert_gate.weight                 [1, D]     its gate
"""

from collections.abc import Callable, Mapping
from typing import Any

from ...config import ModelConfig
from ...errors import InvalidValueError
from . import _moe
from ._family import Family


def _writes(config: ModelConfig) -> bool:
    return config.is_moe and bool(config.num_shared_experts or config.qkv_bias)


def _moe_fields(hf: Mapping[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
    shared = get("shared_expert_intermediate_size")
    if not isinstance(shared, int) or shared <= 0:
        raise InvalidValueError(f"HF config: a qwen2_moe config.json must give shared_expert_intermediate_size > 0, "
                                f"got {shared!r}.")
    return dict(_moe.routing_fields(hf, get, "qwen2_moe"), **_moe.layer_pattern(hf, get, hf["num_hidden_layers"]),
                moe_ffn_dim=get("moe_intermediate_size"), num_shared_experts=1, shared_expert_ffn_dim=shared,
                shared_expert_gate=True)


def _hf_fields(config: ModelConfig) -> dict[str, Any]:
    return dict(_moe.routing_hf_fields(config), **_moe.layer_pattern_hf_fields(config),
                moe_intermediate_size=config.expert_ffn_dim, shared_expert_intermediate_size=config.shared_mlp_dim,
                qkv_bias=True, use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)


def _unsupported(hf: Mapping[str, Any]) -> list[str]:
    problems = _moe.refuse_windows(hf)
    if hf.get("qkv_bias") is False:
        problems.append("qkv_bias=false (vishwam reads Qwen2-MoE with its q/k/v biases)")
    return problems


def _export_problems(config: ModelConfig) -> list[str]:
    problems = _moe.routing_problems(config, "Qwen2-MoE")
    if config.num_shared_experts != 1 or not config.shared_expert_gate:
        problems.append(f"num_shared_experts={config.num_shared_experts}, shared_expert_gate="
                        f"{config.shared_expert_gate} (Qwen2-MoE has one gated shared expert)")
    if not config.qkv_bias:
        problems.append("qkv_bias=False (Qwen2-MoE's q/k/v projections have biases)")
    return problems


QWEN2_MOE = Family(
    architecture="Qwen2MoeForCausalLM",
    model_type="qwen2_moe",
    defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
              "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
              "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "router_aux_loss_coef": 0.001,
              "decoder_sparse_step": 1},
    writes=_writes,
    hf_fields=_hf_fields,
    qkv_bias=True,
    unsupported=_unsupported,
    moe_fields=_moe_fields,
    export_problems=_export_problems,
    router=_moe.ROUTER,
    experts=_moe.EXPERTS,
    tensors={"mlp.shared.gate_proj.weight": ("mlp.shared_expert.gate_proj.weight", True),
             "mlp.shared.up_proj.weight": ("mlp.shared_expert.up_proj.weight", True),
             "mlp.shared.down_proj.weight": ("mlp.shared_expert.down_proj.weight", True),
             "mlp.shared_gate": ("mlp.shared_expert_gate.weight", True)},
)

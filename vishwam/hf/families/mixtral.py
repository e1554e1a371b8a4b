"""Mixtral (`MixtralForCausalLM`): every layer MoE, routed by a softmax over the router
logits, top-k, the weights renormalised to sum to one; one sliding window for every layer
(none by default). It becomes `moe_dispatch="auto"` with `capacity_factor=None` (dropless,
like Mixtral: `grouped` on CPU, `ragged` on GPU/TPU), no router z-loss (Mixtral has none) and
transformers' load-balancing loss (`load_balance_loss="hf"`), so `router_aux_loss_coef` keeps its
meaning in both directions. A model trained with another definition exports with its coefficient as
it is, and `config_to_hf` warns that transformers will weigh its own loss with it.

Its MoE tensors, within `model.layers.N.`:

    block_sparse_moe.gate.weight           [X, D]  the router
    block_sparse_moe.experts.E.w1.weight   [F, D]  expert E's gate projection
    block_sparse_moe.experts.E.w3.weight   [F, D]  expert E's up projection
    block_sparse_moe.experts.E.w2.weight   [D, F]  expert E's down projection
"""

from collections.abc import Callable, Mapping
from typing import Any

from ...config import ModelConfig
from ...errors import InvalidValueError
from ._family import Family


def _writes(config: ModelConfig) -> bool:
    return config.is_moe and not config.num_shared_experts and not config.qkv_bias


def _moe_fields(hf: Mapping[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
    if not isinstance(hf.get("num_local_experts"), int) or hf["num_local_experts"] < 2:
        raise InvalidValueError(f"HF config: a mixtral config.json must give num_local_experts >= 2, got "
                                f"{hf.get('num_local_experts')!r}.")
    return dict(
        num_experts=hf["num_local_experts"], experts_per_token=get("num_experts_per_tok"),
        router_type="softmax", router_renormalize=True, moe_dispatch="auto", capacity_factor=None,
        router_aux_loss_coef=float(get("router_aux_loss_coef")), router_z_loss_coef=0.0,
        router_jitter=float(get("router_jitter_noise")), load_balance_loss="hf",
    )


def _hf_fields(config: ModelConfig) -> dict[str, Any]:
    return dict(num_local_experts=config.num_experts, num_experts_per_tok=config.experts_per_token,
                router_aux_loss_coef=config.router_aux_loss_coef, router_jitter_noise=config.router_jitter,
                output_router_logits=False, sliding_window=config.sliding_window)


def _export_problems(config: ModelConfig) -> list[str]:
    problems = []
    if config.first_dense_layers or config.moe_every != 1:
        problems.append(f"first_dense_layers={config.first_dense_layers}, moe_every={config.moe_every} "
                        "(every Mixtral layer is MoE: 0 and 1)")
    if config.num_shared_experts:
        problems.append(f"num_shared_experts={config.num_shared_experts} (Mixtral has none)")
    if config.router_type != "softmax" or not config.router_renormalize:
        problems.append(f"router_type={config.router_type!r}, router_renormalize={config.router_renormalize} "
                        "(Mixtral routes by softmax and renormalises the top-k weights)")
    if config.aux_free_bias:
        problems.append("aux_free_bias=True (Mixtral has no selection bias)")
    if config.expert_ffn_dim != config.ffn_dim:
        problems.append(f"moe_ffn_dim={config.moe_ffn_dim} (Mixtral's experts are ffn_dim={config.ffn_dim} wide)")
    if config.n_groups != 1 or config.routed_scaling_factor != 1.0:
        problems.append(f"n_groups={config.n_groups}, routed_scaling_factor={config.routed_scaling_factor} "
                        "(Mixtral routes over all experts, unscaled)")
    return problems


MIXTRAL = Family(
    architecture="MixtralForCausalLM",
    model_type="mixtral",
    defaults={"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32,
              "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0},
    writes=_writes,
    hf_fields=_hf_fields,
    sliding_window=True,
    moe_fields=_moe_fields,
    export_problems=_export_problems,
    router="block_sparse_moe.gate.weight",
    experts={"mlp.experts.gate": "block_sparse_moe.experts.{e}.w1.weight",
             "mlp.experts.up": "block_sparse_moe.experts.{e}.w3.weight",
             "mlp.experts.down": "block_sparse_moe.experts.{e}.w2.weight"},
)

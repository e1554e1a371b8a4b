"""What the fine-grained MoE families (Qwen2-MoE, Qwen3-MoE, OLMoE) share: softmax top-k
routing with an optional renormalisation (`norm_topk_prob`), per-expert tensors under
`mlp.experts.E.`, the router at `mlp.gate.weight`, and Qwen's choice of MoE layers
(`decoder_sparse_step`, `mlp_only_layers`)."""

from collections.abc import Callable, Mapping
from typing import Any

from ...config import ModelConfig
from ...errors import InvalidValueError

ROUTER = "mlp.gate.weight"
EXPERTS = {"mlp.experts.gate": "mlp.experts.{e}.gate_proj.weight",
           "mlp.experts.up": "mlp.experts.{e}.up_proj.weight",
           "mlp.experts.down": "mlp.experts.{e}.down_proj.weight"}


def num_experts(hf: Mapping[str, Any], get: Callable[[str], Any], model_type: str) -> int:
    """`num_experts` (the published configs), or `num_local_experts` (transformers 5 writes it)."""
    value = hf.get("num_experts", hf.get("num_local_experts"))
    value = get("num_experts") if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise InvalidValueError(f"HF config: a {model_type} config.json must give num_experts >= 2, got {value!r}.")
    return value


def routing_fields(hf: Mapping[str, Any], get: Callable[[str], Any], model_type: str) -> dict[str, Any]:
    """The `ModelConfig` routing fields: softmax, top-k, `norm_topk_prob`, dropless, no z-loss,
    transformers' load-balancing loss (`"hf"`, which `router_aux_loss_coef` weighs there too)."""
    return dict(
        num_experts=num_experts(hf, get, model_type), experts_per_token=get("num_experts_per_tok"),
        router_type="softmax", router_renormalize=bool(get("norm_topk_prob")), moe_dispatch="auto",
        capacity_factor=None, router_aux_loss_coef=float(get("router_aux_loss_coef")), router_z_loss_coef=0.0,
        router_jitter=0.0, load_balance_loss="hf",
    )


def routing_hf_fields(config: ModelConfig) -> dict[str, Any]:
    return dict(num_experts=config.num_experts, num_experts_per_tok=config.experts_per_token,
                norm_topk_prob=config.router_renormalize, router_aux_loss_coef=config.router_aux_loss_coef,
                output_router_logits=False)


def layer_pattern(hf: Mapping[str, Any], get: Callable[[str], Any], num_layers: int) -> dict[str, int]:
    """`first_dense_layers` and `moe_every` of Qwen's MoE layers: layer i is MoE when
    `(i + 1) % decoder_sparse_step == 0` and i is not in `mlp_only_layers`. Refuses a
    pattern vishwam's dense prefix + every n-th layer cannot express."""
    step = get("decoder_sparse_step")
    dense_only = hf.get("mlp_only_layers") or []
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise InvalidValueError(f"HF config: decoder_sparse_step must be a positive integer, got {step!r}.")
    moe = [(i + 1) % step == 0 and i not in dense_only for i in range(num_layers)]
    for first in range(num_layers + 1):
        for every in range(1, num_layers - first + 1):
            if (num_layers - first) % every == 0 and moe == [
                    i >= first and (i - first) % every == every - 1 for i in range(num_layers)]:
                return dict(first_dense_layers=first, moe_every=every)
    raise InvalidValueError(
        f"HF config: unsupported decoder_sparse_step={step}, mlp_only_layers={dense_only} (MoE layers "
        f"{[i for i in range(num_layers) if moe[i]]}); vishwam's MoE layers are a dense prefix followed by every "
        "n-th layer, with at least one MoE layer."
    )


def layer_pattern_hf_fields(config: ModelConfig) -> dict[str, Any]:
    """Qwen's `decoder_sparse_step` and `mlp_only_layers` for `config`'s MoE layers."""
    return dict(decoder_sparse_step=1,
                mlp_only_layers=[i for i in range(config.num_layers) if not config.layer_is_moe(i)])


def routing_problems(config: ModelConfig, name: str) -> list[str]:
    """What of `config`'s routing a softmax top-k family without groups or bias lacks."""
    problems = []
    if config.router_type != "softmax":
        problems.append(f"router_type={config.router_type!r} ({name} routes by softmax)")
    if config.aux_free_bias:
        problems.append(f"aux_free_bias=True ({name} has no selection bias)")
    if config.n_groups != 1 or config.routed_scaling_factor != 1.0:
        problems.append(f"n_groups={config.n_groups}, routed_scaling_factor={config.routed_scaling_factor} "
                        f"({name} routes over all experts, unscaled)")
    if config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window} ({name} is written without windows)")
    return problems


def refuse_windows(hf: Mapping[str, Any]) -> list[str]:
    if hf.get("use_sliding_window"):
        return ["use_sliding_window=true (windows on some layers only; vishwam has one window for every layer)"]
    return []

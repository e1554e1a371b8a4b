"""Parameter counts and the abstract model: how big a config is, with nothing allocated.

`count_parameters` reads the shapes of `abstract_model(config)` (`eqx.filter_eval_shape`),
so the seed preset counts instantly; `parameter_counts_closed_form` is the same count
from formulae alone, an independent check of the modules' shapes (the tests compare them).
"""

import functools
import math

import jax

from ..arrays import is_abstract
from ..config import ModelConfig
from .lm import abstract_model as abstract_model


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts of `VishwamAI(config)`: `total`, `active` (used per token: top-k of the
    routed experts) and `routed` (all routed-expert weights)."""
    return dict(_counts(config))


@functools.cache  # configs are frozen (hashable); the planner asks once per candidate
def _counts(config: ModelConfig) -> tuple[tuple[str, int], ...]:
    model = abstract_model(config)
    total = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(model) if is_abstract(x))
    routed = sum(math.prod(x.shape) for stage in model.stages for block in stage.blocks if block.is_moe
                 for x in jax.tree_util.tree_leaves(block.mlp.experts) if is_abstract(x))
    inactive = routed * (config.num_experts - config.experts_per_token) // config.num_experts if routed else 0
    return ("total", total), ("active", total - inactive), ("routed", routed)


def parameter_counts_closed_form(config: ModelConfig) -> dict[str, int]:
    """`count_parameters` from the formulae alone.

    Mirrors the modules in `vishwam.nn` (no biases on projections but the optional q/k/v ones, SwiGLU MLPs
    and experts, the shared experts as one MLP with an optional `[hidden, 1]` gate, norms with a scale only
    for RMSNorm and scale+bias for LayerNorm, the q/k norms' scales: `head_dim` each per head, or the
    projected widths).
    """
    h, hd, nh, nkv = config.hidden_size, config.dim_per_head, config.num_heads, config.kv_heads
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + (nh * hd + 2 * nkv * hd if config.qkv_bias else 0)
    attn += {"none": 0, "head": 2 * hd, "full": nh * hd + nkv * hd}[config.qk_norm]
    norm = h if config.norm_type == "rms" else 2 * h
    mlp = 3 * h * config.ffn_dim
    expert = 3 * h * config.expert_ffn_dim
    total = active = routed = 0
    for i in range(config.num_layers):
        total += attn + 2 * norm
        active += attn + 2 * norm
        if config.layer_is_moe(i):
            router = h * config.num_experts
            shared = 3 * h * config.shared_mlp_dim + (h if config.shared_expert_gate else 0)
            total += router + config.num_experts * expert + shared
            routed += config.num_experts * expert
            active += router + config.experts_per_token * expert + shared
        else:
            total += mlp
            active += mlp
    embed = config.vocab_size * h
    head = 0 if config.tie_embeddings else config.vocab_size * h
    total += embed + head + norm
    active += embed + head + norm
    return {"total": total, "active": active, "routed": routed}


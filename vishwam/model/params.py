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
    """Parameter counts of `VishwamAI(config)`: `total`, `active` (used per token in training: top-k
    of the routed experts), `routed` (all routed-expert weights) and `mtp` (the multi-token
    prediction modules, in `total` and, less their inactive experts, in `active`; inference runs
    without them)."""
    return dict(_counts(config))


@functools.cache  # configs are frozen (hashable); the planner asks once per candidate
def _counts(config: ModelConfig) -> tuple[tuple[str, int], ...]:
    model = abstract_model(config)
    total = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(model) if is_abstract(x))
    blocks = [block for stage in model.stages for block in stage.blocks] + [m.block for m in model.mtp or ()]
    routed = sum(math.prod(x.shape) for block in blocks if block.is_moe
                 for x in jax.tree_util.tree_leaves(block.mlp.experts) if is_abstract(x))
    inactive = routed * (config.num_experts - config.experts_per_token) // config.num_experts if routed else 0
    mtp = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(model.mtp) if is_abstract(x))
    return ("total", total), ("active", total - inactive), ("routed", routed), ("mtp", mtp)


def parameter_counts_closed_form(config: ModelConfig) -> dict[str, int]:
    """`count_parameters` from the formulae alone.

    Mirrors the modules in `vishwam.nn` (no biases on projections but the optional q/k/v ones, SwiGLU MLPs
    and experts, the shared experts as one MLP with an optional `[hidden, 1]` gate, norms with a scale only
    for RMSNorm and scale+bias for LayerNorm, the q/k norms' scales: `head_dim` each per head, or the
    projected widths; MLA's low-rank projections with the norms of their latents).
    """
    h = config.hidden_size
    attn = _attention_parameters(config)
    norm = h if config.norm_type == "rms" else 2 * h
    mlp = 3 * h * config.ffn_dim
    expert = 3 * h * config.expert_ffn_dim
    router = h * config.num_experts + (config.num_experts if config.aux_free_bias else 0)  # + the selection bias
    shared = 3 * h * config.shared_mlp_dim + (h if config.shared_expert_gate else 0)
    total = active = routed = 0
    # Each multi-token prediction module: a block of the last layer's kind, three norms, a [2h, h] projection.
    mtp_kind = config.layer_is_moe(config.num_layers - 1)
    for is_moe in [config.layer_is_moe(i) for i in range(config.num_layers)] + [mtp_kind] * config.mtp_depth:
        total += attn + 2 * norm
        active += attn + 2 * norm
        if is_moe:
            total += router + config.num_experts * expert + shared
            routed += config.num_experts * expert
            active += router + config.experts_per_token * expert + shared
        else:
            total += mlp
            active += mlp
    embed = config.vocab_size * h
    head = 0 if config.tie_embeddings else config.vocab_size * h
    mtp_extra = config.mtp_depth * (3 * norm + 2 * h * h)
    total += embed + head + norm + mtp_extra
    active += embed + head + norm + mtp_extra
    mtp_block = attn + 2 * norm + (router + config.num_experts * expert + shared if mtp_kind else mlp)
    mtp = config.mtp_depth * mtp_block + mtp_extra
    return {"total": total, "active": active, "routed": routed, "mtp": mtp}


def _attention_parameters(config: ModelConfig) -> int:
    """One attention layer's parameters."""
    h, nh = config.hidden_size, config.num_heads
    if config.is_mla:
        qk, rank = config.qk_head_dim, config.q_lora_rank
        queries = h * nh * qk if rank is None else h * rank + rank + rank * nh * qk
        kv = h * (config.kv_lora_rank + config.qk_rope_head_dim) + config.kv_lora_rank
        kv += config.kv_lora_rank * nh * (config.qk_nope_head_dim + config.v_head_dim)
        return queries + kv + nh * config.v_head_dim * h
    hd, nkv = config.dim_per_head, config.kv_heads
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + (nh * hd + 2 * nkv * hd if config.qkv_bias else 0)
    return attn + {"none": 0, "head": 2 * hd, "full": nh * hd + nkv * hd}[config.qk_norm]

"""Pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..config import ModelConfig
from .attention import TPUMultiHeadAttention
from .mla import MultiHeadLatentAttention, mla_softmax_scale
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm, TPULayerNorm, make_norm
from .precision import dtype_from_name
from .rope import rope_scaling_of


def dropout(x, rate: float, key):
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def make_attention(config: ModelConfig, *, key: PRNGKeyArray) -> TPUMultiHeadAttention | MultiHeadLatentAttention:
    """The attention layer of `config.attention`: `TPUMultiHeadAttention` (`gqa`) or
    `MultiHeadLatentAttention` (`mla`)."""
    dtype = dtype_from_name(config.param_dtype)
    scaling = rope_scaling_of(config)
    common = dict(use_fp8=config.fp8 in ("attention", "all"), sliding_window=config.sliding_window,
                  rope_theta=config.rope_theta, rope_scaling=scaling, norm_eps=config.norm_eps,
                  implementation=config.attention_impl, block_size=config.attention_block_size,
                  fp8_scaling=config.fp8_scaling, fp8_block_size=config.fp8_block_size, init_std=config.init_std,
                  out_init_std=config.init_std / math.sqrt(2 * config.num_layers), dtype=dtype, key=key)
    if config.is_mla:
        return MultiHeadLatentAttention(
            config.hidden_size, config.num_heads, q_lora_rank=config.q_lora_rank,
            kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
            softmax_scale=mla_softmax_scale(config.qk_head_dim, scaling, config.rope_mscale_all_dim),
            rope_interleave=config.rope_interleave, **common)
    return TPUMultiHeadAttention(config.hidden_size, config.num_heads, config.dim_per_head,
                                 num_kv_heads=config.kv_heads, qkv_bias=config.qkv_bias, qk_norm=config.qk_norm,
                                 **common)


class Block(eqx.Module):
    """One transformer layer. `mlp` is a dense `MLP` or a routed `MoE`."""

    attn_norm: RMSNorm | TPULayerNorm
    attn: TPUMultiHeadAttention | MultiHeadLatentAttention
    mlp_norm: RMSNorm | TPULayerNorm
    mlp: MLP | MoE
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, config: ModelConfig, is_moe: bool, *, key: PRNGKeyArray):
        ka, km = jax.random.split(key)
        dtype = dtype_from_name(config.param_dtype)
        out_std = config.init_std / math.sqrt(2 * config.num_layers)
        fp8_mlp = config.fp8 in ("mlp", "all")
        self.attn_norm = make_norm(config.norm_type, config.hidden_size, config.norm_eps, dtype=dtype)
        self.attn = make_attention(config, key=ka)
        self.mlp_norm = make_norm(config.norm_type, config.hidden_size, config.norm_eps, dtype=dtype)
        if is_moe:
            self.mlp = MoE(
                config.hidden_size, config.expert_ffn_dim, config.num_experts, config.experts_per_token,
                router_type=config.router_type, renormalize=config.router_renormalize,
                dispatch=config.moe_dispatch, capacity_factor=config.capacity_factor,
                capacity_priority=config.capacity_priority,
                jitter=config.router_jitter, num_shared_experts=config.num_shared_experts,
                shared_expert_ffn_dim=config.shared_expert_ffn_dim,
                shared_gate=config.shared_expert_gate, n_groups=config.n_groups,
                topk_groups=config.topk_groups, routed_scaling_factor=config.routed_scaling_factor,
                balance_loss=config.load_balance_loss, aux_free_bias=config.aux_free_bias, use_fp8=fp8_mlp,
                fp8_scaling=config.fp8_scaling, fp8_block_size=config.fp8_block_size,
                init_std=config.init_std, out_init_std=out_std, dtype=dtype, key=km,
            )
        else:
            self.mlp = MLP(config.hidden_size, config.ffn_dim, use_fp8=fp8_mlp,
                           fp8_scaling=config.fp8_scaling, fp8_block_size=config.fp8_block_size,
                           init_std=config.init_std, out_init_std=out_std, dtype=dtype, key=km)
        self.dropout_rate = config.dropout

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def _residual(self, x, h, key):
        if key is not None and self.dropout_rate > 0:
            h = dropout(h, self.dropout_rate, key)
        return x + h.astype(x.dtype)

    def _feed_forward(self, x, *, key, inference, token_mask=None):
        h = self.mlp_norm(x)
        if self.is_moe:
            return self.mlp(h, mask=token_mask, key=key, inference=inference)
        return self.mlp(h), {}

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        *,
        positions: Int[Array, "batch seq"],
        segment_ids: Int[Array, "batch seq"] | None = None,
        token_mask: Bool[Array, "batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "batch seq hidden"], dict]:
        """`token_mask` (True for the tokens to count) restricts a MoE layer's aux statistics."""
        k_attn = k_mlp = k_route = None
        if key is not None and not inference:
            k_attn, k_mlp, k_route = jax.random.split(key, 3)
        x = self._residual(x, self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids), k_attn)
        h, aux = self._feed_forward(x, key=k_route, inference=inference, token_mask=token_mask)
        return self._residual(x, h, k_mlp), aux

    def decode(self, x, positions, k_cache, v_cache, layer):
        """One cached step of layer `layer` (see `TPUMultiHeadAttention.decode`); inference mode, no aux."""
        h, k_cache, v_cache = self.attn.decode(self.attn_norm(x), positions, k_cache, v_cache, layer)
        x = x + h
        h, _ = self._feed_forward(x, key=None, inference=True)
        return x + h, k_cache, v_cache

"""Multi-head attention with GQA, RoPE, packed-document masking and a KV cache."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..errors import InvalidValueError
from ..kernels import flash_attention
from .linear import Linear, parallel_linears
from .norm import RMSNorm
from .rope import RopeScaling, apply_rope

QK_NORMS = ("none", "head", "full")


def positions_from_segments(segment_ids: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Positions that restart at 0 wherever the segment id changes along a row."""
    seq = segment_ids.shape[1]
    idx = jnp.arange(seq, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - first


def project_heads(o_proj: Linear, out: Float[Array, "batch seq heads width"]) -> Float[Array, "batch seq hidden"]:
    """An attention output `[batch, seq, heads, width]` through the output projection, its heads
    concatenated; named `attention_output` for the remat policies that save it."""
    b, t = out.shape[:2]
    return o_proj(checkpoint_name(out, "attention_output").reshape(b, t, -1))


def default_positions(segment_ids: Int[Array, "batch seq"] | None, shape: tuple[int, int]) -> Int[Array, "batch seq"]:
    """`0..seq-1` per row, or restarting per document when `segment_ids` is given."""
    if segment_ids is not None:
        return positions_from_segments(segment_ids)
    return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)


class TPUMultiHeadAttention(eqx.Module):
    """Self-attention: q/k/v projections, RoPE, `flash_attention`, output projection.

    `num_kv_heads < num_heads` gives grouped-query attention (the kernels never
    materialise repeated keys). With `use_flash_attn=False` the naive reference
    attention runs instead (debugging, oracles). `sliding_window` limits each query
    to the last `sliding_window` positions (Mistral); `qkv_bias` gives the q/k/v
    projections a bias (Qwen2) whatever `use_bias` says of the output projection.
    `qk_norm` RMS-normalises queries and keys before RoPE: `"head"` over each head's
    `head_dim` with one weight for all heads (Qwen3), `"full"` over the whole projected
    width (OLMoE). `rope_scaling` stretches the rotary frequencies (`vishwam.nn.rope`).
    """

    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)
    rope_scaling: RopeScaling | None = eqx.field(static=True)
    qk_norm: str = eqx.field(static=True)
    use_flash_attn: bool = eqx.field(static=True)
    implementation: str = eqx.field(static=True)
    block_size: int = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        use_flash_attn: bool = True,
        use_fp8: bool = False,
        *,
        num_kv_heads: int | None = None,
        use_bias: bool = False,
        qkv_bias: bool = False,
        sliding_window: int | None = None,
        rope_theta: float = 10000.0,
        rope_scaling: RopeScaling | None = None,
        qk_norm: str = "none",
        norm_eps: float = 1e-6,
        implementation: str = "auto",
        block_size: int = 128,
        fp8_scaling: str = "tensor",
        fp8_block_size: int = 128,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        kq, kk, kv, ko = jax.random.split(key, 4)
        common = dict(use_fp8=use_fp8, block_size=fp8_block_size, fp8_scaling=fp8_scaling, dtype=dtype)
        qkv = dict(common, use_bias=use_bias or qkv_bias)
        self.q_proj = Linear(hidden_size, num_heads * head_dim, init_std=init_std, key=kq, **qkv)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, init_std=init_std, key=kk, **qkv)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, init_std=init_std, key=kv, **qkv)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, use_bias=use_bias,
                             init_std=init_std if out_init_std is None else out_init_std, key=ko, **common)
        if qk_norm not in QK_NORMS:
            raise InvalidValueError(f"TPUMultiHeadAttention: qk_norm={qk_norm!r}; choose one of {QK_NORMS}.")
        # "head": one weight over head_dim shared by the heads; "full": over the projected widths.
        q_width, k_width = ((head_dim, head_dim) if qk_norm == "head"
                            else (num_heads * head_dim, num_kv_heads * head_dim))
        self.q_norm = RMSNorm(q_width, norm_eps, dtype=dtype) if qk_norm != "none" else None
        self.k_norm = RMSNorm(k_width, norm_eps, dtype=dtype) if qk_norm != "none" else None
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.qk_norm = qk_norm
        self.use_flash_attn = use_flash_attn
        self.implementation = implementation
        self.block_size = block_size
        self.sliding_window = sliding_window

    def __check_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise InvalidValueError(
                f"TPUMultiHeadAttention: num_heads={self.num_heads} is not divisible by "
                f"num_kv_heads={self.num_kv_heads}; choose a divisor of num_heads."
            )

    def _project(self, x, positions):
        b, t, _ = x.shape
        q, k, v = parallel_linears(x, self.q_proj, self.k_proj, self.v_proj)  # (B, T, H * D), (B, T, KV * D) x 2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)  # (B, T, KV, D)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        rope = dict(theta=self.rope_theta, scaling=self.rope_scaling)
        return apply_rope(q, positions, **rope), apply_rope(k, positions, **rope), v

    def _attend(self, q, k, v, **kwargs):
        impl = self.implementation if self.use_flash_attn else "reference"
        out = flash_attention(q, k, v, block_size=self.block_size, implementation=impl,
                              sm_scale=1.0 / math.sqrt(self.head_dim), **kwargs)
        return project_heads(self.o_proj, out)

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        *,
        positions: Int[Array, "batch seq"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        mask: Bool[Array, "..."] | None = None,
        causal: bool = True,
    ) -> Float[Array, "batch seq hidden"]:
        """Attention over the sequence itself (training, scoring).

        Arguments:
            positions: RoPE positions; default `0..seq-1`, or restarting per
                document when `segment_ids` is given.
            segment_ids: packed documents; tokens attend only within their id.
            mask: optional boolean mask broadcastable to `[batch, heads, seq, seq]`.
        """
        with jax.named_scope("attention"):
            if positions is None:
                positions = default_positions(segment_ids, x.shape[:2])
            q, k, v = self._project(x, positions)
            return self._attend(q, k, v, mask=mask, causal=causal, segment_ids=segment_ids,
                                window=self.sliding_window)

    def decode(
        self,
        x: Float[Array, "batch seq hidden"],
        positions: Int[Array, "batch seq"],
        k_cache: Float[Array, "layers batch kv_heads max_len head_dim"],
        v_cache: Float[Array, "layers batch kv_heads max_len head_dim"],
        layer: Int[Array, ""] | int,
    ) -> tuple[Float[Array, "batch seq hidden"], Float[Array, "layers batch kv_heads max_len head_dim"],
               Float[Array, "layers batch kv_heads max_len head_dim"]]:
        """Attention with a KV cache (prefill when `seq > 1`, a decode step when `seq == 1`).

        The caches hold every layer (this one is `layer`): the new keys/values are
        written into them in place at `positions` (per row, so rows of a batch may sit
        at different lengths), then each query attends to the cached slots at or
        before its own position (and, with a sliding window, after its position minus
        the window) through `cached_attention`, which reads only the blocks of the
        cache that some row can see. Slots past a row's position hold stale or
        padding entries and are masked out.
        """
        with jax.named_scope("attention"):
            q, k, v = self._project(x, positions)
            rows = jnp.arange(x.shape[0])[:, None]
            # Advanced indices (layer, rows, positions) around the kv-heads slice: the
            # update is laid out [batch, seq, kv_heads, head_dim], as k and v are.
            k_cache = k_cache.at[layer, rows, :, positions].set(k.astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[layer, rows, :, positions].set(v.astype(v_cache.dtype), mode="drop")
            out = cached_attention(q, k_cache, v_cache, layer, positions, block=self.block_size,
                                   window=self.sliding_window, sm_scale=1.0 / math.sqrt(self.head_dim))
            return project_heads(self.o_proj, out), k_cache, v_cache


def cached_attention(
    q: Float[Array, "batch seq heads head_dim"],
    k_cache: Float[Array, "layers batch kv_heads max_len head_dim"],
    v_cache: Float[Array, "layers batch kv_heads max_len head_dim"],
    layer: Int[Array, ""] | int,
    positions: Int[Array, "batch seq"],
    *,
    block: int,
    sm_scale: float,
    window: int | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
    """Queries at `positions` against layer `layer` of a head-major KV cache, with an
    online softmax over blocks of `block` cache slots.

    The loop runs only over the blocks that hold a slot some query may see: from the
    block of `min(positions) - window + 1` (or 0) to the block of `max(positions)`, a
    bound computed at run time, so a decode step early in a long cache reads only the
    filled part (the cost grows with the position, not with `max_len`). Each block is a
    batched `[kv_heads] x (group * seq, block)` matmul read straight from the cache
    (grouped-query heads share their key block). A block that would run past the end
    is moved back to end at `max_len`, and its slots already counted are masked.
    Every query sees at least its own slot, so no row is left empty.
    """
    b, t, h, d = q.shape
    kv, max_len = k_cache.shape[2], k_cache.shape[3]
    g = h // kv
    block = min(block, max_len)
    # Rows of a kv head's score matrix: its g query heads x the t queries.
    qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d).astype(k_cache.dtype)
    query_pos = jnp.broadcast_to(positions[:, None, :], (b, g, t)).reshape(b, 1, g * t, 1)
    lowest = 0 if window is None else jnp.maximum(jnp.min(positions) - window + 1, 0)
    first, last = lowest // block, jnp.max(positions) // block + 1

    def one_block(i, carry):
        running_max, total, acc = carry
        start = jnp.minimum(i * block, max_len - block)
        key = jax.lax.dynamic_slice(k_cache, (layer, 0, 0, start, 0), (1, b, kv, block, d))[0]
        value = jax.lax.dynamic_slice(v_cache, (layer, 0, 0, start, 0), (1, b, kv, block, d))[0]
        scores = jnp.einsum("bkrd,bkld->bkrl", qg, key, preferred_element_type=jnp.float32) * sm_scale
        slots = (start + jnp.arange(block, dtype=jnp.int32))[None, None, None, :]
        visible = (slots >= i * block) & (slots <= query_pos)
        if window is not None:
            visible = visible & (slots > query_pos - window)
        scores = jnp.where(visible, scores, -jnp.inf)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # a row with nothing visible yet
        probs = jnp.exp(scores - safe_max[..., None])
        rescale = jnp.exp(running_max - safe_max)
        total = total * rescale + probs.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("bkrl,bkld->bkrd", probs.astype(value.dtype), value,
                                                    preferred_element_type=jnp.float32)
        return new_max, total, acc

    init = (jnp.full((b, kv, g * t), -jnp.inf, jnp.float32), jnp.zeros((b, kv, g * t), jnp.float32),
            jnp.zeros((b, kv, g * t, d), jnp.float32))
    _, total, acc = jax.lax.fori_loop(first, last, one_block, init)
    out = (acc / total[..., None]).reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h, d).astype(q.dtype)

"""Naive softmax attention: the oracle every fast path is tested against.

Materialises the full `[batch, heads, q_len, kv_len]` logits in fp32, so its
memory is O(q_len * kv_len). Inputs arrive validated and normalised by
`vishwam.kernels.flash_attention`.
"""

import jax
import jax.numpy as jnp

from vishwam.kernels._masking import MASK_VALUE, dropout_keep, dropout_threshold, visible


def grouped_mask(mask: jax.Array | None, kv_heads: int) -> jax.Array | None:
    """`[mb, mh, mq, mk]` -> `[mb, kv_heads | 1, group | 1, mq, mk]` (the GQA layout)."""
    if mask is None:
        return None
    mb, mh, mq, mk = mask.shape
    if mh == 1:
        return mask[:, :, None]  # (mb, 1, 1, mq, mk)
    return mask.reshape(mb, kv_heads, mh // kv_heads, mq, mk)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    sm_scale: float,
    dropout_rate: float,
    dropout_seed: jax.Array | None,
    window: int | None = None,
) -> jax.Array:
    """Attention of `q [b, q_len, heads, d]` over `k, v [b, kv_len, kv_heads, d]`.

    `mask` is `None` or boolean `[b | 1, heads | 1, q_len | 1, kv_len | 1]`; `window` a
    causal sliding window (`_masking.visible`).
    """
    b, q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    f32 = jnp.float32
    qg = q.astype(f32).reshape(b, q_len, kv_heads, group, d)  # (b, q, hk, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(f32)) * sm_scale  # (b, hk, g, q, k)

    seg = q_segment_ids is not None
    vis = visible(
        jnp.arange(q_len)[:, None],
        jnp.arange(kv_len)[None, :],
        causal=causal,
        causal_offset=kv_len - q_len,
        q_seg=q_segment_ids[:, None, None, :, None] if seg else None,
        kv_seg=kv_segment_ids[:, None, None, None, :] if seg else None,
        mask=grouped_mask(mask, kv_heads),
        window=window,
    )
    if vis is not None:
        s = jnp.where(vis, s, MASK_VALUE)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m)
    if vis is not None:
        # A row with nothing visible has m == MASK_VALUE and exp(0) == 1 everywhere.
        p = jnp.where(vis, p, 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)

    if dropout_rate > 0.0:
        head = jnp.arange(heads).reshape(1, kv_heads, group, 1, 1)
        row = (jnp.arange(b).reshape(b, 1, 1, 1, 1) * heads + head) * q_len
        row = row + jnp.arange(q_len).reshape(1, 1, 1, q_len, 1)
        keep = dropout_keep(dropout_seed[0], dropout_seed[1], row, jnp.arange(kv_len), dropout_threshold(dropout_rate))
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)

    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(f32))  # (b, q, hk, g, d)
    return out.reshape(b, q_len, heads, d).astype(q.dtype)

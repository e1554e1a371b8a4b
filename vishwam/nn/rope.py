"""Rotary position embeddings (rotate-half convention, as in Llama/Mixtral checkpoints)."""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rope_frequencies(head_dim: int, theta: float) -> Float[Array, " half"]:
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(
    x: Float[Array, "batch seq heads head_dim"],
    positions: Int[Array, "batch seq"],
    theta: float = 10000.0,
) -> Float[Array, "batch seq heads head_dim"]:
    """Rotate pairs `(x[i], x[i + d/2])` by angle `position * theta^(-2i/d)`.

    Angles are computed in fp32 from the integer positions, so packed documents
    (positions restarting at each document) and KV-cache offsets need no tables.
    """
    head_dim = x.shape[-1]
    freqs = rope_frequencies(head_dim, theta)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # (B, T, d/2)
    cos = jnp.cos(angles)[:, :, None, :]  # (B, T, 1, d/2)
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : head_dim // 2], xf[..., head_dim // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)

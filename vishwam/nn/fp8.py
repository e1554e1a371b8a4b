"""Real fp8 GEMMs: operands quantised to `float8_e4m3fn`, gradients to `float8_e5m2`.

`fp8_matmul(x, w)` quantises both operands with scales, runs `jax.lax.dot_general`
on the fp8 arrays with an fp32 accumulator (`preferred_element_type`) and
dequantises the result into `x.dtype`. Its `custom_vjp` saves the fp8 operands
(1 byte per element instead of 2 or 4) and quantises the incoming gradient to
`float8_e5m2` (wider range, less precision: the usual forward/backward split of
fp8 training) for both gradient matmuls.

Scaling modes (current scaling: the amax of this very call, no history):

- `"tensor"`: one scale per operand, `scale = amax / fp8_max`. One plain fp8 GEMM.
- `"block"`: `block x block` tiles of the weight and `1 x block` groups of the input
  along the contraction dim (DeepSeek-V3 style). An outlier only coarsens its own
  group. Scales differ per contraction block, so each block's fp8 product is
  accumulated in fp32, scaled, then summed over blocks: one batched fp8 GEMM
  `[blocks, M, N]` followed by a fused scale-and-reduce. That intermediate costs
  `(K / block)` fp32 copies of the output; a fused kernel (DeepGEMM, cuBLASLt block
  scaling) keeps it in registers and is the route to speed on a GPU.

Sizes not divisible by `block` are zero-padded (exact for a contraction) and the
result sliced back. Gradients are straight-through: quantisation counts as the
identity, scales carry no gradient.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..errors import InvalidValueError

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
_SCALINGS = ("tensor", "block")


def _fp8_max(dtype) -> float:
    return float(jnp.finfo(dtype).max)


def _scale(amax, dtype):
    """`amax / fp8_max`, with 1 where amax is 0 (all-zero input) and never below the
    smallest normal fp32 (so `x / scale` cannot overflow or divide by a flushed zero)."""
    amax = amax.astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / _fp8_max(dtype), 1.0)
    return jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)


def _cast(x, scale, dtype):
    # Clipping matters: float8_e4m3fn has no infinity, an out-of-range cast gives NaN.
    limit = _fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) / scale, -limit, limit).astype(dtype)


def quantize_tensor(x, dtype):
    """One scale for the whole array: `(q, scale)` with `x ~= q * scale`."""
    scale = _scale(jnp.max(jnp.abs(x)), dtype)
    return _cast(x, scale, dtype), scale


def quantize_groups(x, dtype, block: int):
    """`1 x block` groups along the last axis of `x [rows, cols]` (cols divisible by block).

    Returns `q [rows, cols]` and `scale [rows, cols // block]`.
    """
    rows, cols = x.shape
    groups = x.reshape(rows, cols // block, block)  # (R, C/B, B)
    scale = _scale(jnp.max(jnp.abs(groups), axis=-1), dtype)
    return _cast(groups, scale[..., None], dtype).reshape(rows, cols), scale


def quantize_tiles(w, dtype, block: int):
    """`block x block` tiles of `w [k, n]` (both divisible by block).

    Returns `q [k, n]` and `scale [k // block, n // block]`.
    """
    k, n = w.shape
    tiles = w.reshape(k // block, block, n // block, block)  # (K/B, B, N/B, B)
    scale = _scale(jnp.max(jnp.abs(tiles), axis=(1, 3)), dtype)
    return _cast(tiles, scale[:, None, :, None], dtype).reshape(k, n), scale


def _dot(a, b, contract):
    """fp8 x fp8 -> fp32 matmul; `contract` = (a's axis, b's axis)."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               preferred_element_type=jnp.float32)


def _blocked_dot(aq, a_scale, bq, b_scale, block: int):
    """`sum_c a_scale[:, c, None] * b_scale[c, None, :] * (aq[:, c] @ bq[c, :])` over
    contraction blocks `c`: aq `[M, K]`, a_scale `[M, K/B]`, bq `[K, N]`, b_scale `[K/B, N]`."""
    m, k = aq.shape
    n = bq.shape[1]
    kb = k // block
    partial = jax.lax.dot_general(
        aq.reshape(m, kb, block), bq.reshape(kb, block, n),
        (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32,
    )  # (K/B, M, N): batch dims lead
    return jnp.sum(partial * a_scale.T[:, :, None] * b_scale[:, None, :], axis=0)


def _pad_to(x, multiples):
    pads = [(0, -size % m) for size, m in zip(x.shape, multiples, strict=True)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


# ------------------------------------------------------------------ 2-D core
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_2d(x, w, scaling, block):
    return _forward(x, w, scaling, block)[0]


def _forward(x, w, scaling, block):
    if scaling == "tensor":
        xq, sx = quantize_tensor(x, E4M3)
        wq, sw = quantize_tensor(w, E4M3)
        y = _dot(xq, wq, (1, 0)) * (sx * sw)
    else:
        xq, sx = quantize_groups(x, E4M3, block)  # sx (M, K/B)
        wq, sw = quantize_tiles(w, E4M3, block)  # sw (K/B, N/B)
        y = _blocked_dot(xq, sx, wq, jnp.repeat(sw, block, axis=1), block)
    return y.astype(x.dtype), (xq, sx, wq, sw)


def _backward_rule(scaling, block, residuals, g):
    xq, sx, wq, sw = residuals
    dtype = g.dtype
    if scaling == "tensor":
        gq, sg = quantize_tensor(g, E5M2)
        dx = _dot(gq, wq, (1, 1)) * (sg * sw)  # g @ w^T
        dw = _dot(xq, gq, (0, 0)) * (sx * sg)  # x^T @ g
        return dx.astype(dtype), dw.astype(dtype)
    # dx = g @ w^T contracts over n: g in 1 x B groups along n; the square weight
    # tiles serve this contraction as they are.
    gq, sg = quantize_groups(g, E5M2, block)  # sg (M, N/B)
    dx = _blocked_dot(gq, sg, wq.T, jnp.repeat(sw.T, block, axis=1), block)
    # dw = x^T @ g contracts over tokens, across the input's groups: requantise the
    # saved input in B x 1 groups along tokens (and the gradient likewise).
    # Zero rows pad the tokens to whole groups; they add nothing to dw.
    x_deq = xq.astype(jnp.float32) * jnp.repeat(sx, block, axis=1)
    xtq, sxt = quantize_groups(_pad_to(x_deq, (block, 1)).T, E4M3, block)  # (K, M), sxt (K, M/B)
    gtq, sgt = quantize_groups(_pad_to(g, (block, 1)).T, E5M2, block)  # (N, M), sgt (N, M/B)
    dw = _blocked_dot(xtq, sxt, gtq.T, sgt.T, block)
    return dx.astype(dtype), dw.astype(dtype)


_matmul_2d.defvjp(_forward, _backward_rule)


def _padded_matmul(x, w, scaling, block):
    """Block mode needs `d_in` and `d_out` divisible by the block (the backward pads
    the tokens itself); zero padding is exact for the products and autodiff slices it away."""
    if scaling == "tensor":
        return _matmul_2d(x, w, scaling, block)
    n = w.shape[1]
    y = _matmul_2d(_pad_to(x, (1, block)), _pad_to(w, (block, block)), scaling, block)
    return y[:, :n]


def _check(name, x, w, scaling, block_size):
    if scaling not in _SCALINGS:
        raise InvalidValueError(f"{name}(scaling={scaling!r}): choose 'tensor' or 'block'.")
    if not isinstance(block_size, int) or block_size <= 0:
        raise InvalidValueError(f"{name}(block_size={block_size!r}): must be a positive integer.")
    if x.shape[-1] != w.shape[-2]:
        raise InvalidValueError(
            f"{name}: contraction sizes differ, x {x.shape} vs w {w.shape}; "
            "x's last dim must equal w's second-to-last."
        )


def fp8_matmul(
    x: Float[Array, "*batch d_in"],
    w: Float[Array, "d_in d_out"],
    *,
    scaling: str = "tensor",
    block_size: int = 128,
) -> Float[Array, "*batch d_out"]:
    """`x @ w` computed on `float8_e4m3fn` operands, returned in `x.dtype`.

    Arguments:
        x: activations, any leading dims.
        w: weight `[d_in, d_out]`; cast to `x.dtype` first (the caller's precision policy).
        scaling: `"tensor"` (one scale per operand) or `"block"` (`block_size`-wide
            groups of `x` and `block_size x block_size` tiles of `w`).
        block_size: group/tile size of block scaling; other sizes are zero-padded.

    The backward pass quantises the output gradient to `float8_e5m2` and reuses
    the saved fp8 operands for `dx = g @ w^T` and `dw = x^T @ g`.
    """
    _check("fp8_matmul", x, w, scaling, block_size)
    batch = x.shape[:-1]
    y = _padded_matmul(x.reshape(-1, x.shape[-1]), w.astype(x.dtype), scaling, block_size)
    return y.reshape(*batch, w.shape[-1])


def fp8_batched_matmul(
    x: Float[Array, "groups rows d_in"],
    w: Float[Array, "groups d_in d_out"],
    *,
    scaling: str = "tensor",
    block_size: int = 128,
) -> Float[Array, "groups rows d_out"]:
    """`x[g] @ w[g]` for every group (MoE expert buffers `[experts, capacity, d]`), in fp8.

    Scales are per group (per expert), as if `fp8_matmul` ran on each; one batched
    fp8 GEMM in the compiled program.
    """
    _check("fp8_batched_matmul", x, w, scaling, block_size)
    if x.shape[0] != w.shape[0]:
        raise InvalidValueError(
            f"fp8_batched_matmul: group counts differ, x {x.shape} vs w {w.shape}; "
            "both need the same leading (expert) axis."
        )
    w = w.astype(x.dtype)
    return jax.vmap(lambda xg, wg: _padded_matmul(xg, wg, scaling, block_size))(x, w)

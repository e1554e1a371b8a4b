"""What every attention implementation must agree on, bit for bit.

Which (query, key) pairs are visible and which probabilities dropout keeps are
computed here from *positions*, never from a materialised `[q_len, kv_len]`
array, so the naive oracle, the blockwise XLA path and the Pallas kernels
produce identical masks whatever their tiling. The functions use plain
`jnp` element-wise ops only, so they also run inside Pallas kernels.

Dropout mask: a counter-based hash. For query head `h` of batch row `b`,
query position `i` and key position `j`,
    bits = fmix32(fmix32(((b * heads + h) * q_len + i) ^ seed0) ^ (j * GOLDEN + seed1))
and the probability is kept iff `bits >> 8 >= round(rate * 2**24)`. `seed0,
seed1 = jax.random.bits(key, (2,), uint32)`. Forward and backward recompute the
same bits from the same positions, so nothing of size `q_len * kv_len` is stored.
"""

import jax
import jax.numpy as jnp
from jax import lax

# Finite stand-in for -inf: exp(masked - max) underflows to exactly 0 and
# never produces inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

_GOLDEN = 0x9E3779B9


def _fmix32(x: jax.Array) -> jax.Array:
    # MurmurHash3's finaliser: every input bit flips each output bit with p~1/2.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_threshold(rate: float) -> int:
    """The 24-bit threshold below which a hashed probability is dropped."""
    return int(round(rate * (1 << 24)))


def dropout_keep(
    seed0: jax.Array, seed1: jax.Array, row: jax.Array, col: jax.Array, threshold: int
) -> jax.Array:
    """Boolean keep-mask for flat query rows `row` and key positions `col`.

    Arguments:
        seed0, seed1: uint32 scalars, the two words of `dropout_seed(key)`.
        row: int array, `(batch_index * heads + head) * q_len + query_position`.
        col: int array broadcastable against `row`, the key position.
        threshold: `dropout_threshold(rate)`.
    """
    r = row.astype(jnp.uint32)
    c = col.astype(jnp.uint32)
    bits = _fmix32(_fmix32(r ^ seed0) ^ (c * jnp.uint32(_GOLDEN) + seed1))
    # 24 bits fit an int32 exactly, so the comparison is the same on every backend.
    return (bits >> 8).astype(jnp.int32) >= threshold


def dropout_seed(key: jax.Array) -> jax.Array:
    """Two uint32 words from a PRNG key (typed or raw)."""
    return jax.random.bits(key, (2,), jnp.uint32)


def visible(
    q_pos: jax.Array,
    kv_pos: jax.Array,
    *,
    causal: bool,
    causal_offset: int,
    q_seg: jax.Array | None = None,
    kv_seg: jax.Array | None = None,
    mask: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array | None:
    """Which pairs may attend, or `None` when every pair may.

    `q_pos`/`kv_pos` broadcast against each other (e.g. `[bq, 1]` and `[1, bk]`).
    Query `i` sits at absolute position `i + causal_offset`
    (`causal_offset = kv_len - q_len`: the queries are the last `q_len` positions).
    `window` (sliding-window attention, with `causal`): query position `p` sees only the
    `window` keys `p - window < kv_pos <= p`, as in Mistral.
    Padding past the end of a sequence is the caller's to mask.
    """
    out = mask
    if causal:
        c = kv_pos <= q_pos + causal_offset
        out = c if out is None else out & c
    if window is not None:
        w = kv_pos > q_pos + causal_offset - window
        out = w if out is None else out & w
    if q_seg is not None:
        s = q_seg == kv_seg
        out = s if out is None else out & s
    return out


# Tile ranges. Divisions use `lax.div` on non-negative operands only: it lowers
# everywhere (XLA, Pallas/Triton), where floor division of traced ints does not.
# Checked against brute force in tests/test_kernels.py.


def kv_tile_range(
    i, *, block_q: int, block_k: int, nk: int, kv_len: int, offset: int, causal: bool, masked_everywhere: bool
):
    """For query tile `i`: kv tiles `[0, full_hi)` are entirely visible (no mask
    needed), `[full_hi, hi)` partly, `[hi, nk)` not at all (causally hidden)."""
    n_unpadded = kv_len // block_k
    if causal:
        last_row = (i + 1) * block_q - 1 + offset
        hi = jnp.minimum(lax.div(jnp.maximum(last_row + block_k, 0), block_k), nk)
        full_hi = jnp.minimum(lax.div(jnp.maximum(i * block_q + offset + 1, 0), block_k), jnp.minimum(hi, n_unpadded))
    else:
        hi, full_hi = nk, n_unpadded
    if masked_everywhere:
        full_hi = 0
    return full_hi, hi


def q_tile_range(
    j, *, block_q: int, block_k: int, nq: int, kv_len: int, offset: int, causal: bool, masked_everywhere: bool
):
    """For kv tile `j`: query tiles `[0, lo)` see none of it, `[lo, full_lo)` part
    (mask needed), `[full_lo, nq)` all of it."""
    if causal:
        lo = jnp.minimum(lax.div(jnp.maximum(j * block_k - offset, 0), block_q), nq)
        first_full = lax.div(jnp.maximum((j + 1) * block_k - 1 - offset + block_q - 1, 0), block_q)
        full_lo = jnp.minimum(jnp.maximum(first_full, lo), nq)
    else:
        lo, full_lo = 0, 0
    if masked_everywhere:
        return lo, nq
    if kv_len % block_k:
        # The last tile holds padded keys: it needs the mask. Arithmetic, not
        # `jnp.where`: Triton mis-types a select between two constants.
        padded = (j >= kv_len // block_k).astype(jnp.int32)
        full_lo = full_lo + (nq - full_lo) * padded
    return lo, full_lo


def window_kv_start(i, *, block_q: int, block_k: int, offset: int, window: int):
    """For query tile `i` under a sliding window: kv tiles before the result hold no key
    that any of its queries sees (they lie wholly before the band)."""
    first_visible = i * block_q + offset - window + 1  # lowest key the tile's first query sees
    return lax.div(jnp.maximum(first_visible, 0), block_k)


def window_q_stop(j, *, block_q: int, block_k: int, nq: int, offset: int, window: int):
    """For kv tile `j` under a sliding window: query tiles from the result on see none of
    its keys (they lie wholly after the band)."""
    last_query = (j + 1) * block_k - 1 - offset + window - 1  # highest query that sees the tile's last key
    return jnp.minimum(lax.div(jnp.maximum(last_query + block_q, 0), block_q), nq)

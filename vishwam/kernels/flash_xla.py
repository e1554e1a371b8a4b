"""Blockwise flash attention in pure JAX: online softmax over kv tiles.

Memory is O(length): the forward pass keeps, per query row, only the running max, the
running sum and the output accumulator, and saves the log-sum-exp; the backward pass (a
`custom_vjp`) recomputes each tile's probabilities from it.

Work is skipped, not masked: for each query tile the kv tiles `[0, full_hi)` are wholly
visible (no mask computed), `[full_hi, hi)` partly (masked) and `[hi, nk)` causally hidden
(never visited); a sliding window also skips the tiles before its band and masks every
visited tile (`_kv_range`); the backward does the same per kv tile over query tiles. The
loops are `lax.fori_loop`s with traced bounds, so the program has a fixed size whatever the
length and causal attention costs about half of non-causal. Tiles hidden only by `mask` or
`segment_ids` are still visited. Tiles are laid out tile-major (`_to_q_tiles`: fetching one
is a contiguous slice), and the query heads that share a kv head are stacked into the rows
of one matmul (GQA without repeating k/v).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from vishwam.kernels._masking import (
    MASK_VALUE,
    dropout_keep,
    dropout_threshold,
    kv_tile_range,
    q_tile_range,
    visible,
    window_kv_start,
    window_q_stop,
)
from vishwam.kernels.reference import grouped_mask

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the traced code specialises on (hashable: a custom_vjp nondiff arg)."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    block_q: int
    block_k: int
    causal: bool
    sm_scale: float
    dropout_rate: float
    window: int | None = None

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def nq(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def nk(self) -> int:
        return -(-self.kv_len // self.block_k)

    @property
    def offset(self) -> int:
        # The queries are the last q_len positions of the kv sequence.
        return self.kv_len - self.q_len


def _to_q_tiles(x: jax.Array, st: _Static) -> jax.Array:
    """`[b, q_len, heads, ...]` -> `[nq, b, kv_heads, group * block_q, ...]`."""
    b, bq, hk, g = st.batch, st.block_q, st.kv_heads, st.group
    rest = x.shape[3:]
    x = jnp.pad(x, [(0, 0), (0, st.nq * bq - st.q_len)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, st.nq, bq, hk, g, *rest)
    x = jnp.moveaxis(x, (1, 3, 4), (0, 2, 3))  # (nq, b, hk, g, bq, ...)
    return x.reshape(st.nq, b, hk, g * bq, *rest)


def _from_q_tiles(x: jax.Array, st: _Static) -> jax.Array:
    """Inverse of `_to_q_tiles`."""
    b, bq, hk, g = st.batch, st.block_q, st.kv_heads, st.group
    rest = x.shape[4:]
    x = x.reshape(st.nq, b, hk, g, bq, *rest)
    x = jnp.moveaxis(x, (0, 2, 3), (1, 3, 4))  # (b, nq, bq, hk, g, ...)
    return x.reshape(b, st.nq * bq, hk * g, *rest)[:, : st.q_len]


def _to_kv_tiles(x: jax.Array, st: _Static) -> jax.Array:
    """`[b, kv_len, kv_heads, d]` -> `[nk, b, kv_heads, block_k, d]`."""
    x = jnp.pad(x, [(0, 0), (0, st.nk * st.block_k - st.kv_len), (0, 0), (0, 0)])
    x = x.reshape(st.batch, st.nk, st.block_k, st.kv_heads, st.head_dim)
    return jnp.transpose(x, (1, 0, 3, 2, 4))


def _from_kv_tiles(x: jax.Array, st: _Static) -> jax.Array:
    x = jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(st.batch, st.nk * st.block_k, st.kv_heads, st.head_dim)
    return x[:, : st.kv_len]


def _seq_tiles(ids: jax.Array, block: int, n: int) -> jax.Array:
    """`[b, len]` -> `[n, b, block]` (padding gets id -1; padded keys are masked anyway)."""
    ids = jnp.pad(ids, [(0, 0), (0, n * block - ids.shape[1])], constant_values=-1)
    return jnp.swapaxes(ids.reshape(ids.shape[0], n, block), 0, 1)


def _padded_mask(mask: jax.Array | None, st: _Static) -> jax.Array | None:
    """GQA-layout mask with full q/kv dims padded to whole tiles (padding = False)."""
    mask = grouped_mask(mask, st.kv_heads)
    if mask is None:
        return None
    pq = st.nq * st.block_q - st.q_len if mask.shape[3] > 1 else 0
    pk = st.nk * st.block_k - st.kv_len if mask.shape[4] > 1 else 0
    return jnp.pad(mask, [(0, 0)] * 3 + [(0, pq), (0, pk)])


@dataclasses.dataclass(frozen=True)
class _Extras:
    """Non-differentiable inputs, arrays or None (typed `Any`: pytree unflattening passes sentinels)."""

    mask: Any  # (mb, hk|1, g|1, Lq_pad|1, Lk_pad|1)
    q_seg: Any  # (nq, b, block_q)
    kv_seg: Any  # (nk, b, block_k)
    seed: Any  # uint32[2]

    @property
    def masked_everywhere(self) -> bool:
        return self.mask is not None or self.q_seg is not None


jax.tree_util.register_dataclass(_Extras, data_fields=["mask", "q_seg", "kv_seg", "seed"], meta_fields=[])


def _row_positions(st: _Static, i):
    """Query position of each row of tile i, `[g*bq, 1]` (rows are (head in group, position))."""
    r = lax.broadcasted_iota(jnp.int32, (st.group * st.block_q, 1), 0)
    return i * st.block_q + lax.rem(r, st.block_q)


def _tile_vis(st: _Static, ex: _Extras, i, j, q_seg_i, kv_seg_j) -> jax.Array:
    """Visibility of tile (i, j), broadcastable against `[b, hk, g*bq, bk]`."""
    g, bq, bk = st.group, st.block_q, st.block_k
    kv_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    mask = None
    if ex.mask is not None:
        m = ex.mask  # (mb, hk|1, g|1, Lq_pad|1, Lk_pad|1)
        if m.shape[3] > 1:
            m = lax.dynamic_slice_in_dim(m, i * bq, bq, axis=3)
        if m.shape[4] > 1:
            m = lax.dynamic_slice_in_dim(m, j * bk, bk, axis=4)
        if m.shape[2] > 1 or m.shape[3] > 1:
            m = jnp.broadcast_to(m, (*m.shape[:2], g, bq, m.shape[4]))
        mask = m.reshape(m.shape[0], m.shape[1], -1, m.shape[4])  # (mb, hk|1, g*bq | 1, bk|1)
    vis = visible(
        _row_positions(st, i),
        kv_pos,
        causal=st.causal,
        causal_offset=st.offset,
        q_seg=None if q_seg_i is None else jnp.tile(q_seg_i, (1, g))[:, None, :, None],
        kv_seg=None if kv_seg_j is None else kv_seg_j[:, None, None, :],
        mask=mask,
        window=st.window,
    )
    in_range = kv_pos < st.kv_len
    return in_range if vis is None else vis & in_range


def _tile_keep(st: _Static, ex: _Extras, i, j) -> jax.Array:
    """Dropout keep-mask of tile (i, j), `[b, hk, g*bq, bk]`."""
    b, hk, rows, bk = st.batch, st.kv_heads, st.group * st.block_q, st.block_k
    r = lax.broadcasted_iota(jnp.int32, (1, 1, rows, 1), 2)
    head = lax.broadcasted_iota(jnp.int32, (1, hk, 1, 1), 1) * st.group + lax.div(r, st.block_q)
    bidx = lax.broadcasted_iota(jnp.int32, (b, 1, 1, 1), 0)
    row = (bidx * st.heads + head) * st.q_len + i * st.block_q + lax.rem(r, st.block_q)
    col = j * bk + lax.broadcasted_iota(jnp.int32, (1, 1, 1, bk), 3)
    return dropout_keep(ex.seed[0], ex.seed[1], row, col, dropout_threshold(st.dropout_rate))


def _kv_range(st: _Static, ex: _Extras, i):
    """`(full_hi, start, hi)`: kv tiles `[0, full_hi)` need no mask, `[start, hi)` are masked
    (`start > full_hi` only under a sliding window, whose band starts there)."""
    full_hi, hi = kv_tile_range(
        i,
        block_q=st.block_q,
        block_k=st.block_k,
        nk=st.nk,
        kv_len=st.kv_len,
        offset=st.offset,
        causal=st.causal,
        masked_everywhere=ex.masked_everywhere or st.window is not None,
    )
    if st.window is None:
        return full_hi, full_hi, hi
    start = window_kv_start(i, block_q=st.block_q, block_k=st.block_k, offset=st.offset, window=st.window)
    return full_hi, jnp.minimum(jnp.maximum(full_hi, start), hi), hi


def _q_range(st: _Static, ex: _Extras, j):
    """`(lo, full_lo, stop)`: query tiles `[lo, full_lo)` are masked, `[full_lo, stop)` need
    no mask (`stop < nq` only under a sliding window, whose band ends there)."""
    lo, full_lo = q_tile_range(
        j,
        block_q=st.block_q,
        block_k=st.block_k,
        nq=st.nq,
        kv_len=st.kv_len,
        offset=st.offset,
        causal=st.causal,
        masked_everywhere=ex.masked_everywhere or st.window is not None,
    )
    if st.window is None:
        return lo, full_lo, st.nq
    stop = window_q_stop(j, block_q=st.block_q, block_k=st.block_k, nq=st.nq, offset=st.offset, window=st.window)
    return lo, jnp.minimum(full_lo, stop), stop


def _forward(st: _Static, q, k, v, ex: _Extras):
    qt = _to_q_tiles((q.astype(_F32) * st.sm_scale).astype(q.dtype), st)  # (nq, b, hk, g*bq, d)
    kt, vt = _to_kv_tiles(k, st), _to_kv_tiles(v, st)  # (nk, b, hk, bk, d)
    rows = st.group * st.block_q

    def q_tile(_, xs):
        i, q_i, q_seg_i = xs

        def kv_step(masked: bool):
            def body(j, carry):
                m, l, acc = carry
                s = jnp.einsum("bhqd,bhkd->bhqk", q_i, kt[j], preferred_element_type=_F32)  # (b, hk, g*bq, bk)
                if masked:
                    vis = _tile_vis(st, ex, i, j, q_seg_i, None if ex.kv_seg is None else ex.kv_seg[j])
                    s = jnp.where(vis, s, MASK_VALUE)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.exp(s - m_new[..., None])
                if masked:
                    p = jnp.where(vis, p, 0.0)
                alpha = jnp.exp(m - m_new)
                l = alpha * l + jnp.sum(p, axis=-1)
                if st.dropout_rate > 0.0:
                    p = jnp.where(_tile_keep(st, ex, i, j), p, 0.0)
                pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vt[j], preferred_element_type=_F32)
                acc = alpha[..., None] * acc + pv
                return m_new, l, acc

            return body

        full_hi, start, hi = _kv_range(st, ex, i)
        carry = (
            jnp.full((st.batch, st.kv_heads, rows), MASK_VALUE, _F32),
            jnp.zeros((st.batch, st.kv_heads, rows), _F32),
            jnp.zeros((st.batch, st.kv_heads, rows, st.head_dim), _F32),
        )
        carry = lax.fori_loop(0, full_hi, kv_step(False), carry)
        m, l, acc = lax.fori_loop(start, hi, kv_step(True), carry)
        l_safe = jnp.where(l == 0.0, 1.0, l)
        scale = 1.0 / (1.0 - st.dropout_rate)
        out = acc * (scale / l_safe)[..., None]
        lse = jnp.where(l == 0.0, 0.0, m + jnp.log(l_safe))
        return None, (out.astype(q.dtype), lse)

    _, (out_t, lse_t) = lax.scan(q_tile, None, (jnp.arange(st.nq), qt, ex.q_seg))
    return _from_q_tiles(out_t, st), lse_t


def _backward(st: _Static, q, k, v, ex: _Extras, out, lse_t, do):
    qt = _to_q_tiles((q.astype(_F32) * st.sm_scale).astype(q.dtype), st)
    dot = _to_q_tiles(do, st)
    delta = jnp.sum(do.astype(_F32) * out.astype(_F32), axis=-1)  # (b, q_len, h)
    delta_t = _to_q_tiles(delta, st)  # (nq, b, hk, g*bq)
    kt, vt = _to_kv_tiles(k, st), _to_kv_tiles(v, st)
    keep_scale = 1.0 / (1.0 - st.dropout_rate)

    def kv_tile(dq_t, xs):
        j, k_j, v_j, kv_seg_j = xs

        def q_step(masked: bool):
            def body(i, carry):
                dk, dv, dq_t = carry
                q_i, do_i = qt[i], dot[i]
                s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j, preferred_element_type=_F32)
                p = jnp.exp(s - lse_t[i][..., None])
                if masked:
                    vis = _tile_vis(st, ex, i, j, None if ex.q_seg is None else ex.q_seg[i], kv_seg_j)
                    p = jnp.where(vis, p, 0.0)
                dp = jnp.einsum("bhqd,bhkd->bhqk", do_i, v_j, preferred_element_type=_F32)
                if st.dropout_rate > 0.0:
                    keep = _tile_keep(st, ex, i, j)
                    p_drop = jnp.where(keep, p, 0.0) * keep_scale
                    dp = jnp.where(keep, dp, 0.0) * keep_scale
                else:
                    p_drop = p
                dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p_drop.astype(do.dtype), do_i, preferred_element_type=_F32)
                ds = p * (dp - delta_t[i][..., None])
                dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q.dtype), q_i, preferred_element_type=_F32)
                dq_i = jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k.dtype), k_j, preferred_element_type=_F32)
                dq_t = dq_t.at[i].add(dq_i)
                return dk, dv, dq_t

            return body

        lo, full_lo, stop = _q_range(st, ex, j)
        zeros = jnp.zeros((st.batch, st.kv_heads, st.block_k, st.head_dim), _F32)
        carry = lax.fori_loop(lo, full_lo, q_step(True), (zeros, zeros, dq_t))
        dk, dv, dq_t = lax.fori_loop(full_lo, stop, q_step(False), carry)
        return dq_t, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq_t = jnp.zeros(qt.shape, _F32)
    dq_t, (dk_t, dv_t) = lax.scan(kv_tile, dq_t, (jnp.arange(st.nk), kt, vt, ex.kv_seg))
    dq = (_from_q_tiles(dq_t, st) * st.sm_scale).astype(q.dtype)
    return dq, _from_kv_tiles(dk_t, st), _from_kv_tiles(dv_t, st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, ex: _Extras):
    return _forward(st, q, k, v, ex)[0]


def _flash_fwd(st, q, k, v, ex):
    out, lse_t = _forward(st, q, k, v, ex)
    return out, (q, k, v, ex, out, lse_t)


def _flash_bwd(st, res, do):
    q, k, v, ex, out, lse_t = res
    dq, dk, dv = _backward(st, q, k, v, ex, out, lse_t, do)
    return dq, dk, dv, jax.tree.map(lambda _: None, ex)


_flash.defvjp(_flash_fwd, _flash_bwd)


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
    block_size: int,
    window: int | None = None,
) -> jax.Array:
    """Same contract as `reference.attention`; `block_size` tiles q and kv."""
    b, q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    st = _Static(
        batch=b,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=d,
        block_q=min(block_size, q_len),
        block_k=min(block_size, kv_len),
        causal=causal,
        sm_scale=sm_scale,
        dropout_rate=dropout_rate,
        window=window,
    )
    seg = q_segment_ids is not None
    ex = _Extras(
        mask=_padded_mask(mask, st),
        q_seg=_seq_tiles(q_segment_ids, st.block_q, st.nq) if seg else None,
        kv_seg=_seq_tiles(kv_segment_ids, st.block_k, st.nk) if seg else None,
        seed=dropout_seed,
    )
    return _flash(st, q, k, v, ex)

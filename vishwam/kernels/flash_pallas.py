"""Flash attention as Pallas kernels, written for the GPU (Triton) lowering.

Three kernels behind one `custom_vjp` (FlashAttention-2 layout):

- forward, grid `(q tiles, batch, heads)`: online softmax over kv tiles; writes
  the output and the per-row log-sum-exp (fp32).
- dk/dv, grid `(kv tiles, batch, kv_heads)`: for one kv tile, loops over the query heads
  of its GQA group and over the query tiles that can see it, recomputing probabilities
  from the saved log-sum-exp. GQA: k/v blocks are picked by `head // group` in the
  index map; nothing is repeated.
- dq, grid `(q tiles, batch, heads)`: the same recomputation, accumulating dq.

`delta = rowsum(out * d_out)` is plain JAX between them. Tiles causally hidden, or wholly
outside a sliding window's band, are never visited (`_masking.kv_tile_range`, `q_tile_range`,
`window_kv_start`, `window_q_stop`); without a window, entirely visible tiles skip the mask.
On CPU the kernels run with `interpret=True` (tests), and the tests export them for CUDA
(the Pallas->Triton lowering without a GPU); speed on a GPU needs `benchmarks/attention.py`.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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

KERNEL_NAMES = ("flash_attention_fwd", "flash_attention_dkdv", "flash_attention_dq")
"""The kernels' `pallas_call` names (forward, dk/dv, dq): how they show in a compiled program."""

_F32 = jnp.float32
_MIN_TILE = 16  # smallest M/N/K that Triton's dot accepts
# Untuned (no GPU measurement yet): the FlashAttention-2 Triton tutorial uses
# 32-128 for its backward tiles.
_MAX_BACKWARD_TILE = 64


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _tile(block_size: int, length: int) -> int:
    """Tile length: `block_size` rounded down to a power of two, at least 16, at most the
    padded length.

    Triton wants power-of-two tensor shapes of at least 16 for `dot`, so sequences are
    zero-padded to whole tiles (padded keys are masked) and head_dim is zero-padded to a
    power of two (zeros change no dot product); the backward kernels cap their tiles at
    `_MAX_BACKWARD_TILE`. fp32 inputs use the backend's default matmul precision (TF32 on
    recent NVIDIA GPUs); softmax statistics and accumulators are always fp32.
    """
    floor_pow2 = 1 << (max(block_size, 1).bit_length() - 1)
    return max(_MIN_TILE, min(floor_pow2, _next_pow2(length)))


@dataclasses.dataclass(frozen=True)
class _Static:
    """Shapes and switches the kernels specialise on (a custom_vjp nondiff arg)."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim_padded: int
    q_len_padded: int  # a multiple of block_q (and of the backward tiles)
    kv_len_padded: int
    block_q: int
    block_k: int
    causal: bool
    sm_scale: float
    dropout_rate: float
    mask_shape: tuple[int, int, int, int] | None  # padded int8 mask (mb, mh, 1|Lq_pad, 1|Lk_pad)
    has_segments: bool
    interpret: bool
    window: int | None = None

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def nq(self) -> int:
        return self.q_len_padded // self.block_q

    @property
    def nk(self) -> int:
        return self.kv_len_padded // self.block_k

    def backward(self) -> "_Static":
        """Backward tiles: at most `_MAX_BACKWARD_TILE`, since a dk/dv program holds
        four `[block_k, head_dim]` fp32 tiles plus the `[block_q, block_k]`
        probabilities. Smaller powers of two still divide the padded lengths."""
        return dataclasses.replace(
            self, block_q=min(self.block_q, _MAX_BACKWARD_TILE), block_k=min(self.block_k, _MAX_BACKWARD_TILE)
        )

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def masked_everywhere(self) -> bool:
        return self.mask_shape is not None or self.has_segments or self.window is not None

    def kv_start(self, i, full_hi, hi):
        """First masked kv tile of query tile i: past the tiles wholly before a sliding window."""
        if self.window is None:
            return full_hi
        start = window_kv_start(i, block_q=self.block_q, block_k=self.block_k, offset=self.offset, window=self.window)
        return jnp.minimum(jnp.maximum(full_hi, start), hi)

    def q_stop(self, j):
        """Query tiles from this one on see nothing of kv tile j (`nq` without a window)."""
        if self.window is None:
            return self.nq
        return window_q_stop(j, block_q=self.block_q, block_k=self.block_k, nq=self.nq, offset=self.offset,
                             window=self.window)

    def ranges(self):
        common = dict(
            block_q=self.block_q,
            block_k=self.block_k,
            kv_len=self.kv_len,
            offset=self.offset,
            causal=self.causal,
            masked_everywhere=self.masked_everywhere,
        )
        return functools.partial(kv_tile_range, nk=self.nk, **common), functools.partial(
            q_tile_range, nq=self.nq, **common
        )

    def compiler_params(self):
        if self.interpret:
            return None
        # Triton's parameters also select the Triton lowering (not Mosaic GPU).
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=4 if self.head_dim_padded <= 64 else 8, num_stages=2)


@dataclasses.dataclass(frozen=True)
class _Extras:
    """Non-differentiable inputs, padded arrays or None (typed `Any`: pytree unflattening passes sentinels)."""

    mask: Any  # int8 (mb, mh, 1|Lq_pad, 1|Lk_pad)
    q_seg: Any  # int32 (b, Lq_pad)
    kv_seg: Any  # int32 (b, Lk_pad)
    seed: Any  # uint32 (2,)


jax.tree_util.register_dataclass(_Extras, data_fields=["mask", "q_seg", "kv_seg", "seed"], meta_fields=[])


def _unpack(st: _Static, refs):
    """The optional refs after the fixed inputs: (mask, q_seg, kv_seg, seed, [outputs])."""
    refs = list(refs)
    mask = refs.pop(0) if st.mask_shape is not None else None
    q_seg, kv_seg = (refs.pop(0), refs.pop(0)) if st.has_segments else (None, None)
    seed = refs.pop(0) if st.dropout_rate > 0.0 else None
    return mask, q_seg, kv_seg, seed, refs


def _visibility(st: _Static, q_pos, kv_pos, q_seg, kv_seg, mask):
    """`[bq, bk]` bool for a tile; `mask` is an int8 tile broadcastable to it."""
    vis = visible(
        q_pos,
        kv_pos,
        causal=st.causal,
        causal_offset=st.offset,
        q_seg=None if q_seg is None else q_seg[:, None],
        kv_seg=None if kv_seg is None else kv_seg[None, :],
        mask=None if mask is None else mask != 0,
        window=st.window,
    )
    in_range = kv_pos < st.kv_len
    return in_range if vis is None else vis & in_range


def _keep(st: _Static, seed_ref, b, head, q_pos, kv_pos):
    row = (b * st.heads + head) * st.q_len + q_pos
    return dropout_keep(seed_ref[0], seed_ref[1], row, kv_pos, dropout_threshold(st.dropout_rate))


def _dot_nt(a, b):
    """a @ b.T with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _dot_tn(a, b):
    """a.T @ b with fp32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def _kv_pos(j, bk: int):
    return j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)


# ------------------------------------------------------------------ forward


def _fwd_kernel(st: _Static, q_ref, k_ref, v_ref, *refs):
    mask_ref, qseg_ref, kvseg_ref, seed_ref, (o_ref, lse_ref) = _unpack(st, refs)
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = st.block_q, st.block_k
    q = q_ref[...]  # (bq, dp)
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def step(masked: bool):
        def body(j, carry):
            m, l, acc = carry
            kv = pl.ds(j * bk, bk)
            s = _dot_nt(q, k_ref[kv, :]) * st.sm_scale  # (bq, bk)
            if masked:
                vis = _visibility(
                    st,
                    q_pos,
                    _kv_pos(j, bk),
                    q_seg,
                    None if kvseg_ref is None else kvseg_ref[kv],
                    None if mask_ref is None else _row_mask_tile(st, mask_ref, j),
                )
                s = jnp.where(vis, s, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.exp(s - m_new[:, None])
            if masked:
                p = jnp.where(vis, p, 0.0)
            alpha = jnp.exp(m - m_new)
            l = alpha * l + jnp.sum(p, axis=1)
            if seed_ref is not None:
                p = jnp.where(_keep(st, seed_ref, b, h, q_pos, _kv_pos(j, bk)), p, 0.0)
            v = v_ref[kv, :]
            acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
            return m_new, l, acc

        return body

    kv_range, _ = st.ranges()
    full_hi, hi = kv_range(i)
    carry = (
        jnp.full((bq,), MASK_VALUE, _F32),
        jnp.zeros((bq,), _F32),
        jnp.zeros((bq, st.head_dim_padded), _F32),
    )
    carry = lax.fori_loop(0, full_hi, step(False), carry)
    m, l, acc = lax.fori_loop(st.kv_start(i, full_hi, hi), hi, step(True), carry)
    empty = l == 0.0  # no visible key: the output is 0, not 0/0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc * ((1.0 / (1.0 - st.dropout_rate)) / l_safe)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(l_safe))


def _row_mask_tile(st: _Static, mask_ref, j):
    """Forward/dq: the int8 mask for kv tile j, `(bq | 1, bk | 1)`."""
    if st.mask_shape[3] > 1:
        return mask_ref[:, pl.ds(j * st.block_k, st.block_k)]
    return mask_ref[...]


def _per_q_tile_specs(st: _Static):
    """BlockSpecs of the forward and dq kernels, grid `(q tile i, batch b, head h)`."""
    lk, dp, g = st.kv_len_padded, st.head_dim_padded, st.group
    q_spec = pl.BlockSpec((None, st.block_q, None, dp), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, lk, None, dp), lambda i, b, h: (b, 0, lax.div(h, g), 0))
    row_spec = pl.BlockSpec((None, None, st.block_q), lambda i, b, h: (b, h, i))
    extras = []
    if st.mask_shape is not None:
        mb, mh, mq, mk = st.mask_shape
        extras.append(
            pl.BlockSpec(
                (None, None, st.block_q if mq > 1 else 1, lk if mk > 1 else 1),
                lambda i, b, h: (b if mb > 1 else 0, h if mh > 1 else 0, i if mq > 1 else 0, 0),
            )
        )
    if st.has_segments:
        extras.append(pl.BlockSpec((None, st.block_q), lambda i, b, h: (b, i)))
        extras.append(pl.BlockSpec((None, lk), lambda i, b, h: (b, 0)))
    if st.dropout_rate > 0.0:
        extras.append(pl.BlockSpec((2,), lambda i, b, h: (0,)))
    return q_spec, kv_spec, row_spec, extras


def _extras_args(st: _Static, ex: _Extras) -> list:
    args = []
    if st.mask_shape is not None:
        args.append(ex.mask)
    if st.has_segments:
        args += [ex.q_seg, ex.kv_seg]
    if st.dropout_rate > 0.0:
        args.append(ex.seed)
    return args


def _forward(st: _Static, q, k, v, ex: _Extras):
    q_spec, kv_spec, row_spec, extras = _per_q_tile_specs(st)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st),
        grid=(st.nq, st.batch, st.heads),
        in_specs=[q_spec, kv_spec, kv_spec, *extras],
        out_specs=[q_spec, row_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((st.batch, st.heads, st.q_len_padded), _F32),
        ],
        compiler_params=st.compiler_params(),
        interpret=st.interpret,
        name=KERNEL_NAMES[0],
    )(q, k, v, *_extras_args(st, ex))


# ----------------------------------------------------------------- backward


def _dq_kernel(st: _Static, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    mask_ref, qseg_ref, kvseg_ref, seed_ref, (dq_ref,) = _unpack(st, refs)
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = st.block_q, st.block_k
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def step(masked: bool):
        def body(j, dq):
            kv = pl.ds(j * bk, bk)
            k, v = k_ref[kv, :], v_ref[kv, :]
            p = jnp.exp(_dot_nt(q, k) * st.sm_scale - lse)  # (bq, bk)
            if masked:
                vis = _visibility(
                    st,
                    q_pos,
                    _kv_pos(j, bk),
                    q_seg,
                    None if kvseg_ref is None else kvseg_ref[kv],
                    None if mask_ref is None else _row_mask_tile(st, mask_ref, j),
                )
                p = jnp.where(vis, p, 0.0)
            dp = _dot_nt(do, v)
            if seed_ref is not None:
                keep = _keep(st, seed_ref, b, h, q_pos, _kv_pos(j, bk))
                dp = jnp.where(keep, dp, 0.0) * (1.0 / (1.0 - st.dropout_rate))
            ds = p * (dp - delta)
            return dq + _dot(ds.astype(k.dtype), k)

        return body

    kv_range, _ = st.ranges()
    full_hi, hi = kv_range(i)
    dq = jnp.zeros((bq, st.head_dim_padded), _F32)
    dq = lax.fori_loop(0, full_hi, step(False), dq)
    dq = lax.fori_loop(st.kv_start(i, full_hi, hi), hi, step(True), dq)
    dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(st: _Static, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    mask_ref, qseg_ref, kvseg_ref, seed_ref, (dk_ref, dv_ref) = _unpack(st, refs)
    j, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk, dp_ = st.block_q, st.block_k, st.head_dim_padded
    k, v = k_ref[...], v_ref[...]  # (bk, dp)
    kv_pos = _kv_pos(j, bk)
    kv_seg = None if kvseg_ref is None else kvseg_ref[...]
    keep_scale = 1.0 / (1.0 - st.dropout_rate)

    def step(gi, masked: bool):
        def body(i, carry):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[rows, gi, :], do_ref[rows, gi, :]  # (bq, dp)
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
            p = jnp.exp(_dot_nt(q, k) * st.sm_scale - lse_ref[gi, rows][:, None])  # (bq, bk)
            if masked:
                vis = _visibility(
                    st,
                    q_pos,
                    kv_pos,
                    None if qseg_ref is None else qseg_ref[rows],
                    kv_seg,
                    None if mask_ref is None else _col_mask_tile(st, mask_ref, gi, i),
                )
                p = jnp.where(vis, p, 0.0)
            dp = _dot_nt(do, v)
            if seed_ref is not None:
                keep = _keep(st, seed_ref, b, hk * st.group + gi, q_pos, kv_pos)
                p_drop = jnp.where(keep, p, 0.0) * keep_scale
                dp = jnp.where(keep, dp, 0.0) * keep_scale
            else:
                p_drop = p
            dv = dv + _dot_tn(p_drop.astype(do.dtype), do)
            ds = p * (dp - delta_ref[gi, rows][:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        return body

    _, q_range = st.ranges()
    lo, full_lo = q_range(j)
    stop = st.q_stop(j)
    full_lo = jnp.minimum(full_lo, stop)

    def head(gi, carry):
        carry = lax.fori_loop(lo, full_lo, step(gi, True), carry)
        return lax.fori_loop(full_lo, stop, step(gi, False), carry)

    zeros = jnp.zeros((bk, dp_), _F32)
    dk, dv = lax.fori_loop(0, st.group, head, (zeros, zeros))
    dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _col_mask_tile(st: _Static, mask_ref, gi, i):
    """dk/dv: the int8 mask of query head `gi` (of the group) for q tile i, `(bq | 1, bk | 1)`."""
    _, mh, mq, _ = st.mask_shape
    h = gi if mh > 1 else 0
    if mq > 1:
        return mask_ref[h, pl.ds(i * st.block_q, st.block_q), :]
    return mask_ref[h, :, :]


def _backward(st: _Static, res, do):
    q, k, v, ex, out, lse = res
    st = st.backward()
    lq, dp, g = st.q_len_padded, st.head_dim_padded, st.group
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(_F32), do.astype(_F32))  # (b, h, lq)
    extras = _extras_args(st, ex)

    q_spec, kv_spec, row_spec, row_extras = _per_q_tile_specs(st)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st),
        grid=(st.nq, st.batch, st.heads),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *row_extras],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=st.compiler_params(),
        interpret=st.interpret,
        name=KERNEL_NAMES[2],
    )(q, k, v, do, lse, delta, *extras)

    group_q_spec = pl.BlockSpec((None, lq, g, dp), lambda j, b, hk: (b, 0, hk, 0))
    tile_kv_spec = pl.BlockSpec((None, st.block_k, None, dp), lambda j, b, hk: (b, j, hk, 0))
    group_row_spec = pl.BlockSpec((None, g, lq), lambda j, b, hk: (b, hk, 0))
    col_extras = []
    if st.mask_shape is not None:
        mb, mh, mq, mk = st.mask_shape
        col_extras.append(
            pl.BlockSpec(
                (None, g if mh > 1 else 1, lq if mq > 1 else 1, st.block_k if mk > 1 else 1),
                lambda j, b, hk: (b if mb > 1 else 0, hk if mh > 1 else 0, 0, j if mk > 1 else 0),
            )
        )
    if st.has_segments:
        col_extras.append(pl.BlockSpec((None, lq), lambda j, b, hk: (b, 0)))
        col_extras.append(pl.BlockSpec((None, st.block_k), lambda j, b, hk: (b, j)))
    if st.dropout_rate > 0.0:
        col_extras.append(pl.BlockSpec((2,), lambda j, b, hk: (0,)))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st),
        grid=(st.nk, st.batch, st.kv_heads),
        in_specs=[group_q_spec, tile_kv_spec, tile_kv_spec, group_q_spec, group_row_spec, group_row_spec, *col_extras],
        out_specs=[tile_kv_spec, tile_kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=st.compiler_params(),
        interpret=st.interpret,
        name=KERNEL_NAMES[1],
    )(q, k, v, do, lse, delta, *extras)
    return dq, dk, dv, jax.tree.map(lambda _: None, ex)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, ex: _Extras):
    return _forward(st, q, k, v, ex)[0]


def _flash_fwd(st: _Static, q, k, v, ex: _Extras):
    out, lse = _forward(st, q, k, v, ex)
    return out, (q, k, v, ex, out, lse)


_flash.defvjp(_flash_fwd, _backward)


# ------------------------------------------------------------------- entry


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
    interpret: bool,
    window: int | None = None,
) -> jax.Array:
    """Same contract as `reference.attention`; `block_size` is the tile length
    (rounded down to a power of two, at least 16)."""
    b, q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    bq, bk = _tile(block_size, q_len), _tile(block_size, kv_len)
    lq, lk = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
    dp = max(_MIN_TILE, _next_pow2(d))

    if mask is not None:
        mb, mh, mq, mk = mask.shape
        mask = jnp.pad(
            mask.astype(jnp.int8), [(0, 0), (0, 0), (0, lq - q_len if mq > 1 else 0), (0, lk - kv_len if mk > 1 else 0)]
        )
    seg = q_segment_ids is not None
    st = _Static(
        batch=b,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim_padded=dp,
        q_len_padded=lq,
        kv_len_padded=lk,
        block_q=bq,
        block_k=bk,
        causal=causal,
        sm_scale=sm_scale,
        dropout_rate=dropout_rate,
        mask_shape=None if mask is None else tuple(mask.shape),
        has_segments=seg,
        interpret=interpret,
        window=window,
    )
    ex = _Extras(
        mask=mask,
        q_seg=jnp.pad(q_segment_ids, [(0, 0), (0, lq - q_len)], constant_values=-1) if seg else None,
        kv_seg=jnp.pad(kv_segment_ids, [(0, 0), (0, lk - kv_len)], constant_values=-1) if seg else None,
        seed=dropout_seed,
    )
    qp = jnp.pad(q, [(0, 0), (0, lq - q_len), (0, 0), (0, dp - d)])
    kp = jnp.pad(k, [(0, 0), (0, lk - kv_len), (0, 0), (0, dp - d)])
    vp = jnp.pad(v, [(0, 0), (0, lk - kv_len), (0, 0), (0, dp - d)])
    return _flash(st, qp, kp, vp, ex)[:, :q_len, :, :d]

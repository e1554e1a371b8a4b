"""Flash attention as Pallas kernels for the TPU (Mosaic) lowering.

Same contract as `reference.attention` (causal, segment ids, GQA, boolean mask,
dropout with the shared position hash). Three kernels behind one `custom_vjp`:

- forward, grid `(batch, head, q tile, kv tile)`: online softmax with the kv tile as
  the innermost, sequential grid axis; running max, sum and output live in VMEM
  scratch; writes the output and the log-sum-exp (fp32).
- dk/dv, grid `(batch, kv head, kv tile, group head x q tile)`: the GQA group's query
  heads and the query tiles are one sequential axis; dk/dv accumulate in scratch.
- dq, grid `(batch, head, q tile, kv tile)`: accumulates dq.

Probabilities are recomputed from the saved log-sum-exp; `delta = rowsum(out * d_out)`
is plain JAX. Tiles that causal masking hides are skipped (`pl.when`, their index maps
repeat the previous block so no copy is issued); entirely visible tiles skip the mask
(`_masking.kv_tile_range`, `q_tile_range`). On CPU the kernels run with `interpret=True`;
the tests also compile them for an abstract TPU topology. Nothing here was timed on a TPU.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from vishwam.kernels._masking import (
    MASK_VALUE,
    dropout_keep,
    dropout_threshold,
    kv_tile_range,
    q_tile_range,
    visible,
)
from vishwam.parallel.mesh import BATCH_AXES, TENSOR_AXIS

_F32 = jnp.float32
_LANES = 128
_SUBLANES = 8
_MIN_Q_TILE = 16  # bf16 packs 16 rows per sublane tile
# VMEM bound: tiles of 2048 ran out of v5e's scoped VMEM at head_dim 128 (AOT
# compile), 1024 compiled at head_dim 256; 512 leaves room for wider heads.
_MAX_TILE = 512


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tiles(block_size: int, q_len: int, kv_len: int) -> tuple[int, int]:
    tile = min(_MAX_TILE, max(_LANES, block_size // _LANES * _LANES))
    bk = min(tile, _round_up(kv_len, _LANES))
    bq = _round_up(q_len, _MIN_Q_TILE) if q_len < tile else tile
    return bq, bk


@dataclasses.dataclass(frozen=True)
class _Static:
    """Shapes and switches the kernels specialise on (a custom_vjp nondiff arg)."""

    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int  # padded
    q_len_padded: int
    kv_len_padded: int
    block_q: int
    block_k: int
    causal: bool
    sm_scale: float
    dropout_rate: float
    global_heads: int  # query heads before any shard_map split (the dropout hash counts them)
    mask_shape: tuple[int, int, int, int] | None  # padded int8 mask (mb, mh, 1|Lq_pad, 1|Lk_pad)
    has_segments: bool
    interpret: bool

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def nq(self) -> int:
        return self.q_len_padded // self.block_q

    @property
    def nk(self) -> int:
        return self.kv_len_padded // self.block_k

    def kv_range(self, i):
        return kv_tile_range(i, nk=self.nk, **self._range_args())

    def q_range(self, j):
        return q_tile_range(j, nq=self.nq, **self._range_args())

    def _range_args(self):
        return dict(
            block_q=self.block_q,
            block_k=self.block_k,
            kv_len=self.kv_len,
            offset=self.kv_len - self.q_len,
            causal=self.causal,
            masked_everywhere=self.mask_shape is not None or self.has_segments,
        )

    def compiler_params(self):
        # The last grid axis carries the accumulators: it must run in order.
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


@dataclasses.dataclass(frozen=True)
class _Extras:
    """Non-differentiable inputs in kernel layout, or None (typed `Any`: pytree unflattening passes sentinels)."""

    mask: Any  # int8 (mb, mh, 1|Lq_pad, 1|Lk_pad)
    q_seg: Any  # int32 (b, Lq_pad, 128)
    kv_seg: Any  # int32 (b, 8, Lk_pad)
    seed: Any  # uint32 (2,)
    offsets: Any  # int32 (2,): this shard's first (batch row, query head)


jax.tree_util.register_dataclass(
    _Extras, data_fields=["mask", "q_seg", "kv_seg", "seed", "offsets"], meta_fields=[]
)


class _ExtraRefs(NamedTuple):
    mask: Any
    q_seg: Any
    kv_seg: Any
    seed: Any
    offsets: Any


def _extras_args(st: _Static, ex: _Extras) -> list:
    args = [ex.mask] if st.mask_shape is not None else []
    args += [ex.q_seg, ex.kv_seg] if st.has_segments else []
    return args + ([ex.seed, ex.offsets] if st.dropout_rate > 0.0 else [])


def _unpack(st: _Static, refs) -> tuple[_ExtraRefs, list]:
    """The optional refs after the fixed inputs, and the rest (outputs, scratch)."""
    refs = list(refs)
    mask = refs.pop(0) if st.mask_shape is not None else None
    q_seg, kv_seg = (refs.pop(0), refs.pop(0)) if st.has_segments else (None, None)
    seed, offsets = (refs.pop(0), refs.pop(0)) if st.dropout_rate > 0.0 else (None, None)
    return _ExtraRefs(mask, q_seg, kv_seg, seed, offsets), refs


def _extras_specs(st: _Static, index):
    """BlockSpecs of the optional inputs; `index(*grid ids)` gives (batch, head, q tile, kv tile)."""
    bq, bk = st.block_q, st.block_k
    specs = []
    if st.mask_shape is not None:
        mb, mh, mq, mk = st.mask_shape

        def mask_map(*ids):
            b, h, i, j = index(*ids)
            return (b if mb > 1 else 0, h if mh > 1 else 0, i if mq > 1 else 0, j if mk > 1 else 0)

        specs.append(pl.BlockSpec((None, None, bq if mq > 1 else 1, bk if mk > 1 else 1), mask_map))
    if st.has_segments:
        specs.append(pl.BlockSpec((None, bq, _LANES), lambda *ids: (index(*ids)[0], index(*ids)[2], 0)))
        specs.append(pl.BlockSpec((None, _SUBLANES, bk), lambda *ids: (index(*ids)[0], 0, index(*ids)[3])))
    if st.dropout_rate > 0.0:
        specs += [pl.BlockSpec(memory_space=pltpu.SMEM)] * 2  # seed, offsets: scalars
    return specs


def _lanes(x, n: int):
    """A `[rows, 128]` lane-broadcast statistic as `[rows, n]`."""
    if n <= _LANES:
        return x[:, :n]
    return jnp.tile(x, (1, n // _LANES))


def _dot_nt(a, b):
    """a @ b.T with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def _positions(st: _Static, i, j):
    """Query and key positions `[bq, bk]` of q tile i and kv tile j."""
    shape = (st.block_q, st.block_k)
    q_pos = i * st.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    return q_pos, j * st.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)


def _visibility(st: _Static, x: _ExtraRefs, i, j):
    """`[bq, bk]` bool for q tile i and kv tile j."""
    q_pos, kv_pos = _positions(st, i, j)
    vis = visible(
        q_pos,
        kv_pos,
        causal=st.causal,
        causal_offset=st.kv_len - st.q_len,
        q_seg=None if x.q_seg is None else _lanes(x.q_seg[...], st.block_k),
        kv_seg=None if x.kv_seg is None else x.kv_seg[:1, :],
        mask=None if x.mask is None else x.mask[...] != 0,
    )
    in_range = kv_pos < st.kv_len
    return in_range if vis is None else vis & in_range


def _head_row(st: _Static, x: _ExtraRefs, b, head):
    """`global batch row * global heads + global head`, the dropout hash's head
    coordinate (None without dropout). Read at the kernel's top level: the
    interpreter substitutes `program_id` only there."""
    if st.dropout_rate == 0.0:
        return None
    return (x.offsets[0] + b) * st.global_heads + x.offsets[1] + head


def _dropped(st: _Static, x: _ExtraRefs, head_row, i, j, y):
    """`y [bq, bk]` through dropout (zeroed where dropped, the kept scaled up), or
    `y`. The keep-mask is hashed from global positions exactly as in `reference`,
    whatever the shard or the tile."""
    if st.dropout_rate == 0.0:
        return y
    q_pos, kv_pos = _positions(st, i, j)
    keep = dropout_keep(
        x.seed[0], x.seed[1], head_row * st.q_len + q_pos, kv_pos, dropout_threshold(st.dropout_rate)
    )
    return jnp.where(keep, y, 0.0) * (1.0 / (1.0 - st.dropout_rate))


def _when_visible(full, partial, body) -> None:
    """`body(masked=False)` on a tile that is entirely visible, `body(masked=True)`
    on one partly visible, nothing on a hidden one."""
    pl.when(full)(functools.partial(body, False))
    pl.when(partial)(functools.partial(body, True))


# ------------------------------------------------------------------ forward


def _fwd_kernel(st: _Static, q_ref, k_ref, v_ref, *refs):
    x, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _unpack(st, refs)
    i, j = pl.program_id(2), pl.program_id(3)
    head_row = _head_row(st, x, pl.program_id(0), pl.program_id(1))

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, _F32)
        l_scr[...] = jnp.zeros(l_scr.shape, _F32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

    def body(masked: bool):
        s = _dot_nt(q_ref[...], k_ref[...]) * st.sm_scale  # (bq, bk)
        if masked:
            vis = _visibility(st, x, i, j)
            s = jnp.where(vis, s, MASK_VALUE)
        m_prev, l_prev = m_scr[...], l_scr[...]  # (bq, 128)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_new, st.block_k))
        if masked:
            p = jnp.where(vis, p, 0.0)  # a row with nothing visible has s == m_new
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        p = _dropped(st, x, head_row, i, j, p)
        v = v_ref[...]
        acc_scr[...] = _lanes(alpha, st.head_dim) * acc_scr[...] + _dot(p.astype(v.dtype), v)

    full_hi, hi = st.kv_range(i)
    _when_visible(j < full_hi, (j >= full_hi) & (j < hi), body)

    @pl.when(j == st.nk - 1)
    def _finish():
        l = l_scr[...]
        empty = l == 0.0  # no visible key: the output is 0, not 0/0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_scr[...] / _lanes(l_safe, st.head_dim)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, 0.0, m_scr[...] + jnp.log(l_safe))


def _kv_block(st: _Static, i, j):
    """The kv tile to fetch at step j of q tile i: hidden tiles repeat the last
    visible one, so the pipeline issues no copy for them."""
    _, hi = st.kv_range(i)
    return jnp.minimum(j, jnp.maximum(hi - 1, 0))


def _row_specs(st: _Static):
    """BlockSpecs of the forward and dq kernels, grid `(b, h, q tile i, kv tile j)`."""
    d, g = st.head_dim, st.group
    q_spec = pl.BlockSpec((None, None, st.block_q, d), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, st.block_k, d), lambda b, h, i, j: (b, lax.div(h, g), _kv_block(st, i, j), 0))
    stat_spec = pl.BlockSpec((None, None, st.block_q, _LANES), lambda b, h, i, j: (b, h, i, 0))
    extras = _extras_specs(st, lambda b, h, i, j: (b, h, i, _kv_block(st, i, j)))
    return q_spec, kv_spec, stat_spec, extras


def _forward(st: _Static, q, k, v, ex: _Extras):
    batch, heads = q.shape[:2]
    q_spec, kv_spec, stat_spec, extras = _row_specs(st)
    stats = jax.ShapeDtypeStruct((batch, heads, st.q_len_padded, _LANES), _F32)
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st),
        grid=(batch, heads, st.nq, st.nk),
        in_specs=[q_spec, kv_spec, kv_spec, *extras],
        out_specs=[q_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), stats],
        scratch_shapes=[
            pltpu.VMEM((st.block_q, _LANES), _F32),
            pltpu.VMEM((st.block_q, _LANES), _F32),
            pltpu.VMEM((st.block_q, st.head_dim), _F32),
        ],
        compiler_params=st.compiler_params(),
        interpret=st.interpret,
        name="flash_attention_tpu_fwd",
    )(q, k, v, *_extras_args(st, ex))
    return out, lse


# ----------------------------------------------------------------- backward


def _dq_kernel(st: _Static, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    x, (dq_ref, dq_scr) = _unpack(st, refs)
    i, j = pl.program_id(2), pl.program_id(3)
    head_row = _head_row(st, x, pl.program_id(0), pl.program_id(1))

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, _F32)

    def body(masked: bool):
        k, v = k_ref[...], v_ref[...]
        p = jnp.exp(_dot_nt(q_ref[...], k) * st.sm_scale - _lanes(lse_ref[...], st.block_k))  # (bq, bk)
        if masked:
            p = jnp.where(_visibility(st, x, i, j), p, 0.0)
        dp = _dropped(st, x, head_row, i, j, _dot_nt(do_ref[...], v))
        ds = p * (dp - _lanes(delta_ref[...], st.block_k))
        dq_scr[...] += _dot(ds.astype(k.dtype), k)

    full_hi, hi = st.kv_range(i)
    _when_visible(j < full_hi, (j >= full_hi) & (j < hi), body)

    @pl.when(j == st.nk - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * st.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(st: _Static, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    x, (dk_ref, dv_ref, dk_scr, dv_scr) = _unpack(st, refs)
    j, t = pl.program_id(2), pl.program_id(3)
    i = lax.rem(t, st.nq)
    head_row = _head_row(st, x, pl.program_id(0), pl.program_id(1) * st.group + lax.div(t, st.nq))

    @pl.when(t == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, _F32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, _F32)

    def body(masked: bool):
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        p = jnp.exp(_dot_nt(q, k) * st.sm_scale - _lanes(lse_ref[...], st.block_k))  # (bq, bk)
        if masked:
            p = jnp.where(_visibility(st, x, i, j), p, 0.0)
        dv_scr[...] += _dot(_dropped(st, x, head_row, i, j, p).T.astype(do.dtype), do)
        ds = p * (_dropped(st, x, head_row, i, j, _dot_nt(do, v)) - _lanes(delta_ref[...], st.block_k))
        dk_scr[...] += _dot(ds.T.astype(q.dtype), q)

    lo, full_lo = st.q_range(j)
    _when_visible(i >= full_lo, (i >= lo) & (i < full_lo), body)

    @pl.when(t == st.group * st.nq - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * st.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _q_block(st: _Static, j, t):
    """(query head within the group, q tile) to fetch at step t of kv tile j:
    tiles that see none of it are replaced by the first that does."""
    lo, _ = st.q_range(j)
    return lax.div(t, st.nq), jnp.minimum(jnp.maximum(lax.rem(t, st.nq), lo), st.nq - 1)


def _backward(st: _Static, res, do):
    q, k, v, ex, out, lse = res
    batch, heads = q.shape[:2]
    d, g, bq, bk = st.head_dim, st.group, st.block_q, st.block_k
    delta = jnp.einsum("bhqd,bhqd->bhq", out.astype(_F32), do.astype(_F32))
    lse, delta = (jnp.broadcast_to(x[..., None], (*x.shape, _LANES)) for x in (lse, delta))
    extras = _extras_args(st, ex)

    q_spec, kv_spec, stat_spec, row_extras = _row_specs(st)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st),
        grid=(batch, heads, st.nq, st.nk),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec, *row_extras],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), _F32)],
        compiler_params=st.compiler_params(),
        interpret=st.interpret,
        name="flash_attention_tpu_dq",
    )(q, k, v, do, lse, delta, *extras)

    def q_map(b, hk, j, t):  # grid (b, kv head, kv tile j, group head x q tile t)
        gi, i = _q_block(st, j, t)
        return b, hk * g + gi, i, 0

    group_q_spec = pl.BlockSpec((None, None, bq, d), q_map)
    group_stat_spec = pl.BlockSpec((None, None, bq, _LANES), q_map)
    tile_kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, hk, j, t: (b, hk, j, 0))
    col_extras = _extras_specs(st, lambda b, hk, j, t: (*q_map(b, hk, j, t)[:3], j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st),
        grid=(batch, st.kv_heads, st.nk, g * st.nq),
        in_specs=[
            group_q_spec, tile_kv_spec, tile_kv_spec, group_q_spec, group_stat_spec, group_stat_spec, *col_extras
        ],
        out_specs=[tile_kv_spec, tile_kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, d), _F32)],
        compiler_params=st.compiler_params(),
        interpret=st.interpret,
        name="flash_attention_tpu_dkdv",
    )(q, k, v, do, lse, delta, *extras)
    return dq, dk, dv, jax.tree.map(lambda _: None, ex)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, ex: _Extras):
    return _forward(st, q, k, v, ex)[0]


def _flash_fwd(st: _Static, q, k, v, ex: _Extras):
    out, lse = _forward(st, q, k, v, ex)
    # Saved once per row, not 128 times: the backward broadcasts it again.
    return out, (q, k, v, ex, out, lse[..., 0])


_flash.defvjp(_flash_fwd, _backward)


# ------------------------------------------------------------------- entry


def _local_attention(
    q, k, v, mask, q_seg, kv_seg, seed, offsets, *, causal, sm_scale, dropout_rate, global_heads, block_size, interpret
):
    """One device's attention: pad and transpose into kernel layout, run, undo.

    Mosaic's rules shape the layout. The last two dims of every block must be
    multiples of (8, 128) or the whole array dim, so the kernels work on
    `[batch, heads, len, head_dim]` (transposed here) and a whole-head_dim block.
    Per-row statistics (log-sum-exp, delta, query segment ids) are stored broadcast
    over 128 lanes (`[..., len, 128]`) and key segment ids over 8 sublanes
    (`[batch, 8, kv_len]`), so that a tile reads them as a column or a row with no
    relayout (the layout of `jax.experimental.pallas.ops.tpu`); the log-sum-exp is saved
    for the backward once per row. Tiles (`_tiles`): kv
    tiles are multiples of 128 (`block_size` rounded down, clamped to [128, 512]); q
    tiles the same, or one tile of the whole query length rounded up to 16 when it is
    shorter; sequences are zero-padded to whole tiles and padded keys masked. head_dim
    over 128 is zero-padded to a multiple of 128.
    """
    _, q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    bq, bk = _tiles(block_size, q_len, kv_len)
    lq, lk = _round_up(q_len, bq), _round_up(kv_len, bk)
    dp = d if d <= _LANES else _round_up(d, _LANES)
    if mask is not None:
        _, _, mq, mk = mask.shape
        mask = jnp.pad(
            mask.astype(jnp.int8), [(0, 0), (0, 0), (0, lq - q_len if mq > 1 else 0), (0, lk - kv_len if mk > 1 else 0)]
        )
    seg = q_seg is not None
    st = _Static(
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=dp,
        q_len_padded=lq,
        kv_len_padded=lk,
        block_q=bq,
        block_k=bk,
        causal=causal,
        sm_scale=sm_scale,
        dropout_rate=dropout_rate,
        global_heads=global_heads,
        mask_shape=None if mask is None else tuple(mask.shape),
        has_segments=seg,
        interpret=interpret,
    )
    if seg:
        q_seg = jnp.pad(q_seg, [(0, 0), (0, lq - q_len)], constant_values=-1)
        kv_seg = jnp.pad(kv_seg, [(0, 0), (0, lk - kv_len)], constant_values=-1)
        q_seg = jnp.broadcast_to(q_seg[:, :, None], (*q_seg.shape, _LANES))  # (b, lq, 128)
        kv_seg = jnp.broadcast_to(kv_seg[:, None, :], (kv_seg.shape[0], _SUBLANES, lk))  # (b, 8, lk)
    ex = _Extras(mask=mask, q_seg=q_seg, kv_seg=kv_seg, seed=seed, offsets=offsets)

    def layout(x, length, padded):  # (b, len, h, d) -> (b, h, len_padded, d_padded)
        return jnp.pad(x, [(0, 0), (0, padded - length), (0, 0), (0, dp - d)]).transpose(0, 2, 1, 3)

    out = _flash(st, layout(q, q_len, lq), layout(k, kv_len, lk), layout(v, kv_len, lk), ex)
    return out.transpose(0, 2, 1, 3)[:, :q_len, :, :d]


def _mesh_split(mesh, free: set, batch: int, heads: int, kv_heads: int):
    """Axes of `free` (the mesh axes not already manual) that the batch and the heads are split over."""
    sizes = dict(mesh.shape)
    batch_axes, shards = [], 1
    for axis in BATCH_AXES:
        if axis in free and sizes[axis] > 1 and batch % (shards * sizes[axis]) == 0:
            batch_axes.append(axis)
            shards *= sizes[axis]
    t = sizes.get(TENSOR_AXIS, 1)
    split_heads = TENSOR_AXIS in free and t > 1 and heads % t == 0 and kv_heads % t == 0
    return tuple(batch_axes), TENSOR_AXIS if split_heads else None


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
) -> jax.Array:
    """Same contract as `reference.attention`; `block_size` is the tile length,
    rounded down to a multiple of 128 in [128, 512].

    Inside a mesh (`jax.set_mesh`) the kernels run under `jax.shard_map`: batch split
    over the mesh axes of `data, fsdp, expert` that divide it, heads over `tensor` when
    both head counts divide by it, everything else replicated (Mosaic calls cannot be
    partitioned automatically). Each shard is told where its batch rows and heads
    start, so dropout hashes the same global positions as `reference`.
    """
    local = functools.partial(
        _local_attention,
        causal=causal,
        sm_scale=sm_scale,
        dropout_rate=dropout_rate,
        global_heads=q.shape[2],
        block_size=block_size,
        interpret=interpret,
    )
    dropout = dropout_rate > 0.0
    mesh = jax.sharding.get_abstract_mesh()
    free = set() if mesh.empty else set(mesh.axis_names) - set(mesh.manual_axes)
    if not free:
        offsets = jnp.zeros((2,), jnp.int32) if dropout else None
        return local(q, k, v, mask, q_segment_ids, kv_segment_ids, dropout_seed, offsets)

    batch_axes, head_axis = _mesh_split(mesh, free, q.shape[0], q.shape[2], k.shape[2])
    b_spec = batch_axes or None
    qkv_spec = P(b_spec, None, head_axis, None)
    named = {"q": (q, qkv_spec), "k": (k, qkv_spec), "v": (v, qkv_spec)}
    if mask is not None:
        mb, mh = mask.shape[:2]
        named["mask"] = (mask, P(b_spec if mb > 1 else None, head_axis if mh > 1 else None, None, None))
    if q_segment_ids is not None:
        named["q_seg"], named["kv_seg"] = (q_segment_ids, P(b_spec, None)), (kv_segment_ids, P(b_spec, None))
    if dropout:
        named["seed"] = (dropout_seed, P())

    def per_shard(a):
        offsets = None
        if dropout:  # where this shard's rows and heads start, for the dropout hash
            b0 = lax.axis_index(batch_axes) * a["q"].shape[0] if batch_axes else 0
            h0 = lax.axis_index(head_axis) * a["q"].shape[2] if head_axis else 0
            offsets = jnp.stack([jnp.asarray(b0, jnp.int32), jnp.asarray(h0, jnp.int32)])
        return local(
            a["q"], a["k"], a["v"], a.get("mask"), a.get("q_seg"), a.get("kv_seg"), a.get("seed"), offsets
        )

    arrays = {name: x for name, (x, _) in named.items()}
    specs = {name: spec for name, (_, spec) in named.items()}
    # check_vma=False: pallas_call's outputs carry no varying-axes annotation.
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(specs,), out_specs=qkv_spec, axis_names=free, check_vma=False
    )(arrays)

"""Grouped SwiGLU: each expert's MLP over its own routed rows, gathered and combined inside
the loop, with its own backward.

The assignments come sorted by expert into blocks of `block` rows (the layout of
`vishwam.nn.moe.assign_blocks`): `source[r]` is the token that fills row `r` (`tokens` for
a padding row), `row[t, j]` the row of token `t`'s j-th choice, and `ends[e]` the block
after expert `e`'s run (its run is the blocks `ends[e - 1]` to `ends[e] - 1`). The loops are
expert-major: a `fori_loop` over the experts that have blocks (a run-time count), and
inside it a `fori_loop` over the expert's blocks, so empty runs and unused trailing blocks
are never visited, each used expert's weights are sliced once (not once per block), and
the traced program is the same size whatever the number of experts. Weights given as one
array per expert (`SplitExperts`, inference) cannot be indexed at run time: those get one
block loop per expert.

Each block gathers its rows from the tokens and scatter-adds its outputs, scaled by their
routing weights, into the result (fp32) inside the loop: no `[blocks, block, hidden]` array
is built, so none is zero-filled, written block by block, kept for the backward (under a
layer scan: stacked over the layers) and read back. Measured on the 2-core CPU at issue 33's
fine-grained shape (4096 tokens, 64 experts top-8 of FFN 128, blocks of 256; one layer's
values and gradients): 321-336 ms with pre-gathered blocks and a separate weighted combine,
202-206 ms this way (`benchmarks/RESULTS.md`).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .flash import target_platform


def _for_used_experts(ends: Int[Array, " experts"], body, carry):
    """`body(e, first_block, end_block, carry)` for each expert that has blocks, in order, as a
    run-time loop over their count (experts without blocks are never visited)."""
    starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
    used = ends > starts
    (order,) = jnp.nonzero(used, size=ends.shape[0], fill_value=0)
    order = order.astype(jnp.int32)

    def one_expert(i, carry):
        e = order[i]
        return body(e, starts[e], ends[e], carry)

    return jax.lax.fori_loop(0, jnp.sum(used, dtype=jnp.int32), one_expert, carry)


def _expert_weights(weights, e, dtype):
    return [jax.lax.dynamic_index_in_dim(w, e, keepdims=False).astype(dtype) for w in weights]


def _expert_loops(weights, ends, one_block, carry):
    """Run `one_block(b, carry, w_gate, w_up, w_down)` over every used expert's blocks
    (expert-major, see the module docstring), for stacked or per-expert weights."""
    if isinstance(weights[0], Sequence):
        for e in range(len(weights[0])):
            start = ends[e - 1] if e else 0
            ws = [w[e] for w in weights]
            carry = jax.lax.fori_loop(start, ends[e], lambda b, c, ws=ws: one_block(b, c, *ws), carry)
        return carry

    def one_expert(e, first, end, carry):
        ws = [jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in weights]
        return jax.lax.fori_loop(first, end, lambda b, c: one_block(b, c, *ws), carry)

    return _for_used_experts(ends, one_expert, carry)


def _row_weights(weights, row, rows: int):
    """Each row's routing weight (fp32; 0 for padding rows)."""
    return jnp.zeros((rows,), jnp.float32).at[row.reshape(-1)].set(weights.reshape(-1).astype(jnp.float32))


def grouped_swiglu_forward(x, weights, source, row, ends, gate, up, down, *, block: int, save: bool):
    """`grouped_swiglu`'s forward loops. The weights are stacked `[experts, ...]` arrays or
    sequences of one array per expert (`SplitExperts`, inference), cast to `x`'s dtype.

    Returns the output `[tokens, hidden]` in `x`'s dtype and, with `save`, each block's gate
    and up projections `[blocks, block, ffn]` (`[]` without). Not reverse-differentiable
    (run-time loop bounds): `grouped_swiglu` is."""
    dt = x.dtype
    num_blocks = source.shape[0] // block
    ffn = gate[0].shape[-1]
    row_weights = _row_weights(weights, row, source.shape[0])
    y = jnp.zeros(x.shape, jnp.float32)
    saved = (jnp.zeros((num_blocks, block, ffn), dt),) * 2 if save else ()

    def one_block(b, carry, w_gate, w_up, w_down):
        y, *saved = carry
        index = jax.lax.dynamic_slice_in_dim(source, b * block, block)
        rows = jnp.take(x, index, axis=0, mode="fill", fill_value=0)  # padding rows (index `tokens`): zeros
        g, u = rows @ w_gate.astype(dt), rows @ w_up.astype(dt)
        scale = jax.lax.dynamic_slice_in_dim(row_weights, b * block, block)[:, None]
        out = jnp.matmul(jax.nn.silu(g) * u, w_down.astype(dt), preferred_element_type=jnp.float32) * scale
        y = y.at[index].add(out, mode="drop")  # and dropped
        if saved:
            saved = [jax.lax.dynamic_update_index_in_dim(a, v, b, 0) for a, v in zip(saved, (g, u))]
        return (y, *saved)

    y, *saved = _expert_loops((gate, up, down), ends, one_block, (y, *saved))
    return y.astype(dt), saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def grouped_swiglu(
    x: Float[Array, "tokens hidden"],
    weights: Float[Array, "tokens k"],
    source: Int[Array, " rows"],
    row: Int[Array, "tokens k"],
    ends: Int[Array, " experts"],
    gate: Float[Array, "experts hidden ffn"],
    up: Float[Array, "experts hidden ffn"],
    down: Float[Array, "experts ffn hidden"],
    block: int,
) -> Float[Array, "tokens hidden"]:
    """The routed experts' combined output, `sum_j weights[t, j] * mlp_{e(t, j)}(x[t])` with
    `mlp_e(r) = down_e(silu(gate_e(r)) * up_e(r))`, over the block layout described in the
    module docstring (`block` rows per block, static). Blocks after the last run are never
    visited; padding rows add nothing.

    The backward runs the same loops, re-gathering each block's rows and output gradients;
    besides the inputs it keeps each block's gate and up projections (as plain autodiff of
    the SwiGLU would), and accumulates each used expert's weight gradients in fp32 in the
    block loop's carry. The routing weights' gradient costs no GEMM:
    `d weight = <dy[t], down(h)> = <dy[t] @ down.T, h>`, and `dy @ down.T` is needed anyway.
    The gate and up projections go backward as one product of twice the width each way
    (`[gate | up]`), each expert's weights are transposed once rather than in every block,
    and on CPU the weight-gradient products read a transposed copy of their left operand
    (`_transposed_operand`): the fine-grained train step of `benchmarks/vs_transformers.py`
    1.07x faster than with the plain backward (`benchmarks/RESULTS.md`).
    """
    return grouped_swiglu_forward(x, weights, source, row, ends, gate, up, down, block=block, save=False)[0]


def _grouped_swiglu_fwd(x, weights, source, row, ends, gate, up, down, block):
    y, (g, u) = grouped_swiglu_forward(x, weights, source, row, ends, gate, up, down, block=block, save=True)
    return y, (x, weights, source, row, ends, gate, up, down, g, u)


def _transposed_operand(a):
    """`a.T` as a product's left operand. On CPU behind an optimization barrier, so that XLA
    does not fold the transpose into the product: XLA:CPU runs a product contracting over the
    rows of both operands (a weight gradient) as an Eigen dot, and a row-major one in YNNPACK,
    faster here even with the copy (`benchmarks/RESULTS.md`). Elsewhere a plain transpose."""
    return jax.lax.optimization_barrier(a.T) if target_platform() == "cpu" else a.T


def _grouped_swiglu_bwd(block, residuals, dy):
    x, weights, source, row, ends, gate, up, down, g_all, u_all = residuals
    dt, f32 = x.dtype, jnp.float32
    ffn = gate.shape[-1]
    row_weights = _row_weights(weights, row, source.shape[0])
    dy = dy.astype(dt)

    def one_expert(e, first, end, carry):
        dx, d_rows_w, d_gate_up_all, d_down_all = carry
        w_gate, w_up, w_down = _expert_weights((gate, up, down), e, dt)
        # The gate and up projections' gradients as one product each way (twice as wide: faster
        # on CPU than two), the weights transposed once per expert rather than in every block.
        w_gate_up_t = jnp.concatenate([w_gate, w_up], axis=-1).T  # (2F, D)
        w_down_t = w_down.T  # (D, F)

        def one_block(b, carry):
            dx, d_rows_w, d_gate_up, d_down = carry
            index = jax.lax.dynamic_slice_in_dim(source, b * block, block)
            rows = jnp.take(x, index, axis=0, mode="fill", fill_value=0)
            d_out = jnp.take(dy, index, axis=0, mode="fill", fill_value=0)
            scale = jax.lax.dynamic_slice_in_dim(row_weights, b * block, block)[:, None]
            g, u = g_all[b].astype(f32), u_all[b].astype(f32)
            sig = jax.nn.sigmoid(g)
            silu = g * sig
            h = silu * u
            dh_unscaled = jnp.matmul(d_out, w_down_t, preferred_element_type=f32)  # (block, F)
            d_rows_w = jax.lax.dynamic_update_slice_in_dim(d_rows_w, jnp.sum(dh_unscaled * h, axis=-1), b * block, 0)
            d_down = d_down + jnp.matmul(_transposed_operand((h * scale).astype(dt)), d_out, preferred_element_type=f32)
            dh = dh_unscaled * scale
            d_gate_up_rows = jnp.concatenate([dh * u * sig * (1.0 + g * (1.0 - sig)), dh * silu], axis=-1).astype(dt)
            d_gate_up = d_gate_up + jnp.matmul(_transposed_operand(rows), d_gate_up_rows, preferred_element_type=f32)
            dx = dx.at[index].add(jnp.matmul(d_gate_up_rows, w_gate_up_t, preferred_element_type=f32), mode="drop")
            return dx, d_rows_w, d_gate_up, d_down

        zeros = (jnp.zeros((x.shape[1], 2 * ffn), f32), jnp.zeros(w_down.shape, f32))
        dx, d_rows_w, d_gate_up, d_down = jax.lax.fori_loop(first, end, one_block, (dx, d_rows_w, *zeros))
        return (dx, d_rows_w, jax.lax.dynamic_update_index_in_dim(d_gate_up_all, d_gate_up, e, 0),
                jax.lax.dynamic_update_index_in_dim(d_down_all, d_down, e, 0))

    init = (jnp.zeros(x.shape, f32), jnp.zeros(row_weights.shape, f32),
            jnp.zeros((*gate.shape[:-1], 2 * ffn), f32), jnp.zeros(down.shape, f32))
    dx, d_rows_w, d_gate_up, d_down = _for_used_experts(ends, one_expert, init)
    d_weights = jnp.take(d_rows_w, row.reshape(-1), axis=0).reshape(row.shape).astype(weights.dtype)
    d_gate, d_up = d_gate_up[..., :ffn].astype(gate.dtype), d_gate_up[..., ffn:].astype(up.dtype)
    return dx.astype(x.dtype), d_weights, None, None, None, d_gate, d_up, d_down.astype(down.dtype)


grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)

"""Grouped SwiGLU: each expert's MLP over its own run of row blocks, with its own backward.

The rows arrive sorted by expert into `[blocks, block, hidden]`, each expert's run
padded to whole blocks; `ends[e]` is the block after expert `e`'s run (its run is
the blocks `ends[e - 1]` to `ends[e] - 1`). The loops are expert-major: a
`fori_loop` over the experts that have blocks (a run-time count), and inside it a
`fori_loop` over the expert's blocks, so empty runs and unused trailing blocks are
never visited, each used expert's weights are sliced once (not once per block), and
the traced program is the same size whatever the number of experts. Weights given as
one array per expert (`SplitExperts`, inference) cannot be indexed at run time: those
get one block loop per expert.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _runs(ends: Int[Array, " experts"]) -> tuple[Int[Array, " experts"], Int[Array, " experts"], Int[Array, ""]]:
    """Each expert's first block, the used experts in order (padded with 0) and their count."""
    starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
    used = ends > starts
    (order,) = jnp.nonzero(used, size=ends.shape[0], fill_value=0)
    return starts, order.astype(jnp.int32), jnp.sum(used, dtype=jnp.int32)


def _expert_weights(weights, e, dtype):
    return [jax.lax.dynamic_index_in_dim(w, e, keepdims=False).astype(dtype) for w in weights]


def _forward_blocks(x, start, stop, w_gate, w_up, w_down, carry):
    """One expert's blocks `[start, stop)`: three GEMMs and the SwiGLU per block, written
    into `carry = (out, *saved)` (with `saved`, each block's gate and up projections)."""

    def one_block(b, carry):
        out, *saved = carry
        rows = x[b]
        g, u = rows @ w_gate, rows @ w_up  # (block, F)
        out = jax.lax.dynamic_update_index_in_dim(out, (jax.nn.silu(g) * u) @ w_down, b, 0)
        if saved:
            saved = [jax.lax.dynamic_update_index_in_dim(a, v, b, 0) for a, v in zip(saved, (g, u))]
        return (out, *saved)

    return jax.lax.fori_loop(start, stop, one_block, carry)


def grouped_swiglu_forward(x, ends, gate, up, down, *, save: bool):
    """Expert-major loops over the blocks (see the module docstring), each block's three
    GEMMs and the SwiGLU in one loop body (the `[block, ffn]` intermediates stay in cache).
    With `save`, each block's gate and up projections are kept for the backward. The
    weights are stacked `[experts, ...]` arrays or sequences of one array per expert,
    cast to `x`'s dtype.

    Returns the output `[blocks, block, hidden]` and the saved projections (`[]` without
    `save`). Not reverse-differentiable (run-time loop bounds): `grouped_swiglu` is.
    """
    dt = x.dtype
    num_blocks, block, _ = x.shape
    ffn = gate[0].shape[-1]
    carry = (jnp.zeros_like(x), *((jnp.zeros((num_blocks, block, ffn), dt),) * 2 if save else ()))
    if isinstance(gate, Sequence):
        for e in range(len(gate)):
            start = ends[e - 1] if e else 0
            carry = _forward_blocks(x, start, ends[e], gate[e].astype(dt), up[e].astype(dt),
                                    down[e].astype(dt), carry)
    else:
        starts, order, used = _runs(ends)

        def one_expert(i, carry):
            e = order[i]
            return _forward_blocks(x, starts[e], ends[e], *_expert_weights((gate, up, down), e, dt), carry)

        carry = jax.lax.fori_loop(0, used, one_expert, carry)
    out, *saved = carry
    return out, saved


@jax.custom_vjp
def grouped_swiglu(
    x: Float[Array, "blocks block hidden"],
    ends: Int[Array, " experts"],
    gate: Float[Array, "experts hidden ffn"],
    up: Float[Array, "experts hidden ffn"],
    down: Float[Array, "experts ffn hidden"],
) -> Float[Array, "blocks block hidden"]:
    """`down_e(silu(gate_e(x[b])) * up_e(x[b]))` for every block `b` of expert `e`'s run
    (see the module docstring for `ends`); blocks after the last run stay zero.

    On XLA:CPU this runs faster than a scan over all blocks with the block's expert's
    weights indexed per block: one weight slice per used expert, no padding blocks, three
    GEMMs and the SwiGLU per loop step. Its own backward (the same loops: `dx`, and each
    used expert's three weight gradients accumulated in fp32 in the block loop's carry)
    keeps `x` and each block's gate and up projections (as plain autodiff of the SwiGLU would).
    """
    return grouped_swiglu_forward(x, ends, gate, up, down, save=False)[0]


def _grouped_swiglu_fwd(x, ends, gate, up, down):
    out, (g, u) = grouped_swiglu_forward(x, ends, gate, up, down, save=True)
    return out, (x, ends, gate, up, down, g, u)


def _grouped_swiglu_bwd(residuals, dy):
    x, ends, gate, up, down, g_all, u_all = residuals
    dt = x.dtype
    f32 = jnp.float32
    dy = dy.astype(dt)
    starts, order, used = _runs(ends)

    def one_expert(i, carry):
        dx, d_gate_all, d_up_all, d_down_all = carry
        e = order[i]
        w_gate, w_up, w_down = _expert_weights((gate, up, down), e, dt)

        def one_block(b, carry):
            dx, d_gate, d_up, d_down = carry
            rows, d_out = x[b], dy[b]
            g, u = g_all[b].astype(f32), u_all[b].astype(f32)
            sig = jax.nn.sigmoid(g)
            silu = g * sig
            d_down = d_down + jnp.matmul((silu * u).astype(dt).T, d_out, preferred_element_type=f32)
            dh = jnp.matmul(d_out, w_down.T, preferred_element_type=f32)  # (block, F)
            du = (dh * silu).astype(dt)
            dg = (dh * u * sig * (1.0 + g * (1.0 - sig))).astype(dt)
            d_gate = d_gate + jnp.matmul(rows.T, dg, preferred_element_type=f32)
            d_up = d_up + jnp.matmul(rows.T, du, preferred_element_type=f32)
            d_rows = jnp.matmul(dg, w_gate.T, preferred_element_type=f32) + jnp.matmul(
                du, w_up.T, preferred_element_type=f32)
            return jax.lax.dynamic_update_index_in_dim(dx, d_rows.astype(dt), b, 0), d_gate, d_up, d_down

        zeros = tuple(jnp.zeros(w.shape, f32) for w in (w_gate, w_up, w_down))
        dx, *expert_grads = jax.lax.fori_loop(starts[e], ends[e], one_block, (dx, *zeros))
        grads = [jax.lax.dynamic_update_index_in_dim(a, g, e, 0)
                 for a, g in zip((d_gate_all, d_up_all, d_down_all), expert_grads)]
        return dx, *grads

    zeros = tuple(jnp.zeros(w.shape, f32) for w in (gate, up, down))  # unused experts: zero
    dx, *grads = jax.lax.fori_loop(0, used, one_expert, (jnp.zeros_like(x), *zeros))
    d_gate, d_up, d_down = (d.astype(w.dtype) for d, w in zip(grads, (gate, up, down)))
    return dx, None, d_gate, d_up, d_down


grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)

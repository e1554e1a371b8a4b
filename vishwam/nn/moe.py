"""Mixture-of-Experts layer: router, load-balancing losses, expert dispatch.

The steps are named as free functions (`route`, `assign_slots`, the dispatch
functions, `load_balancing_loss`, `router_z_loss`) so they can be tested and
swapped alone.

Dispatches (all equal to `dense` in values and gradients whenever nothing is dropped):

- `dense`: every expert on every token, combined with the top-k weights. The
  oracle; `num_experts / k` times the expert FLOPs of the others. Drops nothing.
- `capacity`: each expert gets a `[capacity, hidden]` buffer, filled by a sort
  and a gather (no one-hot dispatch tensors), run as one batched einsum over
  `[experts, capacity, hidden]`, then gathered back and weighted.
  `capacity = min(tokens, ceil(tokens * k / experts * capacity_factor))`
  (`expert_capacity`);
  `capacity_factor=None` (and every `inference=True` call) means the worst case,
  `capacity = tokens`, which never drops. See `assign_slots` for what is dropped.
- `ragged`: assignments sorted by expert and run with `jax.lax.ragged_dot`
  (grouped GEMM on GPU/TPU). Dropless. On CPU XLA lowers it to a masked dense dot
  (slow); it is here for accelerators.
- `grouped`: assignments sorted by expert, each expert's run padded up to whole
  blocks of `block` rows (`assign_blocks`) in one `[blocks, block, hidden]`
  buffer; one loop per expert over its own blocks, each step the block's three
  2-D GEMMs and the SwiGLU (`grouped_swiglu`: the expert's weights a static
  slice, no per-block weight copy; its own backward in the same loops). Dropless.
  It computes `tokens * k` routed rows plus at most `block - 1` padding rows per
  used expert (the loops have run-time bounds: unused blocks of the static
  `grouped_num_blocks` buffer are never visited): about `k / num_experts` of
  `dense`'s FLOPs. `block` is `GROUPED_BLOCK_SIZE`, or the smallest power of two
  >= `tokens * k / experts` when that is smaller, so decoding one token computes
  only its k experts' rows. On CPU it is the fast dropless dispatch.
- `auto` (the config default): resolved per call by `resolve_dispatch`: `capacity`
  when training with a capacity factor; otherwise (dropless: `capacity_factor=None`
  or `inference=True`) `grouped` on CPU, `ragged` on GPU/TPU, and `grouped` on
  any backend when the experts run in fp8 (`ragged` has no fp8 path). The GPU/TPU
  choice is not measured here: TPU lowers `ragged_dot` to a grouped GEMM; XLA:GPU
  uses cuDNN's grouped GEMM where it supports the shape and otherwise the same
  zero-padded dense dot as CPU (openxla/xla PRs 45995-46002 describe that default).

Expert parallelism: when the layer is traced under `jax.set_mesh(mesh)` and the
mesh has an `expert` axis larger than 1, the routed experts run through
`vishwam.parallel.expert.expert_parallel_dispatch` (shard_map + all_to_all on
capacity buffers) instead; see that module.
"""

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..parallel.expert import (
    assign_slots as assign_slots,
    combine_buffers as combine_buffers,
    expert_capacity as expert_capacity,
    expert_parallel_dispatch,
    gather_buffers as gather_buffers,
    use_expert_parallel,
)
from .fp8 import fp8_batched_matmul, fp8_matmul
from .mlp import MLP


class Routing(NamedTuple):
    weights: Float[Array, "tokens k"]
    """Combine weights of the chosen experts (fp32)."""
    indices: Int[Array, "tokens k"]
    """Chosen experts, best first."""
    probs: Float[Array, "tokens experts"]
    """Router probabilities over all experts (fp32, rows sum to 1)."""


def route(
    logits: Float[Array, "tokens experts"],
    k: int,
    *,
    router_type: str = "softmax",
    renormalize: bool = True,
    selection_bias: Float[Array, " experts"] | None = None,
) -> Routing:
    """Top-k routing.

    `selection_bias` (aux-loss-free balancing) shifts which experts are chosen
    but not the combine weights, and carries no gradient.
    """
    logits = logits.astype(jnp.float32)
    if router_type == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    elif router_type == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        raise ValueError(f"Unknown router_type {router_type!r}; choose 'softmax' or 'sigmoid'.")
    selection = scores if selection_bias is None else scores + jax.lax.stop_gradient(selection_bias)
    _, indices = jax.lax.top_k(selection, k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, indices.astype(jnp.int32), probs)


def expert_fractions(indices: Int[Array, "tokens k"], num_experts: int) -> Float[Array, " experts"]:
    """Fraction of all (token, slot) assignments that go to each expert."""
    counts = jnp.zeros((num_experts,), jnp.float32).at[indices.reshape(-1)].add(1.0)
    return counts / indices.size


def load_balancing_loss(routing: Routing, num_experts: int) -> Float[Array, ""]:
    """Switch-Transformer loss `E * sum_e f_e * P_e`; its minimum, 1, is uniform routing."""
    f = expert_fractions(routing.indices, num_experts)
    p = jnp.mean(routing.probs, axis=0)
    return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(logits: Float[Array, "tokens experts"]) -> Float[Array, ""]:
    """Mean squared log-sum-exp of the router logits (keeps them small)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def combine_matrix(routing: Routing, num_experts: int) -> Float[Array, "tokens experts"]:
    """Dense `[tokens, experts]` matrix of combine weights (zero for unchosen experts)."""
    tokens = routing.indices.shape[0]
    rows = jnp.arange(tokens)[:, None]
    return jnp.zeros((tokens, num_experts), jnp.float32).at[rows, routing.indices].add(routing.weights)


class Experts(eqx.Module):
    """`num_experts` SwiGLU MLPs stored as stacked weights (leading `experts` axis)."""

    gate: Float[Array, "experts hidden ffn"]
    up: Float[Array, "experts hidden ffn"]
    down: Float[Array, "experts ffn hidden"]

    def __init__(self, num_experts: int, hidden_size: int, ffn_dim: int, *, init_std: float = 0.02,
                 out_init_std: float | None = None, dtype=jnp.float32, key: PRNGKeyArray):
        kg, ku, kd = jax.random.split(key, 3)
        out_std = init_std if out_init_std is None else out_init_std
        self.gate = (init_std * jax.random.normal(kg, (num_experts, hidden_size, ffn_dim))).astype(dtype)
        self.up = (init_std * jax.random.normal(ku, (num_experts, hidden_size, ffn_dim))).astype(dtype)
        self.down = (out_std * jax.random.normal(kd, (num_experts, ffn_dim, hidden_size))).astype(dtype)

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]


class SplitExperts(eqx.Module):
    """The same experts, one array per expert and projection: for decoding on CPU.

    XLA:CPU copies a slice `w[e]` of stacked weights before it can multiply by it, so
    a decode step over `Experts` pays a weight copy per chosen expert and projection
    (as costly as the matmul itself at a few rows). Separate arrays are read in place
    by `dispatch_split`. Made by `split_experts`, outside any jit; inference only.
    """

    gate: tuple[Float[Array, "hidden ffn"], ...]
    up: tuple[Float[Array, "hidden ffn"], ...]
    down: tuple[Float[Array, "ffn hidden"], ...]

    @property
    def num_experts(self) -> int:
        return len(self.gate)


def split_experts(experts: Experts) -> SplitExperts:
    """`experts` as `SplitExperts` (copies each expert's weights into arrays of their own)."""
    split = lambda w: tuple(jnp.array(w[e]) for e in range(w.shape[0]))  # noqa: E731
    return SplitExperts(split(experts.gate), split(experts.up), split(experts.down))


SPLIT_ALL_ROWS_TOKENS = 64
"""Up to this many tokens `dispatch_split` runs each used expert on every token
(memory-bound, so nearly free, at decode batch sizes); above it, on its own rows only."""


def dispatch_split(
    x: Float[Array, "tokens hidden"],
    experts: SplitExperts,
    routing: Routing,
    *,
    block_size: int = 128,
) -> tuple[Float[Array, "tokens hidden"], Float[Array, ""]]:
    """The routed experts over per-expert arrays (inference). Dropless, equal to `dense`.

    Up to `SPLIT_ALL_ROWS_TOKENS` tokens (decode steps): every expert that some token
    chose runs on all tokens, weighted by each token's combine weight for it (0 where
    it did not choose it); unchosen experts are skipped at run time (`jax.lax.cond`),
    so decoding one token reads only its k experts' weights. More tokens (prefill):
    the assignments are sorted into blocks as in `dispatch_grouped`, and each expert
    loops over its own blocks only (`grouped_swiglu`'s forward loops, run-time bounds:
    no padding blocks, no weight copies). The second path is not reverse-differentiable.

    Returns the output and the dropped fraction (always 0).
    """
    tokens = routing.indices.shape[0]
    dt = x.dtype
    mlp = lambda rows, e: (jax.nn.silu(rows @ experts.gate[e].astype(dt)) * (rows @ experts.up[e].astype(dt))  # noqa: E731
                           ) @ experts.down[e].astype(dt)
    if tokens <= SPLIT_ALL_ROWS_TOKENS:
        combine = combine_matrix(routing, experts.num_experts).astype(dt)  # (T, E), 0 where not chosen
        y = jnp.zeros_like(x)
        for e in range(experts.num_experts):
            y = jax.lax.cond(jnp.any(combine[:, e] != 0), lambda y, e=e: y + combine[:, e:e + 1] * mlp(x, e),
                             lambda y: y, y)
        return y, jnp.zeros((), jnp.float32)

    def run(rows, layout):
        return _grouped_swiglu_forward(rows, layout.ends, experts.gate, experts.up, experts.down, save=False)[0]

    return _through_blocks(x, routing, experts.num_experts, block_size, run), jnp.zeros((), jnp.float32)


class Fp8Spec(NamedTuple):
    """fp8 settings of the expert GEMMs (see `vishwam.nn.fp8`)."""

    scaling: str = "tensor"
    block_size: int = 128


def expert_ffn(
    buffers: Float[Array, "experts capacity hidden"],
    gate: Float[Array, "experts hidden ffn"],
    up: Float[Array, "experts hidden ffn"],
    down: Float[Array, "experts ffn hidden"],
    fp8: Fp8Spec | None = None,
) -> Float[Array, "experts capacity hidden"]:
    """Each expert's SwiGLU MLP on its own buffer: three batched GEMMs.

    With `fp8` set the GEMMs run on fp8 operands (`fp8_batched_matmul`, scales per expert).
    """
    dt = buffers.dtype
    gate, up, down = gate.astype(dt), up.astype(dt), down.astype(dt)
    if fp8 is None:
        matmul = functools.partial(jnp.einsum, "ecd,edf->ecf")
    else:
        matmul = functools.partial(fp8_batched_matmul, scaling=fp8.scaling, block_size=fp8.block_size)
    with jax.named_scope("moe_experts"):
        h = jax.nn.silu(matmul(buffers, gate)) * matmul(buffers, up)  # (E, C, F)
        return matmul(h, down)  # (E, C, D)


def dispatch_dense(
    x: Float[Array, "tokens hidden"], experts: Experts, routing: Routing
) -> tuple[Float[Array, "tokens hidden"], Float[Array, ""]]:
    """Every expert on every token, combined with the top-k weights.

    The oracle for the other dispatches: E times the FLOPs of top-k, drops nothing.
    Returns the output and the fraction of assignments dropped (always 0).
    """
    dt = x.dtype
    combine = combine_matrix(routing, experts.num_experts).astype(dt)
    with jax.named_scope("moe_experts"):
        gate = jnp.einsum("td,edf->tef", x, experts.gate.astype(dt))  # (T, E, F)
        up = jnp.einsum("td,edf->tef", x, experts.up.astype(dt))
        h = jax.nn.silu(gate) * up * combine[:, :, None]
        y = jnp.einsum("tef,efd->td", h, experts.down.astype(dt))
    return y, jnp.zeros((), jnp.float32)


def dispatch_capacity(
    x: Float[Array, "tokens hidden"],
    experts: Experts,
    routing: Routing,
    *,
    capacity: int | None = None,
    fp8: Fp8Spec | None = None,
) -> tuple[Float[Array, "tokens hidden"], Float[Array, ""]]:
    """Capacity buffers + one batched einsum per projection (see `assign_slots` for drops).

    Arguments:
        capacity: rows per expert; `None` means `tokens` (dropless).
        fp8: run the expert GEMMs in fp8.

    Returns the output and the fraction of (token, slot) assignments dropped.
    """
    tokens = x.shape[0]
    capacity = tokens if capacity is None else capacity
    slots = assign_slots(routing.indices, routing.weights, experts.num_experts, capacity)
    buffers = gather_buffers(x, slots, experts.num_experts)  # (E, C, D)
    outputs = expert_ffn(buffers, experts.gate, experts.up, experts.down, fp8)
    return combine_buffers(outputs, slots, routing.weights), slots.dropped


def dispatch_ragged(
    x: Float[Array, "tokens hidden"], experts: Experts, routing: Routing
) -> tuple[Float[Array, "tokens hidden"], Float[Array, ""]]:
    """Assignments sorted by expert, expert MLPs as grouped GEMMs (`jax.lax.ragged_dot`).

    Dropless. Returns the output and the dropped fraction (always 0).
    """
    tokens, k = routing.indices.shape
    dt = x.dtype
    n = tokens * k
    expert = routing.indices.reshape(n)
    order = jnp.argsort(expert).astype(jnp.int32)  # any order within an expert will do
    sizes = jnp.zeros((experts.num_experts,), jnp.int32).at[expert].add(1)
    rows = jnp.take(x, order // k, axis=0)  # (T*k, D), grouped by expert
    with jax.named_scope("moe_experts"):
        gate = jax.lax.ragged_dot(rows, experts.gate.astype(dt), sizes)  # (T*k, F)
        up = jax.lax.ragged_dot(rows, experts.up.astype(dt), sizes)
        out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, experts.down.astype(dt), sizes)  # (T*k, D)
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    picked = jnp.take(out, inverse, axis=0).reshape(tokens, k, -1)  # (T, k, D)
    y = jnp.einsum("tkd,tk->td", picked, routing.weights.astype(dt))
    return y, jnp.zeros((), jnp.float32)


GROUPED_BLOCK_SIZE = 256
"""Default rows per block of the `grouped` dispatch. At the issue-16 Mixtral training shape
(8 experts, 8192 assignments) on the 2-core CPU one traced step took 6.7 s with 128, 6.2 s
with 256 and 6.4 s with 512 (quiet; fewer loop steps and fp32 weight-gradient adds
against more padding rows)."""


def grouped_block_size(assignments: int, num_experts: int, block_size: int = GROUPED_BLOCK_SIZE) -> int:
    """Rows per block: `block_size`, or the smallest power of two >= `assignments / num_experts`
    when that is smaller (few tokens: decoding one token gets blocks of one row)."""
    per_expert = -(-assignments // num_experts)
    return min(block_size, 1 << max(per_expert - 1, 0).bit_length())


def grouped_num_blocks(assignments: int, num_experts: int, block: int) -> int:
    """Blocks that hold any routing of `assignments` rows: each of the at most
    `min(num_experts, assignments)` used experts pads its run by at most `block - 1` rows."""
    return (assignments + min(num_experts, assignments) * (block - 1)) // block


class Blocks(NamedTuple):
    """Assignments sorted by expert into `[blocks * block]` rows, each expert's run
    padded to whole blocks; every block belongs to one expert.

    `source[r]` is the token that fills row `r` (`tokens` = padding row),
    `row[t, j]` the row of token `t`'s j-th choice, `expert[b]` block `b`'s expert
    (trailing unused blocks, all padding, get the last expert), `ends[e]` the block
    after expert `e`'s run (its run is the blocks `ends[e - 1]` to `ends[e] - 1`).
    """

    source: Int[Array, " rows"]
    row: Int[Array, "tokens k"]
    expert: Int[Array, " blocks"]
    ends: Int[Array, " experts"]


def assign_blocks(indices: Int[Array, "tokens k"], num_experts: int, block: int) -> Blocks:
    """Place every assignment in its expert's run of blocks (one sort, no one-hots); drops nothing."""
    tokens, k = indices.shape
    n = tokens * k
    num_blocks = grouped_num_blocks(n, num_experts, block)
    expert = indices.reshape(n)
    order = jnp.argsort(expert).astype(jnp.int32)  # any order within an expert will do
    expert_sorted = expert[order]
    counts = jnp.zeros((num_experts,), jnp.int32).at[expert].add(1)
    padded = (counts + block - 1) // block * block
    padded_ends = jnp.cumsum(padded)
    rank = jnp.arange(n, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[expert_sorted]
    row_sorted = (padded_ends - padded)[expert_sorted] + rank
    row = jnp.zeros((n,), jnp.int32).at[order].set(row_sorted)
    source = jnp.full((num_blocks * block,), tokens, jnp.int32).at[row_sorted].set(order // k)
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * block
    block_expert = jnp.searchsorted(padded_ends, starts, side="right").astype(jnp.int32)
    return Blocks(source, row.reshape(tokens, k), jnp.minimum(block_expert, num_experts - 1),
                  (padded_ends // block).astype(jnp.int32))


def _expert_runs(ends: Int[Array, " experts"], e: int):
    """Expert `e`'s blocks: `[ends[e - 1], ends[e])` (run-time bounds, so empty and unused
    trailing blocks are never visited)."""
    return (ends[e - 1] if e else 0), ends[e]


def _grouped_swiglu_forward(x, ends, gate, up, down, *, save: bool):
    """Expert-major loops over the blocks: one `fori_loop` per expert, whose weights are a
    static slice (no per-block weight copy), each block's three GEMMs and the SwiGLU in
    one loop body (the `[block, ffn]` intermediates stay in cache). With `save`, each
    block's gate and up projections are kept for the backward. The weights are stacked
    `[experts, ...]` arrays or (`SplitExperts`) one array per expert, cast to `x`'s dtype."""
    dt = x.dtype
    num_blocks, block, _ = x.shape
    ffn = gate[0].shape[-1]
    out = jnp.zeros_like(x)
    saved = (jnp.zeros((num_blocks, block, ffn), dt),) * 2 if save else ()
    for e in range(len(gate)):
        w_gate, w_up, w_down = gate[e].astype(dt), up[e].astype(dt), down[e].astype(dt)

        def one_block(b, carry, w_gate=w_gate, w_up=w_up, w_down=w_down):
            out, *saved = carry
            rows = x[b]
            g, u = rows @ w_gate, rows @ w_up  # (block, F)
            out = jax.lax.dynamic_update_index_in_dim(out, (jax.nn.silu(g) * u) @ w_down, b, 0)
            if saved:
                saved = [jax.lax.dynamic_update_index_in_dim(a, v, b, 0) for a, v in zip(saved, (g, u))]
            return (out, *saved)

        out, *saved = jax.lax.fori_loop(*_expert_runs(ends, e), one_block, (out, *saved))
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
    (`Blocks.ends`); blocks after the last run stay zero.

    On XLA:CPU this runs faster than a scan over all blocks with the block's expert's
    weights indexed per block: no weight copies, no padding blocks, three GEMMs and the
    SwiGLU per loop step. Its own backward (the same loops: `dx`, and every expert's
    three weight gradients accumulated in fp32 in the loop carry) keeps `x` and each
    block's gate and up projections (as plain autodiff of the SwiGLU would).
    """
    return _grouped_swiglu_forward(x, ends, gate, up, down, save=False)[0]


def _grouped_swiglu_fwd(x, ends, gate, up, down):
    out, (g, u) = _grouped_swiglu_forward(x, ends, gate, up, down, save=True)
    return out, (x, ends, gate, up, down, g, u)


def _grouped_swiglu_bwd(residuals, dy):
    x, ends, gate, up, down, g_all, u_all = residuals
    dt = x.dtype
    f32 = jnp.float32
    dy = dy.astype(dt)
    dx = jnp.zeros_like(x)
    grads = []
    for e in range(gate.shape[0]):
        w_gate, w_up, w_down = gate[e], up[e], down[e]

        def one_block(b, carry, w_gate=w_gate, w_up=w_up, w_down=w_down):
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

        zeros = (jnp.zeros(w_gate.shape, f32), jnp.zeros(w_up.shape, f32), jnp.zeros(w_down.shape, f32))
        dx, *expert_grads = jax.lax.fori_loop(*_expert_runs(ends, e), one_block, (dx, *zeros))
        grads.append(expert_grads)
    d_gate, d_up, d_down = (jnp.stack(gs).astype(w.dtype) for gs, w in zip(zip(*grads), (gate, up, down)))
    return dx, None, d_gate, d_up, d_down


grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


def grouped_ffn(
    blocks: Float[Array, "blocks block hidden"],
    layout: "Blocks",
    gate: Float[Array, "experts hidden ffn"],
    up: Float[Array, "experts hidden ffn"],
    down: Float[Array, "experts ffn hidden"],
    fp8: Fp8Spec | None = None,
) -> Float[Array, "blocks block hidden"]:
    """Each block's rows through its expert's SwiGLU MLP (`grouped_swiglu`).

    With `fp8` set the GEMMs run in fp8 instead: one scan over all blocks of `fp8_matmul`
    (scales per block, the block's expert's weights indexed per block), differentiated
    through `fp8_matmul`'s own backward.
    """
    dt = blocks.dtype
    gate, up, down = gate.astype(dt), up.astype(dt), down.astype(dt)
    with jax.named_scope("moe_experts"):
        if fp8 is None:
            return grouped_swiglu(blocks, layout.ends, gate, up, down)
        matmul = functools.partial(fp8_matmul, scaling=fp8.scaling, block_size=fp8.block_size)

        def one_block(carry, inputs):
            rows, e = inputs  # (block, D), its expert
            weight = functools.partial(jax.lax.dynamic_index_in_dim, index=e, keepdims=False)
            h = jax.nn.silu(matmul(rows, weight(gate))) * matmul(rows, weight(up))  # (block, F)
            return carry, matmul(h, weight(down))  # (block, D)

        return jax.lax.scan(one_block, None, (blocks, layout.expert))[1]


def dispatch_grouped(
    x: Float[Array, "tokens hidden"],
    experts: Experts,
    routing: Routing,
    *,
    block_size: int = GROUPED_BLOCK_SIZE,
    fp8: Fp8Spec | None = None,
) -> tuple[Float[Array, "tokens hidden"], Float[Array, ""]]:
    """Assignments sorted by expert into blocks, block-sparse grouped GEMM (`grouped_ffn`).

    Arguments:
        block_size: largest rows per block (see `grouped_block_size`).
        fp8: run the expert GEMMs in fp8.

    Dropless. Returns the output and the dropped fraction (always 0).
    """
    run = lambda rows, layout: grouped_ffn(rows, layout, experts.gate, experts.up, experts.down, fp8)  # noqa: E731
    return _through_blocks(x, routing, experts.num_experts, block_size, run), jnp.zeros((), jnp.float32)


def _through_blocks(x, routing: Routing, num_experts: int, block_size: int, run):
    """Assignments sorted into expert blocks (`assign_blocks`), `run(rows [blocks, block, D],
    layout) -> [blocks, block, D]` over them, and each token's k outputs combined."""
    tokens, k = routing.indices.shape
    block = grouped_block_size(tokens * k, num_experts, block_size)
    layout = assign_blocks(routing.indices, num_experts, block)
    rows = jnp.take(x, layout.source, axis=0, mode="fill", fill_value=0)  # (blocks*block, D)
    out = run(rows.reshape(-1, block, x.shape[-1]), layout)  # (blocks, block, D)
    picked = jnp.take(out.reshape(-1, x.shape[-1]), layout.row, axis=0)  # (T, k, D)
    return jnp.einsum("tkd,tk->td", picked, routing.weights.astype(x.dtype))


DISPATCHES = {"dense": dispatch_dense, "capacity": dispatch_capacity, "ragged": dispatch_ragged,
              "grouped": dispatch_grouped}
DISPATCH_CHOICES = (*DISPATCHES, "auto")


def resolve_dispatch(
    dispatch: str,
    capacity_factor: float | None,
    *,
    inference: bool = False,
    use_fp8: bool = False,
    backend: str | None = None,
) -> str:
    """The dispatch a layer runs: `dispatch` itself, or for `"auto"` the fastest correct one.

    `auto`: `capacity` when training with a capacity factor (the factor is asked for:
    bounded buffers, drops); dropless otherwise (`capacity_factor=None` or
    `inference=True`): `grouped` on CPU, `ragged` on GPU/TPU, `grouped` on any
    backend with `use_fp8` (`ragged` has no fp8 path).

    Arguments:
        backend: `"cpu"`, `"gpu"`, `"tpu"`, ...; default `jax.default_backend()`.
    """
    if dispatch != "auto":
        return dispatch
    if capacity_factor is not None and not inference:
        return "capacity"
    backend = jax.default_backend() if backend is None else backend
    if use_fp8 or backend == "cpu":
        return "grouped"
    return "ragged"


class MoE(eqx.Module):
    """Routed experts (plus optional shared experts) replacing a dense MLP.

    Returns `(y, aux)`, where `aux` holds this layer's `load_balancing_loss`,
    `router_z_loss`, `expert_load` (fraction of assignments per expert) and
    `dropped_fraction`; the model averages them over layers and the training
    loss weights them with the config's coefficients.

    `dispatch` is one of `DISPATCH_CHOICES`; `"auto"` is resolved at trace time
    by `resolve_dispatch` (so one layer can train with `capacity` and decode with
    `grouped`). `capacity_factor` applies to the `capacity` dispatch in training
    only; `inference=True` always routes dropless. `use_fp8` runs the routed
    experts' GEMMs in fp8 (`fp8_batched_matmul`, `fp8_matmul`) in the `capacity`
    and `grouped` dispatches and the expert-parallel path, and the shared experts'
    linears in fp8; the `dense` oracle and `ragged` (no fp8 grouped GEMM) stay in
    the compute dtype.
    """

    router: Float[Array, "hidden experts"]
    experts: Experts | SplitExperts
    shared: MLP | None
    selection_bias: Float[Array, " experts"] | None
    num_experts: int = eqx.field(static=True)
    top_k: int = eqx.field(static=True)
    router_type: str = eqx.field(static=True)
    renormalize: bool = eqx.field(static=True)
    dispatch: str = eqx.field(static=True)
    capacity_factor: float | None = eqx.field(static=True)
    jitter: float = eqx.field(static=True)
    use_fp8: bool = eqx.field(static=True)
    fp8_scaling: str = eqx.field(static=True)
    fp8_block_size: int = eqx.field(static=True)

    def __init__(self, hidden_size: int, ffn_dim: int, num_experts: int, top_k: int, *,
                 router_type: str = "softmax", renormalize: bool = True, dispatch: str = "auto",
                 capacity_factor: float | None = None, jitter: float = 0.0, num_shared_experts: int = 0,
                 aux_free_bias: bool = False, use_fp8: bool = False, fp8_scaling: str = "tensor",
                 fp8_block_size: int = 128, init_std: float = 0.02, out_init_std: float | None = None,
                 dtype=jnp.float32, key: PRNGKeyArray):
        kr, ke, ks = jax.random.split(key, 3)
        self.router = (init_std * jax.random.normal(kr, (hidden_size, num_experts))).astype(jnp.float32)
        self.experts = Experts(num_experts, hidden_size, ffn_dim, init_std=init_std,
                               out_init_std=out_init_std, dtype=dtype, key=ke)
        self.shared = (
            MLP(hidden_size, ffn_dim * num_shared_experts, use_fp8=use_fp8, fp8_scaling=fp8_scaling,
                fp8_block_size=fp8_block_size, init_std=init_std, out_init_std=out_init_std,
                dtype=dtype, key=ks)
            if num_shared_experts > 0 else None
        )
        # Aux-loss-free balancing: used for expert selection only, never trained
        # (it enters `route` under stop_gradient); see `VishwamAI.update_router_bias`.
        self.selection_bias = jnp.zeros((num_experts,), jnp.float32) if aux_free_bias else None
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_type = router_type
        self.renormalize = renormalize
        self.dispatch = dispatch
        self.capacity_factor = capacity_factor
        self.jitter = jitter
        self.use_fp8 = use_fp8
        self.fp8_scaling = fp8_scaling
        self.fp8_block_size = fp8_block_size

    def __check_init__(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"MoE: top_k={self.top_k} exceeds num_experts={self.num_experts}.")
        if self.dispatch not in DISPATCH_CHOICES:
            raise ValueError(f"MoE: unknown dispatch {self.dispatch!r}; choose one of {sorted(DISPATCH_CHOICES)}.")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"MoE: capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}.")

    @property
    def fp8(self) -> Fp8Spec | None:
        return Fp8Spec(self.fp8_scaling, self.fp8_block_size) if self.use_fp8 else None

    def router_logits(
        self, x: Float[Array, "tokens hidden"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "tokens experts"]:
        """fp32 router logits; with `jitter > 0`, a training `key` and not `inference`,
        the inputs are scaled by uniform noise in `[1 - jitter, 1 + jitter]`."""
        xf = x.astype(jnp.float32)
        if self.jitter > 0 and key is not None and not inference:
            xf = xf * jax.random.uniform(key, xf.shape, minval=1 - self.jitter, maxval=1 + self.jitter)
        return xf @ self.router

    def routed(
        self, x: Float[Array, "tokens hidden"], routing: Routing, *, inference: bool = False
    ) -> tuple[Float[Array, "tokens hidden"], Float[Array, ""]]:
        """The routed experts' output and dropped fraction, by this layer's dispatch,
        or expert-parallel when the current mesh has an `expert` axis > 1."""
        dispatch = resolve_dispatch(self.dispatch, self.capacity_factor, inference=inference,
                                    use_fp8=self.use_fp8)
        if isinstance(self.experts, SplitExperts):
            if not inference:
                raise ValueError("MoE: split experts (from `split_experts`) are for inference only; train the "
                                 "model with its stacked `Experts`.")
            return dispatch_split(x, self.experts, routing)
        # `dense`, `ragged` and `grouped` promise no drops, so they never get a finite capacity.
        factor = self.capacity_factor if dispatch == "capacity" and not inference else None
        if use_expert_parallel(x.shape[0]):
            e = self.experts
            return expert_parallel_dispatch(
                x, routing.indices, routing.weights, e.gate, e.up, e.down,
                ffn=functools.partial(expert_ffn, fp8=self.fp8), capacity_factor=factor,
            )
        if dispatch == "capacity":
            capacity = expert_capacity(x.shape[0], self.top_k, self.num_experts, factor)
            return dispatch_capacity(x, self.experts, routing, capacity=capacity, fp8=self.fp8)
        if dispatch == "grouped":
            return dispatch_grouped(x, self.experts, routing, fp8=self.fp8)
        return DISPATCHES[dispatch](x, self.experts, routing)

    def __call__(
        self, x: Float[Array, "*batch hidden"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> tuple[Float[Array, "*batch hidden"], dict]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, D)
        with jax.named_scope("moe_route"):
            logits = self.router_logits(tokens, key=key, inference=inference)
            routing = route(logits, self.top_k, router_type=self.router_type, renormalize=self.renormalize,
                            selection_bias=self.selection_bias)
        with jax.named_scope("moe_dispatch"):
            y, dropped = self.routed(tokens, routing, inference=inference)
        if self.shared is not None:
            y = y + self.shared(tokens)
        aux = {
            "load_balancing_loss": load_balancing_loss(routing, self.num_experts),
            "router_z_loss": router_z_loss(logits),
            "expert_load": expert_fractions(routing.indices, self.num_experts),
            "dropped_fraction": dropped,
        }
        return y.reshape(shape), aux

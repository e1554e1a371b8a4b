"""Expert parallelism: experts split over the mesh axis `expert`, tokens moved by all-to-all.

Also home of the capacity-buffer maths (`assign_slots`, `gather_buffers`,
`combine_buffers`) that the single-device `capacity` dispatch in
`vishwam.nn.moe` shares with the expert-parallel path.

How a layer runs with expert parallelism (`expert_parallel_dispatch`), inside
one `jax.shard_map` over the whole mesh:

1. Every device holds `num_experts / ep` experts (weights split over `expert`,
   and over `tensor` along the ffn dim when the mesh has one) and its own slice
   of the tokens (split over `data`, `fsdp` and `expert`; replicated over `tensor`).
2. It packs its tokens into fixed-size `[experts, capacity, hidden]` buffers,
   `capacity = expert_capacity(local_tokens, k, experts, factor)` per expert,
   ranked as in `assign_slots` by the same priority as on one device (so drops
   are decided per device, by the same rule).
3. `jax.lax.all_to_all` over `expert` sends each expert's buffer to the device
   holding that expert: it receives `[ep, experts / ep, capacity, hidden]`.
4. It runs its experts on the received rows, then a second all-to-all returns
   every row to the device it came from, which combines them with the router
   weights. With a `tensor` axis each device computes a slice of the ffn dim and
   the outputs are summed over `tensor` (`psum`).

Gradients flow back through the same exchanges (the transpose of an all-to-all
is the reverse all-to-all); weight gradients are summed over the data axes by
`shard_map`'s autodiff.

When it is used: `MoE` switches to this path by itself when traced under
`jax.set_mesh(mesh)` (a mesh from `vishwam.parallel.make_mesh`, Auto axes) whose
`expert` axis is larger than 1 (`use_expert_parallel`), e.g.

    with jax.set_mesh(mesh):
        logits, aux = model(tokens)        # or a jitted train step

Functions here also take `mesh=` explicitly. A call whose token count does not
split evenly over the batch axes (e.g. decoding one sequence on an 8-way mesh)
falls back to the single-device dispatch, which the compiler partitions by
itself (correct; the expert weights are gathered, so slower).

Dropless (`capacity_factor=None`) buffers hold `local_tokens` rows per expert:
`num_experts` times the tokens cross the network. Training uses a capacity
factor; inference and the dropless dispatches (`dense`, `ragged`, `grouped`) use None.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from ..errors import InvalidValueError
from .mesh import axis_size, check_experts_divisible
from .sharding import batch_axes, batch_shards


def expert_capacity(tokens: int, k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Buffer rows per expert: `min(tokens, ceil(tokens * k / num_experts * factor))`.

    `None` gives `tokens`, the worst case (top-k experts are distinct, so an expert
    sees each token at most once): nothing can be dropped.
    """
    if capacity_factor is None:
        return tokens
    return max(1, min(tokens, math.ceil(tokens * k / num_experts * capacity_factor)))


class Slots(NamedTuple):
    """Where each (token, choice) assignment sits in the `[experts * capacity]` buffer rows.

    Two index maps, each the other's inverse on the kept assignments:
    `source[r]` is the token that fills buffer row `r` (`tokens` = empty row), and
    `row[t, j]` is the buffer row of token `t`'s j-th choice (`experts * capacity` = dropped).
    """

    source: Int[Array, " rows"]
    row: Int[Array, "tokens k"]
    dropped: Float[Array, ""]
    """Fraction of the counted assignments dropped (all assignments without a mask)."""
    dropped_counts: Float[Array, " experts"]
    """Counted assignments dropped, per expert."""
    counted: Float[Array, ""]
    """Counted assignments."""


def position_priority(rows: int, seq: int, mask: Bool[Array, " tokens"] | None = None) -> Int[Array, " tokens"]:
    """Capacity rank of each of `rows * seq` row-major tokens by position: earlier positions
    first, rows interleaved at each position (`position * rows + row`). Whether a token is kept
    then depends only on tokens at its own or earlier positions, never on later tokens of its
    sequence, and no row is served before another over a whole sequence.

    With `mask` (True for the tokens that count, False for padding), at each position the
    counted tokens of every row come before the uncounted ones (`position * 2 * rows +
    uncounted * rows + row`): padding never takes capacity from a real token at its own or an
    earlier position, and the rule stays causal (padding can still fill capacity that a real
    token at a later position would have found free)."""
    position = jnp.arange(seq, dtype=jnp.int32)[None, :]  # (1, S)
    row = jnp.arange(rows, dtype=jnp.int32)[:, None]  # (R, 1)
    if mask is None:
        return (position * rows + row).reshape(rows * seq)  # (R*S,)
    uncounted = (~mask).reshape(rows, seq).astype(jnp.int32)  # (R, S)
    return (position * 2 * rows + uncounted * rows + row).reshape(rows * seq)  # (R*S,)


def assign_slots(
    indices: Int[Array, "tokens k"],
    weights: Float[Array, "tokens k"],
    num_experts: int,
    capacity: int,
    priority: Int[Array, " tokens"] | None = None,
    mask: Bool[Array, " tokens"] | None = None,
) -> Slots:
    """Place every assignment in its expert's buffer; drop what does not fit.

    Drop rule: an expert keeps its `capacity` first assignments, first by `priority`
    (lower first; `position_priority` gives a causal LM's order), or with `priority=None`
    by router weight (largest first: the "score" rule, which lets a later token of a
    sequence push out an earlier one); ties go to the earlier token, then to its earlier
    choice. Everything else sent to that expert is dropped (adds zero to the output; the
    residual stream still carries the token). One sort by (expert, priority, position)
    ranks them; no `[tokens, experts, capacity]` one-hot tensors are built.

    With `mask` (True for the tokens that count, False for padding) the drop statistics count
    the counted assignments only, and under the score rule (`priority=None`) the tokens it
    leaves out rank after every counted one: they only fill capacity the counted tokens leave
    free, so padding never pushes out a real token. A `priority` is followed as given (ranking
    padding after all real tokens would make a padding token's fate, and through attention its
    sequence, depend on later tokens); `position_priority(..., mask)` orders padding after the
    real tokens of each position.
    """
    tokens, k = indices.shape
    n = tokens * k
    expert = indices.reshape(n)
    if priority is None:
        key = -jax.lax.stop_gradient(weights).reshape(n).astype(jnp.float32)
    else:
        key = jnp.repeat(priority.astype(jnp.int32), k)  # (T*k,)
    position = jnp.arange(n, dtype=jnp.int32)  # token-major: t * k + j
    counts_as = jnp.ones((n,), bool) if mask is None else jnp.repeat(mask, k)  # (T*k,)
    # Under the score rule padding ranks after every counted assignment of its expert.
    last = (~counts_as).astype(jnp.int32) if priority is None else jnp.zeros((n,), jnp.int32)
    expert_sorted, _, _, order = jax.lax.sort((expert, last, key, position), num_keys=4)
    counts = jnp.zeros((num_experts,), jnp.int32).at[expert].add(1)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(n, dtype=jnp.int32) - starts[expert_sorted]  # place within its expert
    kept = rank < capacity
    empty = num_experts * capacity
    row_sorted = jnp.where(kept, expert_sorted * capacity + rank, empty)
    row = jnp.zeros((n,), jnp.int32).at[order].set(row_sorted)
    source = jnp.full((empty,), tokens, jnp.int32).at[row_sorted].set(order // k, mode="drop")
    lost = (~kept & counts_as[order]).astype(jnp.float32)  # counted and dropped, in sorted order
    dropped_counts = jnp.zeros((num_experts,), jnp.float32).at[expert_sorted].add(lost)
    counted = jnp.sum(counts_as.astype(jnp.float32))
    dropped = jnp.sum(lost) / jnp.maximum(counted, 1.0)
    return Slots(source, row.reshape(tokens, k), dropped, dropped_counts, counted)


def gather_buffers(
    x: Float[Array, "tokens hidden"], slots: Slots, num_experts: int
) -> Float[Array, "experts capacity hidden"]:
    """`[experts, capacity, hidden]` buffers of token rows; empty rows are zero."""
    rows = jnp.take(x, slots.source, axis=0, mode="fill", fill_value=0)  # (E*C, D)
    return rows.reshape(num_experts, -1, x.shape[-1])


def combine_buffers(
    outputs: Float[Array, "experts capacity hidden"], slots: Slots, weights: Float[Array, "tokens k"]
) -> Float[Array, "tokens hidden"]:
    """`y[t] = sum_j weights[t, j] * outputs[row[t, j]]`; dropped assignments add zero."""
    flat = outputs.reshape(-1, outputs.shape[-1])  # (E*C, D)
    picked = jnp.take(flat, slots.row, axis=0, mode="fill", fill_value=0)  # (T, k, D)
    return jnp.einsum("tkd,tk->td", picked, weights.astype(outputs.dtype))


# ---------------------------------------------------------------- expert parallel
def _mesh_or_current(mesh):
    return jax.sharding.get_abstract_mesh() if mesh is None else mesh


def use_expert_parallel(tokens: int, mesh=None) -> bool:
    """Whether a MoE layer on `tokens` tokens runs expert-parallel on `mesh`
    (default: the mesh set by `jax.set_mesh`): an `expert` axis > 1 that is not
    already manual (inside a shard_map), and tokens that split evenly."""
    mesh = _mesh_or_current(mesh)
    if mesh.empty or axis_size(mesh, "expert") == 1:
        return False
    if "expert" in getattr(mesh, "manual_axes", ()):
        return False
    return tokens % batch_shards(mesh) == 0


ExpertFn = Callable[..., Float[Array, "experts capacity hidden"]]


def expert_parallel_dispatch(
    x: Float[Array, "tokens hidden"],
    indices: Int[Array, "tokens k"],
    weights: Float[Array, "tokens k"],
    gate: Float[Array, "experts hidden ffn"],
    up: Float[Array, "experts hidden ffn"],
    down: Float[Array, "experts ffn hidden"],
    *,
    ffn: ExpertFn,
    capacity_factor: float | None = None,
    priority: Int[Array, " tokens"] | None = None,
    mask: Bool[Array, " tokens"] | None = None,
    per_expert: bool = False,
    mesh=None,
) -> tuple[Float[Array, "tokens hidden"], Float[Array, "*experts"]]:
    """Routed experts with expert parallelism over the mesh axis `expert` (see module doc).

    Arguments:
        x: the layer's tokens (global view; split over the batch axes inside).
        indices: the top-k experts of each token.
        weights: their routing weights.
        gate: stacked expert weights (global view), as `up` and `down`.
        up: see `gate`.
        down: see `gate`.
        ffn: `ffn(buffers [e, rows, hidden], gate [e, hidden, f], up, down [e, f, hidden])`
            -> `[e, rows, hidden]`, each expert's MLP on its rows. It receives an
            ffn-dim slice of the weights under a `tensor` axis, so it must be a sum
            over the ffn dim (as a SwiGLU MLP is).
        capacity_factor: per-device capacity factor; `None` is dropless.
        priority: each token's capacity rank (`assign_slots`; None ranks by weight),
            applied to each device's tokens.
        mask: the tokens that count (`assign_slots`: the others are left out of the drop
            statistics and, without a `priority`, only fill free capacity); None: every token.
        per_expert: return each expert's share of the dropped assignments `[experts]`
            (summing to the dropped fraction) instead of the fraction.
        mesh: default the mesh set by `jax.set_mesh`.

    Returns `y [tokens, hidden]` and the fraction of (counted) assignments dropped.
    """
    mesh = _mesh_or_current(mesh)
    num_experts, hidden, ffn_dim = gate.shape
    tokens, k = indices.shape
    check_experts_divisible(num_experts, mesh)
    shards = batch_shards(mesh)
    if tokens % shards:
        raise InvalidValueError(
            f"expert_parallel_dispatch: {tokens} tokens do not split over {shards} batch shards "
            f"(data x fsdp x expert of mesh {dict(mesh.shape)}); use a batch * seq that is a multiple of {shards}."
        )
    ep = axis_size(mesh, "expert")
    local_experts = num_experts // ep
    tp = axis_size(mesh, "tensor")
    tensor = "tensor" if tp > 1 and ffn_dim % tp == 0 else None
    capacity = expert_capacity(tokens // shards, k, num_experts, capacity_factor)

    def local(x, indices, weights, gate, up, down, extras):
        slots = assign_slots(indices, weights, num_experts, capacity, extras.get("priority"), extras.get("mask"))
        send = gather_buffers(x, slots, num_experts)  # (E, C, D): experts in device order
        send = send.reshape(ep, local_experts, capacity, hidden)  # (ep, E/ep, C, D)
        received = jax.lax.all_to_all(send, "expert", 0, 0)  # (ep sources, E/ep, C, D)
        rows = received.transpose(1, 0, 2, 3).reshape(local_experts, ep * capacity, hidden)
        out = ffn(rows, gate, up, down)  # (E/ep, ep*C, D)
        out = out.reshape(local_experts, ep, capacity, hidden).transpose(1, 0, 2, 3)
        back = jax.lax.all_to_all(out, "expert", 0, 0)  # (ep owners, E/ep, C, D) = my rows
        y = combine_buffers(back.reshape(num_experts, capacity, hidden), slots, weights)
        if tensor is not None:
            y = jax.lax.psum(y, tensor)  # each device summed its slice of the ffn dim
        return y, slots.dropped_counts[None], slots.counted[None]

    rows = P(batch_axes(mesh), None)
    w_in = P("expert", None, tensor)
    w_out = P("expert", tensor, None)
    extras = {name: a for name, a in (("priority", priority), ("mask", mask)) if a is not None}
    y, counts, counted = jax.shard_map(
        local, mesh=mesh,
        in_specs=(rows, rows, rows, w_in, w_in, w_out, {name: P(batch_axes(mesh)) for name in extras}),
        out_specs=(rows, rows, P(batch_axes(mesh))),
    )(x, indices, weights, gate, up, down, extras)
    drops = jnp.sum(counts, axis=0) / jnp.maximum(jnp.sum(counted), 1.0)  # (E,): over every device's tokens
    return y, drops if per_expert else jnp.sum(drops)

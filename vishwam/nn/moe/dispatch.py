"""The dispatches: how routed tokens reach their experts and come back.

Each `dispatch_*` takes the tokens `[tokens, hidden]`, the experts and a `Routing`, and
returns the combined output and the fraction of (token, slot) assignments dropped.
Dispatches (each equals `dense` in values and gradients whenever nothing is dropped):

- `dense`: every expert on every token; the oracle, `num_experts / k` times the others' expert FLOPs.
- `capacity`: `[experts, capacity, hidden]` buffers (a sort and a gather) and one batched einsum per
  projection; drops what overflows `expert_capacity`, earlier positions kept first or the largest
  weights (the layer's `capacity_priority`; see `assign_slots`); `capacity_factor=None` and
  `inference=True` use `capacity = tokens`, which never drops.
- `ragged`: assignments sorted by expert, `jax.lax.ragged_dot` (grouped GEMM on GPU/TPU; on CPU a slow
  masked dense dot). Dropless.
- `grouped`: assignments sorted into per-expert blocks (`assign_blocks`), `grouped_swiglu` loops over
  the used experts and each one's own blocks, gathering the rows and combining the outputs inside
  the loop (run-time loops: the program does not grow with the expert count): about
  `k / num_experts` of `dense`'s FLOPs plus at most `block - 1` padding rows per used expert
  (`grouped_block_size`). Dropless; the fast one on CPU.
- `dispatch_split`: `SplitExperts` (one array per expert) at inference. Dropless.
- `auto`: chosen per call by `resolve_dispatch`.

Under `jax.set_mesh` with an `expert` axis > 1 the layer runs `expert_parallel_dispatch` instead.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ...kernels.flash import target_platform
from ...kernels.grouped_swiglu import grouped_swiglu, grouped_swiglu_forward
from ...parallel.expert import assign_slots, combine_buffers, gather_buffers
from ..fp8 import fp8_matmul
from .experts import Experts, Fp8Spec, SplitExperts, expert_ffn
from .routing import Routing, combine_matrix


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
    priority: Int[Array, " tokens"] | None = None,
    mask: Bool[Array, " tokens"] | None = None,
    per_expert: bool = False,
    fp8: Fp8Spec | None = None,
) -> tuple[Float[Array, "tokens hidden"], Float[Array, "*experts"]]:
    """Capacity buffers + one batched einsum per projection (see `assign_slots` for drops).

    Arguments:
        capacity: rows per expert; `None` means `tokens` (dropless).
        priority: which assignments an expert keeps first (`assign_slots`): a rank per
            token, lower first (`position_priority`), or `None` for the largest weights.
        mask: the tokens that count (True); the others (padding) are not in the drop
            statistics and, without a `priority`, only fill capacity the counted ones leave
            free (`assign_slots`). None: every token.
        per_expert: return each expert's share of the dropped assignments `[experts]`
            (summing to the dropped fraction) instead of the fraction.
        fp8: run the expert GEMMs in fp8.

    Returns the output and the fraction of (counted token, slot) assignments dropped.
    """
    tokens = x.shape[0]
    capacity = tokens if capacity is None else capacity
    slots = assign_slots(routing.indices, routing.weights, experts.num_experts, capacity, priority, mask)
    buffers = gather_buffers(x, slots, experts.num_experts)  # (E, C, D)
    outputs = expert_ffn(buffers, experts.gate, experts.up, experts.down, fp8)
    dropped = slots.dropped_counts / jnp.maximum(slots.counted, 1.0) if per_expert else slots.dropped
    return combine_buffers(outputs, slots, routing.weights), dropped


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
"""Default rows per block of the `grouped` dispatch: of 128, 256 and 512 the fastest training
step on a 2-core CPU at a Mixtral shape (fewer loop steps and fp32 weight-gradient adds
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



def dispatch_grouped(
    x: Float[Array, "tokens hidden"],
    experts: Experts,
    routing: Routing,
    *,
    block_size: int = GROUPED_BLOCK_SIZE,
    fp8: Fp8Spec | None = None,
) -> tuple[Float[Array, "tokens hidden"], Float[Array, ""]]:
    """Assignments sorted by expert into blocks (`assign_blocks`), each used expert's SwiGLU
    over its own blocks with the rows gathered and the weighted outputs combined inside the
    loop (`vishwam.kernels.grouped_swiglu`).

    Arguments:
        block_size: largest rows per block (see `grouped_block_size`).
        fp8: run the expert GEMMs in fp8 instead: the rows gathered into `[blocks, block,
            hidden]`, one scan over all blocks of `fp8_matmul` (scales per block, each
            block's expert's weights indexed per block, differentiated through `fp8_matmul`'s
            own backward), each token's k outputs combined after it.

    Dropless. Returns the output and the dropped fraction (always 0).
    """
    tokens, k = routing.indices.shape
    block = grouped_block_size(tokens * k, experts.num_experts, block_size)
    layout = assign_blocks(routing.indices, experts.num_experts, block)
    with jax.named_scope("moe_experts"):
        if fp8 is None:
            y = grouped_swiglu(x, routing.weights, layout.source, layout.row, layout.ends, experts.gate, experts.up,
                               experts.down, block)
        else:
            y = _grouped_fp8(x, routing, layout, block, experts, fp8)
    return y, jnp.zeros((), jnp.float32)


def _grouped_fp8(x, routing: Routing, layout: Blocks, block: int, experts: Experts, fp8: Fp8Spec):
    """`dispatch_grouped`'s fp8 path (see there)."""
    dt = x.dtype
    gate, up, down = (w.astype(dt) for w in (experts.gate, experts.up, experts.down))
    matmul = functools.partial(fp8_matmul, scaling=fp8.scaling, block_size=fp8.block_size)

    def one_block(carry, inputs):
        rows, e = inputs  # (block, D), its expert
        weight = functools.partial(jax.lax.dynamic_index_in_dim, index=e, keepdims=False)
        h = jax.nn.silu(matmul(rows, weight(gate))) * matmul(rows, weight(up))  # (block, F)
        return carry, matmul(h, weight(down))  # (block, D)

    rows = jnp.take(x, layout.source, axis=0, mode="fill", fill_value=0).reshape(-1, block, x.shape[-1])
    out = jax.lax.scan(one_block, None, (rows, layout.expert))[1]  # (blocks, block, D)
    picked = jnp.take(out.reshape(-1, x.shape[-1]), layout.row, axis=0)  # (T, k, D)
    return jnp.einsum("tkd,tk->td", picked, routing.weights.astype(dt))


def split_all_rows(tokens: int, k: int, num_experts: int) -> bool:
    """Whether `dispatch_split` runs each chosen expert on every token (True) or on its own
    rows only (False): all rows while there is at most one assignment per expert on average
    (`tokens * k <= num_experts`: decoding one or a few sequences).

    Measured on the 2-core CPU (`benchmarks/moe_decode_step.py`: a 6-layer MoE of 8 experts
    top-2, hidden 512, FFN 1024, fp32; one decode step of the serve engine, 2026-12-06): all
    rows / own rows 9.2-9.8 / 11.3-11.5 ms at 4 tokens, 14.3-14.8 / 12.2-12.5 ms at 8,
    19.7 / 15.7-17.6 ms at 16, 27.2-27.7 / 19.7-20.4 ms at 32. XLA:CPU's
    `[16, 512] x [512, 1024]` product is compute-bound (~220 GFLOP/s), so 16 rows through every
    chosen expert cost 4x the routed rows' FLOPs; the block loop's re-read weights are cheap
    beside that (this CPU reads ~40 GB/s per thread).
    """
    return tokens * k <= num_experts


def dispatch_split(
    x: Float[Array, "tokens hidden"],
    experts: SplitExperts,
    routing: Routing,
    *,
    block_size: int = 128,
) -> tuple[Float[Array, "tokens hidden"], Float[Array, ""]]:
    """The routed experts over per-expert arrays (inference). Dropless, equal to `dense`.

    With few tokens (`split_all_rows`: decoding one or a few rows) every expert that some
    token chose runs on all tokens, weighted by each token's combine weight for it (0 where
    it did not choose it); unchosen experts are skipped at run time (`jax.lax.cond`), so
    decoding one token reads only its k experts' weights. More tokens (a batch of decode
    rows, prefill): the assignments are sorted into blocks as in `dispatch_grouped`, and each
    expert loops over its own blocks only (`grouped_swiglu_forward`, one loop per expert:
    no padding blocks, no weight copies). The second path is not reverse-differentiable.

    Returns the output and the dropped fraction (always 0).
    """
    tokens, k = routing.indices.shape
    dt = x.dtype
    mlp = lambda rows, e: (jax.nn.silu(rows @ experts.gate[e].astype(dt)) * (rows @ experts.up[e].astype(dt))  # noqa: E731
                           ) @ experts.down[e].astype(dt)
    if split_all_rows(tokens, k, experts.num_experts):
        combine = combine_matrix(routing, experts.num_experts).astype(dt)  # (T, E), 0 where not chosen
        y = jnp.zeros_like(x)
        for e in range(experts.num_experts):
            y = jax.lax.cond(jnp.any(combine[:, e] != 0), lambda y, e=e: y + combine[:, e:e + 1] * mlp(x, e),
                             lambda y: y, y)
        return y, jnp.zeros((), jnp.float32)

    block = grouped_block_size(tokens * k, experts.num_experts, block_size)
    layout = assign_blocks(routing.indices, experts.num_experts, block)
    y, _ = grouped_swiglu_forward(x, routing.weights, layout.source, layout.row, layout.ends, experts.gate,
                                  experts.up, experts.down, block=block, save=False)
    return y, jnp.zeros((), jnp.float32)


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

    `auto` (the config default, resolved per call, so one layer can train with `capacity`
    and decode with `grouped`): `capacity` when training with a capacity factor (the
    factor is asked for: bounded buffers, drops); dropless otherwise (`capacity_factor=None`
    or `inference=True`): `grouped` on CPU, `ragged` on GPU/TPU, `grouped` on any backend
    with `use_fp8` (`ragged` has no fp8 path). The GPU/TPU choice is not settled by a
    measurement: TPU lowers `ragged_dot` to a grouped GEMM; XLA:GPU uses cuDNN's grouped
    GEMM where it supports the shape and otherwise the same zero-padded dense dot as CPU
    (openxla/xla PRs 45995-46002 describe that default). On one H100 (jax 0.11.2,
    benchmarks/RESULTS.md) a fine-grained step (64 experts top-8 of FFN 128, bf16) ran at
    0.7% MFU under `ragged` against 25.9% for an 8-expert MoE under `capacity`; the other
    dispatches are timed there by `benchmarks/gpu_check.py --only moe_dispatch`, not yet run.

    Arguments:
        backend: `"cpu"`, `"gpu"`, `"tpu"`, ...; default the platform being compiled for
            (`vishwam.kernels.target_platform`: the mesh in context's devices, else
            `jax.default_backend()`), so a program compiled on a CPU host for TPUs or GPUs
            gets their dispatch.
    """
    if dispatch != "auto":
        return dispatch
    if capacity_factor is not None and not inference:
        return "capacity"
    backend = target_platform() if backend is None else backend
    if use_fp8 or backend == "cpu":
        return "grouped"
    return "ragged"


"""Stacked layers: the one place that builds, runs and indexes a stack of blocks.

A stack is a tuple of `Stage`s. A stage repeats a pattern of blocks (`Stage.blocks`,
e.g. `(dense, MoE)`), each block's arrays carrying a leading `repeats` axis; layer
`n` of the model is block `j` of repeat `r` of stage `s` with
`n = stage_offsets(stages)[s] + r * len(pattern) + j`. `build_stages` creates the
weights with `eqx.filter_vmap` (stacked), `run_stages` runs them with `jax.lax.scan`
(compile time independent of depth) or unrolled (debugging; the same numbers), with
the remat policy applied to the scan body. `REMAT` names every remat policy with what
it saves, so the model and the planner's estimates read one table.
"""

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ..config import ModelConfig
from ..config.model import RematPolicy
from ..errors import InvalidValueError
from .block import Block


@dataclasses.dataclass(frozen=True)
class Remat:
    """One remat (gradient checkpointing) policy.

    `checkpoint_policy` makes the `jax.checkpoint` policy (None: no `jax.checkpoint` for
    `none`, a plain one for `full`); `recompute` is hardware FLOPs / model FLOPs of a
    train step under it (`full` runs the forward twice: 8N against 6N); `saved_values`
    is the values kept per token and layer for the backward, from hidden size `h`, FFN
    width `f` and top-k `k` (an estimate of what the policy keeps, for the planner).
    """

    checkpoint_policy: Callable[[], Callable] | None
    recompute: float
    saved_values: Callable[[int, int, int], int]


REMAT: dict[str, Remat] = {
    "none": Remat(None, 1.0, lambda h, f, k: 16 * h + 5 * f * k),
    "full": Remat(None, 4.0 / 3.0, lambda h, f, k: h),
    "dots_saveable": Remat(lambda: jax.checkpoint_policies.dots_saveable, 1.0,
                           lambda h, f, k: 6 * h + 3 * f * k),
    "save_attention_output": Remat(lambda: jax.checkpoint_policies.save_only_these_names("attention_output"),
                                   1.25, lambda h, f, k: 2 * h),
    "offload_dots": Remat(lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
                          1.0, lambda h, f, k: h),
}
assert set(REMAT) == set(RematPolicy.__args__), "REMAT must describe every ModelConfig.remat_policy"


def apply_remat(fn: Callable, policy: str) -> Callable:
    """Wrap a scan body in `jax.checkpoint` according to a remat policy name."""
    if policy not in REMAT:
        raise InvalidValueError(f"Unknown remat policy {policy!r}; choose one of {', '.join(REMAT)}.")
    if policy == "none":
        return fn
    factory = REMAT[policy].checkpoint_policy
    if factory is None:
        return jax.checkpoint(fn, prevent_cse=False)
    return jax.checkpoint(fn, prevent_cse=False, policy=factory())


def stage_plan(config: ModelConfig) -> list[tuple[tuple[bool, ...], int]]:
    """The layer stack as `(pattern, repeats)` stages; `pattern[j]` says whether
    the j-th block of one repeat is MoE. Layers run stage by stage, each stage
    scanning `repeats` times over its pattern."""
    if not config.is_moe:
        return [((False,), config.num_layers)]
    plan = []
    if config.first_dense_layers:
        plan.append(((False,), config.first_dense_layers))
    rest = config.num_layers - config.first_dense_layers
    if rest:
        n = config.moe_every
        plan.append(((False,) * (n - 1) + (True,), rest // n))
    return plan


class Stage(eqx.Module):
    """A repeated pattern of blocks; each block's arrays carry a leading `repeats` axis."""

    blocks: tuple[Block, ...]
    repeats: int = eqx.field(static=True)

    @property
    def num_layers(self) -> int:
        return self.repeats * len(self.blocks)


def build_stages(config: ModelConfig, *, key: PRNGKeyArray) -> tuple[Stage, ...]:
    """Every layer's weights, stacked per stage (`eqx.filter_vmap` over per-layer keys)."""
    layer_keys = jax.random.split(key, config.num_layers)
    stages, offset = [], 0
    for pattern, repeats in stage_plan(config):
        n = len(pattern) * repeats
        keys = layer_keys[offset:offset + n].reshape(repeats, len(pattern))
        offset += n
        blocks = tuple(
            eqx.filter_vmap(lambda k, m=is_moe: Block(config, m, key=k))(keys[:, j])
            for j, is_moe in enumerate(pattern)
        )
        stages.append(Stage(blocks, repeats))
    return tuple(stages)


def stage_offsets(stages: tuple[Stage, ...]) -> list[int]:
    """The model-wide number of the first layer of each stage."""
    offsets, offset = [], 0
    for stage in stages:
        offsets.append(offset)
        offset += stage.num_layers
    return offsets


def split_layers(stages: tuple[Stage, ...], array: Array) -> list[Array]:
    """Split a `[num_layers, ...]` array (layer order) into per-stage `[repeats, pattern, ...]` pieces."""
    pieces = []
    for stage, offset in zip(stages, stage_offsets(stages)):
        piece = array[offset:offset + stage.num_layers]
        pieces.append(piece.reshape(stage.repeats, len(stage.blocks), *array.shape[1:]))
    return pieces


def split_moe_rows(stages: tuple[Stage, ...], rows: Array) -> list[Array]:
    """`[num_moe_layers, ...]` rows in layer order -> one `[repeats, ...]` piece per MoE
    block of each stage, in the order the stages and blocks are stored."""
    pieces, offset = [], 0
    for stage in stages:
        n_moe = sum(block.is_moe for block in stage.blocks)
        chunk = rows[offset:offset + stage.repeats * n_moe].reshape(stage.repeats, n_moe, *rows.shape[1:])
        offset += stage.repeats * n_moe
        pieces.extend(chunk[:, j] for j in range(n_moe))
    return pieces


def run_stages(stages: tuple[Stage, ...], body: Callable, carry, xs_per_stage: list, *, remat: str = "none",
               scan: bool = True):
    """Run `body(carry, blocks, xs) -> (carry, ys)` over every repeat of every stage.

    `blocks` is one repeat's pattern with arrays of their own; `xs` that repeat's slice
    of the stage's entry of `xs_per_stage` (None or a pytree with a leading `repeats`
    axis). Returns the final carry and, per stage, the `ys` stacked over repeats.
    """
    outputs = []
    for stage, xs in zip(stages, xs_per_stage):
        params, static = eqx.partition(stage.blocks, eqx.is_array)

        def step(carry, scanned, static=static):
            layer_params, layer_xs = scanned
            return body(carry, eqx.combine(layer_params, static), layer_xs)

        step = apply_remat(step, remat)
        if scan:
            carry, ys = jax.lax.scan(step, carry, (params, xs))
        else:
            ys_list = []
            for i in range(stage.repeats):
                carry, y = step(carry, jax.tree_util.tree_map(lambda a: a[i], (params, xs)))
                ys_list.append(y)
            ys = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys_list)
        outputs.append(ys)
    return carry, outputs


def unstack_layers(stages: tuple[Stage, ...], split: Callable[[Block], Block] = lambda block: block
                   ) -> tuple[Block, ...]:
    """Every layer as a `Block` with arrays of its own (copies), in layer order; `split`
    may further rewrite each layer (e.g. split its experts). Eager: call outside jit."""
    layers = []
    for stage in stages:
        for i in range(stage.repeats):
            for block in stage.blocks:
                layers.append(split(jax.tree_util.tree_map(
                    lambda a, i=i: jnp.array(a[i]) if eqx.is_array(a) else a, block)))
    return tuple(layers)

"""The built-in optimiser from a `TrainConfig`: clipping + AdamW with masked decay, the learning-rate
schedules, and which parameters train."""

import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PyTree

from ..config import TrainConfig
from ..parallel.sharding import path_string

# Leaves whose path names one of these are gains/offsets, never decayed even when
# stacking over layers gives them two dimensions.
_NO_DECAY_NAMES = ("bias", "scale", "norm")


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Learning rate of the optimiser update number `count` (0-based).

    Linear warm-up `peak * (count + 1) / warmup_steps` for the first `warmup_steps`
    updates (so the first update already moves the weights), then by `config.lr_schedule`:
    `cosine` from the peak at `count = warmup_steps` to `peak * min_lr_ratio` at
    `count = total_steps`; `linear` the same in a straight line; `wsd` the peak until the
    last `decay_fraction * total_steps` updates, then linearly down to the floor; `constant`
    the peak. Constant after `total_steps`. Pure `jnp`: `count` may be traced.
    """
    peak = config.learning_rate
    floor = peak * config.min_lr_ratio
    warmup, total, kind = config.warmup_steps, config.total_steps, config.lr_schedule
    # wsd: the decay starts here, never before the end of the warm-up.
    decay_start = max(warmup, total - round(config.decay_fraction * total))

    def schedule(count) -> Float[Array, ""]:
        count = jnp.asarray(count, jnp.float32)
        warm = peak * (count + 1.0) / max(warmup, 1)
        start = decay_start if kind == "wsd" else warmup
        progress = jnp.clip((count - start) / max(total - start, 1), 0.0, 1.0)
        if kind == "cosine":
            after = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif kind == "constant":
            after = jnp.full_like(count, peak)
        else:  # linear, wsd
            after = peak + (floor - peak) * progress
        return jnp.where(count < warmup, warm, after)

    return schedule


def _key_name(entry) -> str:
    for attr in ("name", "key"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return ""


def weight_decay_mask(params: PyTree, *, decay_embeddings: bool = False) -> PyTree[bool]:
    """True for the leaves AdamW should decay: matrices and higher.

    Never decayed: norms, biases, any vector (this includes MoE's `selection_bias`,
    which the optimiser must never move), judged per layer, i.e. without the
    leading `repeats` axis that scanned `stages` carry. The token embedding
    (`embed`) is decayed only with `decay_embeddings`.
    """

    def decide(path, leaf) -> bool:
        names = [_key_name(entry) for entry in path]
        per_layer_ndim = leaf.ndim - (1 if names and names[0] == "stages" else 0)
        if per_layer_ndim < 2:
            return False
        if any(word in name for name in names for word in _NO_DECAY_NAMES):
            return False
        if names == ["embed"]:
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def trainable_mask(params: PyTree, config: TrainConfig) -> PyTree[bool]:
    """True for the floating-point array leaves that train under `config.trainable` /
    `config.frozen` (regular expressions searched in each leaf's dotted path)."""
    keep = re.compile(config.trainable) if config.trainable is not None else None
    drop = re.compile(config.frozen) if config.frozen is not None else None

    def decide(path, leaf) -> bool:
        if not eqx.is_inexact_array(leaf):
            return False
        name = path_string(path)
        return (keep is None or keep.search(name) is not None) and (drop is None or drop.search(name) is None)

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (unless `grad_clip=None`), then AdamW on the schedule.

    Weight decay is decoupled and scaled by the learning rate (as in
    `torch.optim.AdamW`), masked by `weight_decay_mask`.
    """
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=functools.partial(weight_decay_mask, decay_embeddings=config.decay_embeddings),
    )
    if config.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)

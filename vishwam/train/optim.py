"""The optimiser from a `TrainConfig`: AdamW, warm-up + cosine schedule, masked decay, clipping."""

import functools

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PyTree

from ..config import TrainConfig

# Leaves whose path names one of these are gains/offsets, never decayed even when
# stacking over layers gives them two dimensions.
_NO_DECAY_NAMES = ("bias", "scale", "norm")


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Learning rate of the optimiser update number `count` (0-based).

    Linear warm-up `peak * (count + 1) / warmup_steps` for the first
    `warmup_steps` updates (so the first update already moves the weights), then
    a cosine from the peak at `count = warmup_steps` to `peak * min_lr_ratio` at
    `count = total_steps`, constant afterwards. Pure `jnp`: `count` may be traced.
    """
    peak = config.learning_rate
    floor = peak * config.min_lr_ratio
    warmup, total = config.warmup_steps, config.total_steps

    def schedule(count) -> Float[Array, ""]:
        count = jnp.asarray(count, jnp.float32)
        warm = peak * (count + 1.0) / max(warmup, 1)
        progress = jnp.clip((count - warmup) / (total - warmup), 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, warm, cosine)

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

"""The train state: what changes during training, how a fresh one is built, and where it lives.

`TrainState` (model, optimiser moments, step, PRNG key) is resumable bit for bit.
`fresh_train_state` is a run's step-0 state; `init_sharded_state` computes the same values
with one jitted init whose `out_shardings` follow the sharding rules (each device only ever
holds its own shards); `abstract_train_state` and `abstract_batch` are the same trees as
sharded `jax.ShapeDtypeStruct`s, the inputs of an ahead-of-time compile.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from ..arrays import is_abstract
from ..config import ModelConfig, TrainConfig
from ..errors import InvalidTypeError, InvalidValueError
from ..model import VishwamAI
from ..parallel.sharding import DEFAULT_RULES, Rule, batch_spec, tree_shardings
from .optim import make_optimizer, trainable_mask


class TrainState(eqx.Module):
    """Everything that changes during training; resumable bit for bit.

    `opt_state` covers only the model's trainable floating-point arrays; static fields
    (the config, hyperparameters) live in the tree structure. `key` is a typed
    PRNG key, split every step (dropout and router jitter draw from it).
    """

    model: PyTree  # a VishwamAI, or any module following vishwam.model.LanguageModel
    opt_state: PyTree
    step: Int[Array, ""]
    key: PRNGKeyArray


def init_train_state(model, train_config: TrainConfig, *, key: PRNGKeyArray,
                     optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """A fresh state at step 0: optimiser moments zero, `key` kept for the step's randomness.

    Arguments:
        model: a `VishwamAI`, or any Equinox module following `vishwam.model.LanguageModel`.
        train_config: `trainable` / `frozen` pick the parameters that train (frozen ones get
            no optimiser state); the built-in optimiser's settings unless `optimizer` is given.
        key: a typed PRNG key (`jax.random.key(seed)`), split every step.
        optimizer: any `optax.GradientTransformation`; pass the same one to `make_train_step`.
    """
    if not (isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise InvalidTypeError(
            f"init_train_state: `key` must be a typed PRNG key, got {type(key).__name__} "
            f"with dtype {getattr(key, 'dtype', None)}; pass `jax.random.key(seed)` "
            "(or `jax.random.wrap_key_data(raw)` for a legacy uint32 key)."
        )
    params = eqx.filter(model, trainable_mask(model, train_config))
    if not jax.tree_util.tree_leaves(params):
        raise InvalidValueError(f"init_train_state: no parameter trains under trainable={train_config.trainable!r}, "
                                f"frozen={train_config.frozen!r}; loosen the patterns (they search dotted paths such "
                                "as 'stages.0.blocks.0.mlp.router').")
    transform = make_optimizer(train_config) if optimizer is None else optimizer
    return TrainState(model, transform.init(params), jnp.zeros((), jnp.int32), key)


def fresh_train_state(model_config: ModelConfig, train_config: TrainConfig,
                      optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """The step-0 state of a run, built eagerly: the model from `key(seed)`, the state's
    key `state_key(train_config)` (what `VishwamAITrainer` and the train command use)."""
    model = VishwamAI(model_config, key=jax.random.key(train_config.seed))
    return init_train_state(model, train_config, key=state_key(train_config), optimizer=optimizer)


def state_key(train_config: TrainConfig) -> PRNGKeyArray:
    """The train state's PRNG key of a run: `fold_in(key(seed), 1)` (the model's init uses `key(seed)`)."""
    return jax.random.fold_in(jax.random.key(train_config.seed), 1)


def abstract_state(model_config: ModelConfig, train_config: TrainConfig,
                   optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """`fresh_train_state` as `jax.ShapeDtypeStruct`s (nothing allocated): a restore target."""
    return eqx.filter_eval_shape(fresh_train_state, model_config, train_config, optimizer)


def _state_shardings(model_config, train_config, mesh, rules, optimizer=None):
    abstract = abstract_state(model_config, train_config, optimizer)
    arrays, static = eqx.partition(abstract, is_abstract)
    return arrays, static, tree_shardings(arrays, mesh, rules)


def abstract_train_state(
    model_config: ModelConfig,
    train_config: TrainConfig,
    mesh: jax.sharding.Mesh,
    rules: Sequence[Rule] = DEFAULT_RULES,
    optimizer: optax.GradientTransformation | None = None,
) -> TrainState:
    """`fresh_train_state`'s tree with every array a `jax.ShapeDtypeStruct` carrying its
    `NamedSharding` on `mesh` (by `rules`): the input of an ahead-of-time compile, or a
    restore target."""
    arrays, static, shardings = _state_shardings(model_config, train_config, mesh, rules, optimizer)
    arrays = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), arrays, shardings)
    return eqx.combine(arrays, static)


def init_sharded_state(
    model_config: ModelConfig,
    train_config: TrainConfig,
    mesh: jax.sharding.Mesh | None,
    rules: Sequence[Rule] = DEFAULT_RULES,
    optimizer: optax.GradientTransformation | None = None,
) -> TrainState:
    """`fresh_train_state`, computed by one jitted init whose `out_shardings` follow
    `rules` on `mesh`: each device only ever holds its own shards (no full host copy).
    Values equal the eager `fresh_train_state`. `mesh=None`: the default device."""
    if mesh is None:
        abstract = abstract_state(model_config, train_config, optimizer)
        (_, static), shardings = eqx.partition(abstract, is_abstract), None
    else:
        _, static, shardings = _state_shardings(model_config, train_config, mesh, rules, optimizer)

    def init():
        return eqx.filter(fresh_train_state(model_config, train_config, optimizer), eqx.is_array)

    return eqx.combine(jax.jit(init, out_shardings=shardings)(), static)


def abstract_batch(train_config: TrainConfig, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """A packed global batch as the data pipeline gives it, split over the batch axes."""
    shape = (train_config.batch_size, train_config.seq_len)
    sharding = jax.sharding.NamedSharding(mesh, batch_spec(mesh, 2))
    ints = ("tokens", "targets", "segment_ids", "positions")
    batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for name in ints}
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    return batch

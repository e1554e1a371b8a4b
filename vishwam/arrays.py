"""Arrays and their abstract stand-ins in pytrees: the one definition of "an array leaf".

`eqx.is_array` is False for `jax.ShapeDtypeStruct`, so a model from `eqx.filter_eval_shape`
partitions into an all-`None` tree with it. Everything that treats concrete and abstract
trees alike (checkpoint targets, sharding rules, the HF tensor map, memory estimates) uses
these instead.
"""

from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree


def is_abstract(x: Any) -> bool:
    """True for a `jax.ShapeDtypeStruct` leaf."""
    return isinstance(x, jax.ShapeDtypeStruct)


def is_array_like(x: Any) -> bool:
    """True for arrays (`jax.Array`, numpy) and for `jax.ShapeDtypeStruct`."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def partition_arrays(tree: PyTree) -> tuple[PyTree, PyTree]:
    """Split a model (concrete or abstract) into `(arrays, static)`."""
    return eqx.partition(tree, is_array_like)


def combine_arrays(arrays: PyTree, static: PyTree) -> PyTree:
    """Inverse of `partition_arrays`."""
    return eqx.combine(arrays, static)


def abstract_arrays(tree: PyTree, shardings: PyTree | jax.sharding.Sharding | None = None) -> PyTree:
    """A `jax.ShapeDtypeStruct` per array leaf, for use as a restore or compile target.

    Arguments:
        tree: arrays or `ShapeDtypeStruct`s (e.g. `jax.eval_shape` output).
        shardings: one `Sharding` for every leaf, or a tree of them matching
            `tree`; `None` keeps each leaf's own sharding (if it has one).
    """
    def to_struct(x, sharding=None):
        if sharding is None:
            sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: to_struct(x, shardings), tree)
    return jax.tree.map(to_struct, tree, shardings)

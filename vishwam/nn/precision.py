"""Mixed-precision policy: parameters stored in one dtype, computed in another.

Logits and losses are always fp32; norms and softmaxes accumulate in fp32.
"""

import dataclasses

import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str) -> jnp.dtype:
    try:
        return jnp.dtype(_DTYPES[name])
    except KeyError:
        raise ValueError(f"Unknown dtype name {name!r}; choose one of {sorted(_DTYPES)}.") from None


@dataclasses.dataclass(frozen=True)
class Precision:
    """Where each dtype applies. `output_dtype` is the dtype of logits and losses."""

    param_dtype: jnp.dtype = jnp.dtype(jnp.float32)
    compute_dtype: jnp.dtype = jnp.dtype(jnp.float32)
    output_dtype: jnp.dtype = jnp.dtype(jnp.float32)

    @classmethod
    def from_config(cls, config) -> "Precision":
        return cls(dtype_from_name(config.param_dtype), dtype_from_name(config.compute_dtype))

    def cast_to_compute(self, tree):
        return cast_floating(tree, self.compute_dtype)

    def cast_to_param(self, tree):
        return cast_floating(tree, self.param_dtype)


def cast_floating(tree, dtype):
    """Cast every floating-point array leaf of `tree` to `dtype`; other leaves pass through."""

    def cast(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map(cast, tree)

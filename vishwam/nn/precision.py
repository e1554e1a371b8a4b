"""Mixed-precision policy: parameters stored in one dtype, computed in another.

Logits and losses are always fp32 (the LM head accumulates with
`preferred_element_type=float32`); norms, softmaxes and routers compute in fp32.
"""

import dataclasses

import jax.numpy as jnp

from ..errors import InvalidValueError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str) -> jnp.dtype:
    try:
        return jnp.dtype(_DTYPES[name])
    except KeyError:
        raise InvalidValueError(f"Unknown dtype name {name!r}; choose one of {sorted(_DTYPES)}.") from None


@dataclasses.dataclass(frozen=True)
class Precision:
    """Where each dtype applies: `param_dtype` for stored weights, `compute_dtype` for
    activations and matmul inputs (each `Linear` casts its weight to its input's dtype)."""

    param_dtype: jnp.dtype = jnp.dtype(jnp.float32)
    compute_dtype: jnp.dtype = jnp.dtype(jnp.float32)

    @classmethod
    def from_config(cls, config) -> "Precision":
        return cls(dtype_from_name(config.param_dtype), dtype_from_name(config.compute_dtype))

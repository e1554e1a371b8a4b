"""Normalisation layers. Statistics are computed in fp32, output in the input's dtype."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..errors import InvalidValueError


def rms_norm(x, scale, epsilon: float):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + epsilon)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def check_last_dim(where: str, x, dim: int) -> None:
    """A cheap trace-time check that `x` ends in the layer's width."""
    if x.ndim < 1 or x.shape[-1] != dim:
        raise InvalidValueError(f"{where}: input of shape {tuple(x.shape)} must end in the layer's width {dim}; "
                                "check the hidden size of what you feed it against the config's.")


def layer_norm(x, scale, bias, epsilon: float):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + epsilon)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class TPULayerNorm(eqx.Module):
    """LayerNorm over the last axis; `use_scale`/`use_bias` toggle the affine parts."""

    scale: Float[Array, " dim"] | None
    bias: Float[Array, " dim"] | None
    dim: int = eqx.field(static=True)
    epsilon: float = eqx.field(static=True)

    def __init__(self, dim: int, epsilon: float = 1e-6, use_bias: bool = True,
                 use_scale: bool = True, *, dtype=jnp.float32):
        self.dim = dim
        self.epsilon = epsilon
        self.scale = jnp.ones((dim,), dtype) if use_scale else None
        self.bias = jnp.zeros((dim,), dtype) if use_bias else None

    def __check_init__(self):
        if self.epsilon <= 0:
            raise InvalidValueError(f"TPULayerNorm(epsilon={self.epsilon}): epsilon must be > 0.")

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        check_last_dim("TPULayerNorm", x, self.dim)
        return layer_norm(x, self.scale, self.bias, self.epsilon)


class RMSNorm(eqx.Module):
    """RMSNorm over the last axis (no mean subtraction, no bias)."""

    scale: Float[Array, " dim"] | None
    dim: int = eqx.field(static=True)
    epsilon: float = eqx.field(static=True)

    def __init__(self, dim: int, epsilon: float = 1e-6, use_scale: bool = True, *, dtype=jnp.float32):
        self.dim = dim
        self.epsilon = epsilon
        self.scale = jnp.ones((dim,), dtype) if use_scale else None

    def __check_init__(self):
        if self.epsilon <= 0:
            raise InvalidValueError(f"RMSNorm(epsilon={self.epsilon}): epsilon must be > 0.")

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        check_last_dim("RMSNorm", x, self.dim)
        return rms_norm(x, self.scale, self.epsilon)


LayerNorm = TPULayerNorm


def make_norm(norm_type: str, dim: int, epsilon: float, *, dtype=jnp.float32):
    if norm_type == "rms":
        return RMSNorm(dim, epsilon, dtype=dtype)
    if norm_type == "layer":
        return TPULayerNorm(dim, epsilon, dtype=dtype)
    raise InvalidValueError(f"Unknown norm_type {norm_type!r}; choose 'rms' or 'layer'.")

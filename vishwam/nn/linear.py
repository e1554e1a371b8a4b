"""Linear layer: `Linear` (alias `TPUGEMMLinear`), any backend, optional real fp8 GEMMs."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..errors import InvalidValueError


class Linear(eqx.Module):
    """`y = x @ weight (+ bias)` over any leading dims.

    The weight is stored `[in_features, out_features]` (so `x @ W` needs no
    transpose and sharding rules read naturally); it is cast to the input's dtype,
    so the caller's precision policy decides the compute dtype. With
    `use_fp8=True` the matmul runs on `float8_e4m3fn` operands (see `vishwam.nn.fp8`).
    """

    weight: Float[Array, "d_in d_out"]
    bias: Float[Array, " d_out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    use_fp8: bool = eqx.field(static=True)
    fp8_scaling: str = eqx.field(static=True)
    block_size: int = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        use_bias: bool = True,
        use_fp8: bool = False,
        block_size: int = 128,
        *,
        fp8_scaling: str = "tensor",
        init_std: float | None = None,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        std = 1.0 / math.sqrt(in_features) if init_std is None else init_std
        self.weight = (std * jax.random.normal(key, (in_features, out_features))).astype(dtype)
        self.bias = jnp.zeros((out_features,), dtype) if use_bias else None
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.use_fp8 = use_fp8
        self.fp8_scaling = fp8_scaling
        self.block_size = block_size

    def __check_init__(self):
        if self.fp8_scaling not in ("tensor", "block"):
            raise InvalidValueError(f"Linear(fp8_scaling={self.fp8_scaling!r}): choose 'tensor' or 'block'.")
        if self.block_size <= 0:
            raise InvalidValueError(f"Linear(block_size={self.block_size}): must be a positive integer.")

    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        if x.shape[-1] != self.in_features:
            raise InvalidValueError(
                f"Linear expects inputs with last dim {self.in_features}, got shape {x.shape}."
            )
        weight = self.weight.astype(x.dtype)
        if self.use_fp8:
            from .fp8 import fp8_matmul

            y = fp8_matmul(x, weight, scaling=self.fp8_scaling, block_size=self.block_size)
        elif x.ndim > 2:
            # One 2-D GEMM over the flattened leading dims (a free reshape): XLA:CPU then picks
            # layouts for the backward without the transposed copies it makes for `[b, t, d] @ w`
            # (the dense train step of benchmarks/vs_transformers.py 1.18x faster; benchmarks/RESULTS.md).
            y = (x.reshape(-1, x.shape[-1]) @ weight).reshape(*x.shape[:-1], weight.shape[-1])
        else:
            y = x @ weight
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)
        return y


TPUGEMMLinear = Linear

"""Linear layer: `Linear` (alias `TPUGEMMLinear`), any backend, optional real fp8 GEMMs."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..errors import InvalidValueError
from ..kernels.flash import target_platform


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

    def check_input(self, x: Float[Array, "*batch d_in"]) -> None:
        """Raise a clear error unless `x`'s last dim is `in_features`."""
        if x.shape[-1] != self.in_features:
            raise InvalidValueError(
                f"Linear expects inputs with last dim {self.in_features}, got shape {x.shape}."
            )

    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        self.check_input(x)
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


PARALLEL_MIN_ROWS = 1024
"""Rows from which `parallel_linears` concatenates the weights: the concatenation copies them
on every call, which a product of that many rows amortises (below it, decoding, it would not)."""


def parallel_linears(x: Float[Array, "*batch d_in"], *linears: Linear) -> tuple[Float[Array, "*batch _"], ...]:
    """Each of `linears` applied to the same `x` (attention's q/k/v projections).

    On CPU, for at least `PARALLEL_MIN_ROWS` rows and none in fp8: one product with the
    weights side by side, whose backward is one product each way too (the fine-grained MoE
    train step of `benchmarks/vs_transformers.py` 1.06x faster with q/k/v fused, measured in
    one process against separate calls, `benchmarks/RESULTS.md`; the dense MLP's gate and up
    projections fused the same way made the dense step slower, 0.97x, so `MLP` does not).
    Otherwise one call each: on TPU/GPU a concatenation along the output dim would regroup
    tensor-parallel shards of the weights."""
    rows = math.prod(x.shape[:-1])
    if len(linears) < 2 or rows < PARALLEL_MIN_ROWS or any(lin.use_fp8 for lin in linears) or (
            target_platform() != "cpu"):
        return tuple(lin(x) for lin in linears)
    for lin in linears:
        lin.check_input(x)
    weight = jnp.concatenate([lin.weight.astype(x.dtype) for lin in linears], axis=-1)
    y = (x.reshape(rows, x.shape[-1]) @ weight).reshape(*x.shape[:-1], weight.shape[-1])
    outs, start = [], 0
    for lin in linears:
        out = y[..., start:start + lin.out_features]
        outs.append(out if lin.bias is None else out + lin.bias.astype(out.dtype))
        start += lin.out_features
    return tuple(outs)

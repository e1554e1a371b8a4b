"""Expert weights (stacked `Experts`, per-expert `SplitExperts`) and the batched expert MLP."""

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..fp8 import fp8_batched_matmul


class Experts(eqx.Module):
    """`num_experts` SwiGLU MLPs stored as stacked weights (leading `experts` axis)."""

    gate: Float[Array, "experts hidden ffn"]
    up: Float[Array, "experts hidden ffn"]
    down: Float[Array, "experts ffn hidden"]

    def __init__(self, num_experts: int, hidden_size: int, ffn_dim: int, *, init_std: float = 0.02,
                 out_init_std: float | None = None, dtype=jnp.float32, key: PRNGKeyArray):
        kg, ku, kd = jax.random.split(key, 3)
        out_std = init_std if out_init_std is None else out_init_std
        self.gate = (init_std * jax.random.normal(kg, (num_experts, hidden_size, ffn_dim))).astype(dtype)
        self.up = (init_std * jax.random.normal(ku, (num_experts, hidden_size, ffn_dim))).astype(dtype)
        self.down = (out_std * jax.random.normal(kd, (num_experts, ffn_dim, hidden_size))).astype(dtype)

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]


class SplitExperts(eqx.Module):
    """The same experts, one array per expert and projection: for decoding on CPU.

    XLA:CPU copies a slice `w[e]` of stacked weights before it can multiply by it, so
    a decode step over `Experts` pays a weight copy per chosen expert and projection
    (as costly as the matmul itself at a few rows). Separate arrays are read in place
    by `dispatch_split`. Made by `split_experts`, outside any jit; inference only.
    """

    gate: tuple[Float[Array, "hidden ffn"], ...]
    up: tuple[Float[Array, "hidden ffn"], ...]
    down: tuple[Float[Array, "ffn hidden"], ...]

    @property
    def num_experts(self) -> int:
        return len(self.gate)


def split_experts(experts: Experts) -> SplitExperts:
    """`experts` as `SplitExperts` (copies each expert's weights into arrays of their own)."""
    split = lambda w: tuple(jnp.array(w[e]) for e in range(w.shape[0]))  # noqa: E731
    return SplitExperts(split(experts.gate), split(experts.up), split(experts.down))


class Fp8Spec(NamedTuple):
    """fp8 settings of the expert GEMMs (see `vishwam.nn.fp8`)."""

    scaling: str = "tensor"
    block_size: int = 128


def expert_ffn(
    buffers: Float[Array, "experts capacity hidden"],
    gate: Float[Array, "experts hidden ffn"],
    up: Float[Array, "experts hidden ffn"],
    down: Float[Array, "experts ffn hidden"],
    fp8: Fp8Spec | None = None,
) -> Float[Array, "experts capacity hidden"]:
    """Each expert's SwiGLU MLP on its own buffer: three batched GEMMs.

    With `fp8` set the GEMMs run on fp8 operands (`fp8_batched_matmul`, scales per expert).
    """
    dt = buffers.dtype
    gate, up, down = gate.astype(dt), up.astype(dt), down.astype(dt)
    if fp8 is None:
        matmul = functools.partial(jnp.einsum, "ecd,edf->ecf")
    else:
        matmul = functools.partial(fp8_batched_matmul, scaling=fp8.scaling, block_size=fp8.block_size)
    with jax.named_scope("moe_experts"):
        h = jax.nn.silu(matmul(buffers, gate)) * matmul(buffers, up)  # (E, C, F)
        return matmul(h, down)  # (E, C, D)

"""SwiGLU feed-forward block."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .linear import Linear


class MLP(eqx.Module):
    """`down(silu(gate(x)) * up(x))`, as in Llama/Mixtral experts."""

    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear

    def __init__(self, hidden_size: int, ffn_dim: int, *, use_fp8: bool = False,
                 fp8_scaling: str = "tensor", fp8_block_size: int = 128, init_std: float = 0.02,
                 out_init_std: float | None = None, dtype=jnp.float32, key: PRNGKeyArray):
        kg, ku, kd = jax.random.split(key, 3)
        common = dict(use_bias=False, use_fp8=use_fp8, fp8_scaling=fp8_scaling,
                      block_size=fp8_block_size, dtype=dtype)
        self.gate_proj = Linear(hidden_size, ffn_dim, init_std=init_std, key=kg, **common)
        self.up_proj = Linear(hidden_size, ffn_dim, init_std=init_std, key=ku, **common)
        self.down_proj = Linear(ffn_dim, hidden_size,
                                init_std=init_std if out_init_std is None else out_init_std, key=kd, **common)

    def __call__(self, x: Float[Array, "*batch hidden"]) -> Float[Array, "*batch hidden"]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))

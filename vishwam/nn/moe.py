"""Mixture-of-Experts layer: router, load-balancing losses, expert dispatch.

The steps are named as free functions (`route`, the dispatch functions,
`load_balancing_loss`, `router_z_loss`) so they can be tested and swapped alone.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .mlp import MLP


class Routing(NamedTuple):
    weights: Float[Array, "tokens k"]
    """Combine weights of the chosen experts (fp32)."""
    indices: Int[Array, "tokens k"]
    """Chosen experts, best first."""
    probs: Float[Array, "tokens experts"]
    """Router probabilities over all experts (fp32, rows sum to 1)."""


def route(
    logits: Float[Array, "tokens experts"],
    k: int,
    *,
    router_type: str = "softmax",
    renormalize: bool = True,
    selection_bias: Float[Array, " experts"] | None = None,
) -> Routing:
    """Top-k routing.

    `selection_bias` (aux-loss-free balancing) shifts which experts are chosen
    but not the combine weights, and carries no gradient.
    """
    logits = logits.astype(jnp.float32)
    if router_type == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    elif router_type == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        raise ValueError(f"Unknown router_type {router_type!r}; choose 'softmax' or 'sigmoid'.")
    selection = scores if selection_bias is None else scores + jax.lax.stop_gradient(selection_bias)
    _, indices = jax.lax.top_k(selection, k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, indices.astype(jnp.int32), probs)


def expert_fractions(indices: Int[Array, "tokens k"], num_experts: int) -> Float[Array, " experts"]:
    """Fraction of all (token, slot) assignments that go to each expert."""
    counts = jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.float32), axis=(0, 1))
    return counts / indices.size


def load_balancing_loss(routing: Routing, num_experts: int) -> Float[Array, ""]:
    """Switch-Transformer loss `E * sum_e f_e * P_e`; its minimum, 1, is uniform routing."""
    f = expert_fractions(routing.indices, num_experts)
    p = jnp.mean(routing.probs, axis=0)
    return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(logits: Float[Array, "tokens experts"]) -> Float[Array, ""]:
    """Mean squared log-sum-exp of the router logits (keeps them small)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def combine_matrix(routing: Routing, num_experts: int) -> Float[Array, "tokens experts"]:
    """Dense `[tokens, experts]` matrix of combine weights (zero for unchosen experts)."""
    tokens = routing.indices.shape[0]
    rows = jnp.arange(tokens)[:, None]
    return jnp.zeros((tokens, num_experts), jnp.float32).at[rows, routing.indices].add(routing.weights)


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


def dispatch_dense(
    x: Float[Array, "tokens hidden"], experts: Experts, routing: Routing
) -> tuple[Float[Array, "tokens hidden"], Float[Array, ""]]:
    """Every expert on every token, combined with the top-k weights.

    The oracle for the other dispatches: E times the FLOPs of top-k, drops nothing.
    Returns the output and the fraction of assignments dropped (always 0).
    """
    dt = x.dtype
    combine = combine_matrix(routing, experts.num_experts).astype(dt)
    gate = jnp.einsum("td,edf->tef", x, experts.gate.astype(dt))  # (T, E, F)
    up = jnp.einsum("td,edf->tef", x, experts.up.astype(dt))
    h = jax.nn.silu(gate) * up * combine[:, :, None]
    y = jnp.einsum("tef,efd->td", h, experts.down.astype(dt))
    return y, jnp.zeros((), jnp.float32)


DISPATCHES = {"dense": dispatch_dense}


class MoE(eqx.Module):
    """Routed experts (plus optional shared experts) replacing a dense MLP.

    Returns `(y, aux)`, where `aux` holds this layer's `load_balancing_loss`,
    `router_z_loss`, `expert_load` (fraction of assignments per expert) and
    `dropped_fraction`; the model averages them over layers and the training
    loss weights them with the config's coefficients.
    """

    router: Float[Array, "hidden experts"]
    experts: Experts
    shared: MLP | None
    selection_bias: Float[Array, " experts"] | None
    num_experts: int = eqx.field(static=True)
    top_k: int = eqx.field(static=True)
    router_type: str = eqx.field(static=True)
    renormalize: bool = eqx.field(static=True)
    dispatch: str = eqx.field(static=True)
    capacity_factor: float | None = eqx.field(static=True)
    jitter: float = eqx.field(static=True)
    use_fp8: bool = eqx.field(static=True)

    def __init__(self, hidden_size: int, ffn_dim: int, num_experts: int, top_k: int, *,
                 router_type: str = "softmax", renormalize: bool = True, dispatch: str = "dense",
                 capacity_factor: float | None = None, jitter: float = 0.0, num_shared_experts: int = 0,
                 aux_free_bias: bool = False, use_fp8: bool = False, init_std: float = 0.02, out_init_std: float | None = None, dtype=jnp.float32,
                 key: PRNGKeyArray):
        kr, ke, ks = jax.random.split(key, 3)
        self.router = (init_std * jax.random.normal(kr, (hidden_size, num_experts))).astype(jnp.float32)
        self.experts = Experts(num_experts, hidden_size, ffn_dim, init_std=init_std,
                               out_init_std=out_init_std, dtype=dtype, key=ke)
        self.shared = (
            MLP(hidden_size, ffn_dim * num_shared_experts, init_std=init_std, out_init_std=out_init_std,
                dtype=dtype, key=ks)
            if num_shared_experts > 0 else None
        )
        # Aux-loss-free balancing: used for expert selection only, never trained
        # (it enters `route` under stop_gradient); see `VishwamAI.update_router_bias`.
        self.selection_bias = jnp.zeros((num_experts,), jnp.float32) if aux_free_bias else None
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_type = router_type
        self.renormalize = renormalize
        self.dispatch = dispatch
        self.capacity_factor = capacity_factor
        self.jitter = jitter
        self.use_fp8 = use_fp8

    def __check_init__(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"MoE: top_k={self.top_k} exceeds num_experts={self.num_experts}.")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"MoE: unknown dispatch {self.dispatch!r}; choose one of {sorted(DISPATCHES)}.")

    def router_logits(self, x: Float[Array, "tokens hidden"], *, key=None, inference=False):
        xf = x.astype(jnp.float32)
        if self.jitter > 0 and key is not None and not inference:
            xf = xf * jax.random.uniform(key, xf.shape, minval=1 - self.jitter, maxval=1 + self.jitter)
        return xf @ self.router

    def __call__(
        self, x: Float[Array, "*batch hidden"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> tuple[Float[Array, "*batch hidden"], dict]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, D)
        logits = self.router_logits(tokens, key=key, inference=inference)
        routing = route(logits, self.top_k, router_type=self.router_type, renormalize=self.renormalize,
                        selection_bias=self.selection_bias)
        y, dropped = DISPATCHES[self.dispatch](tokens, self.experts, routing)
        if self.shared is not None:
            y = y + self.shared(tokens)
        aux = {
            "load_balancing_loss": load_balancing_loss(routing, self.num_experts),
            "router_z_loss": router_z_loss(logits),
            "expert_load": expert_fractions(routing.indices, self.num_experts),
            "dropped_fraction": dropped,
        }
        return y.reshape(shape), aux

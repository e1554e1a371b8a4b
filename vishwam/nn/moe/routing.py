"""Top-k routing and the router's auxiliary losses, as free functions.

`route` follows DeepSeek-V3's order: scores (softmax or sigmoid), plus the selection
bias, limited to the best groups (`group_limited_scores`), top-k; the combine weights
are the unbiased scores of the chosen experts, optionally renormalised, then scaled.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ...errors import InvalidValueError


class Routing(NamedTuple):
    weights: Float[Array, "tokens k"]
    """Combine weights of the chosen experts (fp32)."""
    indices: Int[Array, "tokens k"]
    """Chosen experts, best first."""
    probs: Float[Array, "tokens experts"]
    """Router probabilities over all experts (fp32, rows sum to 1)."""


BALANCE_LOSS_CHOICES = ("switch", "sequence")
"""The load-balancing losses `MoE` can report: `load_balancing_loss`, `sequence_balance_loss`."""


def group_limited_scores(
    selection: Float[Array, "tokens experts"], n_groups: int, topk_groups: int
) -> Float[Array, "tokens experts"]:
    """DeepSeek-V3's group limit: `selection` with every expert outside its token's best
    `topk_groups` groups set to `-inf`.

    The experts are `n_groups` contiguous groups of `experts / n_groups`; a group's score
    is the sum of its two best selection scores (its one score for groups of one). Ties
    go to the lower group index.
    """
    tokens, experts = selection.shape
    grouped = selection.reshape(tokens, n_groups, experts // n_groups)  # (T, G, E/G)
    best_two = jax.lax.top_k(grouped, min(2, experts // n_groups))[0]
    _, groups = jax.lax.top_k(jnp.sum(best_two, axis=-1), topk_groups)  # (T, topk_groups)
    allowed = jnp.zeros((tokens, n_groups), bool).at[jnp.arange(tokens)[:, None], groups].set(True)
    return jnp.where(allowed[:, :, None], grouped, -jnp.inf).reshape(tokens, experts)


def route(
    logits: Float[Array, "tokens experts"],
    k: int,
    *,
    router_type: str = "softmax",
    renormalize: bool = True,
    selection_bias: Float[Array, " experts"] | None = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
) -> Routing:
    """Top-k routing.

    Arguments:
        router_type: `"softmax"` over experts or independent `"sigmoid"`s (whose `probs`
            are the scores divided by their sum).
        renormalize: divide the k weights by their sum (HF `norm_topk_prob`).
        selection_bias: aux-loss-free balancing (DeepSeek's `e_score_correction_bias`):
            added to the scores before the group limit and the top-k, so it shifts which
            experts are chosen but not the combine weights; it carries no gradient.
        n_groups: groups of experts for the group limit (`group_limited_scores`).
        topk_groups: groups eligible per token; `topk_groups == n_groups` (the default
            1 and 1) means no limit.
        routed_scaling_factor: multiplies the combine weights (after renormalising).
    """
    logits = logits.astype(jnp.float32)
    if router_type == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    elif router_type == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        raise InvalidValueError(f"Unknown router_type {router_type!r}; choose 'softmax' or 'sigmoid'.")
    selection = scores if selection_bias is None else scores + jax.lax.stop_gradient(selection_bias)
    if topk_groups < n_groups:
        selection = group_limited_scores(selection, n_groups, topk_groups)
    _, indices = jax.lax.top_k(selection, k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return Routing(weights, indices.astype(jnp.int32), probs)


def expert_fractions(indices: Int[Array, "tokens k"], num_experts: int) -> Float[Array, " experts"]:
    """Fraction of all (token, slot) assignments that go to each expert."""
    counts = jnp.zeros((num_experts,), jnp.float32).at[indices.reshape(-1)].add(1.0)
    return counts / indices.size


def load_balancing_loss(routing: Routing, num_experts: int) -> Float[Array, ""]:
    """Switch-Transformer loss `E * sum_e f_e * P_e`; its minimum, 1, is uniform routing."""
    f = expert_fractions(routing.indices, num_experts)
    p = jnp.mean(routing.probs, axis=0)
    return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def sequence_balance_loss(routing: Routing, num_experts: int, sequences: int) -> Float[Array, ""]:
    """DeepSeek-V3's sequence-wise balance loss (eq. 17-20, without its `alpha`).

    Per sequence of `T` tokens, `sum_i f_i P_i` with `f_i = E / (K T) * (tokens choosing
    expert i)` and `P_i` the mean of its tokens' normalised scores (`routing.probs`): the
    Switch loss of each sequence alone. Averaged over the `sequences` equal, consecutive
    runs of `routing`'s token rows; its minimum, 1, is uniform routing in every sequence.
    """
    per_sequence = Routing(*(a.reshape(sequences, -1, a.shape[-1]) for a in routing))  # (S, T, .)
    return jnp.mean(jax.vmap(load_balancing_loss, in_axes=(0, None))(per_sequence, num_experts))


def router_z_loss(logits: Float[Array, "tokens experts"]) -> Float[Array, ""]:
    """Mean squared log-sum-exp of the router logits (keeps them small)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def combine_matrix(routing: Routing, num_experts: int) -> Float[Array, "tokens experts"]:
    """Dense `[tokens, experts]` matrix of combine weights (zero for unchosen experts)."""
    tokens = routing.indices.shape[0]
    rows = jnp.arange(tokens)[:, None]
    return jnp.zeros((tokens, num_experts), jnp.float32).at[rows, routing.indices].add(routing.weights)

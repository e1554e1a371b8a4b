"""Top-k routing and the router's auxiliary losses, as free functions.

`route` follows DeepSeek-V3's order: scores (softmax or sigmoid), plus the selection
bias, limited to the best groups (`group_limited_scores`), top-k; the combine weights
are the unbiased scores of the chosen experts, optionally renormalised, then scaled.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ...errors import InvalidValueError


class Routing(NamedTuple):
    weights: Float[Array, "tokens k"]
    """Combine weights of the chosen experts (fp32)."""
    indices: Int[Array, "tokens k"]
    """Chosen experts, best first."""
    probs: Float[Array, "tokens experts"]
    """Router probabilities over all experts (fp32, rows sum to 1)."""


BALANCE_LOSS_CHOICES = ("switch", "sequence", "hf")
"""The load-balancing losses `MoE` can report: `load_balancing_loss`, `sequence_balance_loss`,
`pooled_balance_loss` (transformers' definition, over `balance_sums` pooled across layers)."""


CAPACITY_PRIORITIES = ("position", "score")
"""What an expert over capacity keeps first: earlier positions (`position_priority`) or larger
router weights (see `vishwam.parallel.expert.assign_slots`)."""


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


def _masked_mean(values: Float[Array, "tokens ..."], mask: Bool[Array, " tokens"] | None) -> Float[Array, "..."]:
    """Mean over the leading axis of the rows `mask` keeps (all rows for None; 0 if none is kept)."""
    if mask is None:
        return jnp.mean(values, axis=0)
    w = mask.astype(jnp.float32).reshape(-1, *([1] * (values.ndim - 1)))
    kept = jnp.where(w != 0, values * w, 0.0)
    # A mean rescaled by (rows / kept rows), so an all-True mask gives `jnp.mean`'s value exactly.
    return jnp.mean(kept, axis=0) * (values.shape[0] / jnp.maximum(jnp.sum(w), 1.0))


def expert_fractions(
    indices: Int[Array, "tokens k"], num_experts: int, mask: Bool[Array, " tokens"] | None = None
) -> Float[Array, " experts"]:
    """Fraction of all (token, slot) assignments that go to each expert; with `mask`, of
    the kept tokens' assignments only (all zero when no token is kept)."""
    if mask is None:
        counts = jnp.zeros((num_experts,), jnp.float32).at[indices.reshape(-1)].add(1.0)
        return counts / indices.size
    w = mask.astype(jnp.float32)
    counts = jnp.zeros((num_experts,), jnp.float32).at[indices.reshape(-1)].add(jnp.repeat(w, indices.shape[1]))
    return counts / jnp.maximum(jnp.sum(w) * indices.shape[1], 1.0)


def load_balancing_loss(
    routing: Routing, num_experts: int, mask: Bool[Array, " tokens"] | None = None
) -> Float[Array, ""]:
    """Switch-Transformer loss `E * sum_e f_e * P_e` (`f` per assignment); its minimum, 1, is
    uniform routing. With `mask`, `f` and `P` are over the kept tokens only."""
    f = expert_fractions(routing.indices, num_experts, mask)
    p = _masked_mean(routing.probs, mask)
    return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def sequence_balance_loss(
    routing: Routing, num_experts: int, sequences: int, mask: Bool[Array, " tokens"] | None = None
) -> Float[Array, ""]:
    """DeepSeek-V3's sequence-wise balance loss (eq. 17-20, without its `alpha`).

    Per sequence of `T` tokens, `sum_i f_i P_i` with `f_i = E / (K T) * (tokens choosing
    expert i)` and `P_i` the mean of its tokens' normalised scores (`routing.probs`): the
    Switch loss of each sequence alone. Averaged over the `sequences` equal, consecutive
    runs of `routing`'s token rows; its minimum, 1, is uniform routing in every sequence.
    With `mask`, each sequence counts its kept tokens, and sequences without any are left out.
    """
    per_sequence = Routing(*(a.reshape(sequences, -1, a.shape[-1]) for a in routing))  # (S, T, .)
    if mask is None:
        return jnp.mean(jax.vmap(load_balancing_loss, in_axes=(0, None))(per_sequence, num_experts))
    rows = mask.reshape(sequences, -1)  # (S, T)
    losses = jax.vmap(load_balancing_loss, in_axes=(0, None, 0))(per_sequence, num_experts, rows)
    present = jnp.any(rows, axis=-1).astype(jnp.float32)
    return jnp.sum(losses * present) / jnp.maximum(jnp.sum(present), 1.0)


class BalanceSums(NamedTuple):
    """Sums over (kept) tokens from which transformers' load-balancing loss is computed; they add
    across layers, which is how transformers pools every layer's tokens into one loss."""

    counts: Float[Array, " experts"]
    """(token, slot) assignments per expert."""
    probs: Float[Array, " experts"]
    """Router probabilities per expert, summed over tokens (carries the gradient)."""
    tokens: Float[Array, ""]
    """Tokens counted."""


def balance_sums(
    indices: Int[Array, "tokens k"],
    probs: Float[Array, "tokens experts"],
    num_experts: int,
    mask: Bool[Array, " tokens"] | None = None,
) -> BalanceSums:
    """`BalanceSums` of one layer's routing over the tokens `mask` keeps (all for None)."""
    tokens, k = indices.shape
    w = jnp.ones((tokens,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    counts = jnp.zeros((num_experts,), jnp.float32).at[indices.reshape(-1)].add(jnp.repeat(w, k))
    prob_sum = jnp.sum(jnp.where(w[:, None] != 0, probs * w[:, None], 0.0), axis=0)
    return BalanceSums(counts, prob_sum, jnp.sum(w))


def pooled_balance_loss(sums: BalanceSums, num_experts: int) -> Float[Array, ""]:
    """transformers' `load_balancing_loss_func` (Mixtral, Qwen2-MoE, ...):
    `E * sum_e (counts_e / N) * (probs_e / N)`, `N` the tokens counted. The counts sum over the
    top-k slots, so uniform routing gives `k` (the Switch loss's minimum is 1). Pass the
    `BalanceSums` of all layers added up for transformers' value over a whole model."""
    n = jnp.maximum(sums.tokens, 1.0)
    return num_experts * jnp.sum(jax.lax.stop_gradient(sums.counts / n) * (sums.probs / n))


def router_z_loss(
    logits: Float[Array, "tokens experts"], mask: Bool[Array, " tokens"] | None = None
) -> Float[Array, ""]:
    """Mean squared log-sum-exp of the router logits (keeps them small), over the kept tokens."""
    return _masked_mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)), mask)


def router_entropy(
    probs: Float[Array, "tokens experts"], mask: Bool[Array, " tokens"] | None = None
) -> Float[Array, ""]:
    """Mean entropy (nats) of the router's distribution over experts, over the kept tokens:
    `log(experts)` for a router that has not decided, 0 for one sure of a single expert."""
    p = probs.astype(jnp.float32)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return _masked_mean(entropy, mask)


def combine_matrix(routing: Routing, num_experts: int) -> Float[Array, "tokens experts"]:
    """Dense `[tokens, experts]` matrix of combine weights (zero for unchosen experts)."""
    tokens = routing.indices.shape[0]
    rows = jnp.arange(tokens)[:, None]
    return jnp.zeros((tokens, num_experts), jnp.float32).at[rows, routing.indices].add(routing.weights)

"""The MoE layer: router, routed experts through a dispatch, optional (gated) shared experts."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ...errors import InvalidValueError
from ...parallel.expert import expert_capacity, expert_parallel_dispatch, position_priority, use_expert_parallel
from ..mlp import MLP
from .dispatch import (
    DISPATCH_CHOICES,
    DISPATCHES,
    dispatch_capacity,
    dispatch_grouped,
    dispatch_split,
    resolve_dispatch,
)
from .experts import Experts, Fp8Spec, SplitExperts, expert_ffn
from .routing import (
    BALANCE_LOSS_CHOICES,
    CAPACITY_PRIORITIES,
    Routing,
    balance_sums,
    expert_fractions,
    load_balancing_loss,
    pooled_balance_loss,
    route,
    router_entropy,
    router_z_loss,
    sequence_balance_loss,
)


class MoE(eqx.Module):
    """Routed experts (plus optional shared experts) replacing a dense MLP.

    Returns `(y, aux)`, where `aux` holds this layer's `load_balancing_loss`
    (`balance_loss="switch"`: `load_balancing_loss` over all tokens; `"sequence"`:
    `sequence_balance_loss`, each of the input's `[..., seq, hidden]` sequences alone;
    `"hf"`: `pooled_balance_loss`, with this layer's `BalanceSums` as `balance_counts`,
    `balance_probs` and `balance_tokens`, which the model adds over layers),
    `router_z_loss`, `expert_load` (fraction of assignments per expert),
    `dropped_fraction`, `expert_dropped` (each expert's share of the dropped
    assignments, summing to `dropped_fraction`), `router_entropy` (`router_entropy`) and,
    with the aux-free `selection_bias`, that bias as `router_bias`;
    the model averages the losses over layers and the training loss weights them with
    the config's coefficients. A `mask` (`[*batch]`, True for the tokens to count)
    restricts the losses and statistics to those tokens, and in the `capacity` dispatch
    the other tokens (padding) yield capacity to them: under `"score"` they only take what
    the counted tokens leave free, under `"position"` they come after the counted tokens of
    their own position (see `position_priority`; the rule stays causal).

    Routing options (`route`): `router_type`, `renormalize`, the aux-free
    `selection_bias`, DeepSeek-V3's group limit (`n_groups`, `topk_groups`) and
    `routed_scaling_factor`. Shared experts: `num_shared_experts` of width
    `shared_expert_ffn_dim` (default `ffn_dim`) run as one `MLP` on every token; with
    `shared_gate` (Qwen2-MoE) its output is scaled by `sigmoid(x @ shared_gate)`.

    `dispatch` is one of `DISPATCH_CHOICES`; `"auto"` is resolved per call by
    `resolve_dispatch`. `capacity_factor` applies to the `capacity` dispatch in
    training only; `inference=True` always routes dropless. `capacity_priority` says which
    assignments an expert over capacity keeps: `"position"` (earlier positions first, rows
    interleaved: `position_priority` over the input's `[..., seq, hidden]`; a token's fate
    never depends on later tokens of its sequence) or `"score"` (the largest router weights).
    `use_fp8` runs the routed experts' GEMMs in fp8 (`fp8_batched_matmul`, `fp8_matmul`) in the `capacity`
    and `grouped` dispatches and the expert-parallel path, and the shared experts'
    linears in fp8; the `dense` oracle and `ragged` (no fp8 grouped GEMM) stay in
    the compute dtype.
    """

    router: Float[Array, "hidden experts"]
    experts: Experts | SplitExperts
    shared: MLP | None
    shared_gate: Float[Array, "hidden 1"] | None
    selection_bias: Float[Array, " experts"] | None
    num_experts: int = eqx.field(static=True)
    top_k: int = eqx.field(static=True)
    router_type: str = eqx.field(static=True)
    renormalize: bool = eqx.field(static=True)
    n_groups: int = eqx.field(static=True)
    topk_groups: int = eqx.field(static=True)
    routed_scaling_factor: float = eqx.field(static=True)
    balance_loss: str = eqx.field(static=True)
    dispatch: str = eqx.field(static=True)
    capacity_factor: float | None = eqx.field(static=True)
    capacity_priority: str = eqx.field(static=True)
    jitter: float = eqx.field(static=True)
    use_fp8: bool = eqx.field(static=True)
    fp8_scaling: str = eqx.field(static=True)
    fp8_block_size: int = eqx.field(static=True)

    def __init__(self, hidden_size: int, ffn_dim: int, num_experts: int, top_k: int, *,
                 router_type: str = "softmax", renormalize: bool = True, dispatch: str = "auto",
                 capacity_factor: float | None = None, capacity_priority: str = "position", jitter: float = 0.0,
                 num_shared_experts: int = 0, shared_expert_ffn_dim: int | None = None, shared_gate: bool = False,
                 n_groups: int = 1,
                 topk_groups: int = 1, routed_scaling_factor: float = 1.0, balance_loss: str = "switch",
                 aux_free_bias: bool = False, use_fp8: bool = False, fp8_scaling: str = "tensor",
                 fp8_block_size: int = 128, init_std: float = 0.02, out_init_std: float | None = None,
                 dtype=jnp.float32, key: PRNGKeyArray):
        kr, ke, ks = jax.random.split(key, 3)
        self.router = (init_std * jax.random.normal(kr, (hidden_size, num_experts))).astype(jnp.float32)
        self.experts = Experts(num_experts, hidden_size, ffn_dim, init_std=init_std,
                               out_init_std=out_init_std, dtype=dtype, key=ke)
        if shared_gate and num_shared_experts == 0:
            raise InvalidValueError("MoE: shared_gate=True needs shared experts; set num_shared_experts >= 1.")
        if shared_gate:  # a key of its own, so the shared MLP's init is unchanged without the gate
            ks, kg = jax.random.split(ks)
            # Like the router: tiny, read by every token, kept and computed in fp32.
            self.shared_gate = (init_std * jax.random.normal(kg, (hidden_size, 1))).astype(jnp.float32)
        else:
            self.shared_gate = None
        shared_width = num_shared_experts * (ffn_dim if shared_expert_ffn_dim is None else shared_expert_ffn_dim)
        self.shared = (
            MLP(hidden_size, shared_width, use_fp8=use_fp8, fp8_scaling=fp8_scaling,
                fp8_block_size=fp8_block_size, init_std=init_std, out_init_std=out_init_std,
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
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.balance_loss = balance_loss
        self.dispatch = dispatch
        self.capacity_factor = capacity_factor
        self.capacity_priority = capacity_priority
        self.jitter = jitter
        self.use_fp8 = use_fp8
        self.fp8_scaling = fp8_scaling
        self.fp8_block_size = fp8_block_size

    def __check_init__(self):
        if self.top_k > self.num_experts:
            raise InvalidValueError(f"MoE: top_k={self.top_k} exceeds num_experts={self.num_experts}.")
        if self.dispatch not in DISPATCH_CHOICES:
            raise InvalidValueError(f"MoE: unknown dispatch {self.dispatch!r}; choose one of {sorted(DISPATCH_CHOICES)}.")
        if self.capacity_priority not in CAPACITY_PRIORITIES:
            raise InvalidValueError(f"MoE: unknown capacity_priority {self.capacity_priority!r}; choose one of "
                                    f"{list(CAPACITY_PRIORITIES)}.")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise InvalidValueError(f"MoE: capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}.")
        if self.n_groups < 1 or self.num_experts % self.n_groups:
            raise InvalidValueError(f"MoE: n_groups={self.n_groups} must be a positive divisor of num_experts="
                                    f"{self.num_experts}.")
        if not 1 <= self.topk_groups <= self.n_groups:
            raise InvalidValueError(f"MoE: topk_groups={self.topk_groups} must be in [1, n_groups={self.n_groups}].")
        eligible = self.topk_groups * (self.num_experts // self.n_groups)
        if eligible < self.top_k:
            raise InvalidValueError(f"MoE: topk_groups={self.topk_groups} groups of {self.num_experts // self.n_groups} "
                                    f"experts leave {eligible} eligible, fewer than top_k={self.top_k}; raise "
                                    "topk_groups or lower n_groups.")
        if not self.routed_scaling_factor > 0:
            raise InvalidValueError(f"MoE: routed_scaling_factor must be > 0, got {self.routed_scaling_factor}.")
        if self.balance_loss not in BALANCE_LOSS_CHOICES:
            raise InvalidValueError(f"MoE: unknown balance_loss {self.balance_loss!r}; choose one of "
                                    f"{list(BALANCE_LOSS_CHOICES)}.")

    @property
    def fp8(self) -> Fp8Spec | None:
        return Fp8Spec(self.fp8_scaling, self.fp8_block_size) if self.use_fp8 else None

    def router_logits(
        self, x: Float[Array, "tokens hidden"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "tokens experts"]:
        """fp32 router logits; with `jitter > 0`, a training `key` and not `inference`,
        the inputs are scaled by uniform noise in `[1 - jitter, 1 + jitter]`."""
        xf = x.astype(jnp.float32)
        if self.jitter > 0 and key is not None and not inference:
            xf = xf * jax.random.uniform(key, xf.shape, minval=1 - self.jitter, maxval=1 + self.jitter)
        return xf @ self.router

    def routed(
        self, x: Float[Array, "tokens hidden"], routing: Routing, *, rows: int = 1,
        mask: Bool[Array, " tokens"] | None = None, inference: bool = False
    ) -> tuple[Float[Array, "tokens hidden"], Float[Array, " experts"]]:
        """The routed experts' output and each expert's share of the dropped assignments
        (summing to the dropped fraction), by this layer's dispatch, or expert-parallel when
        the current mesh has an `expert` axis > 1. `x` is `rows` sequences, one after the
        other (for `capacity_priority="position"`); the tokens `mask` leaves out (padding) are
        not counted as drops and yield capacity to the others (`assign_slots`,
        `position_priority`)."""
        dispatch = resolve_dispatch(self.dispatch, self.capacity_factor, inference=inference,
                                    use_fp8=self.use_fp8)
        no_drops = jnp.zeros((self.num_experts,), jnp.float32)
        if isinstance(self.experts, SplitExperts):
            if not inference:
                raise InvalidValueError("MoE: split experts (from `split_experts`) are for inference only; train the "
                                        "model with its stacked `Experts`.")
            return dispatch_split(x, self.experts, routing)[0], no_drops
        # `dense`, `ragged` and `grouped` promise no drops, so they never get a finite capacity.
        factor = self.capacity_factor if dispatch == "capacity" and not inference else None
        priority = (position_priority(rows, x.shape[0] // rows, mask)
                    if factor is not None and self.capacity_priority == "position" else None)
        if use_expert_parallel(x.shape[0]):
            e = self.experts
            return expert_parallel_dispatch(
                x, routing.indices, routing.weights, e.gate, e.up, e.down,
                ffn=functools.partial(expert_ffn, fp8=self.fp8), capacity_factor=factor, priority=priority,
                mask=mask, per_expert=True,
            )
        if dispatch == "capacity":
            capacity = expert_capacity(x.shape[0], self.top_k, self.num_experts, factor)
            return dispatch_capacity(x, self.experts, routing, capacity=capacity, priority=priority, mask=mask,
                                     per_expert=True, fp8=self.fp8)
        if dispatch == "grouped":
            return dispatch_grouped(x, self.experts, routing, fp8=self.fp8)[0], no_drops
        return DISPATCHES[dispatch](x, self.experts, routing)[0], no_drops

    def shared_output(self, x: Float[Array, "tokens hidden"]) -> Float[Array, "tokens hidden"]:
        """The shared experts on every token, scaled by `sigmoid(x @ shared_gate)` when gated."""
        y = self.shared(x)
        if self.shared_gate is None:
            return y
        gate = jax.nn.sigmoid(x.astype(jnp.float32) @ self.shared_gate)  # (T, 1)
        return gate.astype(y.dtype) * y

    def __call__(
        self,
        x: Float[Array, "*batch hidden"],
        *,
        mask: Bool[Array, "*batch"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "*batch hidden"], dict]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, D)
        rows = math.prod(shape[:-2])  # sequences of shape[-2] tokens (one for a [T, D] input)
        flat_mask = None if mask is None else mask.reshape(-1)  # (T,)
        with jax.named_scope("moe_route"):
            logits = self.router_logits(tokens, key=key, inference=inference)
            routing = route(logits, self.top_k, router_type=self.router_type, renormalize=self.renormalize,
                            selection_bias=self.selection_bias, n_groups=self.n_groups,
                            topk_groups=self.topk_groups, routed_scaling_factor=self.routed_scaling_factor)
        with jax.named_scope("moe_dispatch"):
            y, expert_dropped = self.routed(tokens, routing, rows=rows, mask=flat_mask, inference=inference)
        if self.shared is not None:
            y = y + self.shared_output(tokens)
        pooled = {}
        if self.balance_loss == "sequence":
            balance = sequence_balance_loss(routing, self.num_experts, rows, flat_mask)
        elif self.balance_loss == "hf":
            sums = balance_sums(routing.indices, routing.probs, self.num_experts, flat_mask)
            balance = pooled_balance_loss(sums, self.num_experts)
            pooled = {"balance_counts": sums.counts, "balance_probs": sums.probs, "balance_tokens": sums.tokens}
        else:
            balance = load_balancing_loss(routing, self.num_experts, flat_mask)
        aux = {
            "load_balancing_loss": balance,
            "router_z_loss": router_z_loss(logits, flat_mask),
            "expert_load": expert_fractions(routing.indices, self.num_experts, flat_mask),
            "dropped_fraction": jnp.sum(expert_dropped),
            "expert_dropped": expert_dropped,
            "router_entropy": router_entropy(routing.probs, flat_mask),
            **({} if self.selection_bias is None else {"router_bias": self.selection_bias}),
            **pooled,
        }
        return y.reshape(shape), aux

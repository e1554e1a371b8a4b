"""One optimiser step as one filtered-jit function; the evaluation step beside it.

The model is any Equinox module following `vishwam.model.LanguageModel` (`VishwamAI` does);
the optimiser any `optax.GradientTransformation` (default: the built-in clip + AdamW).
`make_train_step` returns `step(state, batch) -> (state, metrics)`. Inside one
`eqx.filter_jit` (the state is donated) it splits the batch into `accum_steps`
micro-batches and accumulates gradients over them with `jax.lax.scan`, so only
one micro-batch's activations are alive at a time; runs a frozen teacher in the
same step when distilling; clips, updates with optax, applies the MoE
aux-loss-free bias update, and reports metrics.

Batches are dicts of `[batch, seq]` arrays: `tokens`, `targets` (int32),
`loss_mask` (float32, 0 on padding and document ends), and optionally
`segment_ids` and `positions` (int32; the model derives positions from
segments when `positions` is absent). The MoE statistics (balance and router
z-losses, `expert_load`, the aux-free bias update) count every token but padding,
passed as `token_mask` to a model that accepts it (`padding_mask`): padding is out
of the loss and, with `segment_ids`, in segment 0 (as `vishwam.data` packs it);
document ends, out of the loss too, are real tokens that the router sees.

Mixed precision is the model's policy (parameters in `param_dtype`, matmuls in
`compute_dtype`, logits fp32); losses are fp32 and gradients accumulate in fp32.

Normalisation: every token term is a masked *sum* divided by the token count of
the whole optimiser batch, so accumulating micro-batches gives exactly the
full-batch mean. The MoE losses are batch statistics (the Switch loss is a
product of two batch means); each micro-batch contributes its own value,
averaged over micro-batches.
"""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float

from ..config import ModelConfig, TrainConfig
from ..errors import InvalidTypeError, InvalidValueError
from ..model import VishwamAI
from ..parallel.sharding import rules_for, shard_model
from ._mtp import mtp_loss
from .losses import (
    chunked_distillation,
    chunked_lse_and_target,
    distillation_kl,
    masked_sum,
    model_aux_loss,
    token_cross_entropy,
)
from .optim import learning_rate_schedule, make_optimizer, trainable_mask
from .state import TrainState as TrainState
from .state import init_train_state as init_train_state

REQUIRED_BATCH_KEYS = ("tokens", "targets", "loss_mask")
OPTIONAL_BATCH_KEYS = ("segment_ids", "positions")
EXPERT_STATS = ("expert_load", "dropped_fraction", "expert_dropped", "router_entropy", "router_bias")
"""The MoE statistics the steps pass on from the model's aux (those it has): per MoE layer
`expert_load`, `expert_dropped`, `router_bias` `[layers, experts]`, `router_entropy`
`[layers]`, and the scalar `dropped_fraction` (see `vishwam.nn.moe.MoE`)."""


# --------------------------------------------------------------------- checks
def _check_batch(batch: dict, accum_steps: int) -> None:
    if not isinstance(batch, dict):
        raise InvalidTypeError(f"train step: the batch must be a dict of arrays, got {type(batch).__name__}.")
    missing = [k for k in REQUIRED_BATCH_KEYS if k not in batch]
    unknown = sorted(set(batch) - set(REQUIRED_BATCH_KEYS) - set(OPTIONAL_BATCH_KEYS))
    if missing or unknown:
        raise InvalidValueError(
            f"train step: batch keys {sorted(batch)}: missing {missing}, unknown {unknown}; "
            f"expected {list(REQUIRED_BATCH_KEYS)} and optionally {list(OPTIONAL_BATCH_KEYS)}."
        )
    shape = batch["tokens"].shape
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    if len(shape) != 2 or any(s != shape for s in shapes.values()):
        raise InvalidValueError(f"train step: every batch array must be [batch, seq] of one shape, got {shapes}.")
    if shape[0] % accum_steps:
        raise InvalidValueError(
            f"train step: batch of {shape[0]} rows does not split into accum_steps={accum_steps} "
            "equal micro-batches; make the batch a multiple of accum_steps."
        )


def teacher_logits(teacher, micro: dict) -> Float[Array, "batch seq vocab"]:
    """Logits of a frozen teacher on a (micro-)batch, under `stop_gradient`.

    A `VishwamAI` teacher runs in inference mode (no dropout, no token dropping);
    any other callable is called as `teacher(tokens, segment_ids=..., positions=...)`
    and may return logits or `(logits, aux)`.
    """
    kwargs = dict(segment_ids=micro.get("segment_ids"), positions=micro.get("positions"))
    if isinstance(teacher, VishwamAI):
        out = teacher(micro["tokens"], inference=True, **kwargs)
    else:
        out = teacher(micro["tokens"], **kwargs)
    logits = out[0] if isinstance(out, tuple) else out
    return jax.lax.stop_gradient(logits.astype(jnp.float32))


def teacher_outputs(teacher, micro: dict) -> tuple[Float[Array, "batch seq width"], Float[Array, "hidden vocab"] | None]:
    """What the chunked distillation reads of a frozen teacher, under `stop_gradient`:
    `(final hidden states, head_weight)` for a teacher that fuses its head
    (`vishwam.model.FusedHeadModel`, e.g. `VishwamAI`, run in inference mode where its
    `features` takes `inference`), so its logits never exist as a whole; otherwise
    `(teacher_logits(teacher, micro), None)`."""
    if not fuses_head(teacher):
        return teacher_logits(teacher, micro), None
    kwargs = dict(segment_ids=micro.get("segment_ids"), positions=micro.get("positions"))
    if _accepts(teacher.features, "inference"):
        kwargs["inference"] = True
    out = teacher.features(micro["tokens"], **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    return jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(teacher.head_weight)


def _check_teacher(teacher, model_config: ModelConfig | None, train_config: TrainConfig) -> None:
    """Abstract evaluation only (nothing compiled or allocated)."""
    seq = train_config.seq_len
    probe = {name: jax.ShapeDtypeStruct((1, seq), jnp.int32) for name in ("tokens", "segment_ids", "positions")}
    shape = eqx.filter_eval_shape(teacher_logits, teacher, probe).shape
    vocab = shape[-1] if model_config is None else model_config.vocab_size
    if shape != (1, seq, vocab):
        raise InvalidValueError(
            f"make_train_step: the teacher maps tokens [1, {seq}] to logits {list(shape)}, but the student "
            f"needs [1, {seq}, vocab_size={vocab}]; distillation needs a teacher over the "
            "same vocabulary (same tokenizer)."
        )


# ---------------------------------------------------------------------- train
def _split_micro_batches(x: Array, accum_steps: int) -> Array:
    """`[batch, ...]` -> `[accum_steps, batch // accum_steps, ...]`, micro-batch `a`
    holding rows `a, a + accum_steps, ...`: with the batch sharded over devices in
    contiguous blocks, each micro-batch then keeps every device busy."""
    rows = x.shape[0] // accum_steps
    return x.reshape(rows, accum_steps, *x.shape[1:]).swapaxes(0, 1)  # (A, B/A, ...)


def _forward(model, micro: dict, key, *, inference: bool = False, mtp: bool = False):
    """`model(...)` by the call protocol: `(hidden, aux, fused)` where `fused` says whether
    `hidden` are final hidden states for the fused head (`features` + `head_weight`) or logits.
    `mtp` asks `features` for the multi-token prediction hidden states too."""
    kwargs = dict(segment_ids=micro.get("segment_ids"), positions=micro.get("positions"), key=key,
                  inference=inference)
    if mtp:
        kwargs["mtp"] = True
    fused = fuses_head(model)
    call = model.features if fused else model
    if _accepts(call, "token_mask"):
        kwargs["token_mask"] = ~padding_mask(micro)
    if fused:
        hidden, aux = call(micro["tokens"], **kwargs)
        return hidden, aux, True
    out = call(micro["tokens"], **kwargs)
    logits, aux = out if isinstance(out, tuple) else (out, {})
    return logits, aux, False


def padding_mask(batch: dict) -> Bool[Array, "batch seq"]:
    """True on the padding of a batch: out of the loss and, when the batch has `segment_ids`,
    in segment 0 (so a first document numbered 0 still counts, and a document's end, out of
    the loss, is not padding)."""
    padding = batch["loss_mask"] == 0
    if batch.get("segment_ids") is not None:
        padding = padding & (batch["segment_ids"] == 0)
    return padding


def _accepts(fn, keyword: str) -> bool:
    """Whether `fn` takes the keyword `keyword` by name: the call protocol's optional keywords
    reach only the models that declare them."""
    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def fuses_head(model) -> bool:
    """Whether the step can fuse `model`'s LM head with the loss (`vishwam.model.FusedHeadModel`)."""
    return all(callable(getattr(model, name, None)) for name in ("features", "logits")) and hasattr(model, "head_weight")


def uses_random_key(model_config: ModelConfig | None) -> bool:
    """Whether the model draws randomness in training (dropout, router jitter). A model without
    a `ModelConfig` always gets a key."""
    return model_config is None or model_config.dropout > 0 or model_config.router_jitter > 0


def learning_rate(train_config: TrainConfig, optimizer, opt_state, step) -> Float[Array, ""] | None:
    """The learning rate of the update at `step`: the built-in schedule's, or the `learning_rate`
    hyperparameter of an optimiser built with `optax.inject_hyperparams`; None if unknown."""
    if optimizer is None:
        return learning_rate_schedule(train_config)(step)
    value = optax.tree_utils.tree_get(opt_state, "learning_rate", None)
    return None if value is None else jnp.asarray(value, jnp.float32)


def train_update(model_config: ModelConfig | None, train_config: TrainConfig, *,
                 optimizer: optax.GradientTransformation | None = None):
    """The un-jitted step `update((batch, teacher), state) -> (state, metrics)` that
    `make_train_step` jits (see there for the metrics; `teacher` may be None).
    `vishwam.plan` lowers it from abstract inputs for pods this machine does not have.

    Under a mesh (`jax.set_mesh`) gradients and the new state are constrained to the
    sharding rules' layouts, so parameters and moments come back sharded as they went in.
    """
    accum = train_config.accum_steps
    transform = make_optimizer(train_config) if optimizer is None else optimizer
    alpha, temperature = train_config.distill_alpha, train_config.distill_temperature
    z_coef = train_config.z_loss_coef
    chunk = train_config.loss_chunk_size
    # Without dropout or jitter a key changes nothing but adds RNG code to compile.
    uses_key = uses_random_key(model_config)
    use_mtp = model_config is not None and model_config.mtp_depth > 0

    def update(inputs, state: TrainState):
        batch, teacher = inputs
        params, static = eqx.partition(state.model, trainable_mask(state.model, train_config))
        key, step_key = jax.random.split(state.key)
        num_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        normalizer = jnp.maximum(num_tokens, 1.0)

        def loss_fn(params, micro, micro_key):
            model = eqx.combine(params, static)
            mask = micro["loss_mask"]
            zero = jnp.zeros((), jnp.float32)
            out, aux, fused = _forward(model, micro, micro_key if uses_key else None, mtp=use_mtp)
            if teacher is None:
                with jax.named_scope("lm_head"):  # fused with the loss: see _token_nll
                    nll, lse = _token_nll(model, out, fused, micro["targets"], chunk)
                with jax.named_scope("loss"):
                    distill = zero
                    ce = masked_sum(nll, mask) / normalizer
                    main = ce
            else:
                with jax.named_scope("lm_head"):  # fused with the loss and the KL: see _token_nll_and_kl
                    nll, lse, kl = _token_nll_and_kl(model, out, fused, teacher, micro, temperature, chunk)
                with jax.named_scope("loss"):
                    ce = masked_sum(nll, mask) / normalizer
                    distill = temperature**2 * masked_sum(kl, mask) / normalizer
                    main = alpha * ce + (1.0 - alpha) * distill
            with jax.named_scope("loss"):
                z = z_coef * masked_sum(jnp.square(lse), mask) / normalizer if z_coef else zero
                aux_loss = model_aux_loss(aux, model_config) / accum
                loss = main + z + aux_loss
            terms = dict(loss=loss, ce=ce, z=z, distill=distill, aux=aux_loss)
            if use_mtp:
                with jax.named_scope("mtp"):
                    mtp, mtp_aux = mtp_loss(model, aux, micro, normalizer, chunk)
                terms.update(mtp=mtp, aux=aux_loss + mtp_aux / accum,
                             mtp_expert_load=aux["mtp"]["expert_load"].astype(jnp.float32) / accum)
                terms["loss"] = loss = loss + mtp + mtp_aux / accum
            for name in EXPERT_STATS:
                if name in aux:
                    terms[name] = aux[name].astype(jnp.float32) / accum
            return loss, terms

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        micro_batches = jax.tree.map(lambda x: _split_micro_batches(x, accum), batch)
        micro_keys = jax.random.split(step_key, accum)

        def accumulate(carry, xs):
            (_, terms), grads = grad_fn(params, *xs)
            return jax.tree.map(lambda a, b: a + b.astype(a.dtype), carry, (grads, terms)), None

        first = jax.tree.map(lambda x: x[0], (micro_batches, micro_keys))
        if accum == 1:  # no fp32 accumulators to fill with zeros and add into
            (_, terms), grads = grad_fn(params, *first)
            terms = jax.tree.map(lambda t: t.astype(jnp.float32), terms)
        else:
            _, term_shapes = jax.eval_shape(lambda: loss_fn(params, *first))
            zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zero_terms = jax.tree.map(lambda t: jnp.zeros(t.shape, jnp.float32), term_shapes)
            (grads, terms), _ = jax.lax.scan(accumulate, (zero_grads, zero_terms), (micro_batches, micro_keys))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty:
            # Gradients, moments and new parameters stay in the parameters' shardings (the
            # rules of `vishwam.parallel.sharding`), whatever the compiler would pick.
            grads = shard_model(grads, mesh, rules_for(state.model))

        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = transform.update(grads, state.opt_state, params)
            model = eqx.combine(optax.apply_updates(params, updates), static)
        if model_config is not None and model_config.aux_free_bias:
            model = model.update_router_bias(terms["expert_load"], terms.get("mtp_expert_load"))
        new_state = TrainState(model, opt_state, state.step + 1, key)

        nonfinite = ~(jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm))
        if train_config.nan_policy == "skip":
            new_state = _keep_old_if(nonfinite, state, new_state)
        if not mesh.empty:
            new_state = shard_model(new_state, mesh, rules_for(state.model))
        metrics = dict(terms, grad_norm=grad_norm, tokens=num_tokens, nonfinite=nonfinite)
        if "expert_load" in terms:
            metrics.update(_load_max(terms["expert_load"]))
        rate = learning_rate(train_config, optimizer, state.opt_state, state.step)
        if rate is not None:
            metrics["learning_rate"] = rate
        return new_state, metrics

    return update


def make_train_step(
    model_config: ModelConfig | None,
    train_config: TrainConfig,
    *,
    teacher=None,
    optimizer: optax.GradientTransformation | None = None,
    max_traces: int | None = None,
):
    """Build `step(state, batch) -> (state, metrics)`: one `eqx.filter_jit`, state donated.

    Arguments:
        model_config: the student's config (must equal `state.model.config`), or None for a
            model without a `ModelConfig` (any module following `vishwam.model.LanguageModel`).
        train_config: schedule, accumulation, loss weights, NaN policy, and the optimiser
            unless `optimizer` is given; `trainable` / `frozen` pick the parameters that train.
        optimizer: any `optax.GradientTransformation` (the state must come from
            `init_train_state(..., optimizer=optimizer)`); default the built-in clip + AdamW.
        teacher: frozen teacher for distillation (a `VishwamAI` or any callable
            returning logits over the same vocabulary); checked abstractly here,
            before anything compiles. It is a jit argument, not a baked constant.
            With `loss_chunk_size` set the KL is chunked with the student's fused head
            (`chunked_distillation`), from a fused teacher's hidden states and head
            (`teacher_outputs`): neither model's `[batch, seq, vocab]` logits exist.
        max_traces: fail (via `eqx.debug.assert_max_traces`) if the step is
            traced more often than this; `None` = no limit.

    Returns:
        `step`, with `step.lower(state, batch)` giving its `jax.stages.Lowered` (for
        `.compile().memory_analysis()`, or the HLO text). Its metrics (fp32 scalars unless noted): `loss` (what was
        differentiated: `ce`, or `alpha*ce + (1-alpha)*distill` with a teacher,
        plus `z` plus `aux`), `ce`, `distill` (`T**2 * KL`, 0 without teacher),
        `z` (weighted logit z-loss), `aux` (weighted MoE losses), `mtp` (the weighted multi-token
        prediction loss, only when `model_config.mtp_depth > 0`; included in `loss`, and its blocks'
        MoE losses in `aux`) with `mtp_expert_load` `[mtp MoE blocks, experts]`, `grad_norm`
        (before clipping), `learning_rate` (of this update; with a custom optimiser only
        when built with `optax.inject_hyperparams`), `tokens` (loss-mask sum),
        the MoE statistics of `EXPERT_STATS` the model's aux has (over the tokens that are not
        padding; means over micro-batches) with `expert_load_max` (the busiest expert's load
        over the uniform load, of any layer), and
        `nonfinite` (bool: loss or gradients had a NaN/inf; with
        `nan_policy="skip"` the returned state is then the input state unchanged).
    """
    accum = train_config.accum_steps
    if teacher is not None:
        _check_teacher(teacher, model_config, train_config)
    update = train_update(model_config, train_config, optimizer=optimizer)
    if max_traces is not None:
        update = eqx.debug.assert_max_traces(update, max_traces=max_traces)
    compiled = eqx.filter_jit(update, donate="all-except-first")

    def check(state: TrainState, batch: dict) -> None:
        if model_config is not None and getattr(state.model, "config", model_config) != model_config:
            raise InvalidValueError(
                "train step: state.model.config differs from the step's model_config in "
                f"{state.model.config.diff(model_config)} (state, step); build the step with the model's config."
            )
        _check_batch(batch, accum)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        check(state, batch)
        return compiled((batch, teacher), state)

    def lower(state: TrainState, batch: dict) -> jax.stages.Lowered:
        # The executable compiled from this is the one `step` then runs (JAX caches it), so
        # `step.lower(state, batch).compile().memory_analysis()` costs no second compile.
        check(state, batch)
        return compiled.lower((batch, teacher), state).lowered

    step.lower = lower
    return step


def _token_nll(model, out, fused: bool, targets, chunk: int | None):
    """Per-position `-log p(target)` and `logsumexp(logits)`: from final hidden states, fused
    with the head and chunked over positions when `chunk` is set (else from full logits);
    or from the logits a model without `features` returned."""
    if fused and chunk is not None:
        lse, target_logit = chunked_lse_and_target(out, model.head_weight, targets, chunk)
        return lse - target_logit, lse
    logits = model.logits(out) if fused else out.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return token_cross_entropy(logits, targets), lse


def _token_nll_and_kl(model, out, fused: bool, teacher, micro: dict, temperature: float, chunk: int | None):
    """`_token_nll` plus the per-position `distillation_kl` against the teacher. With a fused
    student head and `chunk` set, chunk by chunk (`chunked_distillation`): from the teacher's
    final hidden states and head when it fuses its head too (`teacher_outputs`), else from its
    logits; without `chunk`, or for a student that returns logits, from full logits."""
    if fused and chunk is not None:
        teacher_out, teacher_head = teacher_outputs(teacher, micro)
        lse, target_logit, kl = chunked_distillation(out, model.head_weight, micro["targets"], teacher_out,
                                                     temperature, chunk, teacher_head=teacher_head)
        return lse - target_logit, lse, kl
    logits = model.logits(out) if fused else out.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    kl = distillation_kl(logits, teacher_logits(teacher, micro), temperature)
    return token_cross_entropy(logits, micro["targets"]), lse, kl


def _load_max(expert_load: Float[Array, "layers experts"]) -> dict:
    """`expert_load_max`: the busiest expert's share of its layer's assignments, in units of the
    uniform share (1 = balanced); nothing for a model without MoE layers."""
    if expert_load.size == 0:
        return {}
    return {"expert_load_max": jnp.max(expert_load) * expert_load.shape[-1]}


def _keep_old_if(pred: Bool[Array, ""], old: TrainState, new: TrainState) -> TrainState:
    """`old` where `pred`, else `new`, selected on device (no host sync)."""
    old_arrays, static = eqx.partition(old, eqx.is_array)
    new_arrays, _ = eqx.partition(new, eqx.is_array)
    chosen = jax.lax.cond(pred, lambda o, n: o, lambda o, n: n, old_arrays, new_arrays)
    return eqx.combine(chosen, static)


# ----------------------------------------------------------------------- eval
def make_eval_step(model_config: ModelConfig | None, loss_chunk_size: int | None = None):
    """Build `eval_step(model, batch) -> metrics`, jitted, no gradients.

    The model runs in inference mode (no dropout, MoE drops no tokens); with
    `loss_chunk_size` the head and loss are fused as in the train step. Metrics:
    `loss` (masked mean CE), `perplexity` (`exp(loss)`), `tokens` and `nll_sum`
    (so a runner can average over many batches: `sum(nll_sum) / sum(tokens)`), and, as in
    the train step, the MoE statistics of `EXPERT_STATS` the model reports (over the
    tokens that are not padding) with `expert_load_max`.
    """

    @eqx.filter_jit
    def evaluate(model, batch: dict) -> dict:
        out, aux, fused = _forward(model, batch, None, inference=True)
        nll, _ = _token_nll(model, out, fused, batch["targets"], loss_chunk_size)
        nll_sum = masked_sum(nll, batch["loss_mask"])
        tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        loss = nll_sum / jnp.maximum(tokens, 1.0)
        stats = {name: aux[name].astype(jnp.float32) for name in EXPERT_STATS if name in aux}
        if "expert_load" in stats:
            stats.update(_load_max(stats["expert_load"]))
        return dict(loss=loss, perplexity=jnp.exp(loss), tokens=tokens, nll_sum=nll_sum, **stats)

    def eval_step(model, batch: dict) -> dict:
        if model_config is not None and getattr(model, "config", model_config) != model_config:
            raise InvalidValueError(
                f"eval step: model.config differs from the step's model_config in "
                f"{model.config.diff(model_config)} (model, step); build the step with the model's config."
            )
        _check_batch(batch, 1)
        return evaluate(model, batch)

    return eval_step

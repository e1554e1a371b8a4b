"""The call protocol the train and eval steps, the trainer and distillation rely on.

Any Equinox module with this `__call__` trains through `vishwam.train` (`make_train_step`,
`init_train_state`, `VishwamAITrainer`); `VishwamAI` is one. A model that also has
`features`, `logits` and `head_weight` (`FusedHeadModel`) lets the step fuse the LM head with
the loss, chunked over positions, so `[batch, seq, vocab]` logits never exist.
`model_config_of`, `describe_model` and `flops_per_token` say what the trainer needs to know
of any such model (its config if it has one, what identifies it on resume, its FLOPs).
"""

import math
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..arrays import is_array_like
from ..config import ModelConfig
from .flops import model_flops_per_token


@runtime_checkable
class LanguageModel(Protocol):
    """`model(tokens, *, segment_ids=None, positions=None, key=None, inference=False)
    -> (logits, aux)`.

    `tokens`, `segment_ids` (packed documents: attention must not cross a change of id) and
    `positions` are int32 `[batch, seq]`; `key` is None at evaluation and a PRNG key in
    training (dropout); `inference=True` at evaluation. `logits` are `[batch, seq, vocab]`;
    `aux` is a dict, possibly empty: an `aux_loss` scalar in it is added to the training loss,
    and `expert_load` / `dropped_fraction` (MoE) are reported as metrics. The model may ignore
    any keyword it has no use for, but must accept them all. Optional: a model (or its
    `features`) that declares a `token_mask` keyword gets True on the batch's tokens that are
    not padding (`vishwam.train.step.padding_mask`) for its statistics (`VishwamAI`'s MoE aux).
    """

    def __call__(self, tokens: Int[Array, "batch seq"], *, segment_ids: Int[Array, "batch seq"] | None = None,
                 positions: Int[Array, "batch seq"] | None = None, key: PRNGKeyArray | None = None,
                 inference: bool = False) -> tuple[Float[Array, "batch seq vocab"], dict[str, Any]]: ...


@runtime_checkable
class FusedHeadModel(LanguageModel, Protocol):
    """A `LanguageModel` whose call is `logits(features(...))`: then the step computes the loss
    from `features` and `head_weight` chunk by chunk (`TrainConfig.loss_chunk_size`)."""

    @property
    def head_weight(self) -> Float[Array, "hidden vocab"]: ...

    def features(self, tokens: Int[Array, "batch seq"], *, segment_ids: Int[Array, "batch seq"] | None = None,
                 positions: Int[Array, "batch seq"] | None = None, key: PRNGKeyArray | None = None,
                 inference: bool = False) -> tuple[Float[Array, "batch seq hidden"], dict[str, Any]]: ...

    def logits(self, hidden: Float[Array, "*batch hidden"]) -> Float[Array, "*batch vocab"]: ...


def model_config_of(model: Any) -> ModelConfig | None:
    """`model.config` when it is a `ModelConfig` (a `VishwamAI`), else None."""
    config = getattr(model, "config", None)
    return config if isinstance(config, ModelConfig) else None


def describe_model(model: Any) -> dict[str, Any]:
    """What identifies a model's arithmetic in a run's config: its `ModelConfig`, or for any
    other module its class and every array's path, shape and dtype."""
    config = model_config_of(model)
    if config is not None:
        return config.to_dict()
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model, is_array_like))
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "arrays": {jax.tree_util.keystr(path): [list(x.shape), str(x.dtype)] for path, x in leaves}}


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: `model_flops_per_token` for a `VishwamAI`; for any other model
    `6 N` with `N` its floating-point parameters (an estimate: attention not counted)."""
    config = model_config_of(model)
    if config is not None:
        return model_flops_per_token(config, seq_len)
    arrays = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    return 6.0 * sum(math.prod(x.shape) for x in arrays)

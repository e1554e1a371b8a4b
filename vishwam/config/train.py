"""`TrainConfig`: everything that fixes one optimisation step."""

import dataclasses
import re
import typing
from typing import Literal

from ..errors import InvalidValueError
from ._parsing import JsonConfig

NanPolicy = Literal["stop", "skip"]
LrSchedule = Literal["cosine", "wsd", "linear", "constant"]


@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Everything that fixes one optimisation step: optimiser, schedule, batch, losses.

    `batch_size` is the global batch of one optimiser step; it is split into
    `accum_steps` micro-batches of `batch_size // accum_steps` rows each.
    """

    learning_rate: float = 3e-4
    """Peak learning rate, reached at the end of the warm-up."""
    warmup_steps: int = 100
    """Optimiser steps of linear warm-up from `learning_rate / warmup_steps` to the peak."""
    total_steps: int = 10000
    """Length of the whole schedule (warm-up included); the cosine decay ends here at
    `learning_rate * min_lr_ratio` and stays there afterwards."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    lr_schedule: str = "cosine"
    """After the warm-up: `cosine` (to `learning_rate * min_lr_ratio` at `total_steps`),
    `linear` (the same end, in a straight line), `wsd` (warm-up, stable at the peak, then a
    linear decay over the last `decay_fraction` of `total_steps`) or `constant` (the peak)."""
    decay_fraction: float = 0.2
    """`wsd` only: the fraction of `total_steps` spent decaying at the end."""
    trainable: str | None = None
    """A regular expression over parameter paths (`stages.0.blocks.0.mlp.router`, `embed`, ...):
    only the parameters whose path it finds train; `None` trains all. Frozen parameters
    get no optimiser state and no update."""
    frozen: str | None = None
    """A regular expression over parameter paths: parameters whose path it finds do not
    train (applied after `trainable`), e.g. `^embed$`."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay on matrices; never on norms, biases or vectors."""
    decay_embeddings: bool = False
    """Also decay the token embedding (the LM head is a matrix and always decayed)."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    grad_clip: float | None = 1.0
    """Clip gradients to this global L2 norm; `None` disables clipping."""
    accum_steps: int = 1
    """Micro-batches per optimiser step (gradient accumulation, `lax.scan`)."""
    batch_size: int = 8
    """Sequences per optimiser step, over all micro-batches and devices."""
    seq_len: int = 256
    """Tokens per sequence."""
    z_loss_coef: float = 0.0
    """Weight of the logit z-loss, mean of `logsumexp(logits)**2` over unmasked tokens
    (PaLM uses 1e-4; 0 = off)."""
    distill_alpha: float = 0.5
    """With a teacher: loss = `alpha * CE + (1 - alpha) * T**2 * KL(teacher || student)`."""
    distill_temperature: float = 2.0
    """Softmax temperature `T` of the distillation KL."""
    seed: int = 0
    """Seed of the training PRNG key (dropout, router jitter) and of the model init."""
    loss_chunk_size: int | None = 512
    """Sequence positions per chunk of the fused LM head + cross-entropy
    (`vishwam.train.losses.chunked_lse_and_target`): the train and eval steps never hold
    more than `[batch, chunk, vocab]` logits. `None` = one `[batch, seq, vocab]` logits
    array. Distillation chunks its KL the same way (`chunked_distillation`)."""
    nan_policy: NanPolicy = "stop"
    """On a non-finite loss or gradient: `stop` applies the step and only reports it
    (the runner decides what to do); `skip` leaves the whole train state unchanged."""

    def __post_init__(self):
        def fail(field: str, message: str):
            raise InvalidValueError(f"TrainConfig.{field}: {message}")

        self._check_types()

        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            fail("warmup_steps", f"must be a non-negative integer, got {self.warmup_steps!r}.")
        for name in ("total_steps", "accum_steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}.")
        if self.loss_chunk_size is not None and (not isinstance(self.loss_chunk_size, int)
                                                 or isinstance(self.loss_chunk_size, bool)
                                                 or self.loss_chunk_size <= 0):
            fail("loss_chunk_size", f"must be a positive integer or None (unchunked), got {self.loss_chunk_size!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            fail("seed", f"must be an integer, got {self.seed!r}.")
        if self.warmup_steps >= self.total_steps:
            fail("warmup_steps", f"{self.warmup_steps} leaves no decay before total_steps={self.total_steps}; "
                 "make total_steps larger than warmup_steps.")
        if self.batch_size % self.accum_steps:
            fail("accum_steps", f"batch_size={self.batch_size} is not divisible by accum_steps={self.accum_steps}; "
                 "choose a divisor of batch_size.")
        if not self.learning_rate > 0:
            fail("learning_rate", f"must be > 0, got {self.learning_rate}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}.")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, f"must be in [0, 1), got {getattr(self, name)}.")
        if not self.eps > 0:
            fail("eps", f"must be > 0, got {self.eps}.")
        for name in ("weight_decay", "z_loss_coef"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            fail("grad_clip", f"must be > 0 or None (no clipping), got {self.grad_clip}.")
        if not 0.0 <= self.distill_alpha <= 1.0:
            fail("distill_alpha", f"must be in [0, 1], got {self.distill_alpha}.")
        if not self.distill_temperature > 0:
            fail("distill_temperature", f"must be > 0, got {self.distill_temperature}.")
        if self.lr_schedule not in LrSchedule.__args__:
            fail("lr_schedule", f"unknown value {self.lr_schedule!r}; choose one of "
                 f"{', '.join(map(repr, LrSchedule.__args__))}.")
        if not 0.0 < self.decay_fraction <= 1.0:
            fail("decay_fraction", f"must be in (0, 1], got {self.decay_fraction}.")
        for name in ("trainable", "frozen"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as error:
                    fail(name, f"{pattern!r} is not a regular expression ({error}); write e.g. 'mlp\\.router'.")
        if self.nan_policy not in NanPolicy.__args__:
            fail("nan_policy", f"unknown value {self.nan_policy!r}; choose one of "
                 f"{', '.join(map(repr, NanPolicy.__args__))}.")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.accum_steps


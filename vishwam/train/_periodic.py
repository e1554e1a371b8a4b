"""The training loop's periodic work: evaluations, and checkpoint saves with their events.

`evaluate` runs one pass of the validation loader (token-weighted mean NLL and its
perplexity); a stop signal ends it at the next batch, and a partial pass is no result.
`CheckpointSaves` starts saves and records each one's `checkpoint` event only once orbax
has committed it (an asynchronous save is logged when it completes, not when it starts).
"""

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

from ..arrays import partition_arrays
from ..errors import InvalidValueError
from .checkpoint import Checkpointer


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation: `val_loss` is None when a stop signal ended it early."""

    batches: int
    tokens: float = 0.0
    val_loss: float | None = None
    val_perplexity: float | None = None
    seconds: float = 0.0
    expert_stats: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """The eval step's per-layer MoE statistics (`expert_load`, `router_entropy`, ...),
    token-weighted means over the batches."""


def evaluate(eval_step: Callable, model: Any, loader: Iterable, place_batch: Callable, *,
             max_batches: int | None, stop_requested: Callable[[], bool]) -> Evaluation:
    """The validation loss of `model` over `loader` (reset first when it has `reset()`),
    at most `max_batches` batches (None: all)."""
    if hasattr(loader, "reset"):
        loader.reset()
    nll, tokens, batches = 0.0, 0.0, 0
    weighted: dict[str, Any] = {}  # per-layer statistic * batch tokens, summed on device
    started = time.perf_counter()
    for batch in loader:
        if max_batches is not None and batches >= max_batches:
            break
        if stop_requested():
            # A part of the validation set is not the validation loss.
            return Evaluation(batches)
        out = eval_step(model, place_batch(batch))
        nll, tokens, batches = nll + out["nll_sum"], tokens + out["tokens"], batches + 1
        for name, value in out.items():
            if getattr(value, "ndim", 0) > 0:
                weighted[name] = weighted.get(name, 0.0) + value * out["tokens"]
    if batches == 0:
        raise InvalidValueError("VishwamAITrainer: the eval loader yielded no batch; pass eval_loader=None to "
                                "train without evaluation, or give it validation data.")
    (nll, tokens), weighted = jax.device_get(((nll, tokens), weighted))
    nll, tokens = float(nll), float(tokens)
    loss = nll / max(tokens, 1.0)
    stats = {name: np.asarray(value, np.float64) / max(tokens, 1.0) for name, value in weighted.items()}
    return Evaluation(batches, tokens, loss, math.exp(min(loss, 700.0)), time.perf_counter() - started, stats)


class CheckpointSaves:
    """Saves of one `train()` call and their events: `checkpoint_started` (to the callbacks)
    when a save begins, the recorded `checkpoint` event once orbax has committed it."""

    def __init__(self, ckpt: Checkpointer, directory: Path, *,
                 emit: Callable[[str, int, Mapping[str, Any]], None],
                 record: Callable[[int, str, Mapping[str, Any]], None]):
        self.ckpt = ckpt
        self.directory = directory
        self.emit = emit
        self.record = record
        self.uncommitted: list[tuple[int, dict[str, Any]]] = []  # saves started, not yet logged

    def start(self, step: int, state: PyTree, meta: Mapping[str, Any]) -> bool:
        """Start saving `state`'s arrays as `step`; False when `step` is already the latest checkpoint."""
        arrays, _ = partition_arrays(state)
        if not self.ckpt.save(step, arrays, meta):
            return False
        detail = {"directory": str(self.directory / str(step))}
        self.emit("checkpoint_started", step, detail)
        self.uncommitted.append((step, detail))
        return True

    def log_committed(self) -> None:
        """Record the `checkpoint` event of saves orbax has finished (all of them, or none yet)."""
        if self.uncommitted and not self.ckpt.saving():
            for step, detail in self.uncommitted:
                self.record(step, "checkpoint", detail)
            self.uncommitted.clear()

"""Hooks: what the training loop runs around its steps, built in or added with `add_hook`.

`VishwamAITrainer.add_hook(fn, every=N)` calls `fn(info)` after every N-th step with a
`StepInfo`: the step, that step's metrics as Python floats, the state after it, and `info.run`
(`RunControl`) to log more values into the run's DuckDB, record an event, print a note, or
ask the run to stop cleanly (final checkpoint, as on SIGTERM). A hook added with
`state=False` gets no state and runs one step behind the device (no wait for the step to
finish); one that needs the state makes the loop wait for its steps, as evaluation does.
Evaluation, checkpoints, the profiler window, logging and the progress bar are hooks of the
same kind inside the trainer; `TensorBoardHook` and `WandbHook` send the metrics to those
trackers (DuckDB stays the record).
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import InvalidValueError


@runtime_checkable
class RunControl(Protocol):
    """What a hook may do to its run."""

    run_dir: Path

    def log(self, values: Mapping[str, float]) -> None:
        """Record more metric values at this step (same DuckDB table, same names rules)."""

    def event(self, kind: str, detail: Mapping[str, Any]) -> None:
        """Record an event (a JSON-able detail) at this step."""

    def note(self, text: str) -> None:
        """Print a line on process 0 (above the progress bar)."""

    def stop(self, reason: str) -> None:
        """Stop after this step: a final checkpoint, the `stop` event, status `stopped`. Every
        process must ask alike (hooks see the same metrics on every process)."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook sees after step `step` (1-based, as numbered in the metrics)."""

    step: int
    metrics: dict[str, float]
    """The step's metrics: loss, ce, grad_norm, learning_rate, tokens, step_time, ... (floats)."""
    state: Any
    """The `TrainState` after the step; None for hooks added with `state=False`."""
    run: RunControl


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(info)` after the steps where `due(step)` holds; `state`: whether it needs the state."""

    fn: Callable[[StepInfo], None]
    due: Callable[[int], bool]
    state: bool = True
    name: str = ""


def every(n: int) -> Callable[[int], bool]:
    """`due` for every n-th step (n >= 1)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidValueError(f"add_hook: every must be a positive integer, got {n!r}.")
    return lambda step: step % n == 0


class TensorBoardHook:
    """Write every finite metric as a TensorBoard scalar (tensorboardX) under `logdir`
    (default `run_dir/tensorboard`). Add it with `state=False`: it needs no state."""

    def __init__(self, logdir: str | Path | None = None, *, flush_secs: int = 30):
        self.logdir = logdir
        self.flush_secs = flush_secs
        self.writer = None

    def __call__(self, info: StepInfo) -> None:
        if self.writer is None:
            from tensorboardX import SummaryWriter

            logdir = self.logdir if self.logdir is not None else info.run.run_dir / "tensorboard"
            self.writer = SummaryWriter(str(logdir), flush_secs=self.flush_secs)
        for name, value in info.metrics.items():
            if math.isfinite(value):
                self.writer.add_scalar(name, value, info.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbHook:
    """Log every metric to Weights & Biases (`wandb.init(**init_kwargs)` on the first call).
    Needs `pip install wandb`; the constructor says so when it is missing."""

    def __init__(self, **init_kwargs: Any):
        try:
            import wandb
        except ImportError:
            raise ImportError("WandbHook needs the wandb package: pip install wandb") from None
        self.wandb = wandb
        self.init_kwargs = init_kwargs
        self.started = False

    def __call__(self, info: StepInfo) -> None:
        if not self.started:
            self.wandb.init(**{"dir": str(info.run.run_dir), **self.init_kwargs})
            self.started = True
        self.wandb.log(dict(info.metrics), step=info.step)

    def close(self) -> None:
        if self.started:
            self.wandb.finish()
            self.started = False

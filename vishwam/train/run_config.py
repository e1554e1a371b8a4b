"""How a training run is driven and what it returns: `RunConfig`, `TrainResult`, `TrainingDiverged`.

`RunConfig` holds the settings that never change the numbers a step computes (directories,
intervals, mesh, resume mode), so they may change when a run resumes; its `__post_init__`
is the one validation of them. `check_seq_len` is the one check that a `TrainConfig`'s
sequences fit the model.
"""

import dataclasses
from pathlib import Path
from typing import Any

from ..config import ModelConfig, TrainConfig
from ..errors import InvalidValueError
from .state import TrainState

_RESUME_MODES = ("auto", "require", "never")
_DB_LOCKED_MODES = ("raise", "fallback")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a training run is driven: where it writes, how often it evaluates and saves.

    Nothing here changes the numbers a step computes, so these may change when a
    run resumes (the `TrainConfig` and `ModelConfig` may not).
    """

    run_dir: str = "runs/default"
    """Directory of the run: `metrics.duckdb`, `checkpoints/`, `tokenizer/`, `config.json`, `pipeline/`."""
    run_name: str | None = None
    """Run id in the metrics database; `None` = the name of `run_dir`."""
    max_steps: int | None = None
    """Stop after this many steps (batches); `None` = `TrainConfig.total_steps`."""
    eval_every: int = 100
    """Evaluate every this many steps (and before the first and after the last); 0 = only then."""
    eval_batches: int | None = None
    """Validation batches per evaluation; `None` = the whole validation set."""
    checkpoint_every: int = 500
    """Checkpoint every this many steps (and at the end, and on SIGTERM/SIGINT); 0 = only then."""
    keep_checkpoints: int = 3
    """Most recent checkpoints kept on disk."""
    async_checkpoint: bool = True
    """Write checkpoints in a background thread (training continues meanwhile)."""
    log_every: int = 10
    """Refresh the progress bar's loss/throughput and record memory (`MEMORY_METRICS`)
    every this many steps and at the last (the other metrics go to DuckDB every step)."""
    flush_every: int = 100
    """Write buffered metric rows to DuckDB every this many steps (and before every checkpoint)."""
    resume: str = "auto"
    """`auto`: resume from the latest checkpoint if there is one; `require`: fail if there
    is none; `never`: delete the run's checkpoints and metric rows and start afresh."""
    mesh: dict[str, int] | None = None
    """Device mesh axis sizes (`data`, `fsdp`, `expert`, `tensor`; one may be -1 = the
    rest). Without -1 the first `prod(sizes)` devices are used. `None`: one device, or
    all devices on `data` when there are several."""
    nan_max_consecutive_skips: int = 20
    """With `nan_policy="skip"`: give up (`TrainingDiverged`) after this many non-finite steps in a row."""
    peak_flops: float | None = None
    """Peak FLOP/s of all devices together, for the MFU estimate; `None` = a table of
    accelerators, or a short matmul measurement on CPU."""
    on_db_locked: str = "raise"
    """Another process holds `metrics.duckdb`: `raise` a clear error before training, or
    `fallback` to a separate file beside it."""
    progress: bool = True
    """Show the tqdm progress bar (process 0 only)."""
    export_pipeline: bool = True
    """At the end, save `run_dir/pipeline/` (`VishwamAIPipeline.save`) on a single-process run."""
    handle_signals: bool = True
    """Turn SIGTERM/SIGINT into a checkpoint and a clean stop (main thread only)."""
    profile_steps: tuple[int, int] | None = None
    """`(START, STOP)`: trace steps START through STOP (1-based, as numbered in `metrics`)
    with `jax.profiler` into `run_dir/profile/` (TensorBoard's profile plugin, or the
    `perfetto_trace.json.gz` in ui.perfetto.dev); those steps are left out of the
    throughput figures. A call that resumes past START traces nothing. `None`: no trace."""

    def __post_init__(self):
        def fail(field: str, message: str):
            raise InvalidValueError(f"RunConfig.{field}: {message}")

        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            fail("max_steps", f"must be a positive integer or None, got {self.max_steps!r}.")
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                fail(name, f"must be an integer >= 0 (0 = only at start/end), got {value!r}.")
        for name in ("keep_checkpoints", "log_every", "flush_every", "nan_max_consecutive_skips"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                fail(name, f"must be a positive integer, got {value!r}.")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            fail("eval_batches", f"must be a positive integer or None (all), got {self.eval_batches!r}.")
        if self.resume not in _RESUME_MODES:
            fail("resume", f"unknown value {self.resume!r}; choose one of {_RESUME_MODES}.")
        if self.on_db_locked not in _DB_LOCKED_MODES:
            fail("on_db_locked", f"unknown value {self.on_db_locked!r}; choose one of {_DB_LOCKED_MODES}.")
        if self.peak_flops is not None and not self.peak_flops > 0:
            fail("peak_flops", f"must be > 0 or None, got {self.peak_flops!r}.")
        if self.profile_steps is not None:
            window = tuple(self.profile_steps)
            if not (len(window) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in window)
                    and 1 <= window[0] <= window[1]):
                fail("profile_steps", "must be (START, STOP), two step numbers counted from 1: START must be "
                     f"at least 1 and at most STOP, got {self.profile_steps!r}.")
            object.__setattr__(self, "profile_steps", window)
            if self.max_steps is not None:
                self.check_profile_window(self.max_steps)

    def last_step(self, config: TrainConfig) -> int:
        """The run's final step: `max_steps`, else the schedule's `config.total_steps`."""
        return self.max_steps if self.max_steps is not None else config.total_steps

    def check_profile_window(self, last_step: int) -> None:
        """Raise `ValueError` if `profile_steps` ends after `last_step`, the run's final step."""
        if self.profile_steps is not None and self.profile_steps[1] > last_step:
            raise InvalidValueError(f"RunConfig.profile_steps={self.profile_steps}: step {self.profile_steps[1]} is "
                                    f"beyond the run's last step {last_step}; end the window at or before it.")

    @property
    def name(self) -> str:
        return self.run_name or Path(self.run_dir).absolute().name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_seq_len(model_config: ModelConfig, config: TrainConfig) -> None:
    """Raise `ValueError` if `config.seq_len` exceeds the model's `max_seq_len`."""
    if config.seq_len > model_config.max_seq_len:
        raise InvalidValueError(f"VishwamAITrainer: TrainConfig.seq_len={config.seq_len} exceeds the model's "
                                f"max_seq_len={model_config.max_seq_len}; shorten seq_len or build the model "
                                "with a larger max_seq_len.")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient stopped the run (see `TrainConfig.nan_policy`)."""

    def __init__(self, message: str, *, step: int, last_good_checkpoint: int | None):
        super().__init__(message)
        self.step = step
        self.last_good_checkpoint = last_good_checkpoint


@dataclasses.dataclass
class TrainResult:
    """What `VishwamAITrainer.train` did."""

    run_dir: Path
    step: int
    """Steps (batches) done, including those of earlier runs this one resumed."""
    start_step: int
    """Step this call started from (0, or the checkpoint it resumed)."""
    state: TrainState
    stop_reason: str
    """`finished`, `data exhausted`, or the signal's name (`SIGTERM`, `SIGINT`)."""
    initial_val_loss: float | None
    final_val_loss: float | None
    checkpoint_step: int | None
    """Latest checkpoint on disk when `train` returned."""
    skipped_steps: int
    """Non-finite steps skipped (`nan_policy="skip"`), over the whole run."""
    metrics_path: Path | None
    """The DuckDB file written (a fallback file if the main one was held); None off process 0."""
    pipeline_path: Path | None
    wall_time: float

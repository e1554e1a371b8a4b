"""`VishwamAITrainer`: the loop around the train step, with evaluation, checkpoints and metrics.

One `train()` call:

1. opens `run_dir/metrics.duckdb` (fails at once, with a clear message, if another
   process holds it) and the orbax checkpoints in `run_dir/checkpoints/`;
2. resumes from the latest complete checkpoint if there is one (parameters,
   optimiser state, step, PRNG key and the data iterator's position), after
   checking that the run's config equals the checkpoint's (the error lists every
   differing field), and deletes metric rows of steps after it;
3. writes `run_dir/config.json` and `run_dir/tokenizer/`, evaluates once before
   training (the initial validation loss), then steps: a progress bar (loss,
   tokens/s, ETA), metrics per step into DuckDB (losses, gradient norm, learning
   rate, tokens/s, estimated model FLOP utilisation; memory every `log_every`
   steps), evaluation every `eval_every` steps, a checkpoint every
   `checkpoint_every` steps;
4. at the end evaluates, checkpoints, exports `run_dir/pipeline/` (safetensors +
   tokenizer, for `VishwamAIPipeline.load`), and closes everything.

Exactness: the loop is a pure function of (state, batch index), so a run killed
at any point and started again reproduces the uninterrupted run's parameters and
per-step metrics bit for bit. Metrics are flushed to DuckDB before every
checkpoint, and a resumed run rewinds the rows of the steps it repeats.

Stopping: SIGTERM or SIGINT (Ctrl-C) finishes the current step (an evaluation stops
at its next batch and is not logged), writes a final checkpoint, closes the database
(`status = 'stopped'`) and returns; a second signal interrupts at once. The events
table names a checkpoint only once orbax has committed it (an asynchronous save is
logged when it completes, not when it starts). On an exception the checkpoint manager still waits
for saves already started and the database is closed (`status = 'failed'`).

Non-finite losses (`TrainConfig.nan_policy`): `"stop"` raises `TrainingDiverged`
naming the last good checkpoint, without saving the diverged state; `"skip"`
leaves the state unchanged for that batch (the step does this on device), counts
it (`skipped` metric) and raises only after `max_consecutive_skips` in a row.

Monitoring: before the first step, the train step's XLA memory analysis as
compiled for this run (arguments, outputs, aliased, temporaries; per device) goes
into the `compiled_memory` event and `runs.compiled_memory`. Every `log_every`
steps the metrics gain `MEMORY_METRICS`: the device allocator's bytes in use and
peak (`memory/device_bytes`, `memory/device_peak_bytes`, only where the backend
keeps them: not on CPU), the live arrays' bytes on the busiest device, and the
host's RSS and peak RSS. `RunConfig.profile_steps` traces a window of steps with
`jax.profiler` into `run_dir/profile/` (a `profile` event gives the path); the
window's steps log no tokens/s or MFU.

Devices: without `RunConfig.mesh` a single device trains alone and several
devices share the batch (`data` axis). A mesh from the config (e.g.
`{"data": 2, "expert": 4}`) shards the state by `vishwam.parallel` rules and
runs the step under `jax.set_mesh`, so MoE layers go expert-parallel. Several
hosts: call `jax.distributed.initialize()` before building anything (scripts/
train.py `--distributed`); every process runs the same program, each loads its
share of every batch, and only process 0 writes the database, files and logs.
"""

import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig, TrainConfig
from ..memory import device_memory, host_peak_rss_bytes, host_rss_bytes, live_array_bytes, memory_stats
from ..files import atomic_write_text
from ..model import VishwamAI
from ..plan import estimate_peak_flops, init_sharded_state, model_flops_per_token
from .checkpoint import Checkpointer, check_compatible, combine_arrays, partition_arrays
from .metrics_db import MetricsDB
from .step import TrainState, init_train_state, make_eval_step, make_train_step

Callback = Callable[[str, int, Mapping[str, Any]], None]
"""`callback(kind, step, detail)`: every event the trainer records (`start`, `resume`,
`eval`, `checkpoint` once orbax has committed that step, `nan`, `stop`, `finish`) plus
`step` with the step's metrics and `checkpoint_started` when a save begins (not recorded)."""

_RESUME_MODES = ("auto", "require", "never")
_DB_LOCKED_MODES = ("raise", "fallback")
# Metrics that depend on the wall clock, not on the trajectory.
TIMING_METRICS = ("step_time", "tokens_per_s", "mfu")
# Metrics of the process's memory (every `log_every` steps), not of the trajectory either.
MEMORY_METRICS = ("memory/device_bytes", "memory/device_peak_bytes", "memory/live_array_bytes",
                  "memory/host_rss_bytes", "memory/host_peak_rss_bytes")
_THROUGHPUT_WINDOW = 10  # steps


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
            raise ValueError(f"RunConfig.{field}: {message}")

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
                fail("profile_steps", f"must be (START, STOP) with 1 <= START <= STOP, got {self.profile_steps!r}.")
            object.__setattr__(self, "profile_steps", window)
            if self.max_steps is not None:
                self.check_profile_window(self.max_steps)

    def check_profile_window(self, last_step: int) -> None:
        """Raise `ValueError` if `profile_steps` ends after `last_step`, the run's final step."""
        if self.profile_steps is not None and self.profile_steps[1] > last_step:
            raise ValueError(f"RunConfig.profile_steps={self.profile_steps}: step {self.profile_steps[1]} is "
                             f"beyond the run's last step {last_step}; end the window at or before it.")

    @property
    def name(self) -> str:
        return self.run_name or Path(self.run_dir).absolute().name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


# ----------------------------------------------------------------------- signals
class _StopSignals:
    """SIGTERM/SIGINT set `signum`, which the loop checks between steps; a second
    signal raises `KeyboardInterrupt` at once (cleanup still runs)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}) while stopping")
        self.signum = signum

    def __enter__(self) -> "_StopSignals":
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def agreed(self) -> str | None:
        """The name of the signal to stop for, the same in every process: with several
        processes, one that any of them received (a tiny all-gather per call), so that
        all stop after the same step and save the checkpoint together."""
        if jax.process_count() == 1:
            return self.name
        from jax.experimental import multihost_utils

        signum = int(np.max(multihost_utils.process_allgather(np.int32(self.signum or 0))))
        return None if signum == 0 else signal.Signals(signum).name


# ------------------------------------------------------------------------ trainer
class VishwamAITrainer:
    """Train `pipeline.model` on `train_loader` (see the module docstring for the whole story).

    Arguments:
        pipeline: a `VishwamAIPipeline`, or anything with `.model` (a `VishwamAI`)
            and `.tokenizer` (saved into the run with `save_pretrained`). After
            `train()`, `pipeline.model` is the trained model.
        config: the `TrainConfig` (optimiser, schedule, batch, accumulation, NaN policy).
        train_loader: an iterator of batch dicts (`tokens`, `targets`, `loss_mask`,
            optional `segment_ids`, `positions`; this process's rows of the global
            batch). With `state()` / `restore(state)` (as `vishwam.data.DataIterator`)
            or grain's `get_state()` / `set_state(state)` (the iterator of a
            `grain.python.DataLoader`, or of a grain dataset) its position is
            checkpointed and a resumed run continues exactly there.
        eval_loader: validation batches: an object with `reset()` that then iterates
            one pass (a `DataIterator` with `repeat=False`), or any re-iterable.
        run: a `RunConfig` (directories, intervals, mesh, resume mode).
        teacher: a frozen `VishwamAI` to distil from (same vocabulary); the loss is
            then `TrainConfig.distill_alpha` CE + the rest KL.
        extra_config: JSON-able facts about the run stored beside the configs in
            `config.json` and the database (e.g. the data source); not compared on resume.
        callbacks: called as `callback(kind, step, detail)` for every event (see `Callback`).
    """

    def __init__(self, pipeline: Any, config: TrainConfig, train_loader: Iterable,
                 eval_loader: Iterable | None = None, *, run: RunConfig | None = None,
                 teacher: VishwamAI | None = None, extra_config: Mapping[str, Any] | None = None,
                 callbacks: Sequence[Callback] = ()):
        model = getattr(pipeline, "model", None)
        if not isinstance(model, VishwamAI):
            raise TypeError(f"VishwamAITrainer: pipeline.model must be a VishwamAI, got {type(model).__name__}; "
                            "pass a VishwamAIPipeline(model, tokenizer).")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"VishwamAITrainer: config must be a TrainConfig, got {type(config).__name__}.")
        self.pipeline = pipeline
        self.model_config: ModelConfig = model.config
        self.config = config
        self.run = run if run is not None else RunConfig()
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.teacher = teacher
        self.extra_config = dict(extra_config or {})
        self.callbacks = list(callbacks)
        self.max_steps = self.run.max_steps if self.run.max_steps is not None else config.total_steps
        self.run.check_profile_window(self.max_steps)
        if config.seq_len > self.model_config.max_seq_len:
            raise ValueError(f"VishwamAITrainer: TrainConfig.seq_len={config.seq_len} exceeds the model's "
                             f"max_seq_len={self.model_config.max_seq_len}; shorten seq_len or build the model "
                             "with a larger max_seq_len.")
        self.is_main = jax.process_index() == 0
        self.mesh, self.device = self._devices()
        self.run_dir = Path(self.run.run_dir).absolute()
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.duckdb"

    # ---------------------------------------------------------------- configs
    def _tokenizer_info(self) -> dict[str, Any]:
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        if tokenizer is None:
            return {}
        return {"fingerprint": getattr(tokenizer, "fingerprint", None),
                "vocab_size": int(getattr(tokenizer, "vocab_size", 0)) or None}

    def compatibility_config(self) -> dict[str, Any]:
        """What must equal the checkpoint's for a resume: everything that changes the numbers."""
        return {"model": self.model_config.to_dict(), "train": self.config.to_dict(),
                "tokenizer": self._tokenizer_info().get("fingerprint"),
                "teacher": None if self.teacher is None else self.teacher.config.to_dict()}

    def full_config(self) -> dict[str, Any]:
        """`config.json`: the compatibility config, the run settings and `extra_config`."""
        return {**self.extra_config, **self.compatibility_config(), "tokenizer": self._tokenizer_info(),
                "run": self.run.to_dict(), "max_steps": self.max_steps}

    # ---------------------------------------------------------------- devices
    def _devices(self) -> tuple[jax.sharding.Mesh | None, jax.Device | None]:
        from ..parallel import check_mesh, make_mesh

        sizes = self.run.mesh
        devices = jax.devices()
        if sizes is None:
            sizes = {"data": -1} if len(devices) > 1 else {}
        if -1 not in sizes.values():
            count = math.prod(sizes.values()) if sizes else 1
            if count > len(devices):
                raise ValueError(f"RunConfig.mesh={dict(sizes)} needs {count} devices; this process sees "
                                 f"{len(devices)} ({devices[0].platform}). Use smaller axis sizes or -1 to fill.")
            devices = devices[:count]
        if len(devices) == 1:
            return None, devices[0]
        mesh = make_mesh(sizes, devices=devices)
        check_mesh(self.model_config, mesh)
        shards = math.prod(dict(mesh.shape)[axis] for axis in ("data", "fsdp", "expert"))
        if self.config.batch_size % shards:
            raise ValueError(f"VishwamAITrainer: batch_size={self.config.batch_size} is not divisible by the "
                             f"mesh's {shards} batch shards ({dict(mesh.shape)}); use a multiple of {shards}.")
        return mesh, None

    def _place_tree(self, tree):
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        from ..parallel import shard_model

        return shard_model(tree, self.mesh)

    def _place_batch(self, batch: Mapping[str, Any]) -> dict:
        if self.mesh is None:
            return jax.device_put(dict(batch), self.device)
        from ..parallel import make_global_batch

        return make_global_batch(dict(batch), self.mesh)

    def _mesh_context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    # ------------------------------------------------------------------- train
    def train(self) -> TrainResult:
        """Run (or resume) the training; see the module docstring. Returns a `TrainResult`.

        Raises:
            MetricsDBLockedError: another process holds `metrics.duckdb` (`on_db_locked="raise"`).
            IncompatibleConfigError: the checkpoint was written with another config (fields listed).
            TrainingDiverged: a non-finite loss under `nan_policy="stop"` (or too many skips).
        """
        return _Run(self).execute()

    # ------------------------------------------------------------------ events
    def _emit(self, kind: str, step: int, detail: Mapping[str, Any]) -> None:
        for callback in self.callbacks:
            callback(kind, step, detail)


class _Run:
    """The state of one `train()` call (kept off the trainer so that it can be called again)."""

    def __init__(self, trainer: VishwamAITrainer):
        self.t = trainer
        self.run = trainer.run
        self.db: MetricsDB | None = None
        self.ckpt: Checkpointer | None = None
        self.final_status: str | None = None
        self.initial_val_loss: float | None = None
        self.last_eval: dict[str, float] | None = None
        self.skipped = 0
        self.consecutive_skips = 0
        self.last_checkpoint: int | None = None
        self.uncommitted: list[tuple[int, dict[str, Any]]] = []  # saves started, not yet logged
        self.signals: _StopSignals | None = None
        self.pbar = None
        self.postfix: dict[str, str] = {}
        self.last_done = time.perf_counter()
        self.intervals: collections.deque[float] = collections.deque(maxlen=_THROUGHPUT_WINDOW)
        self.compiled = False
        self.tokens_per_step = trainer.config.batch_size * trainer.config.seq_len
        self.flops_per_token = model_flops_per_token(trainer.model_config, trainer.config.seq_len)
        self.peak_flops: float | None = None
        self.profile_window: tuple[int, int] | None = None
        self.profile_trace: tuple[Path, set[str], int] | None = None
        """While tracing: (directory, sessions already in it, first traced step)."""
        self.last_step_done = 0

    # -------------------------------------------------------------- lifecycle
    def execute(self) -> TrainResult:
        t, run = self.t, self.run
        began = time.perf_counter()
        with contextlib.ExitStack() as stack:
            signals = self.signals = stack.enter_context(_StopSignals(run.handle_signals))
            if run.resume == "never" and self.t.is_main and t.checkpoint_dir.exists():
                shutil.rmtree(t.checkpoint_dir)
            self.ckpt = stack.enter_context(Checkpointer(t.checkpoint_dir, keep=run.keep_checkpoints,
                                                         async_save=run.async_checkpoint))
            # Checked before the database is touched: a refused resume leaves the run's records alone.
            latest = self.ckpt.latest_step()
            if latest is None and run.resume == "require":
                raise FileNotFoundError(f"resume='require' but {t.checkpoint_dir} holds no complete checkpoint; "
                                        "start without --resume (or with --new).")
            if latest is not None:
                check_compatible(self.ckpt.read_meta(latest).get("config"), t.compatibility_config())
            # Restored before the database is touched too: a damaged checkpoint leaves the records alone.
            state, start = self._initial_state(latest)
            self.db = MetricsDB(t.metrics_path, run.name, t.full_config(), flush_every=run.flush_every,
                                on_locked=run.on_db_locked)
            stack.push(self._close_db)
            stack.callback(self._close_pbar)
            # Before the database closes: a run that stops inside the window still records its trace.
            stack.callback(self._stop_profile)
            self._record_start(latest, start)
            self._write_run_files()
            teacher = None if t.teacher is None else t._place_tree(t.teacher)
            train_step = make_train_step(t.model_config, t.config, teacher=teacher)
            eval_step = make_eval_step(t.model_config, t.config.loss_chunk_size)
            self.peak_flops, peak_source = ((run.peak_flops, "RunConfig.peak_flops") if run.peak_flops
                                            else estimate_peak_flops(self._devices_used()))
            self._note(f"{run.name}: {'resuming from step ' + str(start) if start else 'starting'} "
                       f"(max_steps {t.max_steps}, {self.tokens_per_step} tokens/step, "
                       f"{self._device_text()}, peak {self.peak_flops / 1e9:,.0f} GFLOP/s: {peak_source})")

            with t._mesh_context():
                if start == 0:
                    self.initial_val_loss = self._evaluate(eval_step, state.model, 0)
                state, step, reason = self._loop(train_step, eval_step, state, start, signals)
                if reason != "finished" and reason != "data exhausted":
                    self._save(state, step, force_wait=True)
                    self._record(step, "stop", {"signal": reason})
                    self.final_status = "stopped"
                else:
                    if self.last_eval is None or self.last_eval["step"] != step:
                        self._evaluate(eval_step, state.model, step)
                    self._save(state, step, force_wait=True)
                    self._record(step, "finish", {"reason": reason, "skipped": self.skipped})
            self._close_pbar()
            self.ckpt.wait()
            self._log_committed()
            t.pipeline.model = state.model
            pipeline_path = None
            if self.final_status is None:
                pipeline_path = self._export(state)
                self.final_status = "finished"
        return TrainResult(
            run_dir=t.run_dir, step=step, start_step=start, state=state, stop_reason=reason,
            initial_val_loss=self.initial_val_loss,
            final_val_loss=None if self.last_eval is None else self.last_eval["val_loss"],
            checkpoint_step=self.last_checkpoint, skipped_steps=self.skipped,
            metrics_path=self.db.path if t.is_main else None, pipeline_path=pipeline_path,
            wall_time=time.perf_counter() - began)

    def _close_db(self, exc_type, exc, tb) -> bool:
        if self.db is not None:
            status = self.final_status
            if status is None and exc_type is not None:
                status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            self.db.close(status)
        return False

    def _close_pbar(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None

    def _devices_used(self) -> list:
        return [self.t.device] if self.t.mesh is None else list(self.t.mesh.devices.flat)

    def _device_text(self) -> str:
        devices = self._devices_used()
        text = f"{len(devices)} x {devices[0].device_kind}"
        if self.t.mesh is not None:
            text += f", mesh {dict(self.t.mesh.shape)}"
        return text

    # -------------------------------------------------------------- monitoring
    def _record_compiled_memory(self, train_step, state: TrainState, batch: dict, step: int) -> None:
        """XLA's memory analysis of the train step as compiled for this run (per device).

        Compiling here is not a second compile: the executable is cached and the
        first step runs it.
        """
        devices = self._devices_used()
        detail: dict[str, Any] = {"devices": len(devices), "device_kind": devices[0].device_kind,
                                  "platform": devices[0].platform}
        try:
            detail["per_device"] = memory_stats(train_step.lower(state, batch).compile())
        except RuntimeError as error:  # a backend without memory analysis: say so, train anyway
            detail["per_device"], detail["unavailable"] = None, str(error)
        allocator = device_memory(self._local_devices())
        detail["allocator_stats"] = allocator is not None
        if allocator is not None and "bytes_limit" in allocator:
            detail["device_bytes_limit"] = allocator["bytes_limit"]
        self.db.set_compiled_memory(detail)
        self._record(step, "compiled_memory", detail)

    def _local_devices(self) -> list:
        return [d for d in self._devices_used() if d.process_index == jax.process_index()]

    def _memory_values(self) -> dict[str, float]:
        """Memory now, as `MEMORY_METRICS`; the device allocator's only where the backend keeps it.

        `memory/device_bytes`, `memory/device_peak_bytes`: bytes in use and the peak
        so far on the busiest local device (`Device.memory_stats()`; absent on CPU,
        whose backend keeps no statistics). `memory/live_array_bytes`: live arrays'
        bytes on the busiest local device (every backend). `memory/host_rss_bytes`,
        `memory/host_peak_rss_bytes`: this process's resident memory now and at its
        peak (on CPU, device memory is host memory, so the latter bounds the device peak).
        """
        devices = self._local_devices()
        values = {"memory/live_array_bytes": float(max(live_array_bytes(devices).values()))}
        rss = host_rss_bytes()
        if rss is not None:
            values["memory/host_rss_bytes"] = float(rss)
        # The kernel's high-water mark can trail the RSS just read by a few pages (its
        # per-thread counters sync lazily); the peak is at least what was just measured.
        values["memory/host_peak_rss_bytes"] = float(max(host_peak_rss_bytes(), rss or 0))
        allocator = device_memory(devices)
        if allocator is not None:
            values["memory/device_bytes"] = float(allocator["bytes_in_use"])
            values["memory/device_peak_bytes"] = float(allocator["peak_bytes_in_use"])
        return values

    def _start_profile(self, first_step: int) -> None:
        directory = self.t.run_dir / "profile"
        if jax.process_count() > 1:  # processes on one host would write the same file names
            directory = directory / f"process{jax.process_index()}"
        sessions = directory / "plugins" / "profile"
        before = {p.name for p in sessions.iterdir()} if sessions.is_dir() else set()
        jax.profiler.start_trace(str(directory), create_perfetto_trace=True)
        self.profile_trace = (directory, before, first_step)

    def _stop_profile(self) -> None:
        """Stop a running trace (at STOP, or when the run ends inside the window) and log it."""
        if self.profile_trace is None:
            return
        directory, before, first = self.profile_trace
        self.profile_trace = None
        jax.profiler.stop_trace()
        sessions = directory / "plugins" / "profile"
        new = sorted(p for p in sessions.iterdir() if p.name not in before) if sessions.is_dir() else []
        files = sorted(f for session in new for f in session.rglob("*") if f.is_file())
        last = self.last_step_done
        detail = {"start": first, "stop": last, "directory": str(directory),
                  "path": str(new[-1]) if new else None, "files": [f.name for f in files],
                  "bytes": sum(f.stat().st_size for f in files)}
        self._record(last, "profile", detail)
        self._note(f"profile of steps {first}-{last}: {detail['path']} (tensorboard --logdir {directory}, "
                   "or perfetto_trace.json.gz in ui.perfetto.dev)")

    # ------------------------------------------------------------ start/resume
    def _initial_state(self, latest: int | None) -> tuple[TrainState, int]:
        t = self.t
        if is_abstract_model(t.pipeline.model):
            # Built where it lives: each device computes only its own shards.
            state = init_sharded_state(t.model_config, t.config, t.mesh)
            if t.mesh is None:
                state = jax.device_put(state, t.device)
        else:
            key = jax.random.fold_in(jax.random.key(t.config.seed), 1)
            # A copy: the step donates its state, and the caller's model must stay usable.
            model = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, t.pipeline.model)
            state = t._place_tree(init_train_state(model, t.config, key=key))
        if latest is None:
            return state, 0
        arrays, static = partition_arrays(state)
        restored, meta = self.ckpt.restore(latest, arrays)
        state = combine_arrays(restored, static)
        start = int(meta["step"])
        data_state = meta.get("data")
        if data_state is not None and _resumable(t.train_loader):
            restore_loader(t.train_loader, data_state)
        elif _resumable(t.train_loader):
            raise ValueError(f"checkpoint step {latest} in {t.checkpoint_dir} has no data position; the loader "
                             "would restart from its first batch. Start a new run directory.")
        self.initial_val_loss = meta.get("initial_val_loss")
        self.last_eval = meta.get("last_eval")
        self.skipped = int(meta.get("skipped", 0))
        self.last_checkpoint = latest
        return state, start

    def _record_start(self, latest: int | None, start: int) -> None:
        if latest is None:
            if self.db.resumed:
                # The run id exists but has no checkpoint: its rows belong to a trajectory we cannot continue.
                self.db.rewind(-1)
            self._record(0, "start", {"max_steps": self.t.max_steps})
            return
        deleted = self.db.rewind(start)
        self._record(start, "resume", {"checkpoint": latest, "rewound_rows": deleted})

    def _write_run_files(self) -> None:
        t = self.t
        if not t.is_main:
            return
        t.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(t.run_dir / "config.json", json.dumps(t.full_config(), indent=2, sort_keys=True,
                                                                  default=str))
        tokenizer = getattr(t.pipeline, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(t.run_dir / "tokenizer")

    # --------------------------------------------------------------------- loop
    def _loop(self, train_step, eval_step, state: TrainState, start: int,
              signals: _StopSignals) -> tuple[TrainState, int, str]:
        t, run = self.t, self.run
        self._open_pbar(start)
        step, pending, reason = start, None, "finished"
        iterator = iter(t.train_loader)
        window = run.profile_steps if run.profile_steps and run.profile_steps[0] > start else None
        self.profile_window = window
        if window is not None and window[0] == start + 1:
            self._start_profile(start + 1)
        self.last_done = time.perf_counter()
        while step < t.max_steps:
            if (stop := signals.agreed()) is not None:
                reason = stop
                break
            try:
                batch = next(iterator)
            except StopIteration:
                reason = "data exhausted"
                break
            placed = t._place_batch(batch)
            if step == start:
                self._record_compiled_memory(train_step, state, placed, step)
            state, metrics = train_step(state, placed)
            step += 1
            self._log_committed()
            # One step of lag: the device runs step n while the host reads step n - 1.
            if pending is not None:
                self._finish_step(*pending)
            pending = (step, metrics)
            eval_due = run.eval_every and step % run.eval_every == 0
            save_due = run.checkpoint_every and step % run.checkpoint_every == 0
            # The trace starts after step START-1 has finished and stops once STOP has.
            profile_due = window is not None and step in (window[0] - 1, window[1])
            if eval_due or save_due or profile_due or step == t.max_steps or signals.signum is not None:
                self._finish_step(*pending)
                pending = None
                if profile_due and step == window[1]:
                    self._stop_profile()
                elif profile_due:
                    self._start_profile(step + 1)
                if eval_due:
                    self._evaluate(eval_step, state.model, step)
                if save_due:
                    self._save(state, step, force_wait=False)
                self.last_done = time.perf_counter()
        if pending is not None:
            self._finish_step(*pending)
        return state, step, reason

    def _finish_step(self, step: int, metrics: dict) -> None:
        t = self.t
        host = jax.device_get(metrics)
        now = time.perf_counter()
        elapsed, self.last_done = now - self.last_done, now
        # Host observations of a run-ahead device are uneven step by step; their sum over
        # a window is exact up to one step, so throughput is taken over the last few steps.
        # The first step of a call includes compilation: logged, but kept out of the window.
        # Traced steps run under the profiler: their time is logged, their throughput is not.
        traced = self.profile_window is not None and self.profile_window[0] <= step <= self.profile_window[1]
        if traced:
            window, self.compiled = None, True
        elif self.compiled:
            self.intervals.append(elapsed)
            window = self.intervals
        else:
            window, self.compiled = [elapsed], True
        tokens_per_s = None if window is None else len(window) * self.tokens_per_step / max(sum(window), 1e-9)
        values = {name: float(host[name]) for name in ("loss", "ce", "aux", "z", "grad_norm", "learning_rate",
                                                       "tokens", "dropped_fraction")}
        if t.teacher is not None:
            values["distill"] = float(host["distill"])
        load = np.asarray(host["expert_load"])
        if load.size:
            values["expert_load_max"] = float(load.max() * t.model_config.num_experts)
        nonfinite = bool(host["nonfinite"])
        values |= {"nonfinite": float(nonfinite), "step_time": elapsed}
        if tokens_per_s is not None:
            values |= {"tokens_per_s": tokens_per_s, "mfu": self.flops_per_token * tokens_per_s / self.peak_flops}
        if step % self.run.log_every == 0 or step == t.max_steps:
            values |= self._memory_values()
        if nonfinite:
            self._non_finite(step, values)
        else:
            self.consecutive_skips = 0
        values["skipped"] = float(self.skipped)
        self.last_step_done = step
        self.db.log(step, values)
        t._emit("step", step, values)
        if self.pbar is not None:
            if (step % self.run.log_every == 0 or step == t.max_steps or nonfinite) and tokens_per_s is not None:
                self.postfix = {"loss": f"{values['loss']:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
                if self.skipped:
                    self.postfix["skipped"] = str(self.skipped)
                self.pbar.set_postfix(self.postfix, refresh=False)
            self.pbar.update(1)

    def _non_finite(self, step: int, values: dict[str, float]) -> None:
        t = self.t
        detail = {"loss": values["loss"], "grad_norm": values["grad_norm"], "policy": t.config.nan_policy}
        if t.config.nan_policy == "skip":
            self.skipped += 1
            self.consecutive_skips += 1
            self._record(step, "nan", {**detail, "action": "skipped", "skipped_total": self.skipped})
            if self.consecutive_skips <= self.run.nan_max_consecutive_skips:
                return
            why = (f"{self.consecutive_skips} non-finite steps in a row (up to step {step}; "
                   f"nan_max_consecutive_skips={self.run.nan_max_consecutive_skips})")
        else:
            self._record(step, "nan", {**detail, "action": "stopped"})
            why = (f"a non-finite loss or gradient at step {step} "
                   f"(loss={values['loss']}, grad_norm={values['grad_norm']})")
        self.db.log(step, values)
        self.final_status = "nan"
        good = self.last_checkpoint
        where = (f"The last good checkpoint is step {good} in {t.checkpoint_dir}; the diverged state was not saved. "
                 "Rerunning the same command resumes from it: lower the learning rate, raise warm-up, "
                 "or check the data around this step"
                 if good is not None else "No checkpoint was written before it; nothing was saved")
        raise TrainingDiverged(f"Training stopped: {why}. {where} (or set nan_policy='skip' to skip such steps).",
                               step=step, last_good_checkpoint=good)

    # --------------------------------------------------------------- evaluate
    def _evaluate(self, eval_step, model: VishwamAI, step: int) -> float | None:
        loader = self.t.eval_loader
        if loader is None:
            return None
        if hasattr(loader, "reset"):
            loader.reset()
        nll, tokens, batches = 0.0, 0.0, 0
        started = time.perf_counter()
        for batch in loader:
            if self.run.eval_batches is not None and batches >= self.run.eval_batches:
                break
            if self.signals is not None and self.signals.signum is not None:
                # A part of the validation set is not the validation loss: nothing is logged.
                self._note(f"step {step}: evaluation stopped by {self.signals.name} after {batches} batches")
                return None
            out = eval_step(model, self.t._place_batch(batch))
            nll, tokens, batches = nll + out["nll_sum"], tokens + out["tokens"], batches + 1
        if batches == 0:
            raise ValueError("VishwamAITrainer: the eval loader yielded no batch; pass eval_loader=None to "
                             "train without evaluation, or give it validation data.")
        nll, tokens = (float(x) for x in jax.device_get((nll, tokens)))
        loss = nll / max(tokens, 1.0)
        perplexity = math.exp(min(loss, 700.0))
        self.last_eval = {"step": step, "val_loss": loss, "val_perplexity": perplexity}
        self.db.log(step, {"val_loss": loss, "val_perplexity": perplexity})
        self._record(step, "eval", {"val_loss": loss, "val_perplexity": perplexity, "batches": batches,
                                    "tokens": tokens, "seconds": time.perf_counter() - started})
        self._note(f"step {step}: val_loss {loss:.4f} (perplexity {perplexity:.2f}, {int(tokens)} tokens)")
        return loss

    # ------------------------------------------------------------- checkpoint
    def _save(self, state: TrainState, step: int, *, force_wait: bool) -> None:
        t = self.t
        loader = t.train_loader
        meta = {"step": step, "config": t.compatibility_config(),
                "data": loader_state(loader) if _resumable(loader) else None,
                "initial_val_loss": self.initial_val_loss, "last_eval": self.last_eval,
                "skipped": self.skipped, "tokenizer": str(t.run_dir / "tokenizer")}
        # Rows of every step this checkpoint covers must be on disk before it can exist.
        self.db.flush()
        arrays, _ = partition_arrays(state)
        if self.ckpt.save(step, arrays, meta):
            self.last_checkpoint = step
            detail = {"directory": str(t.checkpoint_dir / str(step))}
            t._emit("checkpoint_started", step, detail)
            self.uncommitted.append((step, detail))
        if force_wait:
            self.ckpt.wait()
        self._log_committed()

    def _log_committed(self) -> None:
        """Record the `checkpoint` event of saves orbax has finished (all of them, or none yet)."""
        if self.uncommitted and not self.ckpt.saving():
            for step, detail in self.uncommitted:
                self._record(step, "checkpoint", detail)
            self.uncommitted.clear()

    def _export(self, state: TrainState) -> Path | None:
        t = self.t
        if not (self.run.export_pipeline and t.is_main and jax.process_count() == 1):
            return None
        tokenizer = getattr(t.pipeline, "tokenizer", None)
        if tokenizer is None:
            return None
        from ..pipeline import VishwamAIPipeline

        return VishwamAIPipeline(state.model, tokenizer).save(t.run_dir / "pipeline", overwrite=True)

    # ----------------------------------------------------------------- output
    def _record(self, step: int, kind: str, detail: Mapping[str, Any]) -> None:
        self.db.event(step, kind, detail)
        self.t._emit(kind, step, detail)

    def _note(self, text: str) -> None:
        if not self.t.is_main:
            return
        if self.pbar is not None:
            self.pbar.write(text)
        else:
            print(text, flush=True)

    def _open_pbar(self, start: int) -> None:
        t = self.t
        if not (self.run.progress and t.is_main) or start >= t.max_steps:
            return
        from tqdm.auto import tqdm

        interactive = sys.stderr.isatty()
        self.pbar = tqdm(total=t.max_steps, initial=start, unit="step", desc=self.run.name, dynamic_ncols=True,
                         mininterval=0.5 if interactive else 10.0, smoothing=0.1, file=sys.stderr)


def abstract_model(config: ModelConfig) -> VishwamAI:
    """A `VishwamAI` whose arrays are `jax.ShapeDtypeStruct`s (nothing allocated).

    Give it to `VishwamAITrainer` (in a pipeline) and the trainer creates the
    parameters and optimiser state directly in their shardings on its mesh, from
    `TrainConfig.seed` (`vishwam.plan.init_sharded_state`): the same values an eager
    `VishwamAI(config, key=jax.random.key(seed))` would have, without a full copy
    on any one device or the host.
    """
    return eqx.filter_eval_shape(VishwamAI, config, key=jax.random.key(0))


def is_abstract_model(model: VishwamAI) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(model))


def _resumable(loader: Any) -> bool:
    return (hasattr(loader, "state") and hasattr(loader, "restore")) or \
        (hasattr(loader, "get_state") and hasattr(loader, "set_state"))


def loader_state(loader: Any) -> Any:
    """The loader's position as JSON: `state()` as it is (vishwam's `DataIterator`), or grain's
    `get_state()` (bytes of JSON from a `DataLoader` iterator, a dict from a dataset iterator)
    wrapped as `{"get_state": ...}`."""
    if hasattr(loader, "state") and hasattr(loader, "restore"):
        return loader.state()
    value = loader.get_state()
    if isinstance(value, bytes):
        return {"get_state": {"bytes": value.decode("utf-8")}}
    return {"get_state": {"value": value}}


def restore_loader(loader: Any, state: Any) -> None:
    """Puts the loader back at `state`, as returned by `loader_state`."""
    if hasattr(loader, "state") and hasattr(loader, "restore"):
        loader.restore(state)
        return
    if not (isinstance(state, Mapping) and isinstance(state.get("get_state"), Mapping)):
        raise ValueError(f"the checkpoint's data position {str(state)[:200]} was not written by a loader with "
                         "get_state()/set_state(); resume with the loader the run was started with.")
    saved = state["get_state"]
    loader.set_state(saved["bytes"].encode("utf-8") if "bytes" in saved else saved["value"])


# ------------------------------------------------------------------ runs on disk
def load_run_state(run_dir: str | os.PathLike, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """The train state of a run's checkpoint (default: the latest) and that checkpoint's meta.

    Rebuilds the state's structure from the configs stored in the checkpoint, so a
    run need not have finished (no `pipeline/` export needed), e.g. for a teacher.
    """
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist; pass a run directory written by "
                                "VishwamAITrainer (runs/<name>).")
    with Checkpointer(directory, keep=None, async_save=False) as ckpt:
        meta = ckpt.read_meta(step)
        model_config = ModelConfig.from_dict(meta["config"]["model"])
        train_config = TrainConfig.from_dict(meta["config"]["train"])

        def build() -> TrainState:
            model = VishwamAI(model_config, key=jax.random.key(0))
            return init_train_state(model, train_config, key=jax.random.key(0))

        arrays, static = partition_arrays(eqx.filter_eval_shape(build))
        restored, meta = ckpt.restore(step, arrays)
    return combine_arrays(restored, static), meta


def load_run_model(run_dir: str | os.PathLike, step: int | None = None) -> tuple[VishwamAI, dict[str, Any]]:
    """The model of a run's checkpoint (default: the latest) and the checkpoint's meta."""
    state, meta = load_run_state(run_dir, step)
    return state.model, meta

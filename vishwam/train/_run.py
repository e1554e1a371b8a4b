"""One `train()` call of `VishwamAITrainer`: set-up and resume, the step loop, its hooks, the end.

The loop dispatches step n + 1 before reading step n's metrics (one step of lag), except at
steps where a hook needs the state (evaluation, checkpoints, the profiler window, the user's
state hooks): there it waits for the step, runs those hooks, and goes on. A step's time is
from when it could start (its dispatch, or the previous step's end) to its end, so the
bookkeeping between steps is not in it.
"""

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..arrays import abstract_arrays, combine_arrays, is_abstract, partition_arrays
from ..errors import InvalidValueError
from ..files import atomic_write_text
from ..model import VishwamAI
from ..model.flops import estimate_peak_flops
from ..model.protocol import flops_per_token
from ._monitor import (
    EXPERT_STAT_NAMES,
    Profiler,
    Progress,
    Throughput,
    compiled_memory,
    log_expert_stats,
    memory_values,
)
from ._periodic import CheckpointSaves, evaluate
from ._signals import StopSignals
from .checkpoint import Checkpointer, check_compatible
from .hooks import Hook, StepInfo, every
from .loaders import is_resumable, loader_state, restore_loader
from .metrics_db import MetricsDB
from .restore import restore_state
from .run_config import TrainingDiverged, TrainResult
from .state import TrainState, abstract_state, init_sharded_state, init_train_state, state_key
from .step import make_eval_step, make_train_step


def is_abstract_model(model: Any) -> bool:
    return any(is_abstract(x) for x in jax.tree_util.tree_leaves(model))


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics the host has not read yet."""

    step: int
    metrics: dict
    began: float
    """When its dispatch started."""
    done: float | None
    """When it was seen finished, if it already was when the dispatch returned."""


class _Control:
    """`vishwam.train.hooks.RunControl` of one `train()` call, at one step."""

    def __init__(self, run: "_Run", step: int):
        self._run, self.step, self.run_dir = run, step, run.t.run_dir

    def log(self, values: Mapping[str, float]) -> None:
        self._run.db.log(self.step, {name: float(value) for name, value in values.items()})

    def event(self, kind: str, detail: Mapping[str, Any]) -> None:
        self._run.record(self.step, kind, detail)

    def note(self, text: str) -> None:
        self._run.note(text)

    def stop(self, reason: str) -> None:
        self._run.stop_reason = str(reason)


class _Run:
    """The state of one `train()` call (kept off the trainer so that it can be called again)."""

    def __init__(self, trainer):
        self.t = trainer
        self.run = trainer.run
        self.db: MetricsDB | None = None
        self.ckpt: Checkpointer | None = None
        self.saves: CheckpointSaves | None = None
        self.final_status: str | None = None
        self.initial_val_loss: float | None = None
        self.last_eval: dict[str, float] | None = None
        self.skipped = 0
        self.consecutive_skips = 0
        self.last_checkpoint: int | None = None
        self.signals: StopSignals | None = None
        self.stop_reason: str | None = None
        self.progress = Progress(is_main=trainer.is_main, bar=self.run.progress, name=self.run.name,
                                 max_steps=trainer.max_steps, log_every=self.run.log_every)
        self.previous_done: float | None = None
        self.tokens_per_step = trainer.config.batch_size * trainer.config.seq_len
        self.flops_per_token = flops_per_token(trainer.pipeline.model, trainer.config.seq_len)
        self.throughput: Throughput | None = None
        self.profiler = Profiler(trainer.run_dir)
        self.last_step_done = 0
        self.eval_step = None

    def hooks(self, window: tuple[int, int] | None) -> list[Hook]:
        """The built-in hooks, then the user's, in the order they run."""
        run = self.run
        last = self.t.max_steps
        built_in = [Hook(self._memory_hook, lambda step: step % run.log_every == 0 or step == last, state=False,
                         name="memory"),
                    Hook(self._log_hook, every(1), state=False, name="metrics"),
                    Hook(self._progress_hook, every(1), state=False, name="progress")]
        if window is not None:
            built_in.append(Hook(self._profile_hook, lambda step: step in (window[0] - 1, window[1]), name="profile"))
        if run.eval_every and self.t.eval_loader is not None:
            built_in.append(Hook(self._eval_hook, every(run.eval_every), name="evaluation"))
        if run.checkpoint_every:
            built_in.append(Hook(self._save_hook, every(run.checkpoint_every), name="checkpoint"))
        return built_in + self.t.hooks

    # -------------------------------------------------------------- lifecycle
    def execute(self) -> TrainResult:
        t, run = self.t, self.run
        began = time.perf_counter()
        with contextlib.ExitStack() as stack:
            signals = self.signals = stack.enter_context(StopSignals(run.handle_signals))
            if run.resume == "never" and self.t.is_main and t.checkpoint_dir.exists():
                shutil.rmtree(t.checkpoint_dir)
            self.ckpt = stack.enter_context(Checkpointer(t.checkpoint_dir, keep=run.keep_checkpoints,
                                                         async_save=run.async_checkpoint))
            self.saves = CheckpointSaves(self.ckpt, t.checkpoint_dir, emit=t._emit, record=self.record)
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
            stack.callback(self.progress.close)
            # Before the database closes: a run that stops inside the window still records its trace.
            stack.callback(self._stop_profile)
            for hook in t.hooks:
                if callable(getattr(hook.fn, "close", None)):
                    stack.callback(hook.fn.close)
            self._record_start(latest, start)
            self._write_run_files()
            teacher = None if t.teacher is None else t.placement.place_tree(t.teacher)
            train_step = make_train_step(t.model_config, t.config, teacher=teacher, optimizer=t.optimizer)
            self.eval_step = make_eval_step(t.model_config, t.config.loss_chunk_size)
            peak_flops, peak_source = ((run.peak_flops, "RunConfig.peak_flops") if run.peak_flops
                                       else estimate_peak_flops(t.placement.devices()))
            self.throughput = Throughput(self.tokens_per_step, self.flops_per_token, peak_flops)
            self.note(f"{run.name}: {'resuming from step ' + str(start) if start else 'starting'} "
                      f"(max_steps {t.max_steps}, {self.tokens_per_step} tokens/step, "
                      f"{t.placement.describe()}, peak {peak_flops / 1e9:,.0f} GFLOP/s: {peak_source})")

            with t.placement.context():
                if start == 0:
                    self.initial_val_loss = self._evaluate(state.model, 0)
                state, step, reason = self._loop(train_step, state, start, signals)
                if reason != "finished" and reason != "data exhausted":
                    self._save(state, step, force_wait=True)
                    by_hook = self.stop_reason is not None and reason == self.stop_reason
                    self.record(step, "stop", {"hook" if by_hook else "signal": reason})
                    self.final_status = "stopped"
                else:
                    if self.last_eval is None or self.last_eval["step"] != step:
                        self._evaluate(state.model, step)
                    self._save(state, step, force_wait=True)
                    self.record(step, "finish", {"reason": reason, "skipped": self.skipped})
            self.progress.close()
            self.ckpt.wait()
            self.saves.log_committed()
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

    # ------------------------------------------------------------ start/resume
    def _initial_state(self, latest: int | None) -> tuple[TrainState, int]:
        t = self.t
        if latest is None:
            return self._fresh_state(), 0
        # Restored into abstract targets in their shardings: the state is built once, from the checkpoint.
        state, meta = restore_state(self.ckpt, latest, self._abstract_state())
        start = int(meta["step"])
        data_state = meta.get("data")
        if data_state is not None and is_resumable(t.train_loader):
            restore_loader(t.train_loader, data_state)
        elif is_resumable(t.train_loader):
            raise InvalidValueError(f"checkpoint step {latest} in {t.checkpoint_dir} has no data position; the loader "
                                    "would restart from its first batch. Start a new run directory.")
        self.initial_val_loss = meta.get("initial_val_loss")
        self.last_eval = meta.get("last_eval")
        self.skipped = int(meta.get("skipped", 0))
        self.last_checkpoint = latest
        return state, start

    def _fresh_state(self) -> TrainState:
        t = self.t
        if is_abstract_model(t.pipeline.model):
            # Built where it lives: each device computes only its own shards.
            state = init_sharded_state(t.model_config, t.config, t.mesh, t.placement.rules, optimizer=t.optimizer)
            return state if t.mesh is not None else jax.device_put(state, t.device)
        key = state_key(t.config)
        # A copy: the step donates its state, and the caller's model must stay usable.
        model = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, t.pipeline.model)
        return t.placement.place_tree(init_train_state(model, t.config, key=key, optimizer=t.optimizer))

    def _abstract_state(self) -> TrainState:
        """The fresh state's tree as `jax.ShapeDtypeStruct`s in the shardings the run uses."""
        t = self.t
        if is_abstract_model(t.pipeline.model):
            state = abstract_state(t.model_config, t.config, t.optimizer)
        else:
            key = state_key(t.config)
            state = eqx.filter_eval_shape(lambda m: init_train_state(m, t.config, key=key, optimizer=t.optimizer),
                                          t.pipeline.model)
        arrays, static = partition_arrays(state)
        return combine_arrays(abstract_arrays(arrays, t.placement.shardings(arrays)), static)

    def _record_start(self, latest: int | None, start: int) -> None:
        if latest is None:
            if self.db.resumed:
                # The run id exists but has no checkpoint: its rows belong to a trajectory we cannot continue.
                self.db.rewind(-1)
            self.record(0, "start", {"max_steps": self.t.max_steps})
            return
        deleted = self.db.rewind(start)
        self.record(start, "resume", {"checkpoint": latest, "rewound_rows": deleted})

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
    def _loop(self, train_step, state: TrainState, start: int,
              signals: StopSignals) -> tuple[TrainState, int, str]:
        t = self.t
        self.progress.open(start)
        step, pending, reason = start, None, "finished"
        iterator = iter(t.train_loader)
        window = self.profiler.plan(self.run.profile_steps, start)
        hooks = self.hooks(window)
        self.metric_hooks = [h for h in hooks if not h.state]
        state_hooks = [h for h in hooks if h.state]
        if window is not None and window[0] == start + 1:
            self.profiler.start(start + 1)
        while step < t.max_steps:
            if (stop := signals.agreed()) is not None:
                reason = stop
                break
            if self.stop_reason is not None:
                reason = self.stop_reason
                break
            try:
                batch = next(iterator)
            except StopIteration:
                reason = "data exhausted"
                break
            placed = t.placement.place_batch(batch)
            if step == start:
                self._record_compiled_memory(train_step, state, placed, step)
            began = time.perf_counter()
            state, metrics = train_step(state, placed)
            # A backend that ran the step inside the call (XLA:CPU often does) has finished it now.
            done = time.perf_counter() if metrics["loss"].is_ready() else None
            step += 1
            self.saves.log_committed()
            # One step of lag: the device runs step n while the host reads step n - 1.
            if pending is not None:
                self._finish_step(pending)
            pending = _Pending(step, metrics, began, done)
            due = [hook for hook in state_hooks if hook.due(step)]
            if due or step == t.max_steps or signals.signum is not None or self.stop_reason is not None:
                values = self._finish_step(pending)
                pending = None
                info = StepInfo(step, values, state, _Control(self, step))
                for hook in due:
                    hook.fn(info)
        if pending is not None:
            self._finish_step(pending)
        return state, step, reason

    def _finish_step(self, pending: _Pending) -> dict[str, float]:
        """Read a step's metrics, time it, check it is finite and run the metric hooks."""
        t, step = self.t, pending.step
        # The per-layer MoE arrays leave the device only at logging steps.
        arrays = {name: pending.metrics[name] for name in EXPERT_STAT_NAMES if name in pending.metrics}
        if arrays and (step % self.run.log_every == 0 or step == t.max_steps):
            log_expert_stats(self.db, step, arrays)
        host = jax.device_get({name: v for name, v in pending.metrics.items() if name not in arrays})
        done = pending.done if pending.done is not None else time.perf_counter()
        # The step's own time: from when it could start (its dispatch, or the previous step's
        # end) to its end; evaluations and saves between steps are not in it.
        start = pending.began if self.previous_done is None else max(self.previous_done, pending.began)
        elapsed, self.previous_done = done - start, done
        values = {name: float(value) for name, value in host.items()
                  if np.ndim(value) == 0 and name != "nonfinite" and (name != "distill" or t.teacher is not None)}
        nonfinite = bool(host["nonfinite"])
        values |= {"nonfinite": float(nonfinite), "step_time": elapsed}
        # Traced steps run under the profiler: their time is logged, their throughput is not.
        values |= self.throughput.values(elapsed, traced=self.profiler.traces(step))
        if nonfinite:
            self._non_finite(step, values)
        else:
            self.consecutive_skips = 0
        values["skipped"] = float(self.skipped)
        self.last_step_done = step
        info = StepInfo(step, values, None, _Control(self, step))
        for hook in self.metric_hooks:
            if hook.due(step):
                hook.fn(info)
        return values

    def _non_finite(self, step: int, values: dict[str, float]) -> None:
        """`nan_policy="stop"`: raise `TrainingDiverged` naming the last good checkpoint (the
        diverged state is not saved); `"skip"` (the step left the state unchanged on device):
        count it, and raise only after `nan_max_consecutive_skips` in a row."""
        t = self.t
        detail = {"loss": values["loss"], "grad_norm": values["grad_norm"], "policy": t.config.nan_policy}
        if t.config.nan_policy == "skip":
            self.skipped += 1
            self.consecutive_skips += 1
            self.record(step, "nan", {**detail, "action": "skipped", "skipped_total": self.skipped})
            if self.consecutive_skips <= self.run.nan_max_consecutive_skips:
                return
            why = (f"{self.consecutive_skips} non-finite steps in a row (up to step {step}; "
                   f"nan_max_consecutive_skips={self.run.nan_max_consecutive_skips})")
        else:
            self.record(step, "nan", {**detail, "action": "stopped"})
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

    # ----------------------------------------------------------- built-in hooks
    def _memory_hook(self, info: StepInfo) -> None:
        info.metrics.update(memory_values(self.t.placement.local_devices()))

    def _log_hook(self, info: StepInfo) -> None:
        self.db.log(info.step, info.metrics)
        self.t._emit("step", info.step, info.metrics)

    def _progress_hook(self, info: StepInfo) -> None:
        self.progress.step(info.step, info.metrics, nonfinite=bool(info.metrics["nonfinite"]), skipped=self.skipped)

    def _profile_hook(self, info: StepInfo) -> None:
        """The trace starts after step START-1 has finished and stops once STOP has."""
        if self.profiler.window is not None and info.step == self.profiler.window[1]:
            self._stop_profile()
        else:
            self.profiler.start(info.step + 1)

    def _eval_hook(self, info: StepInfo) -> None:
        self._evaluate(info.state.model, info.step)

    def _save_hook(self, info: StepInfo) -> None:
        self._save(info.state, info.step, force_wait=False)

    # ------------------------------------------------------------ periodic work
    def _evaluate(self, model, step: int) -> float | None:
        loader = self.t.eval_loader
        if loader is None:
            return None
        result = evaluate(self.eval_step, model, loader, self.t.placement.place_batch,
                          max_batches=self.run.eval_batches, stop_requested=self._stop_requested)
        if result.val_loss is None:
            self.note(f"step {step}: evaluation stopped by {self.signals.name} after {result.batches} batches")
            return None
        loss, perplexity = result.val_loss, result.val_perplexity
        self.last_eval = {"step": step, "val_loss": loss, "val_perplexity": perplexity}
        scalars = {"val_loss": loss, "val_perplexity": perplexity}
        load = result.expert_stats.get("expert_load")
        if load is not None and load.size:
            scalars["val_expert_load_max"] = float(load.max() * load.shape[-1])
        self.db.log(step, scalars)
        log_expert_stats(self.db, step, result.expert_stats, prefix="val_", names=("expert_load", "router_entropy"))
        self.record(step, "eval", {"val_loss": loss, "val_perplexity": perplexity, "batches": result.batches,
                                   "tokens": result.tokens, "seconds": result.seconds})
        self.note(f"step {step}: val_loss {loss:.4f} (perplexity {perplexity:.2f}, {int(result.tokens)} tokens)")
        return loss

    def _stop_requested(self) -> bool:
        return self.signals is not None and self.signals.signum is not None

    def _save(self, state: TrainState, step: int, *, force_wait: bool) -> None:
        t = self.t
        loader = t.train_loader
        meta = {"step": step, "config": t.compatibility_config(),
                "data": loader_state(loader) if is_resumable(loader) else None,
                "initial_val_loss": self.initial_val_loss, "last_eval": self.last_eval,
                "skipped": self.skipped, "tokenizer": str(t.run_dir / "tokenizer")}
        # Rows of every step this checkpoint covers must be on disk before it can exist.
        self.db.flush()
        if self.saves.start(step, state, meta):
            self.last_checkpoint = step
        if force_wait:
            self.ckpt.wait()
        self.saves.log_committed()

    def _export(self, state: TrainState) -> Path | None:
        t = self.t
        if not (self.run.export_pipeline and t.is_main and jax.process_count() == 1):
            return None
        tokenizer = getattr(t.pipeline, "tokenizer", None)
        if tokenizer is None or not isinstance(state.model, VishwamAI):
            return None
        from ..pipeline import VishwamAIPipeline

        return VishwamAIPipeline(state.model, tokenizer).save(t.run_dir / "pipeline", overwrite=True)

    # -------------------------------------------------------------- monitoring
    def _record_compiled_memory(self, train_step, state: TrainState, batch: dict, step: int) -> None:
        placement = self.t.placement
        detail = compiled_memory(train_step, state, batch, placement.devices(), placement.local_devices())
        self.db.set_compiled_memory(detail)
        self.record(step, "compiled_memory", detail)

    def _stop_profile(self) -> None:
        """Stop a running trace (at STOP, or when the run ends inside the window) and log it."""
        detail = self.profiler.stop(self.last_step_done)
        if detail is None:
            return
        self.record(detail["stop"], "profile", detail)
        self.note(f"profile of steps {detail['start']}-{detail['stop']}: {detail['path']} "
                  f"(tensorboard --logdir {detail['directory']}, or perfetto_trace.json.gz in ui.perfetto.dev)")

    # ----------------------------------------------------------------- output
    def record(self, step: int, kind: str, detail: Mapping[str, Any]) -> None:
        self.db.event(step, kind, detail)
        self.t._emit(kind, step, detail)

    def note(self, text: str) -> None:
        self.progress.note(text)

"""`VishwamAITrainer`: the loop around the train step; evaluation, checkpoints and metrics are its hooks.

One `train()` call opens `run_dir/metrics.duckdb` and the orbax checkpoints in
`run_dir/checkpoints/`; resumes from the latest complete checkpoint (parameters, optimiser
state, step, PRNG key, the data loader's position) once its config equals the run's; writes
`config.json` and `tokenizer/`; evaluates, then steps. After each step the hooks run
(`vishwam.train.hooks`): metrics to DuckDB, the progress bar, throughput and memory, and
every `eval_every` / `checkpoint_every` steps an evaluation / a save, then the user's own
(`add_hook`). The loop is a pure function of (state, batch index): a run killed anywhere and
started again reproduces the uninterrupted run bit for bit. Any Equinox model following
`vishwam.model.LanguageModel` trains here, with any optax optimiser. Non-finite losses follow
`TrainConfig.nan_policy`. With several hosts every process runs the same program after
`jax.distributed.initialize()`, and only process 0 writes the database, files and logs.
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import optax

from ..config import ModelConfig, TrainConfig
from ..errors import InvalidTypeError, InvalidValueError
from ..model import abstract_model as abstract_model
from ..model.flops import model_flops_per_token as model_flops_per_token
from ..model.protocol import describe_model, model_config_of
from ..parallel.sharding import rules_for
from ._monitor import MEMORY_METRICS as MEMORY_METRICS
from ._monitor import TIMING_METRICS as TIMING_METRICS
from ._placement import Placement
from ._run import _Run, is_abstract_model
from .checkpoint import Checkpointer, check_compatible, checkpoint_steps
from .hooks import Hook, StepInfo
from .hooks import every as every_step
from .loaders import loader_state as loader_state
from .loaders import restore_loader as restore_loader
from .restore import load_run_model as load_run_model
from .restore import load_run_state as load_run_state
from .run_config import RunConfig as RunConfig
from .run_config import TrainingDiverged as TrainingDiverged
from .run_config import TrainResult as TrainResult
from .run_config import check_seq_len

Callback = Callable[[str, int, Mapping[str, Any]], None]
"""`callback(kind, step, detail)`: every event the trainer records (`start`, `resume`,
`eval`, `checkpoint` once orbax has committed that step, `nan`, `stop`, `finish`) plus
`step` with the step's metrics and `checkpoint_started` when a save begins (not recorded)."""


class VishwamAITrainer:
    """Train `pipeline.model` on `train_loader` (see the module docstring for the whole story).

    Arguments:
        pipeline: a `VishwamAIPipeline`, anything with `.model` and `.tokenizer` (saved into
            the run with `save_pretrained`), or an Equinox model itself (any module following
            `vishwam.model.LanguageModel`). After `train()`, `pipeline.model` is the trained
            model. A `VishwamAI` from `abstract_model(config)` is created by the trainer
            directly in its shardings on the mesh, from `TrainConfig.seed`
            (`init_sharded_state`: the values an eager `VishwamAI(config, key=jax.random.key(seed))` has).
        config: the `TrainConfig` (schedule, batch, accumulation, NaN policy; the optimiser
            unless `optimizer` is given; `trainable` / `frozen` parameters).
        train_loader: an iterator of batch dicts (`tokens`, `targets`, `loss_mask`,
            optional `segment_ids`, `positions`; this process's rows of the global
            batch). With `state()` / `restore(state)` (as `vishwam.data.DataIterator`)
            or grain's `get_state()` / `set_state(state)` (the iterator of a
            `grain.python.DataLoader`, or of a grain dataset) its position is
            checkpointed and a resumed run continues exactly there.
        eval_loader: validation batches: an object with `reset()` that then iterates
            one pass (a `DataIterator` with `repeat=False`), or any re-iterable.
        run: a `RunConfig` (directories, intervals, mesh, resume mode).
        teacher: a frozen model to distil from (same vocabulary); the loss is
            then `TrainConfig.distill_alpha` CE + the rest KL.
        optimizer: any `optax.GradientTransformation`; default the built-in clip + AdamW.
            A resumed run must use the same one.
        extra_config: JSON-able facts about the run stored beside the configs in
            `config.json` and the database (e.g. the data source); not compared on resume.
        callbacks: called as `callback(kind, step, detail)` for every event (see `Callback`).
    """

    def __init__(self, pipeline: Any, config: TrainConfig, train_loader: Iterable,
                 eval_loader: Iterable | None = None, *, run: RunConfig | None = None,
                 teacher: Any = None, optimizer: optax.GradientTransformation | None = None,
                 extra_config: Mapping[str, Any] | None = None, callbacks: Sequence[Callback] = ()):
        if isinstance(pipeline, eqx.Module):
            pipeline = ModelOnly(pipeline)
        model = getattr(pipeline, "model", None)
        if not isinstance(model, eqx.Module) or not callable(model):
            raise InvalidTypeError(f"VishwamAITrainer: the model must be an Equinox module following "
                                   f"vishwam.model.LanguageModel, got {type(model).__name__}; pass a VishwamAIPipeline, "
                                   "an object with .model, or the model itself.")
        if not isinstance(config, TrainConfig):
            raise InvalidTypeError(f"VishwamAITrainer: config must be a TrainConfig, got {type(config).__name__}.")
        if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
            raise InvalidTypeError(f"VishwamAITrainer: optimizer must be an optax.GradientTransformation, got "
                                   f"{type(optimizer).__name__}.")
        self.pipeline = pipeline
        self.model_config: ModelConfig | None = model_config_of(model)
        self.config = config
        self.run = run if run is not None else RunConfig()
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.teacher = teacher
        self.optimizer = optimizer
        self.extra_config = dict(extra_config or {})
        self.callbacks = list(callbacks)
        self.hooks: list[Hook] = []
        self.max_steps = self.run.last_step(config)
        self.run.check_profile_window(self.max_steps)
        if self.model_config is not None:
            check_seq_len(self.model_config, config)
        elif is_abstract_model(model):
            raise InvalidValueError("VishwamAITrainer: an abstract model (ShapeDtypeStruct leaves) can only be built by "
                                    "the trainer for a VishwamAI; pass a model with arrays.")
        self.is_main = jax.process_index() == 0
        self.placement = Placement(self.run.mesh, self.model_config, config, rules_for(model))
        self.mesh, self.device = self.placement.mesh, self.placement.device
        self.run_dir = Path(self.run.run_dir).absolute()
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.duckdb"

    def add_hook(self, fn: Callable[[StepInfo], None], every: int = 1, *, state: bool = True,
                 name: str | None = None) -> Hook:
        """Call `fn(info)` (a `vishwam.train.hooks.StepInfo`) after every `every`-th step.

        `state=False`: the hook needs only the metrics; it then runs one step behind the
        device and `info.state` is None (no wait for the step). Hooks run after the built-in
        ones (logging, progress, profiling, evaluation, checkpoints), in the order added.
        """
        if not callable(fn):
            raise InvalidTypeError(f"add_hook: fn must be callable, got {type(fn).__name__}.")
        hook = Hook(fn, every_step(every), state, name or getattr(fn, "__name__", type(fn).__name__))
        self.hooks.append(hook)
        return hook

    # ---------------------------------------------------------------- configs
    def _tokenizer_info(self) -> dict[str, Any]:
        return _tokenizer_info(getattr(self.pipeline, "tokenizer", None))

    def compatibility_config(self) -> dict[str, Any]:
        """What must equal the checkpoint's for a resume: everything that changes the numbers."""
        return compatibility_config(self.pipeline.model, self.config, getattr(self.pipeline, "tokenizer", None),
                                    self.teacher)

    def full_config(self) -> dict[str, Any]:
        """`config.json`: the compatibility config, the run settings and `extra_config`."""
        return {**self.extra_config, **self.compatibility_config(), "tokenizer": self._tokenizer_info(),
                "run": self.run.to_dict(), "max_steps": self.max_steps}

    # ------------------------------------------------------------------- train
    def train(self) -> TrainResult:
        """Run (or resume) the training; see the module docstring. Returns a `TrainResult`.

        Raises:
            MetricsDBLockedError: another process holds `metrics.duckdb` (`on_db_locked="raise"`).
            IncompatibleConfigError: the checkpoint was written with another config (fields listed).
            TrainingDiverged: a non-finite loss under `nan_policy="stop"` (or too many skips).

        SIGTERM/SIGINT, or a hook's `info.run.stop(reason)`, stop it cleanly after a final
        checkpoint (`TrainResult.stop_reason` names the signal or the reason). On an exception,
        saves already started still complete and the database is closed with status `failed`.
        """
        return _Run(self).execute()

    # ------------------------------------------------------------------ events
    def _emit(self, kind: str, step: int, detail: Mapping[str, Any]) -> None:
        for callback in self.callbacks:
            callback(kind, step, detail)


def _tokenizer_info(tokenizer) -> dict[str, Any]:
    if tokenizer is None:
        return {}
    return {"fingerprint": getattr(tokenizer, "fingerprint", None),
            "vocab_size": int(getattr(tokenizer, "vocab_size", 0)) or None}


def compatibility_config(model: Any, config: TrainConfig, tokenizer: Any = None, teacher: Any = None) -> dict[str, Any]:
    """What a checkpoint's config must equal for a run to resume from it: the model (its
    `ModelConfig`, or its class and arrays), the `TrainConfig`, the tokenizer's fingerprint and
    the teacher. A script can compare it with `check_resume` before it reads any data."""
    return {"model": describe_model(model), "train": config.to_dict(),
            "tokenizer": _tokenizer_info(tokenizer).get("fingerprint"),
            "teacher": None if teacher is None else describe_model(teacher)}


def check_resume(run_dir: str | Path, compatibility: Mapping[str, Any]) -> None:
    """Raise `IncompatibleConfigError` when `run_dir` has a checkpoint whose config differs
    from `compatibility` (`compatibility_config(...)`); nothing when it has none."""
    steps, _ = checkpoint_steps(Path(run_dir) / "checkpoints")
    if steps:
        with Checkpointer(Path(run_dir) / "checkpoints", keep=None, async_save=False) as ckpt:
            check_compatible(ckpt.read_meta(steps[-1]).get("config"), compatibility)


@dataclasses.dataclass
class ModelOnly:
    """A model trained without a tokenizer (no `tokenizer/` or `pipeline/` in the run)."""

    model: Any
    tokenizer: Any = None

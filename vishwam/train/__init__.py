"""Training: the step, the optimiser, checkpoints, metrics and the runner.

- `TrainState`: what changes during training (model, optimiser moments, step, PRNG key).
- `init_train_state`: a fresh `TrainState` at step 0.
- `make_train_step`: the jitted train step (accumulation, losses, clipping, NaN policy).
- `make_eval_step`: the jitted validation step (summed NLL and token count).
- `make_optimizer`: the optax optimiser of a `TrainConfig`.
- `learning_rate_schedule`: the learning rate of each optimiser update.
- `MetricsDB`: the run's metrics and events in one DuckDB file.
- `MetricsDBLockedError`: another process holds the metrics database.
- `load_metrics`: per-step metrics of a run from a database.
- `load_expert_metrics`: one per-layer, per-expert MoE statistic of a run over steps.
- `query`: SQL over one or several runs' databases.
- `runs`: the runs a database holds.
- `events`: the events of a run.
- `Checkpointer`: keep-last-K orbax checkpoints of a state and its JSON meta.
- `CheckpointError`: a checkpoint cannot be saved or restored as asked.
- `IncompatibleConfigError`: a checkpoint written with another config.
- `VishwamAITrainer`: the training loop (evaluation, checkpoints, metrics, resume, signals), for any
  model following `vishwam.model.LanguageModel` and any optax optimiser; `add_hook` adds your own.
- `StepInfo`: what a hook sees (step, metrics, state, `run.log/event/note/stop`).
- `TensorBoardHook`, `WandbHook`: metrics to TensorBoard (tensorboardX) or Weights & Biases.
- `RunConfig`: how a run is driven (directories, intervals, mesh, resume mode).
- `TrainResult`: what `VishwamAITrainer.train` did.
- `TrainingDiverged`: a non-finite loss or gradient stopped the run.
- `load_run_state`: the train state and meta of a run directory's checkpoint.
- `load_run_model`: the model and meta of a run directory's checkpoint.
- `model_flops_per_token`: training FLOPs per token (defined in `vishwam.model.flops`).

The step-level names and the metrics reader import eagerly; the runner and the checkpointer
pull in orbax, so they load on first use; nothing here imports duckdb until a database is opened.
"""

import importlib

from .metrics_db import MetricsDB as MetricsDB
from .metrics_read import MetricsDBLockedError as MetricsDBLockedError
from .metrics_read import events as events
from .metrics_read import load_expert_metrics as load_expert_metrics
from .metrics_read import load_metrics as load_metrics
from .metrics_read import query as query
from .metrics_read import runs as runs
from .optim import learning_rate_schedule as learning_rate_schedule
from .optim import make_optimizer as make_optimizer
from .state import TrainState as TrainState
from .state import init_train_state as init_train_state
from .step import make_eval_step as make_eval_step
from .step import make_train_step as make_train_step

_LAZY = {
    "Checkpointer": ".checkpoint",
    "CheckpointError": ".checkpoint",
    "IncompatibleConfigError": ".checkpoint",
    "VishwamAITrainer": ".trainer",
    "StepInfo": ".hooks",
    "TensorBoardHook": ".hooks",
    "WandbHook": ".hooks",
    "RunConfig": ".run_config",
    "TrainResult": ".run_config",
    "TrainingDiverged": ".run_config",
    "load_run_model": ".restore",
    "load_run_state": ".restore",
    "model_flops_per_token": "..model.flops",
}

__all__ = [
    "MetricsDB", "MetricsDBLockedError", "events", "load_metrics", "load_expert_metrics", "query", "runs",
    "learning_rate_schedule",
    "make_optimizer", "TrainState", "init_train_state", "make_eval_step", "make_train_step", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

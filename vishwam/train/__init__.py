"""Training: the step, the optimiser, losses, checkpoints, metrics and the runner.

The step-level API (`TrainState`, `make_train_step`, ...) and the metrics reader
import eagerly. The runner and the checkpointer pull in orbax, so they load on
first use (`vishwam.train.VishwamAITrainer`); nothing here imports duckdb until a
database is opened.
"""

import importlib

from .metrics_db import MetricsDB as MetricsDB
from .metrics_db import MetricsDBLockedError as MetricsDBLockedError
from .metrics_db import events as events
from .metrics_db import load_metrics as load_metrics
from .metrics_db import runs as runs
from .optim import learning_rate_schedule as learning_rate_schedule
from .optim import make_optimizer as make_optimizer
from .step import TrainState as TrainState
from .step import init_train_state as init_train_state
from .step import make_eval_step as make_eval_step
from .step import make_train_step as make_train_step

_LAZY = {
    "Checkpointer": ".checkpoint",
    "CheckpointError": ".checkpoint",
    "IncompatibleConfigError": ".checkpoint",
    "VishwamAITrainer": ".trainer",
    "RunConfig": ".trainer",
    "TrainResult": ".trainer",
    "TrainingDiverged": ".trainer",
    "load_run_model": ".trainer",
    "load_run_state": ".trainer",
    "model_flops_per_token": "..plan",
}

__all__ = [
    "MetricsDB", "MetricsDBLockedError", "events", "load_metrics", "runs", "learning_rate_schedule",
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

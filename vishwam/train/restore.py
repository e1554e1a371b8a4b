"""Reading a run back from its checkpoints: the train state, or only its model.

`restore_state` is the one restore of a train state (into a concrete target, whose arrays
land in their shardings, or an abstract one); `abstract_state` is the target built from the
configs alone. `load_run_state` / `load_run_model` read a run directory with the configs
stored in the checkpoint, so a run need not have finished (no `pipeline/` export), e.g. for
a teacher; `load_checkpoint_state` takes the configs from the caller instead.
"""

import os
from pathlib import Path
from typing import Any

import equinox as eqx
from jaxtyping import PyTree

from ..arrays import combine_arrays, partition_arrays
from ..config import ModelConfig, TrainConfig
from ..model import VishwamAI
from .checkpoint import Checkpointer
from .state import TrainState, abstract_state


def restore_state(ckpt: Checkpointer, step: int | None, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """`target` with its arrays read from checkpoint `step` (None: the latest), and the step's meta.

    `target` may hold arrays (the restored ones land in their shardings) or
    `jax.ShapeDtypeStruct`s; its static parts are kept as they are.
    """
    arrays, static = partition_arrays(target)
    restored, meta = ckpt.restore(step, arrays)
    return combine_arrays(restored, static), meta


def load_checkpoint_state(
    directory: str | os.PathLike, step: int | None = None, *,
    configs: tuple[ModelConfig, TrainConfig] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """The train state in checkpoint directory `directory` at `step` (default: the latest), and its meta.

    `configs` are the run's `(ModelConfig, TrainConfig)`; `None` reads them from the
    checkpoint's meta (`meta["config"]`, as `VishwamAITrainer` saves it).
    """
    with Checkpointer(directory, keep=None, async_save=False) as ckpt:
        if configs is None:
            meta = ckpt.read_meta(step)
            configs = ModelConfig.from_dict(meta["config"]["model"]), TrainConfig.from_dict(meta["config"]["train"])
        return restore_state(ckpt, step, abstract_state(*configs))


def load_run_state(run_dir: str | os.PathLike, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """The train state of a run's checkpoint (default: the latest) and that checkpoint's meta.

    Rebuilds the state's structure from the configs stored in the checkpoint, so a
    run need not have finished (no `pipeline/` export needed), e.g. for a teacher.
    """
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist; pass a run directory written by "
                                "VishwamAITrainer (runs/<name>).")
    return load_checkpoint_state(directory, step)


def load_run_model(run_dir: str | os.PathLike, step: int | None = None) -> tuple[VishwamAI, dict[str, Any]]:
    """The model of a run's checkpoint (default: the latest) and the checkpoint's meta."""
    state, meta = load_run_state(run_dir, step)
    return state.model, meta

"""Every kind of directory a model comes in, read by one function (`load_model_dir`).

The commands that take "a model" (`vishwam-generate`, `vishwam-serve`, `vishwam-upcycle`, a
distillation teacher of `vishwam-train`) accept the same directories, in this order:

1. a `VishwamAIPipeline.save` directory (`pipeline.json`), or a finished run's `pipeline/`;
2. a training run (`checkpoints/`): the model of a checkpoint (default the latest) rebuilt from
   the run's `config.json`, with the run's `tokenizer/` when it has one; a `step` always reads
   the checkpoints, even when the run has a `pipeline/`;
3. a transformers checkpoint (`vishwam.hf.is_hf_checkpoint`), with its tokenizer when it has one;
4. a `config.json` (a `ModelConfig`) + `model.safetensors` pair (`vishwam-convert-hf --weights-only`).
"""

import json
import os
from pathlib import Path
from typing import Any

from .config import ModelConfig, TrainConfig
from .errors import InvalidValueError
from .hf import is_hf_checkpoint, load_hf_checkpoint, load_hf_pipeline
from .model import VishwamAI
from .pipeline import VishwamAIPipeline, load_model_weights
from .tokenizer import has_hf_tokenizer, load_hf_tokenizer
from .train.checkpoint import checkpoint_steps
from .train.restore import load_checkpoint_state

KINDS = ("a pipeline directory (pipeline.json), a training run directory (checkpoints/ or pipeline/), a "
         "transformers checkpoint (a config.json naming an architecture, safetensors) or a config.json + "
         "model.safetensors pair")


def load_model_dir(directory: str | os.PathLike, *, step: int | None = None,
                   dtype: Any = None) -> tuple[VishwamAI, VishwamAIPipeline | None]:
    """The model in `directory` (see the module docstring for the kinds and their order), and
    its pipeline when the directory has a tokenizer (`None` otherwise).

    Arguments:
        step: a run's checkpoint step (default: its `pipeline/` if finished, else the latest
            checkpoint); refused for the other kinds.
        dtype: parameter and compute dtype of a transformers checkpoint (`vishwam.hf.config_from_hf`).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory; pass {KINDS}.")
    if step is None:
        for candidate in (folder, folder / "pipeline"):
            if (candidate / "pipeline.json").is_file():
                pipeline = VishwamAIPipeline.load(candidate)
                return pipeline.model, pipeline
    if (folder / "checkpoints").is_dir():
        return _run_model(folder, step)
    if step is not None:
        raise InvalidValueError(f"step {step}: {folder} is not a training run directory (no checkpoints/); a step "
                                "names one of a run's checkpoints.")
    if is_hf_checkpoint(folder):
        if has_hf_tokenizer(folder):
            pipeline = load_hf_pipeline(folder, dtype=dtype)
            return pipeline.model, pipeline
        return load_hf_checkpoint(folder, dtype=dtype)[0], None
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return load_model_weights(folder / "model.safetensors", ModelConfig.from_json(folder / "config.json")), None
    raise InvalidValueError(f"{folder} is neither {KINDS.replace(' or a config', ' nor a config')}; pass one of those.")


def _run_model(run_dir: Path, step: int | None) -> tuple[VishwamAI, VishwamAIPipeline | None]:
    """The model of checkpoint `step` (default: the latest) of a run, rebuilt from the run's
    `config.json` (its `model` and `train` sections, as the trainer writes it)."""
    config_path, checkpoints = run_dir / "config.json", run_dir / "checkpoints"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a run directory holds the config.json the trainer wrote.")
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidValueError(f"{config_path} is not valid JSON ({error}); is {run_dir} a training run "
                                "directory?") from None
    if not isinstance(saved, dict) or "model" not in saved or "train" not in saved:
        raise InvalidValueError(f"{config_path} has no 'model' and 'train' sections; is {run_dir} a training run "
                                "directory?")
    complete, unfinished = checkpoint_steps(checkpoints)
    if unfinished:
        # Opening the checkpoint manager would delete these, failing a save still in flight.
        raise FileExistsError(f"{checkpoints} holds unfinished saves {unfinished}: a run is saving (wait for it) "
                              "or was killed mid-save (resume it, or delete them).")
    if not complete:
        raise FileNotFoundError(f"{checkpoints} holds no complete checkpoint.")
    configs = ModelConfig.from_dict(saved["model"]), TrainConfig.from_dict(saved["train"])
    state, _ = load_checkpoint_state(checkpoints, step, configs=configs)
    if not (run_dir / "tokenizer").is_dir():
        return state.model, None
    return state.model, VishwamAIPipeline(state.model, load_hf_tokenizer(run_dir / "tokenizer"))

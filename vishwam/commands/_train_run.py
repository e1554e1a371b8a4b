"""What `vishwam-train` starts from: the run directory's saved config, data and tokenizer when it
resumes, `--init-from`'s pipeline, a `--config` file or a preset.

A run's `config.json` (written by the trainer) is the base of a resume: its `model` and `train`
sections (`_base_configs`), its `data` section for the data flags not given again (`_saved_data`),
its `run` section (`_saved_section`) and top-level entries such as `init_from` (`_saved_value`).
"""

import json
import tempfile
import time
from pathlib import Path

from vishwam.errors import InvalidValueError
from vishwam.files import read_json_object

DEFAULT_PRESET = "small"
MIN_TOKENIZER_VOCAB = 512  # 256 byte-fallback pieces + 4 specials need room for real pieces


def _init_dir(path: Path) -> Path:
    """The pipeline directory of `--init-from`: the directory itself, or a run's `pipeline/`."""
    return path / "pipeline" if not (path / "pipeline.json").is_file() and (path / "pipeline").is_dir() else path


def _saved_section(run_dir: Path, name: str) -> dict:
    """A section (`run`, `data`) of a run's config.json; {} when absent or unreadable."""
    try:
        section = json.loads((run_dir / "config.json").read_text()).get(name, {})
    except (OSError, ValueError, AttributeError):
        return {}
    return section if isinstance(section, dict) else {}


def _saved_value(run_dir: Path, name: str):
    """A top-level value of a run's config.json; None when absent or unreadable."""
    try:
        data = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get(name) if isinstance(data, dict) else None


def _base_configs(args, run_dir: Path) -> tuple[dict, dict, str]:
    """Model and train dicts before CLI overrides, and where they came from."""
    from vishwam.config import PRESETS

    saved = run_dir / "config.json"
    if args.config is not None:
        data = read_json_object(args.config, what="--config")
        sectioned = "model" in data or "train" in data
        model = data.get("model", {}) if sectioned else data
        train = data.get("train", {}) if sectioned else {}
        if not isinstance(model, dict) or not isinstance(train, dict):
            raise InvalidValueError(f"--config {args.config}: the 'model' and 'train' sections must be JSON objects.")
        return dict(model), dict(train), str(args.config)
    if saved.exists() and not args.new and not args.preset:
        data = read_json_object(saved, what="the run's")
        if not isinstance(data.get("model"), dict) or not isinstance(data.get("train"), dict):
            raise InvalidValueError(f"{saved} has no 'model' and 'train' sections; it was not written by the trainer "
                                    "(start over with --new, or choose another --run-dir).")
        return dict(data["model"]), dict(data["train"]), f"{saved} (resuming)"
    if args.init_from is not None:
        model = read_json_object(_init_dir(args.init_from) / "config.json", what="--init-from's")
        return model, {}, f"{_init_dir(args.init_from)} (its weights)"
    preset = args.preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise InvalidValueError(f"--preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}.")
    return dict(PRESETS[preset]), {}, f"preset {preset!r}"


def _saved_data(run_dir: Path) -> tuple[list | None, str | None, float | None]:
    """The data source, separator and validation fraction a run was started with (its
    config.json), for a resume that does not give them again."""
    data = _saved_section(run_dir, "data")
    source, separator, fraction = data.get("source"), data.get("separator"), data.get("val_fraction")
    return (source if isinstance(source, list) else None, separator if isinstance(separator, str) else None,
            fraction if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) else None)


def _tokenizer(args, run_dir: Path, source, vocab_size: int, *, exact: bool = False):
    """`source`: a `vishwam.data.Source`."""
    from vishwam.tokenizer import VishwamAITokenizer

    if args.tokenizer is not None:
        return VishwamAITokenizer.from_pretrained(args.tokenizer), f"{args.tokenizer}"
    if (run_dir / "tokenizer" / "tokenizer.model").exists() and not args.new:
        return VishwamAITokenizer.from_pretrained(run_dir / "tokenizer"), f"{run_dir / 'tokenizer'}"
    if (run_dir / "tokenizer" / "tokenizer.json").exists() and not args.new:  # an HF model's, kept by the run
        from vishwam.tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(run_dir / "tokenizer"), f"{run_dir / 'tokenizer'}"
    start = time.perf_counter()
    documents = source.read().documents
    if not any(documents):
        raise InvalidValueError(f"--data {' '.join(args.data or [])}: no text to train a tokenizer on (the files are empty).")
    target = args.vocab_size or (vocab_size if exact else max(vocab_size, MIN_TOKENIZER_VOCAB))
    # Trained into a scratch folder: the trainer saves it into the run once training starts,
    # so a run refused later leaves no half-made run directory behind.
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = VishwamAITokenizer.train(documents, Path(scratch) / "tokenizer.model", vocab_size=target,
                                             hard_vocab_limit=False, input_kind="documents")
    return tokenizer, (f"trained here: vocab {tokenizer.vocab_size} on {len(documents)} documents "
                       f"in {time.perf_counter() - start:.1f} s")


def _initial_model(args, model_config):
    """The model the trainer starts from: `--init-from`'s weights run under `model_config`, else
    an abstract model (the trainer initialises it from the seed, or restores a checkpoint)."""
    from vishwam.config import ModelConfig
    from vishwam.model import abstract_model
    from vishwam.pipeline import load_model_weights

    if args.init_from is None:
        return abstract_model(model_config)
    folder = _init_dir(args.init_from)
    saved = ModelConfig.from_json(folder / "config.json")
    try:
        return load_model_weights(folder / "model.safetensors", saved).with_config(model_config)
    except InvalidValueError:
        raise InvalidValueError(f"--init-from {args.init_from}: the flags change the weights' shapes (fields "
                                f"{sorted(saved.diff(model_config))}); --set may change only how they run "
                                "(dispatch, capacity, losses, remat, dtypes).") from None


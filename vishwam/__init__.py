"""vishwam: Mixture-of-Experts transformer language models in JAX (Equinox).

The model and its parts:
    VishwamAI            the MoE transformer: `VishwamAI(config, *, key)`, `model(tokens) -> (logits, aux)`
    ModelConfig          its shapes and arithmetic (`ModelConfig.preset("tiny" | "small" | "seed")`)
    TrainConfig          one optimisation step: optimiser, schedule, batch, losses
    KVCache              preallocated keys and values for cached decoding
    count_parameters     total / active / routed parameter counts of a config, nothing allocated
    flash_attention      attention behind one function (Pallas GPU/TPU kernels, blockwise XLA, reference)
    generate             KV-cache generation in one jit (the module is `vishwam.generation`)
Text:
    VishwamAITokenizer   SentencePiece tokenizer with HuggingFace-compatible files
    JsonTokenizer        a `tokenizer.json` (HF tokenizers) tokenizer behind the same interface
    VishwamAIPipeline    model + tokenizer + generation; saved and loaded as a directory
Training:
    VishwamAITrainer     the runner: checkpoints, resume, evaluation, DuckDB metrics
    upcycle              a dense model / pipeline / HF directory -> a MoE whose experts copy its MLPs
                         (the module is `vishwam.upcycling`)
    enable_runtime_checks  jaxtyping + beartype shape checks of vishwam's code (or VISHWAM_RUNTIME_CHECKS=1)

Everything loads on first use, subpackages included (`vishwam.train.make_train_step` works
after `import vishwam`): nn, kernels, parallel, model, config, tokenizer, data, train, hf, plan,
gpu_targets (abstract NVIDIA GPUs to compile for), memory, generation, pipeline, launch, upcycling, serve (an OpenAI-compatible server), files, cli, arrays,
errors (`InputError`: what bad input raises), compile_cache, commands (the command lines). `help(vishwam.<name>)` lists each API.
"""

import importlib

from .runtime_checks import enable_from_environment as _enable_from_environment
from .runtime_checks import enable_runtime_checks as enable_runtime_checks

__version__ = "0.1.0"

_SUBMODULES = ("nn", "kernels", "parallel", "model", "config", "tokenizer", "data", "train", "hf", "plan",
               "gpu_targets", "memory", "generation", "pipeline", "launch", "upcycling", "serve", "files", "cli", "arrays",
               "runtime_checks", "errors", "compile_cache", "commands")
_NAMES = {
    "VishwamAI": "model", "KVCache": "model", "count_parameters": "model",
    "ModelConfig": "config", "TrainConfig": "config",
    "flash_attention": "kernels", "generate": "generation",
    "VishwamAITokenizer": "tokenizer", "JsonTokenizer": "tokenizer",
    "VishwamAIPipeline": "pipeline", "VishwamAITrainer": "train", "upcycle": "upcycling",
}

__all__ = [*_NAMES, "enable_runtime_checks", "__version__"]

_enable_from_environment()


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vishwam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES})

"""vishwam: Mixture-of-Experts transformer language models in JAX (Equinox)."""

from . import nn as nn
from .config import ModelConfig as ModelConfig
from .kernels import flash_attention as flash_attention
from .generate import generate as generate
from .model import KVCache as KVCache
from .model import VishwamAI as VishwamAI
from .model import count_parameters as count_parameters
from .pipeline import VishwamAIPipeline as VishwamAIPipeline
from .tokenizer import VishwamAITokenizer as VishwamAITokenizer
from .tokenizer_json import JsonTokenizer as JsonTokenizer

__version__ = "0.1.0"


def __getattr__(name: str):
    # The runner pulls in orbax and duckdb; load it only when asked for.
    if name == "VishwamAITrainer":
        from .train.trainer import VishwamAITrainer

        return VishwamAITrainer
    raise AttributeError(f"module 'vishwam' has no attribute {name!r}")

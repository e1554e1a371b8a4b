"""HuggingFace interop: transformers safetensors checkpoints in and out, and their tokenizers.

Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 checkpoints
(`SUPPORTED_ARCHITECTURES`) load as an equivalent `VishwamAI` and save back in a form
transformers loads. The arithmetic already matches (RMSNorm, rotate-half RoPE and its
scalings, GQA, q/k norms, latent attention, SwiGLU, the families' windows, routing and shared
experts); only
the layouts differ (`vishwam.hf.tensor_map`). Each family's own facts are one module of
`vishwam.hf.families`.

Public API:
    load_hf_checkpoint       a transformers directory -> `(VishwamAI, ModelConfig)`.
    save_hf_checkpoint       a `VishwamAI` -> `config.json` + safetensors (sharded on request).
    load_hf_pipeline         a `VishwamAIPipeline` (model + tokenizer + stop ids) from an HF directory.
    load_hf_tokenizer        the tokenizer of an HF directory (from `vishwam.tokenizer`).
    generation_eos_ids       the ids an HF model stops generating at (from `vishwam.tokenizer`).
    config_from_hf           a config.json (dict) -> `ModelConfig`.
    config_to_hf             a `ModelConfig` -> config.json (dict).
    is_hf_checkpoint         whether a directory's config.json is a transformers one.
    SUPPORTED_ARCHITECTURES  config.json `architectures` name -> family `model_type`.
    DEFAULT_TOKEN_IDS        the pad/bos/eos ids `config_to_hf` writes by default.
    PartitionFn              `partition(path, shape) -> PartitionSpec` for loading onto a mesh.
    CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE  the file names.
"""

from ..tokenizer.loading import CONFIG_FILE as CONFIG_FILE
from ..tokenizer.loading import GENERATION_CONFIG_FILE as GENERATION_CONFIG_FILE
from ..tokenizer.loading import generation_eos_ids as generation_eos_ids
from ..tokenizer.loading import load_hf_tokenizer as load_hf_tokenizer
from .config import DEFAULT_TOKEN_IDS as DEFAULT_TOKEN_IDS
from .config import config_from_hf as config_from_hf
from .config import config_to_hf as config_to_hf
from .config import is_hf_checkpoint as is_hf_checkpoint
from .families import SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES
from .pipeline import load_hf_pipeline as load_hf_pipeline
from .weights import INDEX_FILE as INDEX_FILE
from .weights import WEIGHTS_FILE as WEIGHTS_FILE
from .weights import PartitionFn as PartitionFn
from .weights import load_hf_checkpoint as load_hf_checkpoint
from .weights import save_hf_checkpoint as save_hf_checkpoint

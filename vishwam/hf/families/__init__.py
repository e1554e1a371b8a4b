"""The HF architectures vishwam reads and writes, one module each.

    Family                   what one architecture has of its own (config.json names and
                             defaults, features, MoE tensor names).
    FAMILIES                 every family: Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE,
                             Qwen3-MoE, OLMoE, DeepSeek-V3.
    SUPPORTED_ARCHITECTURES  config.json `architectures` name -> `model_type`.
    family_of                the family of a config.json.
    family_for               the family `config_to_hf` writes a `ModelConfig` as.

To add a family: a module here defining its `Family` (`mixtral.py` shows an MoE one), and
its entry in `FAMILIES` (`_registry.py`).
"""

from ._family import Family as Family
from ._registry import FAMILIES as FAMILIES
from ._registry import SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES
from ._registry import family_for as family_for
from ._registry import family_of as family_of

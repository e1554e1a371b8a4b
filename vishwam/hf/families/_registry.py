"""Every family, and the one a `config.json` or a `ModelConfig` belongs to."""

from collections.abc import Mapping
from typing import Any

from ...config import ModelConfig
from ...errors import InvalidValueError
from ._family import Family
from .llama import LLAMA
from .mistral import MISTRAL
from .mixtral import MIXTRAL
from .qwen2 import QWEN2

FAMILIES = (LLAMA, MISTRAL, QWEN2, MIXTRAL)
SUPPORTED_ARCHITECTURES = {family.architecture: family.model_type for family in FAMILIES}
_BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}


def family_of(hf: Mapping[str, Any]) -> Family:
    """The family of a transformers config.json (as a dict): its first supported
    `architectures` entry, else (no `architectures`) its `model_type`."""
    architectures = hf.get("architectures") or []
    known = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if known:
        return _BY_MODEL_TYPE[SUPPORTED_ARCHITECTURES[known[0]]]
    if not architectures and hf.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf["model_type"]]
    raise InvalidValueError(
        f"HF config: unsupported architecture {architectures or hf.get('model_type')!r}; vishwam reads "
        f"{sorted(SUPPORTED_ARCHITECTURES)} checkpoints."
    )


def family_for(config: ModelConfig) -> Family:
    """The family `config_to_hf` writes `config` as (the one whose `writes(config)` holds)."""
    (family,) = [family for family in FAMILIES if family.writes(config)]
    return family

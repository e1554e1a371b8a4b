"""Every family, and the one a `config.json` or a `ModelConfig` belongs to."""

from collections.abc import Mapping
from typing import Any

from ...config import ModelConfig
from ...errors import InvalidValueError
from ._family import Family
from .deepseek_v3 import DEEPSEEK_V3
from .llama import LLAMA
from .mistral import MISTRAL
from .mixtral import MIXTRAL
from .olmoe import OLMOE
from .qwen2 import QWEN2
from .qwen2_moe import QWEN2_MOE
from .qwen3 import QWEN3
from .qwen3_moe import QWEN3_MOE

FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V3)
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
    """The family `config_to_hf` writes `config` as: the one with its `qk_norm` and `attention`
    whose `writes(config)` holds. Raises `InvalidValueError` when none does."""
    families = [family for family in FAMILIES if family.qk_norm == config.qk_norm
                and family.attention == config.attention and family.writes(config)]
    if not families:
        kind = "MoE" if config.is_moe else "dense"
        raise InvalidValueError(
            f"save_hf_checkpoint: no HF family vishwam writes has a {kind} model with qk_norm={config.qk_norm!r} and "
            f"attention={config.attention!r}; q/k norms are written as Qwen3 (dense) and Qwen3-MoE ('head') or OLMoE "
            "('full', MoE), latent attention as DeepSeek-V3 (MoE)."
        )
    (family,) = families
    return family

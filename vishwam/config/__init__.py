"""Configs: frozen dataclasses with a docstring per field, JSON files and `--set` flags.

- `ModelConfig`: the model's shapes and arithmetic; `ModelConfig.preset(name)` for
  `PRESETS` (`tiny`, `small`, `seed`; published MoE models at their real size: `qwen3-30b-a3b`,
  `olmoe-1b-7b`, `qwen2-57b-a14b`).
- `TrainConfig`: one optimisation step (optimiser, schedule, batch, losses).
- `JsonConfig`: the base class (type checks, JSON round trip, `parse_override`, `diff`).
- `config_diff(a, b)`: the fields two config dicts disagree on, nested names dotted.
- The choices of string fields, as `Literal` types: `NormType`, `RematPolicy`, `AttentionImpl`,
  `MoEDispatch`, `RouterType`, `LoadBalanceLoss`, `DType`, `Fp8Target`, `Fp8Scaling`, `QkNorm`,
  `RopeScalingType`, `NanPolicy`, `LrSchedule`.
"""

import warnings

from ._parsing import JsonConfig as JsonConfig
from ._parsing import config_diff as config_diff
from .model import PRESETS as PRESETS
from .model import AttentionImpl as AttentionImpl
from .model import DType as DType
from .model import Fp8Scaling as Fp8Scaling
from .model import Fp8Target as Fp8Target
from .model import LoadBalanceLoss as LoadBalanceLoss
from .model import ModelConfig as ModelConfig
from .model import MoEDispatch as MoEDispatch
from .model import NormType as NormType
from .model import QkNorm as QkNorm
from .model import RematPolicy as RematPolicy
from .model import RopeScalingType as RopeScalingType
from .model import RouterType as RouterType
from .train import LrSchedule as LrSchedule
from .train import NanPolicy as NanPolicy
from .train import TrainConfig as TrainConfig

__all__ = ["JsonConfig", "config_diff", "PRESETS", "ModelConfig", "TrainConfig", "AttentionImpl", "DType",
           "Fp8Scaling", "Fp8Target", "LoadBalanceLoss", "MoEDispatch", "NormType", "QkNorm", "RematPolicy",
           "RopeScalingType", "RouterType", "NanPolicy", "LrSchedule"]


def __getattr__(name: str):
    # Moved names, kept importable from here for one release.
    if name == "parameter_counts_closed_form":
        warnings.warn("vishwam.config.parameter_counts_closed_form moved to vishwam.model.params",
                      DeprecationWarning, stacklevel=2)
        from vishwam.model import params

        return params.parameter_counts_closed_form
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

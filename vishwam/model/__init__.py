"""The language model: token embedding -> stacked blocks -> final norm -> LM head.

- `LanguageModel`, `FusedHeadModel`: the call protocol any model trained by `vishwam.train`
  follows (the latter lets the step fuse the LM head with the loss).
- `VishwamAI(config, *, key)`: the model; `model(tokens)` gives `(logits, aux)`,
  `features`/`logits` the same in two halves, `decode` the KV-cache forward.
- `KVCache`: preallocated keys and values of every layer.
- `vishwam.model.mtp`: DeepSeek-V3's multi-token prediction modules (`ModelConfig.mtp_depth`),
  trained beside the model and left out at inference.
- `abstract_model(config)`: the model as `jax.ShapeDtypeStruct`s (nothing allocated).
- `count_parameters(config)`: total, active-per-token and routed parameter counts;
  `parameter_counts_closed_form(config)`: the same from formulae (an independent check).
- `model_flops_per_token(config, seq_len)`: training FLOPs per token (MFU's numerator).
- `Stage`, `stage_plan`, `apply_remat`: the stacked layers (defined in `vishwam.nn.stack`).
"""

from ..nn.stack import Stage as Stage
from ..nn.stack import apply_remat as apply_remat
from ..nn.stack import stage_plan as stage_plan
from .flops import model_flops_per_token as model_flops_per_token
from .lm import KVCache as KVCache
from .lm import VishwamAI as VishwamAI
from .lm import abstract_model as abstract_model
from .params import count_parameters as count_parameters
from .params import parameter_counts_closed_form as parameter_counts_closed_form
from .protocol import FusedHeadModel as FusedHeadModel
from .protocol import LanguageModel as LanguageModel

__all__ = ["LanguageModel", "FusedHeadModel", "VishwamAI", "KVCache", "abstract_model", "count_parameters", "parameter_counts_closed_form",
           "model_flops_per_token", "Stage", "apply_remat", "stage_plan"]

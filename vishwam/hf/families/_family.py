"""`Family`: what one HF architecture has of its own."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ...config import ModelConfig


def _nothing(_: Any) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF architecture (a transformers `...ForCausalLM`) that vishwam reads and writes.

    What every family shares (RMSNorm, rotate-half RoPE, GQA, SwiGLU, the embedding, norm,
    attention and dense MLP tensor names) lives in `vishwam.hf.config` and
    `vishwam.hf.tensor_map`; a family holds only what is its own.
    """

    architecture: str
    """config.json's `architectures[0]`, e.g. `"LlamaForCausalLM"`."""
    model_type: str
    """config.json's `model_type`, e.g. `"llama"`."""
    defaults: Mapping[str, Any]
    """transformers' defaults for the config.json fields a checkpoint may leave out (at least
    `rope_theta`, `rms_norm_eps` and `max_position_embeddings`)."""
    writes: Callable[[ModelConfig], bool]
    """Whether `config_to_hf` writes a `ModelConfig` as this family: exactly one family writes
    each config."""
    hf_fields: Callable[[ModelConfig], dict[str, Any]]
    """The config.json fields only this family writes."""
    sliding_window: bool = False
    """Whether its config.json's `sliding_window` is one window for every layer
    (`ModelConfig.sliding_window`); otherwise it is not read."""
    qkv_bias: bool = False
    """Whether its q/k/v projections have biases."""
    qk_norm: str = "none"
    """Its `ModelConfig.qk_norm`: `"head"` (Qwen3-MoE), `"full"` (OLMoE) or `"none"`; it
    writes only configs with the same."""
    attention: str = "gqa"
    """Its `ModelConfig.attention`: `"mla"` (DeepSeek-V3) or `"gqa"`; it writes only configs
    with the same."""
    own_fields: Callable[[Mapping[str, Any], Callable[[str], Any]], dict[str, Any]] | None = None
    """`own_fields(hf, get)`: `ModelConfig` fields of its own beyond the MoE ones (DeepSeek-V3's
    latent attention), applied last."""
    mtp: bool = False
    """Whether it stores multi-token prediction modules (`ModelConfig.mtp_depth`) as the layers
    past `num_hidden_layers` (DeepSeek-V3: `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and a
    decoder layer's tensors in `model.layers.{num_hidden_layers + k}.`)."""
    balance_loss: str | None = "hf"
    """The `ModelConfig.load_balance_loss` transformers computes for it (`None`: none, so
    `config_to_hf` does not warn about a different one)."""
    unsupported: Callable[[Mapping[str, Any]], list[str]] = _nothing
    """What of a config.json of this family vishwam cannot run, beyond the checks every family
    gets: one `"field=value (why)"` each."""
    moe_fields: Callable[[Mapping[str, Any], Callable[[str], Any]], dict[str, Any]] | None = None
    """MoE families: `moe_fields(hf, get)`, the `ModelConfig` MoE fields of config.json `hf`
    (`get(name)` reads `hf` with `defaults` filled in). `None`: dense (one expert)."""
    export_problems: Callable[[ModelConfig], list[str]] = _nothing
    """What of a `ModelConfig` it writes this family lacks: one `"field=value (why)"` each."""
    router: str | None = None
    """MoE: the router's tensor name within `model.layers.N.` (HF `[experts, hidden]`)."""
    experts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """MoE: each vishwam expert leaf (within a block, e.g. `mlp.experts.gate`) -> its tensor
    name within `model.layers.N.`, `{e}` standing for the expert number. HF stores each
    expert's `[out, in]` matrix on its own."""
    tensors: Mapping[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)
    """Block leaves of its own (e.g. Qwen2-MoE's shared expert) -> (HF name within
    `model.layers.N.`, whether HF stores it transposed)."""

    @property
    def name(self) -> str:
        """The family in messages, e.g. `"Llama"`."""
        return self.architecture.removesuffix("ForCausalLM")

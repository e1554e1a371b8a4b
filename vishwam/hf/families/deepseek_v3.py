"""DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-head latent attention (`attention="mla"`,
`vishwam.nn.mla`), `first_k_dense_replace` dense layers (`intermediate_size`), then MoE layers of
`n_routed_experts` experts (`moe_intermediate_size`) chosen by sigmoid scores plus the selection
bias `e_score_correction_bias`, limited to the best `topk_group` of `n_group` groups, the top-k
weights renormalised when `norm_topk_prob` and scaled by `routed_scaling_factor`, and
`n_shared_experts` shared experts run as one MLP. `rope_interleave` (transformers' default: true)
becomes `ModelConfig.rope_interleave`; yarn's `mscale_all_dim` the softmax factor
`rope_mscale_all_dim`. Keys and values are per head: `num_key_value_heads` must equal
`num_attention_heads`.

Multi-token prediction: DeepSeek's releases store module k as layer `num_hidden_layers + k`
(`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, a decoder layer's tensors, and copies of the
shared embedding and head, which are not read). `load_hf_checkpoint` sets `mtp_depth` to the
number of such layers present (an `eh_proj` each), not to config.json's `num_nextn_predict_layers`,
which transformers writes as 1 while saving none; export writes them the same way, copies
included (as vLLM's DeepSeek MTP reads them), and transformers, which builds no MTP modules,
loads the rest and reports them as unexpected.

Its own tensors, within `model.layers.N.`:

    self_attn.q_a_proj.weight            [q_rank, D]          queries, low rank (`q_lora_rank`)
    self_attn.q_a_layernorm.weight       [q_rank]
    self_attn.q_b_proj.weight            [H (n + r), q_rank]  (or self_attn.q_proj.weight [H (n + r), D])
    self_attn.kv_a_proj_with_mqa.weight  [C + r, D]           the kv latent and the shared rotary key
    self_attn.kv_a_layernorm.weight      [C]
    self_attn.kv_b_proj.weight           [H (n + v), C]
    self_attn.o_proj.weight              [D, H v]
    mlp.gate.e_score_correction_bias     [X]                  the selection bias
    mlp.shared_experts.{gate,up,down}_proj.weight             the shared experts
"""

from collections.abc import Callable, Mapping
from typing import Any

from ...config import ModelConfig
from ...errors import InvalidValueError
from . import _moe
from ._family import Family


def _writes(config: ModelConfig) -> bool:
    return config.is_moe


def _positive(hf: Mapping[str, Any], get: Callable[[str], Any], name: str):
    value = get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidValueError(f"HF config: a deepseek_v3 config.json must give {name} > 0, got {value!r}.")
    return value


def _moe_fields(hf: Mapping[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
    experts = _positive(hf, get, "n_routed_experts")
    return dict(
        num_experts=experts, experts_per_token=_positive(hf, get, "num_experts_per_tok"),
        moe_ffn_dim=_positive(hf, get, "moe_intermediate_size"), first_dense_layers=get("first_k_dense_replace"),
        moe_every=1, num_shared_experts=_positive(hf, get, "n_shared_experts"), router_type="sigmoid",
        router_renormalize=bool(get("norm_topk_prob")), n_groups=_positive(hf, get, "n_group"),
        topk_groups=_positive(hf, get, "topk_group"), routed_scaling_factor=float(get("routed_scaling_factor")),
        aux_free_bias=True, moe_dispatch="auto", capacity_factor=None, router_z_loss_coef=0.0, router_jitter=0.0,
        # transformers computes no balance loss; DeepSeek's own config.json gives its sequence-wise alpha.
        load_balance_loss="sequence", router_aux_loss_coef=float(hf.get("aux_loss_alpha") or 0.0),
    )


def _rope_parameters(hf: Mapping[str, Any]) -> Mapping[str, Any]:
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _attention_fields(hf: Mapping[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
    rope = _rope_parameters(hf)
    # An explicit null means no query compression (DeepSeek-V2-Lite's shape); absent means the default.
    q_rank = hf["q_lora_rank"] if "q_lora_rank" in hf else get("q_lora_rank")
    if q_rank is not None and (not isinstance(q_rank, int) or isinstance(q_rank, bool) or q_rank <= 0):
        raise InvalidValueError(f"HF config: deepseek_v3 q_lora_rank must be null or > 0, got {q_rank!r}.")
    return dict(
        attention="mla", num_kv_heads=None, head_dim=None, q_lora_rank=q_rank,
        kv_lora_rank=_positive(hf, get, "kv_lora_rank"), qk_nope_head_dim=_positive(hf, get, "qk_nope_head_dim"),
        qk_rope_head_dim=_positive(hf, get, "qk_rope_head_dim"), v_head_dim=_positive(hf, get, "v_head_dim"),
        rope_interleave=bool(get("rope_interleave")), rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
    )


def _hf_fields(config: ModelConfig) -> dict[str, Any]:
    return dict(
        n_routed_experts=config.num_experts, num_experts_per_tok=config.experts_per_token,
        moe_intermediate_size=config.expert_ffn_dim, first_k_dense_replace=config.first_dense_layers,
        n_shared_experts=config.num_shared_experts, norm_topk_prob=config.router_renormalize,
        n_group=config.n_groups, topk_group=config.topk_groups, routed_scaling_factor=config.routed_scaling_factor,
        q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim, head_dim=config.qk_rope_head_dim,
        num_key_value_heads=config.num_heads, rope_interleave=config.rope_interleave, attention_bias=False,
        num_nextn_predict_layers=config.mtp_depth, aux_loss_alpha=config.router_aux_loss_coef,
        seq_aux=config.load_balance_loss == "sequence", output_router_logits=False,
    )


def _unsupported(hf: Mapping[str, Any]) -> list[str]:
    problems = []
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        problems.append(f"num_key_value_heads={kv_heads} (DeepSeek-V3's latent attention expands a key and a value "
                        f"per head: it must equal num_attention_heads={heads})")
    rope = _rope_parameters(hf)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("mscale_all_dim") and kind != "yarn":
        problems.append(f"mscale_all_dim={rope['mscale_all_dim']} with RoPE type {kind!r} (vishwam applies the "
                        "softmax mscale with yarn only)")
    if hf.get("n_shared_experts") == 0:
        problems.append("n_shared_experts=0 (vishwam reads DeepSeek-V3 with its shared experts)")
    return problems


def _export_problems(config: ModelConfig) -> list[str]:
    problems = []
    if config.router_type != "sigmoid" or not config.aux_free_bias:
        problems.append(f"router_type={config.router_type!r}, aux_free_bias={config.aux_free_bias} (DeepSeek-V3 "
                        "routes by sigmoid scores with a selection bias: 'sigmoid' and True; a zero bias routes as none)")
    if config.moe_every != 1:
        problems.append(f"moe_every={config.moe_every} (after its dense layers every DeepSeek-V3 layer is MoE: 1)")
    if config.num_shared_experts < 1 or config.shared_expert_gate or config.shared_mlp_dim != (
            config.num_shared_experts * config.expert_ffn_dim):
        problems.append(f"num_shared_experts={config.num_shared_experts}, shared_expert_ffn_dim="
                        f"{config.shared_expert_ffn_dim}, shared_expert_gate={config.shared_expert_gate} (DeepSeek-V3 "
                        "has n >= 1 ungated shared experts as wide as the routed ones)")
    if config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window} (DeepSeek-V3 has no window)")
    return problems


DEEPSEEK_V3 = Family(
    architecture="DeepseekV3ForCausalLM",
    model_type="deepseek_v3",
    defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
              "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
              "first_k_dense_replace": 3, "n_shared_experts": 1, "norm_topk_prob": True, "n_group": 8,
              "topk_group": 4, "routed_scaling_factor": 2.5, "q_lora_rank": 1536, "kv_lora_rank": 512,
              "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True},
    writes=_writes,
    hf_fields=_hf_fields,
    attention="mla",
    mtp=True,
    unsupported=_unsupported,
    moe_fields=_moe_fields,
    own_fields=_attention_fields,
    balance_loss=None,
    export_problems=_export_problems,
    router=_moe.ROUTER,
    experts=_moe.EXPERTS,
    tensors={"attn.q_a_proj.weight": ("self_attn.q_a_proj.weight", True),
             "attn.q_a_norm.scale": ("self_attn.q_a_layernorm.weight", False),
             "attn.q_b_proj.weight": ("self_attn.q_b_proj.weight", True),
             "attn.kv_a_proj.weight": ("self_attn.kv_a_proj_with_mqa.weight", True),
             "attn.kv_a_norm.scale": ("self_attn.kv_a_layernorm.weight", False),
             "attn.kv_b_proj.weight": ("self_attn.kv_b_proj.weight", True),
             "mlp.selection_bias": ("mlp.gate.e_score_correction_bias", False),
             "mlp.shared.gate_proj.weight": ("mlp.shared_experts.gate_proj.weight", True),
             "mlp.shared.up_proj.weight": ("mlp.shared_experts.up_proj.weight", True),
             "mlp.shared.down_proj.weight": ("mlp.shared_experts.down_proj.weight", True)},
)

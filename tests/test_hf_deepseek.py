"""DeepSeek-V3 (`DeepseekV3ForCausalLM`) in and out against transformers: tiny random checkpoints
built by transformers (CPU torch), logits within 1e-4, greedy generation identical, the export
loading back in transformers with the same logits; and the refusals. Skipped without torch and
transformers."""

import json

import jax
import pytest
from test_hf import _check_against_transformers, _transformers, _transformers_checkpoint

from vishwam import ModelConfig, VishwamAI
from vishwam.errors import InvalidValueError
from vishwam.hf import config_from_hf, config_to_hf, save_hf_checkpoint

# Latent attention with v_head_dim (10) narrower than the q/k heads (12: v is zero-padded), 8 experts
# in 4 groups (2 eligible), top-2, one shared expert, a dense first layer, routed_scaling_factor 2.5.
BASE = dict(num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=10, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, n_shared_experts=1,
            moe_intermediate_size=16, first_k_dense_replace=1, routed_scaling_factor=2.5)
VARIANTS = {
    # DeepSeek-V3's shape: compressed queries, interleaved rotary pairs, yarn with mscale_all_dim.
    "v3": dict(q_lora_rank=12, rope_interleave=True, norm_topk_prob=True,
               rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0,
                                "original_max_position_embeddings": 8, "beta_fast": 8.0, "beta_slow": 1.0,
                                "mscale": 1.0, "mscale_all_dim": 1.0}),
    # DeepSeek-V2-Lite's attention: queries straight from x, rotate-half, plain RoPE; no renormalisation.
    "lite": dict(q_lora_rank=None, rope_interleave=False, norm_topk_prob=False, n_shared_experts=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deepseek_v3_matches_transformers(variant, tmp_path):
    torch, _ = _transformers()
    folder = tmp_path / variant
    hf_model = _transformers_checkpoint(folder, "DeepseekV3Config", **{**BASE, **VARIANTS[variant]})
    with torch.no_grad():  # the selection bias is a buffer: give it values that change the routing
        for name, buffer in hf_model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.5 * torch.randn_like(buffer))
    hf_model.save_pretrained(folder)
    config = _check_against_transformers(hf_model, folder, tmp_path)
    assert config.attention == "mla" and config.q_lora_rank == VARIANTS[variant]["q_lora_rank"]
    assert (config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim) == (16, 8, 4, 10)
    assert (config.num_experts, config.n_groups, config.topk_groups, config.first_dense_layers) == (8, 4, 2, 1)
    assert (config.router_type, config.aux_free_bias, config.routed_scaling_factor) == ("sigmoid", True, 2.5)
    assert config.num_shared_experts == {**BASE, **VARIANTS[variant]}["n_shared_experts"]
    assert config.rope_interleave == VARIANTS[variant]["rope_interleave"]
    assert config.rope_mscale_all_dim == (1.0 if variant == "v3" else 0.0)


def test_deepseek_config_rules(tmp_path):
    hf = config_to_hf(ModelConfig.preset("deepseek-v3"))
    assert hf["architectures"] == ["DeepseekV3ForCausalLM"] and hf["num_nextn_predict_layers"] == 0
    assert hf["rope_scaling"]["mscale_all_dim"] == 1.0 and hf["head_dim"] == 64
    preset = ModelConfig.preset("deepseek-v3")
    back = config_from_hf(json.loads(json.dumps(hf)))
    # What config.json does not carry: how the model trains (compute dtype, remat).
    assert back.diff(preset) == {"compute_dtype": ("float32", "bfloat16"), "remat_policy": ("none", "full")}
    with pytest.raises(InvalidValueError, match="num_key_value_heads"):
        config_from_hf({**hf, "num_key_value_heads": 8})
    with pytest.raises(InvalidValueError, match="n_shared_experts=0"):
        config_from_hf({**hf, "n_shared_experts": 0})
    assert config_from_hf({**hf, "q_lora_rank": None}).q_lora_rank is None
    tiny = ModelConfig.preset("tiny", num_kv_heads=None, attention="mla", kv_lora_rank=8, qk_nope_head_dim=4,
                              qk_rope_head_dim=4, v_head_dim=4)
    model = VishwamAI(tiny, key=jax.random.key(0))
    with pytest.raises(InvalidValueError, match="router_type='softmax', aux_free_bias=False"):
        save_hf_checkpoint(model, tiny, tmp_path / "out")
    with pytest.raises(InvalidValueError, match="attention='mla'"):
        config_to_hf(tiny.replace(num_experts=1, experts_per_token=1))


def test_multi_token_prediction_modules_round_trip(tmp_path):
    """MTP modules go out as layer num_hidden_layers (DeepSeek's layout) and come back with every array
    equal; the copies of the embedding and head DeepSeek keeps there are written and skipped on load; transformers loads the export
    (ignoring the MTP layer) with vishwam's logits; a partial or stray extra layer is refused by name."""
    import equinox as eqx
    import numpy as np
    from safetensors.numpy import load_file, save_file
    from test_hf import TOKENS, _transformers_logits, forward

    from vishwam.hf import load_hf_checkpoint

    tiny = ModelConfig.preset("tiny", num_kv_heads=None, attention="mla", kv_lora_rank=8, qk_nope_head_dim=4,
                              qk_rope_head_dim=4, v_head_dim=4, router_type="sigmoid", aux_free_bias=True,
                              num_shared_experts=1, load_balance_loss="sequence", router_z_loss_coef=0.0,
                              attention_block_size=128, moe_ffn_dim=32, mtp_depth=1, init_std=0.2)
    model = VishwamAI(tiny, key=jax.random.key(0))
    save_hf_checkpoint(model, tiny, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert tensors["model.layers.2.eh_proj.weight"].shape == (32, 64)
    assert {"model.layers.2.enorm.weight", "model.layers.2.shared_head.norm.weight",
            "model.layers.2.self_attn.kv_b_proj.weight", "model.layers.2.mlp.experts.3.down_proj.weight"} <= set(tensors)
    np.testing.assert_array_equal(tensors["model.layers.2.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(tensors["model.layers.2.shared_head.head.weight"], tensors["lm_head.weight"])
    back, config = load_hf_checkpoint(tmp_path)
    assert config == tiny
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(back, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)), strict=True):
        np.testing.assert_array_equal(a, b)
    torch, transformers = _transformers()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    np.testing.assert_allclose(_transformers_logits(hf_model, TOKENS), forward(model, TOKENS), rtol=1e-4, atol=1e-4)

    partial = {k: v for k, v in tensors.items() if k != "model.layers.2.enorm.weight"}
    save_file(partial, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidValueError, match="missing model.layers.2.enorm.weight"):
        load_hf_checkpoint(tmp_path)
    stray = {**tensors, "model.layers.3.input_layernorm.weight": tensors["model.norm.weight"]}
    save_file(stray, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidValueError, match="multi-token prediction modules, each with its eh_proj"):
        load_hf_checkpoint(tmp_path)

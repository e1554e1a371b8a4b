import time
import tracemalloc

import pytest

from vishwam import ModelConfig, count_parameters
from vishwam.model.params import parameter_counts_closed_form


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(hidden_size=30, num_heads=4), "hidden_size"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(num_experts=4, experts_per_token=5), "experts_per_token"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_layers=-1), "num_layers"),
        (dict(ffn_dim=0), "ffn_dim"),
        (dict(norm_type="batch"), "norm_type"),
        (dict(remat_policy="sometimes"), "remat_policy"),
        (dict(attention_impl="cuda"), "attention_impl"),
        (dict(moe_dispatch="magic"), "moe_dispatch"),
        (dict(compute_dtype="float8"), "compute_dtype"),
        (dict(num_layers=4, first_dense_layers=1, moe_every=2), "moe_every"),
        (dict(first_dense_layers=5, num_layers=4), "first_dense_layers"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(dropout=1.0), "dropout"),
        (dict(head_dim=7), "head_dim"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(moe_ffn_dim=0), "moe_ffn_dim"),
        (dict(num_shared_experts=1, shared_expert_ffn_dim=-1), "shared_expert_ffn_dim"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
        (dict(n_groups=3), "n_groups"),
        (dict(n_groups=2, topk_groups=3), "topk_groups"),
        (dict(n_groups=4, topk_groups=1), "topk_groups"),  # one expert eligible, top-2 asked for
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(load_balance_loss="global"), "load_balance_loss"),
        (dict(qk_norm="layer"), "qk_norm"),
        (dict(rope_scaling="longrope"), "rope_scaling"),
        (dict(rope_scaling="linear", rope_factor=0.0), "rope_factor"),
        (dict(rope_scaling="yarn", rope_original_max_seq_len=0), "rope_original_max_seq_len"),
        (dict(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=4.0), "rope_high_freq_factor"),
        (dict(rope_scaling="yarn", rope_attention_factor=-1.0), "rope_attention_factor"),
    ],
)
def test_contradictions_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
        ModelConfig.preset("tiny", **changes)


def test_json_round_trip_and_unknown_field():
    config = ModelConfig.preset("small", capacity_factor=None, remat_policy="full")
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**config.to_dict(), "hidden": 3})


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        ModelConfig.preset("huge")


def test_moe_layer_pattern():
    config = ModelConfig.preset("tiny", num_layers=7, first_dense_layers=1, moe_every=3)
    assert [config.layer_is_moe(i) for i in range(7)] == [False, False, False, True, False, False, True]
    assert config.num_moe_layers == 2
    assert not ModelConfig.preset("tiny", num_experts=1, experts_per_token=1).is_moe


@pytest.mark.parametrize(
    "name, overrides",
    [("tiny", {}), ("small", {}), ("tiny", dict(num_layers=7, first_dense_layers=1, moe_every=3,
                                                   num_shared_experts=1, norm_type="layer", tie_embeddings=True)),
     ("tiny", dict(qkv_bias=True, num_experts=1, experts_per_token=1)),
     ("tiny", dict(num_layers=3, first_dense_layers=1, num_experts=8, moe_ffn_dim=16, n_groups=4, topk_groups=2,
                   num_shared_experts=2, shared_expert_ffn_dim=24, shared_expert_gate=True)),
     ("tiny", dict(moe_ffn_dim=16, num_shared_experts=1)),
     ("tiny", dict(qk_norm="head", head_dim=16)), ("tiny", dict(qk_norm="full", num_kv_heads=1))],
)
def test_parameter_count_matches_closed_form(name, overrides):
    config = ModelConfig.preset(name, **overrides)
    assert count_parameters(config) == parameter_counts_closed_form(config)


def test_seed_parameter_count_is_abstract():
    config = ModelConfig.preset("seed")
    tracemalloc.start()
    start = time.perf_counter()
    counts = count_parameters(config)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert counts == parameter_counts_closed_form(config)
    # 54.8B parameters would be ~219 GB in fp32: the count must come from shapes alone.
    assert counts["total"] == 54_762_147_840
    assert counts["active"] == 16_107_442_176
    assert peak < 200 * 2**20
    assert elapsed < 30


def test_expert_widths_default_to_ffn_dim():
    config = ModelConfig.preset("tiny", num_shared_experts=2)
    assert config.expert_ffn_dim == config.ffn_dim and config.shared_mlp_dim == 2 * config.ffn_dim
    fine = ModelConfig.preset("tiny", moe_ffn_dim=16, num_shared_experts=2)
    assert fine.expert_ffn_dim == 16 and fine.shared_mlp_dim == 32
    assert ModelConfig.preset("tiny", moe_ffn_dim=16, num_shared_experts=1, shared_expert_ffn_dim=40).shared_mlp_dim == 40
    counts = count_parameters(fine)
    h, moe_layers = fine.hidden_size, fine.num_moe_layers
    dense = count_parameters(ModelConfig.preset("tiny", num_shared_experts=2))
    # Each MoE layer: 4 experts and 2 shared experts of 3 * h * (64 - 16) fewer weights each.
    assert dense["total"] - counts["total"] == moe_layers * (4 + 2) * 3 * h * (64 - 16)


# Published totals and actives (embeddings and head included), and the exact counts of the presets.
PUBLISHED = {
    "qwen3-30b-a3b": (30.5e9, 3.3e9, 30_532_122_624, 3_353_032_704),
    "olmoe-1b-7b": (6.9e9, 1.3e9, 6_919_161_856, 1_282_017_280),
    "qwen2-57b-a14b": (57.4e9, 14.2e9, 57_408_658_944, 14_249_270_784),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_moe_presets_match_the_published_parameter_counts(name):
    total, active, exact_total, exact_active = PUBLISHED[name]
    config = ModelConfig.preset(name)
    counts = count_parameters(config)
    assert counts == parameter_counts_closed_form(config)
    assert (counts["total"], counts["active"]) == (exact_total, exact_active)
    # The published figures are rounded to 0.1B: within 1% of the total, 2% of the active count.
    assert abs(counts["total"] / total - 1) < 0.01
    assert abs(counts["active"] / active - 1) < 0.02

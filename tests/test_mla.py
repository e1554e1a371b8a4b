"""Multi-head latent attention (`vishwam.nn.mla`): the layer against a plainly written einsum
reference in values and gradients, the compressed-cache decode against the full forward,
generation with and without the cache, shapes, counts and refusals."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam import ModelConfig, VishwamAI
from vishwam.errors import InvalidValueError
from vishwam.generation import generate, generate_without_cache
from vishwam.model import KVCache
from vishwam.model.flops import model_flops_per_token
from vishwam.model.params import count_parameters, parameter_counts_closed_form
from vishwam.nn.block import make_attention
from vishwam.nn.mla import MultiHeadLatentAttention
from vishwam.nn.rope import rope_frequencies, rope_scaling_of

H, NOPE, ROPE, V_DIM, RANK, Q_RANK = 4, 8, 4, 16, 16, 12
# Two variants: DeepSeek-V3's shape (compressed queries, interleaved rotary pairs, yarn with its
# softmax mscale) and DeepSeek-V2-Lite's (queries straight from x, rotate-half, plain RoPE);
# v_head_dim (16) is wider than the q/k heads (12): the kernels get q and k zero-padded.
VARIANTS = {
    "v3": dict(q_lora_rank=Q_RANK, rope_interleave=True, rope_scaling="yarn", rope_factor=4.0,
               rope_original_max_seq_len=8, rope_beta_fast=8.0, rope_mscale_all_dim=1.0),
    "lite": dict(q_lora_rank=None),
}


def mla_config(variant: str, **changes) -> ModelConfig:
    fields = dict(num_kv_heads=None, attention="mla", kv_lora_rank=RANK, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE,
                  v_head_dim=V_DIM, init_std=0.2, **VARIANTS[variant])
    return ModelConfig.preset("tiny", **{**fields, **changes})


# --------------------------------------------------------------- the reference
def _rms(x, w, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_reference(x, positions, config):
    """DeepSeek's rotation written out: pairs `(x[2i], x[2i+1])` when interleaved, else
    `(x[i], x[i + r/2])`, each rotated by `position * freq_i`; output in halves (as transformers);
    yarn multiplies cos and sin by its attention factor."""
    freqs = rope_frequencies(ROPE, config.rope_theta, rope_scaling_of(config), positions)
    angle = positions[..., None].astype(jnp.float32) * freqs  # (B, T, r/2)
    scaling = rope_scaling_of(config)
    factor = 1.0 if scaling is None else scaling.cos_sin_factor
    cos, sin = (factor * jnp.cos(angle))[:, :, None], (factor * jnp.sin(angle))[:, :, None]
    a, b = (x[..., 0::2], x[..., 1::2]) if config.rope_interleave else (x[..., :ROPE // 2], x[..., ROPE // 2:])
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def mla_reference(attn: MultiHeadLatentAttention, x, config: ModelConfig):
    """Causal MLA on expanded heads, every step its own einsum, softmax in full."""
    b, t, _ = x.shape
    eps = config.norm_eps
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if attn.q_proj is not None:
        q = jnp.einsum("btd,de->bte", x, attn.q_proj.weight)
    else:
        q_low = _rms(jnp.einsum("btd,dr->btr", x, attn.q_a_proj.weight), attn.q_a_norm.scale, eps)
        q = jnp.einsum("btr,re->bte", q_low, attn.q_b_proj.weight)
    q = q.reshape(b, t, H, NOPE + ROPE)
    kv = jnp.einsum("btd,dc->btc", x, attn.kv_a_proj.weight)
    latent = _rms(kv[..., :RANK], attn.kv_a_norm.scale, eps)
    k_rope = _rope_reference(kv[..., None, RANK:], positions, config)  # (B, T, 1, r)
    up = jnp.einsum("btc,ce->bte", latent, attn.kv_b_proj.weight).reshape(b, t, H, NOPE + V_DIM)
    q_full = jnp.concatenate([q[..., :NOPE], _rope_reference(q[..., NOPE:], positions, config)], axis=-1)
    k_full = jnp.concatenate([up[..., :NOPE], jnp.broadcast_to(k_rope, (b, t, H, ROPE))], axis=-1)
    scale = (NOPE + ROPE) ** -0.5
    if config.rope_mscale_all_dim:
        scale *= (0.1 * config.rope_mscale_all_dim * math.log(config.rope_factor) + 1.0) ** 2
    scores = jnp.einsum("bqhd,bkhd->bhqk", q_full, k_full) * scale
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    out = jnp.einsum("bhqk,bkhv->bqhv", jax.nn.softmax(scores, axis=-1), up[..., NOPE:])
    return jnp.einsum("bte,ed->btd", out.reshape(b, t, H * V_DIM), attn.o_proj.weight)


def mla_layer(variant: str, **changes) -> MultiHeadLatentAttention:
    return make_attention(mla_config(variant, **changes), key=jax.random.key(3))


@pytest.fixture(scope="module")
def layers():
    return {name: mla_layer(name) for name in VARIANTS}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_mla_matches_einsum_reference_in_values_and_gradients(variant, impl):
    config = mla_config(variant)
    attn = mla_layer(variant, attention_impl=impl)
    x = jax.random.normal(jax.random.key(4), (2, 12, config.hidden_size))

    def loss(fn):
        def f(inputs):
            y = fn(*inputs)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y
        return eqx.filter_jit(eqx.filter_value_and_grad(f, has_aux=True))

    (_, got), (g_attn, g_x) = loss(lambda a, x: a(x))((attn, x))
    (_, want), (w_attn, w_x) = loss(lambda a, x: mla_reference(a, x, config))((attn, x))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(g_x, w_x, rtol=1e-4, atol=1e-4)
    for g, w in zip(jax.tree_util.tree_leaves(g_attn), jax.tree_util.tree_leaves(w_attn), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(w_attn.kv_b_proj.weight).max()) > 0  # the up-projection is trained


def test_yarn_mscale_changes_the_scores(layers):
    """The softmax mscale is really applied: without it the layer's output differs."""
    attn = layers["v3"]
    x = jax.random.normal(jax.random.key(5), (1, 6, attn.kv_a_proj.in_features))
    plain = mla_layer("v3", rope_mscale_all_dim=0.0)  # the same weights
    assert plain.softmax_scale == (NOPE + ROPE) ** -0.5
    assert attn.softmax_scale == pytest.approx((NOPE + ROPE) ** -0.5 * (0.1 * math.log(4.0) + 1) ** 2)
    assert float(jnp.abs(attn(x) - plain(x)).max()) > 1e-3


# ------------------------------------------------------- the compressed cache
@pytest.fixture(scope="module")
def models():
    return {name: VishwamAI(mla_config(name, num_layers=2), key=jax.random.key(0)) for name in VARIANTS}


@eqx.filter_jit
def _forward(model, tokens):
    return model(tokens, inference=True)[0]


@eqx.filter_jit
def _decode(model, tokens, positions, cache):
    return model.decode(tokens, positions, cache)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decode_equals_recompute(models, variant):
    """Prefill 5 tokens, then 4 one-token steps through the latent cache: every step's logits
    equal the full forward's at that position."""
    model = models[variant]
    tokens = jax.random.randint(jax.random.key(6), (2, 9), 0, 256)
    full = _forward(model, tokens)
    cache = model.init_cache(2, 12)
    config = model.config
    assert cache.k.shape == (config.num_layers, 2, 1, 12, RANK + ROPE) and cache.v.shape[-1] == 0
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    logits, cache = _decode(model, tokens[:, :5], positions, cache)
    steps = [logits]
    for i in range(5, 9):
        logits, cache = _decode(model, tokens[:, i:i + 1], jnp.full((2, 1), i), cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)


def test_generation_with_the_latent_cache_equals_recompute(models):
    model = models["v3"]
    prompt = np.asarray(jax.random.randint(jax.random.key(7), (2, 5), 1, 256), np.int32)
    lengths = np.array([5, 3], np.int32)
    cached, n1 = generate(model, prompt, 6, temperature=0.0, prompt_lengths=lengths)
    plain, n2 = generate_without_cache(model, prompt, 6, temperature=0.0, prompt_lengths=lengths)
    np.testing.assert_array_equal(cached, plain)
    np.testing.assert_array_equal(n1, n2)


def test_cache_bytes_per_token():
    """DeepSeek-V3's compressed cache: 576 values per token and layer, against 128 heads x
    (192 + 128) for the expanded keys and values, and 2 x 8 x 128 for GQA with 8 kv heads of 128."""
    v3 = ModelConfig.preset("deepseek-v3")
    cache = jax.eval_shape(lambda: KVCache.init(v3, 1, 8))
    per_token = (math.prod(cache.k.shape) + math.prod(cache.v.shape)) // 8 // v3.num_layers
    assert per_token == 512 + 64
    expanded = v3.num_heads * (v3.qk_head_dim + v3.v_head_dim)
    assert expanded == 40960 and expanded / per_token > 70
    gqa = ModelConfig.preset("deepseek-v3", attention="gqa", num_kv_heads=8, head_dim=128, q_lora_rank=None,
                             rope_interleave=False, rope_mscale_all_dim=0.0)
    gqa_cache = jax.eval_shape(lambda: KVCache.init(gqa, 1, 8))
    assert (math.prod(gqa_cache.k.shape) + math.prod(gqa_cache.v.shape)) // 8 // gqa.num_layers == 2048


# ------------------------------------------------------- shapes and refusals
def test_runtime_shape_checks(layers):
    attn = layers["v3"]
    x = jnp.zeros((1, 3, attn.kv_a_proj.in_features))
    positions = jnp.zeros((1, 3), jnp.int32)
    good = jnp.zeros((2, 1, 1, 8, RANK + ROPE))
    with pytest.raises(InvalidValueError, match="kv_lora_rank"):
        attn.decode(x, positions, jnp.zeros((2, 1, 1, 8, RANK)), jnp.zeros((2, 1, 1, 8, 0)), 0)
    with pytest.raises(Exception, match="shape|dim|Type-check"):
        attn.decode(x, positions, good, jnp.zeros((2, 1, 1, 8, 3)), 0)
    with pytest.raises(Exception, match="shape|dim|Type-check"):
        attn(jnp.zeros((3, attn.kv_a_proj.in_features)))


def test_config_refusals():
    with pytest.raises(InvalidValueError, match="num_kv_heads"):
        mla_config("lite", num_kv_heads=2)
    with pytest.raises(InvalidValueError, match="qk_norm"):
        mla_config("lite", qk_norm="head")
    with pytest.raises(InvalidValueError, match="qk_rope_head_dim"):
        mla_config("lite", qk_rope_head_dim=5)
    with pytest.raises(InvalidValueError, match="rope_mscale_all_dim"):
        mla_config("lite", rope_mscale_all_dim=1.0)
    with pytest.raises(InvalidValueError, match="attention='mla'"):
        ModelConfig.preset("tiny", q_lora_rank=8)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_counts_and_flops(variant):
    config = mla_config(variant)
    assert count_parameters(config) == parameter_counts_closed_form(config)
    gqa = config.replace(attention="gqa", q_lora_rank=None, rope_interleave=False, rope_mscale_all_dim=0.0)
    # Attention FLOPs: 6 L H (qk + v) T for MLA against 12 L H hd T.
    mla_attn = model_flops_per_token(config, 64) - 6 * (count_parameters(config)["active"] - 256 * 32)
    gqa_attn = model_flops_per_token(gqa, 64) - 6 * (count_parameters(gqa)["active"] - 256 * 32)
    assert mla_attn == 6 * 2 * H * (NOPE + ROPE + V_DIM) * 64
    assert gqa_attn == 12 * 2 * H * 8 * 64


def test_deepseek_presets_match_the_published_parameter_counts():
    """DeepSeek-V3: 671B total, 37B active (MTP modules not counted); DeepSeek-V2-Lite: 15.7B and
    2.4B, which leaves out the embedding (2.66B with it)."""
    v3, lite = ModelConfig.preset("deepseek-v3"), ModelConfig.preset("deepseek-v2-lite")
    counts = {name: count_parameters(c) for name, c in (("v3", v3), ("lite", lite))}
    assert counts["v3"] == parameter_counts_closed_form(v3) and counts["lite"] == parameter_counts_closed_form(lite)
    assert (counts["v3"]["total"], counts["v3"]["active"]) == (671_026_419_200, 37_552_297_472)
    assert (counts["lite"]["total"], counts["lite"]["active"]) == (15_706_484_224, 2_661_150_208)
    assert abs(counts["v3"]["total"] / 671e9 - 1) < 1e-4 and abs(counts["v3"]["active"] / 37e9 - 1) < 0.02
    assert abs(counts["lite"]["total"] / 15.7e9 - 1) < 1e-3
    without_embedding = counts["lite"]["active"] - lite.vocab_size * lite.hidden_size
    assert abs(without_embedding / 2.4e9 - 1) < 0.025


def test_latent_attention_weights_are_sharded():
    """The down-projections keep the latent whole (split over fsdp on the hidden side), the
    up-projections split their heads over `tensor`; norms stay replicated; the multi-token
    prediction projection is split over fsdp."""
    from jax.sharding import PartitionSpec as P

    from vishwam.model import abstract_model
    from vishwam.parallel.mesh import make_mesh
    from vishwam.parallel.sharding import tree_specs

    mesh = make_mesh(fsdp=4, tensor=2)
    specs = tree_specs(abstract_model(mla_config("v3", mtp_depth=1)), mesh)
    attn = specs.stages[0].blocks[0].attn
    assert attn.q_a_proj.weight == P(None, "fsdp") and attn.kv_a_proj.weight == P(None, "fsdp")
    assert attn.q_b_proj.weight == P(None, "fsdp", "tensor") and attn.kv_b_proj.weight == P(None, "fsdp", "tensor")
    assert attn.o_proj.weight == P(None, "tensor", "fsdp") and attn.kv_a_norm.scale == P()
    assert specs.mtp[0].eh_proj.weight == P("fsdp") and specs.mtp[0].block.attn.kv_b_proj.weight == P("fsdp", "tensor")


def test_mla_model_trains():
    """The whole train step (remat, fused head and loss, AdamW) runs on a latent-attention MoE
    model and lowers the loss on a repeated batch."""
    from vishwam.config import TrainConfig
    from vishwam.train.step import init_train_state, make_train_step

    config = mla_config("v3", remat_policy="full")
    train = TrainConfig(batch_size=2, seq_len=16, learning_rate=3e-3, warmup_steps=0, total_steps=10)
    state = init_train_state(VishwamAI(config, key=jax.random.key(0)), train, key=jax.random.key(1))
    step = make_train_step(config, train)
    tokens = jax.random.randint(jax.random.key(8), (2, 17), 0, 256)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((2, 16), jnp.float32)}
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from vishwam import ModelConfig, VishwamAI

SEQ = 16


@pytest.fixture(scope="module")
def config():
    # One dense prefix layer, then (dense, MoE) pairs: two stages, both layer kinds.
    return ModelConfig.preset("tiny", num_layers=3, first_dense_layers=1, moe_every=2,
                              attention_impl="reference")


@pytest.fixture(scope="module")
def model(config):
    return eqx.filter_jit(VishwamAI)(config, key=jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.permutation(jax.random.key(1), 256)[: 2 * SEQ].reshape(2, SEQ).astype(jnp.int32)


def loss_fn(model, tokens, segment_ids=None):
    logits, aux = model(tokens, segment_ids=segment_ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux["load_balancing_loss"], logits


grad_fn = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn, has_aux=True))


def test_output_shapes_and_aux(model, config, tokens):
    logits, aux = eqx.filter_jit(model)(tokens)
    assert logits.shape == (2, SEQ, config.vocab_size) and logits.dtype == jnp.float32
    assert aux["expert_load"].shape == (config.num_moe_layers, config.num_experts) == (1, 4)
    np.testing.assert_allclose(aux["expert_load"].sum(-1), 1.0, rtol=1e-6)
    assert aux["load_balancing_loss"] >= 1.0 - 1e-5  # Switch loss is minimised by uniform routing
    assert aux["dropped_fraction"] == 0.0


def test_causality_gradient_is_exactly_zero(model, tokens):
    # Each position holds a distinct token, so the gradient with respect to the
    # embedding row of token[t'] is the gradient with respect to position t'.
    t = 6

    def logit_at(embed):
        m = eqx.tree_at(lambda m: m.embed, model, embed)
        return jnp.sum(m(tokens[:1])[0][0, t])

    grad = jax.jit(jax.grad(logit_at))(model.embed)
    rows = np.abs(np.asarray(grad)[np.asarray(tokens[0])]).sum(-1)
    assert np.all(rows[t + 1:] == 0.0)
    assert np.all(rows[: t + 1] > 0.0)


def test_segment_isolation(model, tokens):
    segment_ids = jnp.array([[0] * 7 + [1] * (SEQ - 7)] * 2, jnp.int32)
    changed = tokens.at[:, :7].set((tokens[:, :7] + 17) % 256)
    forward = eqx.filter_jit(lambda m, t: m(t, segment_ids=segment_ids)[0])
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_array_equal(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))
    assert not np.allclose(a[:, :7], b[:, :7])
    # Positions restart per document: the second document alone gives the same logits.
    alone = eqx.filter_jit(lambda m, t: m(t)[0])(model, tokens[:, 7:])
    np.testing.assert_allclose(np.asarray(a[:, 7:]), np.asarray(alone), atol=2e-5)


def test_scanned_equals_unrolled(model, config, tokens):
    unrolled = model.with_config(config.replace(scan_layers=False))
    (la, lo_a), ga = grad_fn(model, tokens)
    (lb, lo_b), gb = grad_fn(unrolled, tokens)
    np.testing.assert_allclose(lo_a, lo_b, atol=1e-5)
    np.testing.assert_allclose(la, lb, atol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "save_attention_output"])
def test_remat_policies_give_same_gradients(model, config, tokens, policy):
    remat = model.with_config(config.replace(remat_policy=policy))
    (_, _), ga = grad_fn(model, tokens)
    (_, _), gb = grad_fn(remat, tokens)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_bf16_compute_close_to_fp32(model, config, tokens):
    bf16 = model.with_config(config.replace(compute_dtype="bfloat16"))
    a = eqx.filter_jit(lambda m, t: m(t)[0])(model, tokens)
    b = eqx.filter_jit(lambda m, t: m(t)[0])(bf16, tokens)
    assert b.dtype == jnp.float32  # logits stay fp32
    # bf16 keeps 8 bits of mantissa (~4e-3 relative); through 3 layers the logits
    # (std ~0.1 here) stay within 2e-2 absolute / 5% of their spread.
    err = float(jnp.max(jnp.abs(a - b)))
    assert err < 0.05 * float(jnp.std(a)) + 2e-2, err


def test_tied_embeddings_and_layer_norm(tokens):
    config = ModelConfig.preset("tiny", num_experts=1, experts_per_token=1, tie_embeddings=True,
                                norm_type="layer", attention_impl="reference")
    model = VishwamAI(config, key=jax.random.key(3))
    assert model.lm_head is None
    logits, aux = eqx.filter_jit(model)(tokens)
    assert logits.shape == (2, SEQ, 256)
    assert aux["expert_load"].shape == (0, 1)
    hidden = jnp.ones((1, 1, config.hidden_size))
    np.testing.assert_allclose(model.logits(model.final_norm(hidden))[0, 0], model.final_norm(hidden)[0, 0] @ model.embed.T,
                               rtol=1e-5)


def test_residual_projections_scaled_with_depth(config):
    model = eqx.filter_jit(VishwamAI)(config.replace(num_layers=9, init_std=0.02), key=jax.random.key(4))
    block = model.stages[1].blocks[0]
    expected = 0.02 / np.sqrt(2 * 9)
    assert abs(float(jnp.std(block.attn.o_proj.weight)) - expected) < 0.15 * expected
    assert abs(float(jnp.std(block.attn.q_proj.weight)) - 0.02) < 0.15 * 0.02


def test_wrong_rank_input_is_a_shape_error(model):
    with pytest.raises(jaxtyping.TypeCheckError, match="tokens"):
        model(jnp.zeros((SEQ,), jnp.int32))


def test_too_long_sequence(model, config):
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, config.max_seq_len + 1), jnp.int32))


def test_dropout_only_with_key(model, config, tokens):
    drop = model.with_config(config.replace(dropout=0.5))
    forward = eqx.filter_jit(lambda m, t, k: m(t, key=k)[0])
    a = forward(drop, tokens, None)
    b = forward(model, tokens, None)
    np.testing.assert_allclose(a, b, atol=1e-6)  # same weights, no key: dropout is off
    c = forward(drop, tokens, jax.random.key(5))
    assert not np.allclose(a, c)


def test_with_config_rejects_shape_changes(model, config):
    with pytest.raises(ValueError, match="hidden_size"):
        model.with_config(config.replace(hidden_size=64))

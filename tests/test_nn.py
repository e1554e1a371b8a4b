import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam.nn import (
    MLP,
    Linear,
    MoE,
    RMSNorm,
    TPUGEMMLinear,
    TPULayerNorm,
    TPUMultiHeadAttention,
    apply_rope,
    load_balancing_loss,
    parallel_linears,
    route,
    router_z_loss,
)
from vishwam.nn.attention import positions_from_segments
from vishwam.nn.linear import PARALLEL_MIN_ROWS
from vishwam.nn.rope import RopeScaling, rope_frequencies


def test_linear_any_leading_dims_and_alias(getkey):
    assert TPUGEMMLinear is Linear
    layer = Linear(8, 5, use_bias=True, key=getkey())
    layer = eqx.tree_at(lambda m: m.bias, layer, jnp.arange(5.0))
    x = jax.random.normal(getkey(), (2, 3, 8))
    np.testing.assert_allclose(layer(x), x @ layer.weight + jnp.arange(5.0), rtol=1e-6)
    assert Linear(8, 5, use_bias=False, key=getkey()).bias is None
    with pytest.raises(Exception, match="8|shape"):
        layer(jnp.ones((2, 7)))


def _dot_generals(f, *args) -> int:
    return str(jax.make_jaxpr(f)(*args)).count("dot_general")


@pytest.mark.parametrize("rows", [PARALLEL_MIN_ROWS, 4])
def test_parallel_linears_equal_separate_calls_in_values_and_gradients(getkey, rows):
    """From `PARALLEL_MIN_ROWS` rows on (CPU), one product forward and one per operand
    backward; fewer rows (decoding) one call each. Same values and gradients either way."""
    linears = (Linear(8, 6, use_bias=True, key=getkey()), Linear(8, 4, use_bias=False, key=getkey()),
               Linear(8, 4, use_bias=True, key=getkey()))
    linears = tuple(eqx.tree_at(lambda m: m.bias, lin, jax.random.normal(getkey(), (lin.out_features,)))
                    if lin.use_bias else lin for lin in linears)
    x = jax.random.normal(getkey(), (2, rows // 2, 8))
    weights = [jax.random.normal(getkey(), (2, rows // 2, lin.out_features)) for lin in linears]

    def loss(call, linears, x):
        return sum(jnp.sum(w * y) for w, y in zip(weights, call(x, *linears)))

    separate = lambda x, *ls: tuple(lin(x) for lin in ls)  # noqa: E731
    want, want_grads = jax.value_and_grad(functools.partial(loss, separate), (0, 1))(linears, x)
    got, got_grads = jax.value_and_grad(functools.partial(loss, parallel_linears), (0, 1))(linears, x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    products = _dot_generals(jax.grad(functools.partial(loss, parallel_linears), (0, 1)), linears, x)
    assert products == (3 if rows >= PARALLEL_MIN_ROWS else 9)


def test_layer_norm_and_rms_norm(getkey):
    x = 3.0 + 2.0 * jax.random.normal(getkey(), (4, 16))
    ln = TPULayerNorm(16, epsilon=1e-6)
    expected = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ln(x), expected, atol=1e-5)
    assert TPULayerNorm(16, use_bias=False, use_scale=False).scale is None
    rms = RMSNorm(16, epsilon=1e-6)
    np.testing.assert_allclose(rms(x), x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6), atol=1e-5)
    assert rms(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="epsilon"):
        TPULayerNorm(16, epsilon=0.0)


def test_rope_is_relative(getkey):
    q = jax.random.normal(getkey(), (1, 1, 1, 16))
    k = jax.random.normal(getkey(), (1, 1, 1, 16))

    def score(pq, pk):
        return jnp.sum(apply_rope(q, jnp.array([[pq]])) * apply_rope(k, jnp.array([[pk]])))

    np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
    assert not np.isclose(score(5, 2), score(5, 3))
    np.testing.assert_allclose(apply_rope(q, jnp.array([[0]])), q)  # position 0 is the identity


def test_positions_restart_per_segment():
    seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 1, 2]])


def _rms(x, scale, eps=1e-6):
    return x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + eps) * scale


def plain_mha(attn: TPUMultiHeadAttention, x):
    """Textbook multi-head causal attention with the module's weights (and its q/k norms)."""
    b, t, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    q, k = x @ attn.q_proj.weight, x @ attn.k_proj.weight
    if attn.qk_norm == "full":
        q, k = _rms(q, attn.q_norm.scale), _rms(k, attn.k_norm.scale)
    q, k = q.reshape(b, t, h, d), k.reshape(b, t, h, d)
    if attn.qk_norm == "head":
        q, k = _rms(q, attn.q_norm.scale), _rms(k, attn.k_norm.scale)
    q = apply_rope(q, pos, attn.rope_theta, attn.rope_scaling)
    k = apply_rope(k, pos, attn.rope_theta, attn.rope_scaling)
    v = (x @ attn.v_proj.weight).reshape(b, t, h, d)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, h * d)
    return o @ attn.o_proj.weight


def test_gqa_with_all_kv_heads_is_plain_mha(getkey):
    attn = TPUMultiHeadAttention(32, 4, 8, num_kv_heads=4, implementation="reference", key=getkey())
    x = jax.random.normal(getkey(), (2, 10, 32))
    np.testing.assert_allclose(attn(x), plain_mha(attn, x), atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads(getkey):
    gqa = TPUMultiHeadAttention(32, 4, 8, num_kv_heads=2, implementation="reference", key=getkey())
    # Repeat each kv head's projection columns for the 2 query heads of its group.
    rep = lambda w: jnp.repeat(w.reshape(32, 2, 8), 2, axis=1).reshape(32, 32)  # noqa: E731
    mha = TPUMultiHeadAttention(32, 4, 8, num_kv_heads=4, implementation="reference", key=getkey())
    mha = eqx.tree_at(lambda m: (m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.o_proj.weight), mha,
                      (gqa.q_proj.weight, rep(gqa.k_proj.weight), rep(gqa.v_proj.weight), gqa.o_proj.weight))
    x = jax.random.normal(getkey(), (2, 10, 32))
    np.testing.assert_allclose(gqa(x), mha(x), atol=1e-5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TPUMultiHeadAttention(32, 4, 8, num_kv_heads=3, key=getkey())


@pytest.mark.parametrize("qk_norm, widths", [("head", (8, 8)), ("full", (32, 32))])
def test_qk_norm_normalises_q_and_k_before_rope(getkey, qk_norm, widths):
    key = getkey()
    attn = TPUMultiHeadAttention(32, 4, 8, num_kv_heads=4, qk_norm=qk_norm, implementation="reference", key=key)
    assert (attn.q_norm.dim, attn.k_norm.dim) == widths
    attn = eqx.tree_at(lambda m: (m.q_norm.scale, m.k_norm.scale), attn,
                       (1 + jax.random.normal(getkey(), widths[:1]), 1 + jax.random.normal(getkey(), widths[1:])))
    x = 3 * jax.random.normal(getkey(), (2, 10, 32))
    np.testing.assert_allclose(attn(x), plain_mha(attn, x), atol=1e-5)
    plain = TPUMultiHeadAttention(32, 4, 8, num_kv_heads=4, implementation="reference", key=key)
    assert plain.q_norm is None and plain.q_proj.weight is not None
    assert np.abs(plain(x) - attn(x)).max() > 1e-2
    with pytest.raises(ValueError, match="qk_norm='layer'"):
        TPUMultiHeadAttention(32, 4, qk_norm="layer", key=getkey())


def test_rope_scalings_keep_and_stretch_the_right_frequencies():
    d, theta, plain = 16, 500.0, rope_frequencies(16, 500.0)
    np.testing.assert_allclose(rope_frequencies(d, theta, RopeScaling("linear", 3.0, 8)), plain / 3, rtol=1e-6)
    for kind in ("llama3", "yarn"):  # the fastest rotation is kept, the slowest divided by the factor
        freqs = rope_frequencies(d, theta, RopeScaling(kind, 4.0, 64, beta_fast=8.0))
        np.testing.assert_allclose([freqs[0], freqs[-1]], [plain[0], plain[-1] / 4], rtol=1e-6)
        assert np.all(freqs <= plain + 1e-7) and np.all(np.diff(freqs) < 0)
    dynamic = RopeScaling("dynamic", 2.0, 8)
    short, long = jnp.arange(8)[None], jnp.arange(12)[None]
    np.testing.assert_allclose(rope_frequencies(d, theta, dynamic, short), plain, rtol=1e-6)
    base = theta * (2.0 * 12 / 8 - 1) ** (d / (d - 2))  # NTK: the base grows with the longest position
    np.testing.assert_allclose(rope_frequencies(d, theta, dynamic, long), rope_frequencies(d, base), rtol=1e-5)
    # yarn multiplies cos and sin by its attention factor (0.1 ln 4 + 1 by default).
    x = jax.random.normal(jax.random.key(0), (1, 12, 2, d))
    yarn = apply_rope(x, long, theta, RopeScaling("yarn", 4.0, 8))
    np.testing.assert_allclose(jnp.linalg.norm(yarn, axis=-1), (0.1 * np.log(4) + 1) * jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="RopeScaling.kind"):
        RopeScaling("longrope", 2.0, 8)


def test_attention_with_qk_norm_and_yarn_is_plain_mha(getkey):
    attn = TPUMultiHeadAttention(32, 4, 8, num_kv_heads=4, qk_norm="head", implementation="reference",
                                 rope_scaling=RopeScaling("yarn", 4.0, 4), key=getkey())
    x = jax.random.normal(getkey(), (2, 10, 32))
    np.testing.assert_allclose(attn(x), plain_mha(attn, x), atol=1e-5)


def test_single_expert_top1_moe_is_the_dense_mlp(getkey):
    moe = MoE(16, 24, num_experts=1, top_k=1, key=getkey())
    mlp = MLP(16, 24, key=getkey())
    mlp = eqx.tree_at(lambda m: (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight), mlp,
                      (moe.experts.gate[0], moe.experts.up[0], moe.experts.down[0]))
    x = jax.random.normal(getkey(), (3, 5, 16))
    y, aux = moe(x)
    np.testing.assert_allclose(y, mlp(x), atol=1e-5)
    np.testing.assert_allclose(aux["load_balancing_loss"], 1.0, rtol=1e-6)


def test_load_balancing_loss_by_hand():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]]))
    # Row shifts leave the softmax unchanged and make each row's log-sum-exp equal the shift.
    logits = logits + jnp.array([[1.0], [2.0], [-1.0], [0.5]])
    routing = route(logits, 1, renormalize=True)
    np.testing.assert_array_equal(routing.indices[:, 0], [0, 1, 0, 2])
    np.testing.assert_allclose(routing.weights, 1.0)
    f = np.array([2, 1, 1]) / 4
    p = np.array([0.7 + 0.1 + 0.5 + 0.2, 0.2 + 0.6 + 0.1 + 0.3, 0.1 + 0.3 + 0.4 + 0.5]) / 4
    np.testing.assert_allclose(load_balancing_loss(routing, 3), 3 * np.sum(f * p), rtol=1e-6)
    np.testing.assert_allclose(router_z_loss(logits), (1 + 4 + 1 + 0.25) / 4, rtol=1e-5)


def test_uniform_routing_reaches_the_minimum():
    # Equal probabilities and each expert chosen equally often: f = P = 1/E -> loss 1.
    num_experts = 4
    logits = jnp.zeros((8, num_experts))
    routing = route(logits, 1)._replace(indices=jnp.arange(8)[:, None] % num_experts)
    np.testing.assert_allclose(load_balancing_loss(routing, num_experts), 1.0, rtol=1e-6)
    skewed = routing._replace(indices=jnp.zeros((8, 1), jnp.int32),
                              probs=jnp.tile(jnp.array([0.7, 0.1, 0.1, 0.1]), (8, 1)))
    assert load_balancing_loss(skewed, num_experts) > 2.0


def test_top2_renormalised_weights(getkey):
    logits = jax.random.normal(getkey(), (6, 5))
    r = route(logits, 2, renormalize=True)
    np.testing.assert_allclose(r.weights.sum(-1), 1.0, rtol=1e-6)
    raw = route(logits, 2, renormalize=False)
    probs = jax.nn.softmax(logits)
    np.testing.assert_allclose(raw.weights, jnp.take_along_axis(probs, raw.indices, -1), rtol=1e-6)
    assert np.all(raw.weights[:, 0] >= raw.weights[:, 1])

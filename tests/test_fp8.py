"""fp8 GEMMs: exactness against a fake-quant oracle, error bounds against fp32,
fp8 really in the program, and fp8 layers/models that run and train."""

import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jaxtyping import TypeCheckError

from vishwam import ModelConfig, VishwamAI
from vishwam.memory import next_token_loss
from vishwam.nn import TPUGEMMLinear, TPUMultiHeadAttention
from vishwam.nn.fp8 import fp8_batched_matmul, fp8_matmul

# e4m3 keeps 3 mantissa bits: round-to-nearest moves a normal value by at most
# u = 2^-4 of itself; below the smallest normal (2^-6 after scaling) the grid is
# 2^-9 apart, so a subnormal moves by at most 2^-10 * scale. e5m2 (gradients):
# 2 mantissa bits, u = 2^-3; subnormal spacing 2^-16, half of it 2^-17.
E4M3 = dict(dtype=ml_dtypes.float8_e4m3fn, fmax=448.0, u=2.0**-4, sub=2.0**-10)
E5M2 = dict(dtype=ml_dtypes.float8_e5m2, fmax=57344.0, u=2.0**-3, sub=2.0**-17)
BLOCK = 32
SCALINGS = ["tensor", "block"]
jit_fp8_matmul = jax.jit(fp8_matmul, static_argnames=("scaling", "block_size"))


# ----------------------------------------------------------------- oracles
def fake_quant(x, fmt, blocks):
    """Quantise-dequantise `x [r, c]` in numpy with one scale per `blocks` tile
    (None = the whole axis), exactly as fp8.py does, returned in float64."""
    x = np.asarray(x, np.float32)
    r, c = x.shape
    br, bc = blocks[0] or r, blocks[1] or c
    pr, pc = -r % br, -c % bc
    xp = np.pad(x, ((0, pr), (0, pc)))
    tiles = xp.reshape(xp.shape[0] // br, br, xp.shape[1] // bc, bc)
    amax = np.abs(tiles).max(axis=(1, 3), keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(fmt["fmax"]), np.float32(1)).astype(np.float32)
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    q = np.clip(tiles / scale, -fmt["fmax"], fmt["fmax"]).astype(fmt["dtype"])
    deq = q.astype(np.float64) * scale
    return deq.reshape(xp.shape)[:r, :c]


def oracle(x, w, g, scaling):
    """Forward and both gradients of the fp8 matmul, computed from fake-quantised operands."""
    tile = (None, None) if scaling == "tensor" else (BLOCK, BLOCK)
    row = (None, None) if scaling == "tensor" else (1, BLOCK)
    col = (None, None) if scaling == "tensor" else (BLOCK, 1)
    xq = fake_quant(x, E4M3, row)
    wq = fake_quant(w, E4M3, tile)
    y = xq @ wq
    dx = fake_quant(g, E5M2, row) @ wq.T
    x_for_dw = xq if scaling == "tensor" else fake_quant(xq, E4M3, col)
    dw = x_for_dw.T @ fake_quant(g, E5M2, col)
    return y, dx, dw


def product_error_bound(a, b, fa, fb, rounds_a=1):
    """Elementwise bound on |fq(a) @ fq(b) - a @ b| from the per-element error
    |fq(v) - v| <= u |v| + sub * scale (scale of the whole tensor bounds any
    group's); `rounds_a=2` for an operand quantised twice."""
    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    ua = (1 + fa["u"]) ** rounds_a - 1
    ea = ua * a + rounds_a * (1 + fa["u"]) * fa["sub"] * a.max() / fa["fmax"]
    eb = fb["u"] * b + fb["sub"] * b.max() / fb["fmax"]
    # + fp32 accumulation of exactly representable products
    return ea @ b + a @ eb + ea @ eb + 1e-5 * (a @ b)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def operands():
    kx, kw, kg = jax.random.split(jax.random.key(42), 3)
    # Sizes not divisible by BLOCK exercise the padding; leading dims the reshape.
    x = jax.random.normal(kx, (3, 50, 200), jnp.float32)
    w = jax.random.normal(kw, (200, 130), jnp.float32) / np.sqrt(200)
    g = jax.random.normal(kg, (3, 50, 130), jnp.float32)
    return x, w, g


@functools.partial(jax.jit, static_argnames="scaling")
def fp8_value_and_grads(x, w, g, scaling):
    def f(x, w):
        y = fp8_matmul(x, w, scaling=scaling, block_size=BLOCK)
        return jnp.sum(y * g), y

    (_, y), (dx, dw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)
    return y, dx, dw


@pytest.fixture(scope="module")
def fp8_results(operands):
    return {s: fp8_value_and_grads(*operands, scaling=s) for s in SCALINGS}


def flat(a):
    return np.asarray(a, np.float64).reshape(-1, a.shape[-1])


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("scaling", SCALINGS)
def test_values_and_gradients_equal_fake_quant_oracle(operands, fp8_results, scaling):
    x, w, g = (flat(a) for a in operands)
    y, dx, dw = fp8_results[scaling]
    y_ref, dx_ref, dw_ref = oracle(x, w, g, scaling)
    assert y.shape == (3, 50, 130) and dx.shape == (3, 50, 200) and dw.shape == (200, 130)
    # Products of fp8 numbers are exact in fp32; only the fp32 sums differ.
    for got, ref, scale in ((y, y_ref, np.abs(x) @ np.abs(w)), (dx, dx_ref, np.abs(g) @ np.abs(w).T),
                            (dw, dw_ref, np.abs(x).T @ np.abs(g))):
        assert np.all(np.abs(flat(got) - ref) <= 2e-6 * scale + 1e-12)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_forward_error_within_e4m3_bound(operands, fp8_results, scaling):
    x, w, _ = (flat(a) for a in operands)
    y = flat(fp8_results[scaling][0])
    exact = x @ w
    assert np.all(np.abs(y - exact) <= product_error_bound(x, w, E4M3, E4M3))
    rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    # Really quantised (fp32 would be ~1e-7), and typical error well inside u.
    assert 1e-3 < rel < E4M3["u"]


@pytest.mark.parametrize("scaling", SCALINGS)
def test_gradients_within_e5m2_e4m3_bound(operands, fp8_results, scaling):
    x, w, g = (flat(a) for a in operands)
    _, dx, dw = fp8_results[scaling]
    dx_exact, dw_exact = g @ w.T, x.T @ g
    assert np.all(np.abs(flat(dx) - dx_exact) <= product_error_bound(g, w.T, E5M2, E4M3))
    # Block mode requantises the saved input along tokens for dw: two roundings.
    rounds = 1 if scaling == "tensor" else 2
    assert np.all(np.abs(flat(dw) - dw_exact) <= product_error_bound(x.T, g, E4M3, E5M2, rounds_a=rounds))
    for got, exact in ((dx, dx_exact), (dw, dw_exact)):
        rel = np.linalg.norm(flat(got) - exact) / np.linalg.norm(exact)
        assert 1e-3 < rel < E5M2["u"]


def test_block_scaling_beats_tensor_scaling_with_outliers(operands):
    x, w, g = operands
    # Two outliers 1e5 x the typical magnitude: with one scale per tensor the
    # ordinary values fall below e4m3's normal range (2^-6) and lose precision.
    x = x.at[0, 3, 5].set(1e5).at[1, 40, 100].set(-1e5)
    clean = np.setdiff1d(np.arange(150), [3, 50 + 40])  # rows of the flattened batch
    exact = flat(x) @ flat(w)
    errors = {}
    for scaling in SCALINGS:
        y = flat(fp8_value_and_grads(x, w, g, scaling=scaling)[0])
        errors[scaling] = np.linalg.norm((y - exact)[clean]) / np.linalg.norm(exact[clean])
    assert errors["block"] < E4M3["u"]  # the outliers only coarsen their own groups
    assert errors["block"] < 0.5 * errors["tensor"], errors


@pytest.mark.parametrize("scaling", SCALINGS)
def test_zero_tiny_and_huge_inputs_stay_finite(operands, scaling):
    x, w, g = operands
    y, dx, dw = fp8_value_and_grads(jnp.zeros_like(x), w, g, scaling=scaling)
    assert np.all(np.asarray(y) == 0.0) and np.all(np.asarray(dw) == 0.0) and np.all(np.isfinite(dx))
    for magnitude in (1e-40, 1e30):  # an fp32 subnormal; a value near fp32's top
        xm, wm = magnitude * x, (w / magnitude if magnitude > 1 else w)
        y, dx, dw = fp8_value_and_grads(xm, wm, g, scaling=scaling)
        exact = flat(xm) @ flat(wm)
        assert all(np.all(np.isfinite(a)) for a in (y, dx, dw))
        assert np.linalg.norm(flat(y) - exact) <= 0.1 * np.linalg.norm(exact)


def dot_operand_types(hlo_text):
    """Element types of the (lhs, rhs) of every dot_general in lowered StableHLO."""
    pattern = r"stablehlo\.dot_general[^\n]*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>"
    return re.findall(pattern, hlo_text)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_lowered_program_runs_dots_on_fp8(scaling, getkey):
    layer = TPUGEMMLinear(96, 64, use_fp8=True, block_size=BLOCK, fp8_scaling=scaling, key=getkey())
    x = jax.random.normal(getkey(), (4, 16, 96))
    forward = eqx.filter_jit(layer).lower(x).as_text()
    assert set(dot_operand_types(forward)) == {("f8E4M3FN", "f8E4M3FN", "f32")}

    loss = eqx.filter_value_and_grad(lambda layer_and_x: jnp.sum(layer_and_x[0](layer_and_x[1]) ** 2))
    backward = dot_operand_types(eqx.filter_jit(loss).lower((layer, x)).as_text())
    # The forward dot, dx = g @ w^T, dw = x^T @ g: no dot left in fp32.
    assert set(backward) == {("f8E4M3FN", "f8E4M3FN", "f32"), ("f8E5M2", "f8E4M3FN", "f32"),
                             ("f8E4M3FN", "f8E5M2", "f32")}


@pytest.mark.parametrize("scaling", SCALINGS)
def test_batched_matmul_scales_each_group_alone(scaling):
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 20, 48))
    w = jax.random.normal(kw, (2, 48, 40)) / 7
    x = x.at[1].multiply(100.0)  # a shared scale would crush group 0
    g = jax.random.normal(kg, (2, 20, 40))

    def f(x, w):
        y = fp8_batched_matmul(x, w, scaling=scaling, block_size=BLOCK)
        return jnp.sum(y * g), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, w)
    for e in range(2):
        refs = oracle(*(np.asarray(a[e], np.float64) for a in (x, w, g)), scaling)
        for got, ref in zip((y, dx, dw), refs, strict=True):
            np.testing.assert_allclose(got[e], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_bad_arguments_raise_with_the_fix():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    with pytest.raises(ValueError, match="choose 'tensor' or 'block'"):
        fp8_matmul(x, w, scaling="row")
    with pytest.raises(ValueError, match="block_size=0"):
        fp8_matmul(x, w, scaling="block", block_size=0)
    # Shape mismatches: the run-time type check (on in tests) or fp8.py's own check
    # (for users without one) must name the offending shape.
    with pytest.raises((ValueError, TypeCheckError), match=r"\(7, 3\)|f32\[7,3\]"):
        fp8_matmul(x, jnp.ones((7, 3)))
    with pytest.raises((ValueError, TypeCheckError), match=r"\(3, 8, 3\)|f32\[3,8,3\]"):
        fp8_batched_matmul(jnp.ones((2, 4, 8)), jnp.ones((3, 8, 3)))


def test_bf16_inputs_give_bf16_outputs_and_gradients():
    x = jax.random.normal(jax.random.key(0), (16, 64), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(1), (64, 32)) / 8).astype(jnp.bfloat16)
    f = jax.value_and_grad(lambda x, w: jnp.sum(fp8_matmul(x, w)), argnums=(0, 1))
    y, (dx, dw) = jax.jit(f)(x, w)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16


def test_attention_with_fp8_projections_runs_close_to_fp32(getkey):
    key, x = getkey(), jax.random.normal(getkey(), (2, 16, 64))
    make = functools.partial(TPUMultiHeadAttention, 64, 4, implementation="reference", init_std=0.2, key=key)
    attn8, attn32 = make(use_fp8=True), make(use_fp8=False)  # same key: same weights
    out8 = eqx.filter_jit(attn8)(x)
    out32 = eqx.filter_jit(attn32)(x)
    rel = float(jnp.linalg.norm(out8 - out32) / jnp.linalg.norm(out32))
    assert 1e-3 < rel < 0.1
    assert ("f8E4M3FN", "f8E4M3FN", "f32") in dot_operand_types(eqx.filter_jit(attn8).lower(x).as_text())


# ------------------------------------------------------------ model level
def tiny(**overrides):
    # One dense layer, then MoE: fp8="all" reaches attention and the dense MLP.
    return ModelConfig.preset("tiny", attention_impl="reference", first_dense_layers=1, **overrides)


def synthetic_batch(key, batch=8, seq=33, vocab=256):
    """Arithmetic progressions mod vocab: the next token follows from the last two."""
    ks, kd = jax.random.split(key)
    start = jax.random.randint(ks, (batch, 1), 0, vocab)
    step = jax.random.randint(kd, (batch, 1), 1, 8)
    return (start + step * jnp.arange(seq)[None, :]) % vocab


@eqx.filter_jit
def train(model, key, steps=100):
    """`steps` Adam steps on fresh synthetic batches; returns the loss of every step."""
    optimizer = optax.adam(3e-3)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(carry, key):
        params, opt_state = carry
        batch = synthetic_batch(key)
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(eqx.combine(p, static), batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    _, losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, steps))
    return losses


def test_tiny_model_trained_in_fp8_reaches_fp32_loss():
    key = jax.random.key(11)
    losses = {}
    for fp8 in ("none", "all"):
        model = VishwamAI(tiny(fp8=fp8), key=jax.random.key(0))
        lowered = train.lower(model, key)
        if fp8 == "all":  # the training program itself multiplies in fp8, both ways
            types = set(dot_operand_types(lowered.as_text()))
            assert {("f8E4M3FN", "f8E4M3FN", "f32"), ("f8E5M2", "f8E4M3FN", "f32")} <= types
        # LLVM level 0: a third less compile time; losses agree with level 2 to ~1e-6.
        compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
        losses[fp8] = np.asarray(compiled(model, key))
    assert np.all(np.isfinite(losses["all"]))
    # Same weights and batch: the first losses differ only by the fp8 rounding.
    assert abs(losses["all"][0] - losses["none"][0]) <= 0.01 * losses["none"][0]
    final = {fp8: float(l[-10:].mean()) for fp8, l in losses.items()}
    assert final["none"] < 0.6 * float(losses["none"][:5].mean())  # it did learn
    assert abs(final["all"] - final["none"]) <= 0.05 * final["none"], final

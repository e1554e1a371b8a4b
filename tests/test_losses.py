"""Losses against float64 numpy oracles: values, gradients, masking, distillation limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam.config import ModelConfig
from vishwam.train.losses import (
    chunked_distillation,
    chunked_lse_and_target,
    cross_entropy_loss,
    distillation_kl,
    distillation_loss,
    logit_z_loss,
    masked_mean,
    masked_sum,
    moe_aux_loss,
    token_cross_entropy,
)

B, T, V = 2, 5, 11


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(3.0 * rng.standard_normal((B, T, V)), jnp.float32)
    teacher = jnp.asarray(3.0 * rng.standard_normal((B, T, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], jnp.float32)
    return logits, teacher, targets, mask


def test_token_cross_entropy_matches_oracle(data):
    logits, _, targets, _ = data
    expected = -np.take_along_axis(_log_softmax64(logits), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_cross_entropy(logits, targets), expected, rtol=1e-6, atol=1e-6)


def test_bf16_logits_are_promoted_to_fp32(data):
    logits, _, targets, _ = data
    out = token_cross_entropy(logits.astype(jnp.bfloat16), targets)
    assert out.dtype == jnp.float32
    expected = token_cross_entropy(logits.astype(jnp.bfloat16).astype(jnp.float32), targets)
    np.testing.assert_array_equal(out, expected)


def test_cross_entropy_gradient_matches_oracle(data):
    logits, _, targets, mask = data
    grad = jax.grad(cross_entropy_loss)(logits, targets, mask)
    probs = np.exp(_log_softmax64(logits))
    onehot = np.eye(V)[np.asarray(targets)]
    m = np.asarray(mask, np.float64)
    expected = (probs - onehot) * m[..., None] / m.sum()
    np.testing.assert_allclose(grad, expected, atol=1e-7)


def test_masked_positions_change_nothing(data):
    logits, _, targets, mask = data
    masked = np.asarray(mask) == 0
    other_logits = jnp.where(masked[..., None], 100.0 * logits[::-1, ::-1], logits)
    other_targets = jnp.where(masked, (targets + 3) % V, targets)

    def value_and_grad(lg, tg):
        return jax.value_and_grad(cross_entropy_loss)(lg, tg, mask)

    loss, grad = value_and_grad(logits, targets)
    loss2, grad2 = value_and_grad(other_logits, other_targets)
    assert float(loss) == float(loss2)
    np.testing.assert_array_equal(grad, grad2)
    assert not np.any(np.asarray(grad)[masked])


def test_masked_mean_ignores_nonfinite_masked_values_and_empty_mask():
    values = jnp.asarray([1.0, jnp.nan, 3.0, jnp.inf])
    mask = jnp.asarray([1.0, 0.0, 1.0, 0.0])
    assert float(masked_mean(values, mask)) == 2.0
    assert float(masked_sum(values, mask)) == 4.0
    assert float(masked_mean(values, jnp.zeros(4))) == 0.0


def test_logit_z_loss_matches_oracle(data):
    logits = data[0]
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    np.testing.assert_allclose(logit_z_loss(logits), lse**2, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_kl_matches_oracle(data, temperature):
    student, teacher, _, _ = data
    log_ps = _log_softmax64(np.asarray(student) / temperature)
    log_pt = _log_softmax64(np.asarray(teacher) / temperature)
    expected = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    np.testing.assert_allclose(distillation_kl(student, teacher, temperature), expected, rtol=1e-5, atol=1e-6)


def test_distillation_kl_gradient_matches_oracle(data):
    student, teacher, _, mask = data
    temperature = 2.0
    grad = jax.grad(lambda s: masked_mean(distillation_kl(s, teacher, temperature), mask))(student)
    ps = np.exp(_log_softmax64(np.asarray(student) / temperature))
    pt = np.exp(_log_softmax64(np.asarray(teacher) / temperature))
    m = np.asarray(mask, np.float64)
    expected = (ps - pt) / temperature * m[..., None] / m.sum()
    np.testing.assert_allclose(grad, expected, atol=1e-7)


def test_teacher_with_zero_probabilities_gives_finite_kl(data):
    student, teacher, _, _ = data
    teacher = teacher.at[..., :3].set(-jnp.inf)
    kl = distillation_kl(student, teacher, 1.0)
    assert np.all(np.isfinite(kl)) and np.all(np.asarray(kl) >= 0)


def test_alpha_one_is_plain_cross_entropy(data):
    student, teacher, targets, mask = data
    distilled = distillation_loss(student, teacher, targets, mask, alpha=1.0, temperature=2.0)
    assert float(distilled) == float(cross_entropy_loss(student, targets, mask))


def test_alpha_zero_is_scaled_kl(data):
    student, teacher, targets, mask = data
    distilled = distillation_loss(student, teacher, targets, mask, alpha=0.0, temperature=3.0)
    expected = 9.0 * masked_mean(distillation_kl(student, teacher, 3.0), mask)
    np.testing.assert_allclose(distilled, expected, rtol=1e-6)


def test_student_equal_to_teacher_has_zero_kl_and_zero_gradient(data):
    student, _, targets, mask = data
    kl = distillation_kl(student, student, 2.0)
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    grad = jax.grad(lambda s: distillation_loss(s, student, targets, mask, alpha=0.0, temperature=2.0))(student)
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)


def test_teacher_gets_no_gradient(data):
    student, teacher, targets, mask = data
    grad = jax.grad(lambda t: distillation_loss(student, t, targets, mask, alpha=0.3, temperature=2.0))(teacher)
    assert not np.any(np.asarray(grad))


def test_vocabulary_mismatch_is_a_clear_error(data):
    student, teacher, _, _ = data
    with pytest.raises(ValueError, match=r"student vocabulary 11 != teacher vocabulary 7"):
        distillation_kl(student, teacher[..., :7], 1.0)


def test_moe_aux_loss_uses_config_weights():
    config = ModelConfig.preset("tiny", router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    aux = {"load_balancing_loss": jnp.asarray(2.0), "router_z_loss": jnp.asarray(3.0)}
    np.testing.assert_allclose(moe_aux_loss(aux, config), 0.1 * 2.0 + 0.01 * 3.0, rtol=1e-6)


# ------------------------------------------------- fused, chunked LM head + loss
def _unchunked_loss(hidden, head, targets, mask, z_coef):
    logits = jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return masked_sum(token_cross_entropy(logits, targets), mask) + z_coef * masked_sum(logit_z_loss(logits), mask)


def _chunked_loss(hidden, head, targets, mask, z_coef, chunk):
    lse, target_logit = chunked_lse_and_target(hidden, head, targets, chunk)
    return masked_sum(lse - target_logit, mask) + z_coef * masked_sum(jnp.square(lse), mask)


@pytest.mark.parametrize("seq, chunk", [(24, 8), (23, 8), (23, 64), (16, 1)])
def test_chunked_head_loss_equals_full_logits_in_values_and_gradients(seq, chunk):
    rng = np.random.default_rng(seq * 100 + chunk)
    batch, width, vocab = 3, 16, 37
    hidden = jnp.asarray(rng.standard_normal((batch, seq, width)), jnp.float32)
    head = jnp.asarray(0.3 * rng.standard_normal((width, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    mask = jnp.asarray(rng.random((batch, seq)) > 0.3, jnp.float32)  # padding / document ends
    want, want_grads = jax.value_and_grad(_unchunked_loss, (0, 1))(hidden, head, targets, mask, 1e-2)
    chunked = jax.jit(jax.value_and_grad(_chunked_loss, (0, 1)), static_argnums=5)
    got, got_grads = chunked(hidden, head, targets, mask, 1e-2, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # masked positions get exactly zero gradient
    assert not np.any(np.asarray(got_grads[0])[np.asarray(mask) == 0])


def test_chunked_head_loss_in_bf16_keeps_fp32_head_gradients():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((2, 32, 16)), jnp.bfloat16)
    head = jnp.asarray(0.3 * rng.standard_normal((16, 29)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 29, (2, 32)), jnp.int32)
    mask = jnp.ones((2, 32), jnp.float32)
    want, (dh_want, dw_want) = jax.value_and_grad(_unchunked_loss, (0, 1))(hidden, head, targets, mask, 0.0)
    got, (dh, dw) = jax.value_and_grad(_chunked_loss, (0, 1))(hidden, head, targets, mask, 0.0, 8)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(dw, dw_want, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dh, np.float32), np.asarray(dh_want, np.float32), rtol=5e-2, atol=2e-2)


# ---------------------------------------- fused, chunked LM head + distillation
def _distill_oracle64(hidden, head, teacher_logits, targets, mask, alpha, temperature):
    """float64 numpy: `alpha * CE + (1 - alpha) * T**2 * KL(teacher_T || student_T)` masked sum, and
    its gradients with respect to `hidden` and `head` (d/dlogits written out by hand)."""
    h, w = np.asarray(hidden, np.float64), np.asarray(head, np.float64)
    logits = np.einsum("btd,dv->btv", h, w)
    log_p = _log_softmax64(logits)
    log_ps, log_pt = _log_softmax64(logits / temperature), _log_softmax64(np.asarray(teacher_logits) / temperature)
    pt = np.exp(log_pt)
    tg, m = np.asarray(targets), np.asarray(mask, np.float64)
    ce = -np.take_along_axis(log_p, tg[..., None], -1)[..., 0]
    kl = np.where(pt > 0, pt * (log_pt - log_ps), 0.0).sum(-1)
    value = np.sum(m * (alpha * ce + (1 - alpha) * temperature**2 * kl))
    d_logits = alpha * (np.exp(log_p) - np.eye(logits.shape[-1])[tg])
    d_logits = d_logits + (1 - alpha) * temperature * (np.exp(log_ps) - pt)
    d_logits = d_logits * m[..., None]
    return value, np.einsum("btv,dv->btd", d_logits, w), np.einsum("btd,btv->dv", h, d_logits)


def _chunked_distill_loss(hidden, head, teacher, teacher_head, targets, mask, alpha, temperature, chunk):
    lse, target_logit, kl = chunked_distillation(hidden, head, targets, teacher, temperature, chunk,
                                                 teacher_head=teacher_head)
    return masked_sum(alpha * (lse - target_logit) + (1 - alpha) * temperature**2 * kl, mask)


@pytest.mark.parametrize("seq, chunk, temperature, fused_teacher",
                         [(24, 8, 2.0, True), (23, 8, 1.0, True), (23, 64, 3.0, False), (16, 1, 2.0, False)])
def test_chunked_distillation_equals_full_logits_kl_in_values_and_gradients(seq, chunk, temperature, fused_teacher):
    rng = np.random.default_rng(seq * 10 + chunk)
    batch, width, teacher_width, vocab, alpha = 2, 16, 12, 37, 0.3
    hidden = jnp.asarray(rng.standard_normal((batch, seq, width)), jnp.float32)
    head = jnp.asarray(0.5 * rng.standard_normal((width, vocab)), jnp.float32)
    teacher_hidden = jnp.asarray(rng.standard_normal((batch, seq, teacher_width)), jnp.float32)
    teacher_head = jnp.asarray(rng.standard_normal((teacher_width, vocab)), jnp.float32)
    teacher_logits = jnp.einsum("btd,dv->btv", teacher_hidden, teacher_head)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    mask = jnp.asarray(rng.random((batch, seq)) > 0.3, jnp.float32)
    want, d_hidden, d_head = _distill_oracle64(hidden, head, teacher_logits, targets, mask, alpha, temperature)
    teacher, t_head = (teacher_hidden, teacher_head) if fused_teacher else (teacher_logits, None)
    loss = jax.jit(jax.value_and_grad(_chunked_distill_loss, (0, 1, 2)), static_argnums=(6, 7, 8))
    got, (g_hidden, g_head, g_teacher) = loss(hidden, head, teacher, t_head, targets, mask, alpha, temperature, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(g_hidden, d_hidden, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_head, d_head, rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(g_teacher))  # the teacher is frozen
    # The plain full-logits path of the library gives the same numbers.
    logits = jnp.einsum("btd,dv->btv", hidden, head)
    plain = masked_sum(alpha * token_cross_entropy(logits, targets)
                       + (1 - alpha) * temperature**2 * distillation_kl(logits, teacher_logits, temperature), mask)
    np.testing.assert_allclose(got, plain, rtol=1e-5)


def test_chunked_distillation_with_a_teacher_ruling_tokens_out_is_finite():
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.standard_normal((1, 6, 8)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((8, 13)), jnp.float32)
    teacher = jnp.asarray(rng.standard_normal((1, 6, 13)), jnp.float32).at[..., :4].set(-jnp.inf)
    targets = jnp.zeros((1, 6), jnp.int32)
    value, grads = jax.value_and_grad(_chunked_distill_loss, (0, 1))(hidden, head, teacher, None, targets,
                                                                      jnp.ones((1, 6)), 0.0, 1.0, 4)
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)
    want = masked_sum(distillation_kl(jnp.einsum("btd,dv->btv", hidden, head), teacher, 1.0), jnp.ones((1, 6)))
    np.testing.assert_allclose(value, want, rtol=1e-5)


def test_chunked_distillation_vocabulary_mismatch_is_a_clear_error():
    hidden, head = jnp.zeros((1, 4, 8)), jnp.zeros((8, 13))
    with pytest.raises(ValueError, match=r"teacher hidden states \[1, 4, 6\] with vocabulary 11"):
        chunked_distillation(hidden, head, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4, 6)), 1.0, 2,
                             teacher_head=jnp.zeros((6, 11)))

"""Training losses, all in fp32: token cross-entropy, logit z-loss, MoE aux, distillation.

Per-token functions return one value per position; `masked_mean` and the step
reduce them. The step divides masked *sums* by the token count of the whole
optimiser batch, so that accumulating micro-batches gives the full-batch mean.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ..config import ModelConfig
from ..errors import InvalidValueError


def token_cross_entropy(
    logits: Float[Array, "*batch vocab"], targets: Int[Array, "*batch"]
) -> Float[Array, "*batch"]:
    """`-log softmax(logits)[target]` per position, in fp32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - target_logit


def chunked_lse_and_target(
    hidden: Float[Array, "batch seq hidden"],
    head: Float[Array, "hidden vocab"],
    targets: Int[Array, "batch seq"],
    chunk_size: int,
) -> tuple[Float[Array, "batch seq"], Float[Array, "batch seq"]]:
    """`logsumexp(logits)` and `logits[target]` per position, logits = `hidden @ head`,
    without ever holding more than `[batch, chunk_size, vocab]` logits.

    The LM head and the loss fused: a scan over chunks of `chunk_size` sequence
    positions (the batch dim stays whole, so a batch-sharded input keeps every device
    busy in every chunk), with its own backward that recomputes each chunk's logits
    from the saved log-sum-exp and accumulates the head's gradient in fp32. From the
    two outputs: cross-entropy is `lse - target`, the z-loss `lse**2`. Matmuls run in
    `hidden`'s dtype with fp32 accumulation, as `VishwamAI.logits` does; a sequence
    length that `chunk_size` does not divide is padded (the padding costs compute,
    not correctness).

    Arguments:
        hidden: final hidden states (`VishwamAI.features`).
        head: `VishwamAI.head_weight` (any float dtype; its gradient comes back in it).
        targets: target ids.
        chunk_size: positions per chunk (`min(chunk_size, seq)` is used).

    Returns:
        `(lse, target_logit)`, both fp32 `[batch, seq]`.
    """
    batch, seq, width = hidden.shape
    chunk = min(chunk_size, seq)
    chunks = math.ceil(seq / chunk)
    pad = chunks * chunk - seq
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    h = hidden.reshape(batch, chunks, chunk, width).swapaxes(0, 1)  # (n, B, C, D)
    t = targets.astype(jnp.int32).reshape(batch, chunks, chunk).swapaxes(0, 1)  # (n, B, C)
    lse, target_logit = _fused_head_lse(h, head, t)
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, chunks * chunk)[:, :seq]  # noqa: E731
    return unchunk(lse), unchunk(target_logit)


def _chunk_logits(h, head):
    """`[B, C, D] @ [D, V]` as one 2-D GEMM over the flattened `B * C` rows (XLA:CPU runs the
    3-D einsum's backward products about half as fast: transposed operand copies)."""
    b, c, d = h.shape
    logits = jnp.matmul(h.reshape(b * c, d), head.astype(h.dtype), preferred_element_type=jnp.float32)
    return logits.reshape(b, c, -1)


@jax.custom_vjp
def _fused_head_lse(h, head, t):
    def chunk(_, xs):
        h_c, t_c = xs
        logits = _chunk_logits(h_c, head)
        target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        return None, (jax.nn.logsumexp(logits, axis=-1), target)

    _, (lse, target) = jax.lax.scan(chunk, None, (h, t))
    return lse, target


def _fused_head_lse_fwd(h, head, t):
    lse, target = _fused_head_lse(h, head, t)
    return (lse, target), (h, head, t, lse)


def _fused_head_lse_bwd(residuals, cotangents):
    h, head, t, lse = residuals
    g_lse, g_target = cotangents
    vocab = head.shape[-1]

    def chunk(d_head, xs):
        h_c, t_c, lse_c, g_lse_c, g_t_c = xs
        probs = jnp.exp(_chunk_logits(h_c, head) - lse_c[..., None])  # (B, C, V) fp32
        # d/dlogits of g_lse * lse + g_t * logits[t]
        d_logits = g_lse_c[..., None] * probs + g_t_c[..., None] * jax.nn.one_hot(t_c, vocab, dtype=jnp.float32)
        b, c, d = h_c.shape
        d_logits = d_logits.astype(h_c.dtype).reshape(b * c, vocab)  # 2-D GEMMs, as in `_chunk_logits`
        rows = h_c.reshape(b * c, d)
        d_h = jnp.matmul(d_logits, head.astype(h_c.dtype).T, preferred_element_type=jnp.float32)
        d_head = d_head + jnp.matmul(rows.T, d_logits, preferred_element_type=jnp.float32)
        return d_head, d_h.reshape(b, c, d).astype(h_c.dtype)

    d_head, d_h = jax.lax.scan(chunk, jnp.zeros(head.shape, jnp.float32), (h, t, lse, g_lse, g_target))
    return d_h, d_head.astype(head.dtype), None


_fused_head_lse.defvjp(_fused_head_lse_fwd, _fused_head_lse_bwd)


def chunked_distillation(
    hidden: Float[Array, "batch seq hidden"],
    head: Float[Array, "hidden vocab"],
    targets: Int[Array, "batch seq"],
    teacher: Float[Array, "batch seq teacher_width"],
    temperature: float,
    chunk_size: int,
    *,
    teacher_head: Float[Array, "teacher_hidden teacher_vocab"] | None = None,
) -> tuple[Float[Array, "batch seq"], Float[Array, "batch seq"], Float[Array, "batch seq"]]:
    """`chunked_lse_and_target` plus `distillation_kl` of the same logits, chunk by chunk.

    One scan over chunks of `chunk_size` positions computes the student's logits
    (`hidden @ head`) and the teacher's (`teacher @ teacher_head` for a teacher that fuses
    its head: `teacher` its final hidden states; with `teacher_head=None`, `teacher` are
    its `[batch, seq, vocab]` logits, for teachers that only return logits) and reduces
    them at once: no `[batch, seq, vocab]` student logits exist, nor teacher logits for a
    fused teacher. Its backward recomputes each chunk's logits from saved log-sum-exps
    (as `chunked_lse_and_target`'s does) and gives the teacher no gradient.

    Returns:
        `(lse, target_logit, kl)`, fp32 `[batch, seq]`: `logsumexp(logits)`,
        `logits[target]` and `distillation_kl(logits, teacher_logits, temperature)`.
    """
    batch, seq, _ = hidden.shape
    vocab = head.shape[-1]
    teacher_vocab = teacher.shape[-1] if teacher_head is None else teacher_head.shape[-1]
    if teacher_vocab != vocab or teacher.shape[:2] != (batch, seq):
        raise InvalidValueError(
            f"chunked_distillation: student logits [{batch}, {seq}, {vocab}], teacher "
            f"{'logits' if teacher_head is None else 'hidden states'} {list(teacher.shape)} with vocabulary "
            f"{teacher_vocab}; the teacher must cover the student's positions and vocabulary.")
    chunk = min(chunk_size, seq)
    chunks = math.ceil(seq / chunk)
    pad = chunks * chunk - seq
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        teacher = jnp.pad(teacher, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    split = lambda x: x.reshape(batch, chunks, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731  (n, B, C, ...)
    teacher = jax.lax.stop_gradient(teacher)
    teacher_head = None if teacher_head is None else jax.lax.stop_gradient(teacher_head)
    lse, target, kl = _fused_head_distill(float(temperature), split(hidden), head,
                                          split(targets.astype(jnp.int32)), split(teacher), teacher_head)
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, chunks * chunk)[:, :seq]  # noqa: E731
    return unchunk(lse), unchunk(target), unchunk(kl)


def _teacher_chunk_logits(teacher_c, teacher_head):
    """A chunk of teacher logits: from its hidden states and head, or the logits themselves."""
    if teacher_head is None:
        return teacher_c.astype(jnp.float32)
    return _chunk_logits(teacher_c, teacher_head)


def _kl_terms(logits, teacher_logits, temperature):
    """Per position of a chunk: the KL, and the two log-sum-exps at temperature its backward needs."""
    scaled, teacher_scaled = logits / temperature, teacher_logits / temperature
    lse_s, lse_t = jax.nn.logsumexp(scaled, axis=-1), jax.nn.logsumexp(teacher_scaled, axis=-1)
    log_p_teacher = teacher_scaled - lse_t[..., None]
    p_teacher = jnp.exp(log_p_teacher)
    # 0 * log 0 = 0: a teacher that rules a token out contributes nothing there (no NaN).
    kl = jnp.sum(jnp.where(p_teacher > 0, p_teacher * (log_p_teacher - (scaled - lse_s[..., None])), 0.0), axis=-1)
    return kl, lse_s, lse_t


def _distill_forward(temperature, h, head, t, teacher, teacher_head):
    def chunk(_, xs):
        h_c, t_c, teacher_c = xs
        logits = _chunk_logits(h_c, head)
        target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        kl, lse_s, lse_t = _kl_terms(logits, _teacher_chunk_logits(teacher_c, teacher_head), temperature)
        return None, (jax.nn.logsumexp(logits, axis=-1), target, kl, lse_s, lse_t)

    return jax.lax.scan(chunk, None, (h, t, teacher))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_head_distill(temperature, h, head, t, teacher, teacher_head):
    return _distill_forward(temperature, h, head, t, teacher, teacher_head)[:3]


def _fused_head_distill_fwd(temperature, h, head, t, teacher, teacher_head):
    lse, target, kl, lse_s, lse_t = _distill_forward(temperature, h, head, t, teacher, teacher_head)
    return (lse, target, kl), (h, head, t, teacher, teacher_head, lse, lse_s, lse_t)


def _fused_head_distill_bwd(temperature, residuals, cotangents):
    h, head, t, teacher, teacher_head, lse, lse_s, lse_t = residuals
    g_lse, g_target, g_kl = cotangents
    vocab = head.shape[-1]

    def chunk(d_head, xs):
        h_c, t_c, teacher_c, lse_c, lse_s_c, lse_t_c, g_lse_c, g_t_c, g_kl_c = xs
        logits = _chunk_logits(h_c, head)  # (B, C, V) fp32
        p_student = jnp.exp(logits / temperature - lse_s_c[..., None])
        p_teacher = jnp.exp(_teacher_chunk_logits(teacher_c, teacher_head) / temperature - lse_t_c[..., None])
        # d/dlogits of g_lse * lse + g_t * logits[t] + g_kl * KL(teacher_T || student_T)
        d_logits = (g_lse_c[..., None] * jnp.exp(logits - lse_c[..., None])
                    + g_t_c[..., None] * jax.nn.one_hot(t_c, vocab, dtype=jnp.float32)
                    + (g_kl_c / temperature)[..., None] * (p_student - p_teacher))
        b, c, d = h_c.shape
        d_logits = d_logits.astype(h_c.dtype).reshape(b * c, vocab)  # 2-D GEMMs, as in `_chunk_logits`
        d_h = jnp.matmul(d_logits, head.astype(h_c.dtype).T, preferred_element_type=jnp.float32)
        d_head = d_head + jnp.matmul(h_c.reshape(b * c, d).T, d_logits, preferred_element_type=jnp.float32)
        return d_head, d_h.reshape(b, c, d).astype(h_c.dtype)

    xs = (h, t, teacher, lse, lse_s, lse_t, g_lse, g_target, g_kl)
    d_head, d_h = jax.lax.scan(chunk, jnp.zeros(head.shape, jnp.float32), xs)
    return d_h, d_head.astype(head.dtype), None, None, None


_fused_head_distill.defvjp(_fused_head_distill_fwd, _fused_head_distill_bwd)


def logit_z_loss(logits: Float[Array, "*batch vocab"]) -> Float[Array, "*batch"]:
    """`logsumexp(logits)**2` per position (PaLM's z-loss: keeps the softmax
    normaliser near 1 so that logits do not drift)."""
    return jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))


def distillation_kl(
    student_logits: Float[Array, "*batch vocab"],
    teacher_logits: Float[Array, "*batch teacher_vocab"],
    temperature: float,
) -> Float[Array, "*batch"]:
    """`KL(softmax(teacher / T) || softmax(student / T))` per position, in fp32.

    Positions where the teacher gives a token zero probability contribute zero
    (the `0 * log 0 = 0` convention), so very confident teachers give no NaN.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise InvalidValueError(
            f"distillation_kl: student vocabulary {student_logits.shape[-1]} != teacher vocabulary "
            f"{teacher_logits.shape[-1]}; the teacher must produce logits over the student's vocabulary."
        )
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    p_teacher = jnp.exp(log_p_teacher)
    return jnp.sum(jnp.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0), axis=-1)


def masked_sum(values: Float[Array, "*batch"], mask: Float[Array, "*batch"]) -> Float[Array, ""]:
    """`sum(values * mask)`. Masked positions are selected away (not multiplied),
    so a NaN or inf value there cannot leak into the sum."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask != 0, values.astype(jnp.float32) * mask, 0.0))


def masked_mean(values: Float[Array, "*batch"], mask: Float[Array, "*batch"]) -> Float[Array, ""]:
    """`sum(values * mask) / sum(mask)`; 0 when the mask is empty."""
    return masked_sum(values, mask) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def cross_entropy_loss(
    logits: Float[Array, "*batch vocab"],
    targets: Int[Array, "*batch"],
    loss_mask: Float[Array, "*batch"],
) -> Float[Array, ""]:
    """Masked mean token cross-entropy (padding and document ends have mask 0)."""
    return masked_mean(token_cross_entropy(logits, targets), loss_mask)


def distillation_loss(
    student_logits: Float[Array, "*batch vocab"],
    teacher_logits: Float[Array, "*batch vocab"],
    targets: Int[Array, "*batch"],
    loss_mask: Float[Array, "*batch"],
    *,
    alpha: float,
    temperature: float,
) -> Float[Array, ""]:
    """`alpha * CE(student, targets) + (1 - alpha) * T**2 * KL(teacher_T || student_T)`,
    masked mean over tokens. The `T**2` keeps the KL's gradient scale independent
    of the temperature (Hinton et al., 2015). The teacher gets no gradient."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    per_token = alpha * token_cross_entropy(student_logits, targets) + (1.0 - alpha) * temperature**2 * (
        distillation_kl(student_logits, teacher_logits, temperature)
    )
    return masked_mean(per_token, loss_mask)


def moe_aux_loss(aux: dict, config: ModelConfig) -> Float[Array, ""]:
    """The model's MoE losses weighted by the config:
    `router_aux_loss_coef * load_balancing_loss + router_z_loss_coef * router_z_loss`
    (both are already means over MoE layers; zero for a dense model)."""
    return (config.router_aux_loss_coef * aux["load_balancing_loss"].astype(jnp.float32)
            + config.router_z_loss_coef * aux["router_z_loss"].astype(jnp.float32))


def model_aux_loss(aux: dict, config: ModelConfig | None) -> Float[Array, ""]:
    """The auxiliary loss the step adds to the task loss: `moe_aux_loss` for a model with a
    `ModelConfig`; for any other model its aux's `aux_loss` entry (already weighted), or 0."""
    if config is not None:
        return moe_aux_loss(aux, config)
    return jnp.asarray(aux.get("aux_loss", 0.0), jnp.float32)

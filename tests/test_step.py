"""Train/eval step: accumulation, masking, distillation, NaN policy, retracing, sharding,
optimiser (schedule, weight-decay mask), TrainConfig.

Compiled steps are module-scoped fixtures shared by the tests; every test starts
from a copy of one initial state (the step donates its input state).
"""

import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vishwam import ModelConfig, VishwamAI
from vishwam.config import TrainConfig
from vishwam.train.losses import token_cross_entropy
from vishwam.train.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
from vishwam.train.step import TrainState, init_train_state, make_eval_step, make_train_step

BATCH, SEQ = 8, 16
# The Switch load-balancing loss is a product of two batch means, so its
# micro-batch average differs from its full-batch value by design; it is off here
# so that accumulation can be checked to fp32 precision. Everything else is on:
# MoE routing, router z-loss, logit z-loss, aux-loss-free bias, clipping, decay.
MODEL = ModelConfig.preset("tiny", aux_free_bias=True, router_aux_loss_coef=0.0)
# Adam's first update is lr * g / (|g| + eps): for a gradient entry near eps it
# magnifies fp32 summation-order noise by up to lr / eps (3e5 with eps=1e-8, enough
# to move one weight in 16k by 2e-5). eps=1e-6 keeps parameter comparisons about
# the gradients, not about that amplifier.
TRAIN = TrainConfig(batch_size=BATCH, seq_len=SEQ, learning_rate=3e-3, warmup_steps=0, total_steps=200,
                    eps=1e-6, z_loss_coef=1e-4, nan_policy="skip")


def copy_tree(tree):
    return jax.tree.map(lambda x: x.copy() if eqx.is_array(x) else x, tree)


def make_batch(seed: int, batch: int = BATCH, seq: int = SEQ, vocab: int = MODEL.vocab_size) -> dict:
    """Two packed documents per row plus a padded tail of varying length, so the
    micro-batches of an accumulated step hold different numbers of loss tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    segment_ids = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    loss_mask = np.ones((batch, seq), np.float32)
    for r in range(batch):
        split, pad = int(rng.integers(3, seq - 6)), int(rng.integers(0, 5))
        segment_ids[r, split:] = 1
        segment_ids[r, seq - pad:] = 2
        positions[r] = np.concatenate([np.arange(split), np.arange(seq - pad - split), np.arange(pad)])
        loss_mask[r, split - 1] = 0.0  # the target would be the next document's first token
        loss_mask[r, seq - pad - 1:] = 0.0
    return dict(tokens=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]),
                segment_ids=jnp.asarray(segment_ids), positions=jnp.asarray(positions),
                loss_mask=jnp.asarray(loss_mask))


def assert_trees_close(a, b, atol):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


# One compile (shared by the student and the teacher) instead of many eager ops.
init_model = eqx.filter_jit(VishwamAI)


@pytest.fixture(scope="module")
def state0() -> TrainState:
    return init_train_state(init_model(MODEL, key=jax.random.key(0)), TRAIN, key=jax.random.key(1))


@pytest.fixture(scope="module")
def plain_logits(state0, batch):
    """Oracle: the initial model's logits from a plain forward (no dropping, no dropout)."""
    forward = eqx.filter_jit(lambda m, b: m(b["tokens"], segment_ids=b["segment_ids"],
                                              positions=b["positions"], inference=True)[0])
    return forward(state0.model, batch)


@pytest.fixture(scope="module")
def step1():
    """accum_steps=1, nan_policy="skip"; any retrace in any test fails loudly."""
    return make_train_step(MODEL, TRAIN, max_traces=1)


@pytest.fixture(scope="module")
def batch():
    return make_batch(0)


@pytest.fixture(scope="module")
def after_one_step(state0, step1, batch):
    """The reference single-device result of one step from `state0` on `batch`."""
    return step1(copy_tree(state0), batch)


# ------------------------------------------------------------------- metrics
def test_metrics_are_consistent(after_one_step, batch, state0, plain_logits):
    state, m = after_one_step
    assert int(state.step) == 1
    assert not bool(m["nonfinite"])
    assert float(m["tokens"]) == float(jnp.sum(batch["loss_mask"]))
    np.testing.assert_allclose(m["loss"], m["ce"] + m["z"] + m["aux"], rtol=1e-6)
    assert float(m["distill"]) == 0.0
    assert float(m["aux"]) > 0 and float(m["z"]) > 0  # router z-loss and logit z-loss are on
    assert m["expert_load"].shape == (MODEL.num_moe_layers, MODEL.num_experts)
    np.testing.assert_allclose(m["expert_load"].sum(-1), 1.0, rtol=1e-6)
    assert float(m["learning_rate"]) == pytest.approx(TRAIN.learning_rate)
    # `tiny` drops no tokens, so training and inference logits agree.
    ce = token_cross_entropy(plain_logits, batch["targets"])
    np.testing.assert_allclose(m["ce"], jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]), rtol=1e-5)
    assert jax.random.key_data(state.key).tolist() != jax.random.key_data(state0.key).tolist()


def test_selection_bias_moves_only_by_the_aux_free_rule(after_one_step, state0):
    """The optimiser (with weight decay and a large lr) must never move it; only
    `update_router_bias` does, by `rate * sign(1/E - load)`."""
    state, m = after_one_step
    stage0 = state0.model.stages[0].blocks[0].mlp
    stage1 = state.model.stages[0].blocks[0].mlp
    expected = stage0.selection_bias + MODEL.aux_free_bias_rate * jnp.sign(1.0 / MODEL.num_experts - m["expert_load"])
    np.testing.assert_array_equal(stage1.selection_bias, expected)
    assert np.any(np.asarray(stage1.selection_bias) != 0)


# -------------------------------------------------------------- accumulation
def test_accumulation_equals_one_big_batch(state0, after_one_step, batch):
    step4 = make_train_step(MODEL, TRAIN.replace(accum_steps=4, nan_policy="stop"))
    state4, m4 = step4(copy_tree(state0), batch)
    state1, m1 = after_one_step
    for name in ("loss", "ce", "z", "aux", "grad_norm", "tokens"):
        np.testing.assert_allclose(m4[name], m1[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(m4["expert_load"], m1["expert_load"], atol=1e-6)
    assert_trees_close(eqx.filter(state4, eqx.is_inexact_array), eqx.filter(state1, eqx.is_inexact_array), 1e-5)

    # nan_policy="stop" reports a non-finite step but applies it (the runner decides).
    bad = dict(batch, loss_mask=batch["loss_mask"].at[0, 0].set(jnp.nan))
    state5, m5 = step4(state4, bad)
    assert bool(m5["nonfinite"])
    assert int(state5.step) == 2
    assert not np.all(np.isfinite(np.asarray(state5.model.embed)))


# ------------------------------------------------------------------- masking
def test_masked_targets_do_not_matter(state0, step1, batch, after_one_step):
    masked = np.asarray(batch["loss_mask"]) == 0
    other = dict(batch, targets=jnp.where(masked, (batch["targets"] + 17) % MODEL.vocab_size, batch["targets"]))
    assert np.any(np.asarray(other["targets"]) != np.asarray(batch["targets"]))
    state, m = step1(copy_tree(state0), other)
    ref_state, ref = after_one_step
    for name in ("loss", "ce", "z", "aux", "grad_norm", "tokens"):
        assert float(m[name]) == float(ref[name]), name
    assert_trees_close(eqx.filter(state.model, eqx.is_array), eqx.filter(ref_state.model, eqx.is_array), 0.0)


# -------------------------------------------------------------- optimisation
def test_overfits_a_fixed_batch(state0, step1, batch):
    state = copy_tree(state0)
    losses = []
    for _ in range(60):
        state, m = step1(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_no_retrace_and_a_retrace_is_caught(state0, step1):
    state = copy_tree(state0)
    for seed in range(3):
        state, _ = step1(state, make_batch(seed))
    with pytest.raises(RuntimeError, match="traced"):
        step1(state, make_batch(0, batch=BATCH // 2))


def test_nan_with_skip_policy_leaves_state_unchanged(state0, step1, batch):
    before = copy_tree(state0)
    bad = dict(batch, loss_mask=batch["loss_mask"].at[3, 2].set(jnp.nan))
    after, m = step1(copy_tree(state0), bad)
    assert bool(m["nonfinite"])
    assert int(after.step) == 0
    assert jax.random.key_data(after.key).tolist() == jax.random.key_data(before.key).tolist()
    assert_trees_close(eqx.filter(after, eqx.is_array), eqx.filter(before, eqx.is_array), 0.0)
    # The skipped state trains on as usual.
    after, m = step1(after, batch)
    assert not bool(m["nonfinite"]) and int(after.step) == 1


# ------------------------------------------------------------------ sharding
# This 8-device step used to abort the process in about half the runs (XLA:CPU
# collective timeout); tests/conftest.py now disables the concurrency-optimised
# scheduler that caused it, so it runs in-process.
def test_batch_sharded_over_eight_devices_matches_one_device(state0, after_one_step):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = jax.device_put(make_batch(0), NamedSharding(mesh, P("data")))
    state = jax.device_put(copy_tree(state0), NamedSharding(mesh, P()))
    state, metrics = make_train_step(MODEL, TRAIN)(state, batch)
    assert len(batch["tokens"].sharding.device_set) == 8
    assert len(metrics["loss"].sharding.device_set) == 8
    ref_state, ref = after_one_step
    for name in ("loss", "ce", "grad_norm", "tokens"):
        np.testing.assert_allclose(metrics[name], ref[name], rtol=1e-5, err_msg=name)
    leaves = jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))
    ref_leaves = jax.tree.leaves(eqx.filter(ref_state, eqx.is_inexact_array))
    assert len(leaves) == len(ref_leaves)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        np.testing.assert_allclose(leaf, ref_leaf, atol=1e-5, rtol=0)


def test_fused_chunked_loss_gives_the_full_logits_step(state0):
    """The default step fuses the head with the loss in chunks of positions (here 5,
    which does not divide 16); without chunks it materialises all logits. Same step."""
    batch = make_batch(3)
    chunked, full = (make_train_step(MODEL, TRAIN.replace(loss_chunk_size=c)) for c in (5, None))
    s_chunked, m_chunked = chunked(copy_tree(state0), batch)
    s_full, m_full = full(copy_tree(state0), batch)
    for name in ("loss", "ce", "z", "grad_norm"):
        np.testing.assert_allclose(m_chunked[name], m_full[name], rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(eqx.filter(s_chunked, eqx.is_inexact_array)),
                    jax.tree.leaves(eqx.filter(s_full, eqx.is_inexact_array))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    evaluate = [make_eval_step(MODEL, c)(state0.model, batch) for c in (5, None)]
    np.testing.assert_allclose(evaluate[0]["nll_sum"], evaluate[1]["nll_sum"], rtol=1e-6)


# -------------------------------------------------------------- distillation
DISTILL = TRAIN.replace(distill_alpha=0.0, distill_temperature=2.0, nan_policy="stop")


@pytest.fixture(scope="module")
def teacher():
    """A fixed random teacher with a sharpened head (a plain random init is near uniform)."""
    model = init_model(MODEL, key=jax.random.key(7))
    return eqx.tree_at(lambda m: m.lm_head.weight, model, model.lm_head.weight * 20.0)


def test_distillation_halves_the_kl_in_50_steps(state0, teacher, batch):
    step = make_train_step(MODEL, DISTILL, teacher=teacher)
    state = copy_tree(state0)
    kls = []
    for _ in range(50):
        state, m = step(state, batch)
        kls.append(float(m["distill"]))
    np.testing.assert_allclose(m["loss"], m["distill"] + m["z"] + m["aux"], rtol=1e-6)  # alpha = 0
    assert kls[-1] <= 0.5 * kls[0], kls[::10]


def test_student_equal_to_teacher_has_zero_distillation_term(state0, batch):
    step = make_train_step(MODEL, DISTILL, teacher=copy_tree(state0.model))
    _, m = step(copy_tree(state0), batch)
    assert abs(float(m["distill"])) < 1e-6


class LogitsOnlyTeacher(eqx.Module):
    """A teacher without `features`: the step must fall back to its full logits."""

    model: VishwamAI

    def __call__(self, tokens, *, segment_ids, positions):
        return self.model(tokens, segment_ids=segment_ids, positions=positions, inference=True)


def test_chunked_distillation_step_equals_the_full_logits_step(state0, teacher, batch):
    config = DISTILL.replace(distill_alpha=0.4)
    runs = {
        "full": make_train_step(MODEL, config.replace(loss_chunk_size=None), teacher=teacher),
        "chunked": make_train_step(MODEL, config.replace(loss_chunk_size=5), teacher=teacher),
        "logits_teacher": make_train_step(MODEL, config.replace(loss_chunk_size=5),
                                          teacher=LogitsOnlyTeacher(teacher)),
    }
    results = {name: step(copy_tree(state0), batch) for name, step in runs.items()}
    want_state, want = results["full"]
    assert float(want["distill"]) > 0.1
    for name in ("chunked", "logits_teacher"):
        got_state, got = results[name]
        for metric in ("loss", "ce", "distill", "z", "grad_norm"):
            np.testing.assert_allclose(got[metric], want[metric], rtol=2e-5, err_msg=f"{name}: {metric}")
        assert_trees_close(eqx.filter(got_state.model, eqx.is_array), eqx.filter(want_state.model, eqx.is_array),
                           atol=2e-6)


def test_teacher_vocabulary_mismatch_fails_before_compiling():
    def teacher(tokens, *, segment_ids, positions):  # any callable returning logits will do
        return jnp.zeros((*tokens.shape, 128), jnp.float32)

    with pytest.raises(ValueError, match=r"logits \[1, 16, 128\].*vocab_size=256.*same vocabulary"):
        make_train_step(MODEL, DISTILL, teacher=teacher)


# ----------------------------------------------------------------------- eval
def test_eval_step_matches_a_plain_forward(state0, batch, plain_logits):
    metrics = make_eval_step(MODEL)(state0.model, batch)
    x = np.asarray(plain_logits, np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"], np.float64)
    expected = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["perplexity"], math.exp(expected), rtol=1e-5)
    assert float(metrics["tokens"]) == mask.sum()


# ------------------------------------------------------------ input checking
def test_bad_inputs_fail_with_clear_messages(state0, step1, batch):
    with pytest.raises(ValueError, match=r"missing \['loss_mask'\]"):
        step1(state0, {k: v for k, v in batch.items() if k != "loss_mask"})
    step4 = make_train_step(MODEL, TRAIN.replace(accum_steps=4))
    with pytest.raises(ValueError, match="accum_steps=4"):
        step4(state0, make_batch(0, batch=6))
    with pytest.raises(ValueError, match="num_layers"):
        make_train_step(MODEL.replace(num_layers=4), TRAIN)(state0, batch)
    with pytest.raises(TypeError, match="typed PRNG key"):
        init_train_state(state0.model, TRAIN, key=jax.random.PRNGKey(0))


# ------------------------------------------------------------------ optimiser
def test_schedule_warms_up_linearly_then_follows_the_cosine():
    config = TrainConfig(learning_rate=1.0, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    lr = learning_rate_schedule(config)
    got = [float(lr(i)) for i in (0, 1, 2, 3, 4, 8, 12, 50)]
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_weight_decay_mask_covers_matrices_only():
    abstract = eqx.filter_eval_shape(VishwamAI, MODEL.replace(first_dense_layers=1), key=jax.random.key(0))
    params = eqx.filter(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    paths = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(weight_decay_mask(params))}
    decayed = {k for k, v in paths.items() if v}
    assert ".stages[0].blocks[0].mlp.gate_proj.weight" in decayed
    assert ".stages[1].blocks[0].mlp.experts.up" in decayed
    assert ".lm_head.weight" in decayed and ".stages[1].blocks[0].attn.q_proj.weight" in decayed
    for path in (".embed", ".final_norm.scale", ".stages[1].blocks[0].attn_norm.scale",
                 ".stages[1].blocks[0].mlp.selection_bias"):
        assert path in paths and path not in decayed, path
    assert weight_decay_mask(params, decay_embeddings=True).embed is True


def test_adamw_decays_matrices_and_leaves_vectors_alone(state0):
    """One update with zero gradients: decayed leaves shrink by lr * wd, the rest stay."""
    config = TrainConfig(learning_rate=0.5, warmup_steps=0, total_steps=10, weight_decay=0.1, grad_clip=None)
    optimizer = make_optimizer(config)
    params = eqx.filter(state0.model, eqx.is_inexact_array)

    @jax.jit
    def update(params):
        grads = jax.tree.map(jnp.zeros_like, params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    new = update(params)
    moe, new_moe = params.stages[0].blocks[0].mlp, new.stages[0].blocks[0].mlp
    np.testing.assert_allclose(new.lm_head.weight, params.lm_head.weight * (1 - 0.5 * 0.1), rtol=1e-6)
    np.testing.assert_allclose(new_moe.experts.down, moe.experts.down * (1 - 0.5 * 0.1), rtol=1e-6)
    np.testing.assert_array_equal(new.final_norm.scale, params.final_norm.scale)
    np.testing.assert_array_equal(new.embed, params.embed)
    np.testing.assert_array_equal(new_moe.selection_bias, moe.selection_bias)


# --------------------------------------------------------------- TrainConfig
def test_train_config_json_round_trip_and_validation():
    config = TrainConfig(learning_rate=1e-3, grad_clip=None, accum_steps=2, nan_policy="skip")
    assert TrainConfig.from_json(config.to_json()) == config
    assert config.micro_batch_size == config.batch_size // 2
    with pytest.raises(ValueError, match=r"TrainConfig.accum_steps: batch_size=8 is not divisible"):
        TrainConfig(batch_size=8, accum_steps=3)
    with pytest.raises(ValueError, match=r"TrainConfig.grad_clip: must be > 0 or None"):
        TrainConfig(grad_clip=0.0)
    with pytest.raises(ValueError, match=r"TrainConfig.warmup_steps"):
        TrainConfig(warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match=r"unknown field 'lr'"):
        TrainConfig.from_dict({"lr": 1.0})




def test_lowered_step_names_each_part_of_the_model(state0, step1, batch):
    # Named scopes become the HLO op names a profiler trace shows on GPU/TPU (XLA:CPU's trace
    # shows its thunks instead). Checked on the lowering: an executable from the persistent
    # compile cache may predate the scopes, as its key ignores source locations.
    text = step1.lower(state0, batch).as_text(debug_info=True)
    names = re.findall(r'loc\("([^"]*)"', text)
    for scope in ("attention", "moe_route", "moe_dispatch/moe_experts", "lm_head", "loss", "optimizer"):
        # Under autodiff a scope reads `jvp(loss)/...`, `transpose(jvp(lm_head))/...`.
        assert any(re.search(rf"(^|[/(]){scope}([/)]|$)", name) for name in names), scope


def test_padding_changes_no_moe_statistic_nor_the_step():
    """Appending padding (out of the loss, segment 0: more positions, and a row of nothing else)
    leaves the loss, the MoE aux, `expert_load` and the aux-free bias update as they were. The
    batch's first documents are segment 0 but in the loss, so they still count."""
    config = ModelConfig.preset("tiny", aux_free_bias=True, load_balance_loss="hf")
    train = TrainConfig(batch_size=4, seq_len=12, learning_rate=3e-3, warmup_steps=0, total_steps=10)
    batch = make_batch(7, batch=4, seq=12)
    padded = {name: jnp.zeros((5, 18), value.dtype).at[:4, :12].set(value) for name, value in batch.items()}
    state = init_train_state(init_model(config, key=jax.random.key(8)), train, key=jax.random.key(9))
    step = make_train_step(config, train)
    new, metrics = step(copy_tree(state), batch)
    new_padded, metrics_padded = step(copy_tree(state), padded)
    for name in ("loss", "ce", "aux", "expert_load"):
        np.testing.assert_allclose(metrics_padded[name], metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    bias = lambda s: s.model.stages[0].blocks[0].mlp.selection_bias  # noqa: E731
    np.testing.assert_array_equal(bias(new_padded), bias(new))
    assert float(jnp.max(jnp.abs(bias(new)))) > 0
    # Counting the padding (no mask reaches the model) changes the statistics.
    forward = eqx.filter_jit(lambda m, b: m(b["tokens"], segment_ids=b["segment_ids"], positions=b["positions"])[1])
    counted = np.asarray(forward(state.model, padded)["expert_load"])
    assert np.abs(counted - np.asarray(metrics["expert_load"])).max() > 1e-4

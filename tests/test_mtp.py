"""Multi-token prediction: the loss against a plain two-pass reference (values and gradients),
the model and its loss unchanged without it, a tiny training run, shape checks, parameter counts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from vishwam import ModelConfig, VishwamAI
from vishwam.config import TrainConfig
from vishwam.errors import InvalidValueError
from vishwam.model.mtp import MTPModule, mtp_targets, mtp_valid
from vishwam.model.params import count_parameters, parameter_counts_closed_form
from vishwam.train._mtp import mtp_loss
from vishwam.train.step import init_train_state, make_train_step

SEQ = 16
# MoE model (the MTP blocks are MoE too), dropless: a token's output does not depend on other tokens.
PLAIN = ModelConfig.preset("tiny", num_layers=1, max_seq_len=32, aux_free_bias=True)
CONFIG = PLAIN.replace(mtp_depth=2)


def make_batch(seed: int, batch: int, seq: int = SEQ) -> dict:
    """Two packed documents and a padded tail per row; the loss mask is 0 on document ends and padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (batch, seq + 1)).astype(np.int32)
    segment_ids = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    loss_mask = np.ones((batch, seq), np.float32)
    for r in range(batch):
        split, pad = int(rng.integers(4, seq - 6)), int(rng.integers(0, 4))
        segment_ids[r, split:] = 1
        segment_ids[r, seq - pad:] = 2
        positions[r] = np.concatenate([np.arange(split), np.arange(seq - pad - split), np.arange(pad)])
        loss_mask[r, split - 1] = 0.0
        loss_mask[r, seq - pad - 1:] = 0.0
    return dict(tokens=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]),
                segment_ids=jnp.asarray(segment_ids), positions=jnp.asarray(positions),
                loss_mask=jnp.asarray(loss_mask))


def reference_mtp(model: VishwamAI, batch: dict, normalizer):
    """Plain two passes: the model's features, then each depth on the sequence truncated to the
    positions that have a token k ahead, with explicit shifts and full logits."""
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    segments, positions = batch["segment_ids"], batch["positions"]
    hidden, _ = model.features(tokens, segment_ids=segments, positions=positions)
    embedded = model.embed[tokens]
    seq = tokens.shape[1]
    ce, balance, z = 0.0, [], []
    for k, module in enumerate(model.mtp, start=1):
        n = seq - k
        same_document = segments[:, k:] == segments[:, :n]  # position i and token i + k
        u = module.eh_proj(jnp.concatenate([module.enorm(embedded[:, k:]), module.hnorm(hidden[:, :n])], -1))
        hidden, aux = module.block(u, positions=positions[:, :n], segment_ids=segments[:, :n],
                                   token_mask=same_document)
        logits = jnp.einsum("bsd,vd->bsv", module.norm(hidden), model.embed if model.lm_head is None
                            else model.lm_head.weight.T)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, targets[:, k:, None], axis=-1)[..., 0]  # token i + k + 1
        ce = ce + jnp.sum(jnp.where(same_document, nll * mask[:, k:], 0.0)) / normalizer
        balance.append(aux["load_balancing_loss"])
        z.append(aux["router_z_loss"])
    config = model.config
    mtp = config.mtp_loss_weight * ce / len(model.mtp)
    mtp_aux = config.router_aux_loss_coef * jnp.mean(jnp.stack(balance)) + config.router_z_loss_coef * jnp.mean(
        jnp.stack(z))
    return mtp, mtp_aux


def fused_mtp(model: VishwamAI, batch: dict, normalizer, chunk):
    _, aux = model.features(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                            mtp=True)
    return mtp_loss(model, aux, batch, normalizer, chunk)


@pytest.fixture(scope="module")
def model():
    return VishwamAI(CONFIG, key=jax.random.key(0))


@pytest.fixture(scope="module")
def losses_and_grads(model):
    """`{name: ((mtp, mtp_aux), grads)}` for the reference, the chunked fused head (5 positions per
    chunk: padded, 16 is no multiple of 5) and full logits; one compile."""
    batch = make_batch(0, batch=2)
    normalizer = jnp.sum(batch["loss_mask"])

    @eqx.filter_jit
    def run(model, batch):
        out = {}
        for name, fn in (("reference", reference_mtp), ("chunked", lambda m, b, n: fused_mtp(m, b, n, 5)),
                         ("full", lambda m, b, n: fused_mtp(m, b, n, None))):
            def total(model, fn=fn):
                mtp, mtp_aux = fn(model, batch, normalizer)
                return mtp + mtp_aux, (mtp, mtp_aux)

            (_, terms), grads = eqx.filter_value_and_grad(total, has_aux=True)(model)
            out[name] = (terms, grads)
        return out

    return run(model, batch)


@pytest.mark.parametrize("name", ["chunked", "full"])
def test_mtp_loss_equals_plain_two_pass_reference(losses_and_grads, name):
    (mtp, mtp_aux), _ = losses_and_grads[name]
    (ref_mtp, ref_aux), _ = losses_and_grads["reference"]
    assert float(ref_mtp) > 0.5 and float(ref_aux) > 0
    np.testing.assert_allclose(mtp, ref_mtp, rtol=1e-5)
    np.testing.assert_allclose(mtp_aux, ref_aux, rtol=1e-5)


@pytest.mark.parametrize("name", ["chunked", "full"])
def test_mtp_gradients_equal_plain_two_pass_reference(losses_and_grads, name):
    _, grads = losses_and_grads[name]
    _, ref_grads = losses_and_grads["reference"]
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(grads, eqx.is_array))
    ref_leaves = jax.tree_util.tree_leaves(eqx.filter(ref_grads, eqx.is_array))
    assert len(leaves) == len(ref_leaves)
    for (path, g), r in zip(leaves, ref_leaves):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # The loss reaches the shared embedding and head, the main stack and every module.
    for path in ("embed", "lm_head.weight", "stages[0].blocks[0].attn.q_proj.weight"):
        assert float(jnp.abs(_at(grads, path)).max()) > 0, path
    for module in grads.mtp:
        assert float(jnp.abs(module.eh_proj.weight).max()) > 0


def _at(tree, path: str):
    for part in path.replace("]", "").replace("[", ".").split("."):
        tree = tree[int(part)] if part.isdigit() else getattr(tree, part)
    return tree


def test_mtp_targets_and_valid_positions():
    segments = jnp.array([[0, 0, 0, 1, 1, 1]])
    targets = jnp.array([[10, 11, 12, 13, 14, 15]])
    mask = jnp.array([[1, 1, 0, 1, 1, 1]], jnp.float32)
    np.testing.assert_array_equal(mtp_valid((1, 6), 2), [[1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(mtp_valid((1, 6), 1, segments), [[1, 1, 0, 1, 1, 0]])
    shifted, masks = mtp_targets(targets, mask, 2, segments)
    assert shifted.shape == masks.shape == (1, 2, 6)
    np.testing.assert_array_equal(shifted[0, 1, :4], [12, 13, 14, 15])  # depth 2: token i + 3
    # depth 1: position 2 would read the next document's token, position 1's target is masked,
    # position 5 has none; depth 2: positions 1, 2 cross documents, position 0's target is masked.
    np.testing.assert_array_equal(masks[0], [[1, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0]])


@pytest.fixture(scope="module")
def steps():
    train = TrainConfig(batch_size=4, seq_len=SEQ, learning_rate=3e-3, warmup_steps=0, total_steps=50,
                        loss_chunk_size=8, z_loss_coef=1e-4)
    return train, {config.mtp_depth: make_train_step(config, train) for config in (PLAIN, CONFIG)}


def test_without_mtp_model_forward_and_loss_are_unchanged(model, steps):
    plain = VishwamAI(PLAIN, key=jax.random.key(0))
    assert plain.mtp is None and count_parameters(PLAIN)["mtp"] == 0
    # The same key draws the same main weights with or without MTP modules.
    for name in ("embed", "stages", "final_norm", "lm_head"):
        for a, b in zip(jax.tree.leaves(getattr(plain, name)), jax.tree.leaves(getattr(model, name))):
            np.testing.assert_array_equal(a, b)
    # Inference leaves the modules out: the forward is the plain model's, bit for bit.
    tokens = make_batch(1, batch=2)["tokens"]
    forward = eqx.filter_jit(lambda m, t: m(t, inference=True)[0])
    np.testing.assert_array_equal(forward(plain, tokens), forward(model, tokens))
    # The train step's loss without MTP is exactly main + z + aux and reports no `mtp`.
    train, step = steps
    batch = make_batch(2, batch=4)
    _, metrics = step[0](init_train_state(plain, train, key=jax.random.key(1)), batch)
    assert "mtp" not in metrics
    assert np.float32(metrics["ce"]) + np.float32(metrics["z"]) + np.float32(metrics["aux"]) == np.float32(
        metrics["loss"])
    copy = jax.tree.map(lambda x: x.copy() if eqx.is_array(x) else x, model)
    _, with_mtp = step[2](init_train_state(copy, train, key=jax.random.key(1)), batch)
    np.testing.assert_allclose(with_mtp["ce"], metrics["ce"], rtol=1e-6)
    np.testing.assert_allclose(with_mtp["loss"], with_mtp["ce"] + with_mtp["z"] + with_mtp["aux"] + with_mtp["mtp"],
                               rtol=1e-6)
    assert with_mtp["aux"] > metrics["aux"]  # the MTP blocks' MoE losses join the model's


def test_tiny_training_run_with_mtp_lowers_both_losses(model, steps):
    train, step = steps
    copy = jax.tree.map(lambda x: x.copy() if eqx.is_array(x) else x, model)
    state = init_train_state(copy, train, key=jax.random.key(2))
    batch = make_batch(3, batch=4)
    history = []
    for _ in range(12):
        state, metrics = step[2](state, batch)
        history.append((float(metrics["ce"]), float(metrics["mtp"])))
    (ce0, mtp0), (ce1, mtp1) = history[0], history[-1]
    assert mtp0 > 0 and ce1 < ce0 - 0.5 and mtp1 < mtp0 - 0.5 * CONFIG.mtp_loss_weight
    assert not np.array_equal(state.model.mtp[1].eh_proj.weight, model.mtp[1].eh_proj.weight)
    # The step's aux-free bias update reaches the modules' MoE blocks.
    assert metrics["mtp_expert_load"].shape == (CONFIG.mtp_depth, CONFIG.num_experts)
    assert float(jnp.abs(state.model.mtp[0].block.mlp.selection_bias).max()) > 0


def test_accumulated_micro_batches_give_the_full_batch_mtp_loss(model, steps):
    train, step = steps
    accumulated = make_train_step(CONFIG, train.replace(accum_steps=2))
    batch = make_batch(4, batch=4)
    metrics = []
    for fn in (step[2], accumulated):
        copy = jax.tree.map(lambda x: x.copy() if eqx.is_array(x) else x, model)
        metrics.append(fn(init_train_state(copy, train, key=jax.random.key(5)), batch)[1])
    np.testing.assert_allclose(metrics[1]["mtp"], metrics[0]["mtp"], rtol=1e-5)
    np.testing.assert_allclose(metrics[1]["ce"], metrics[0]["ce"], rtol=1e-5)


def test_router_bias_update_of_the_mtp_blocks(model):
    loads = jnp.tile(jnp.array([0.5, 0.25, 0.25, 0.0]), (CONFIG.num_moe_layers, 1))
    mtp_loads = jnp.array([[0.1, 0.4, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]])
    updated = model.update_router_bias(loads, mtp_loads)
    rate = CONFIG.aux_free_bias_rate
    np.testing.assert_allclose(updated.mtp[0].block.mlp.selection_bias, rate * np.array([1, -1, 0, 0]))
    np.testing.assert_array_equal(updated.mtp[1].block.mlp.selection_bias, np.zeros(4))
    main_only = model.update_router_bias(loads)
    for a, b in zip(jax.tree.leaves(updated.stages), jax.tree.leaves(main_only.stages)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(main_only.mtp[0].block.mlp.selection_bias, np.zeros(4))


def test_shape_checks_and_bad_input(model):
    module: MTPModule = model.mtp[0]
    hidden = jnp.zeros((2, 8, CONFIG.hidden_size))
    positions = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises((TypeCheckError, InvalidValueError)):
        module(hidden, jnp.zeros((2, 7, CONFIG.hidden_size)), positions=positions)
    with pytest.raises((TypeCheckError, InvalidValueError)):
        module(hidden, hidden, positions=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises((TypeCheckError, InvalidValueError)):
        mtp_targets(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 7)), 1)
    plain = VishwamAI(ModelConfig.preset("tiny"), key=jax.random.key(0))
    with pytest.raises(InvalidValueError, match="mtp_depth"):
        plain.features(positions, mtp=True)
    with pytest.raises(InvalidValueError, match="mtp_depth"):
        ModelConfig.preset("tiny", mtp_depth=-1)
    with pytest.raises(InvalidValueError, match="mtp_loss_weight"):
        ModelConfig.preset("tiny", mtp_depth=1, mtp_loss_weight=-0.1)


@pytest.mark.parametrize("overrides", [
    dict(mtp_depth=1, num_experts=1, experts_per_token=1),
    dict(mtp_depth=2),
    dict(mtp_depth=1, num_layers=3, first_dense_layers=1, num_shared_experts=1, moe_ffn_dim=16),
    dict(mtp_depth=3, norm_type="layer", tie_embeddings=True, qk_norm="head"),
])
def test_parameter_counts_include_the_mtp_modules(overrides):
    config = ModelConfig.preset("tiny", **overrides)
    counts = count_parameters(config)
    assert counts == parameter_counts_closed_form(config)
    without = count_parameters(ModelConfig.preset("tiny", **{**overrides, "mtp_depth": 0}))
    assert counts["total"] - without["total"] == counts["mtp"] > 0
    h, depth = config.hidden_size, config.mtp_depth
    assert counts["mtp"] > depth * 2 * h * h

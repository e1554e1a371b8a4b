"""The step and the trainer as a toolkit: any Equinox model, any optax optimiser, frozen
parameters, schedules, hooks and trackers."""

import struct

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vishwam.config import TrainConfig
from vishwam.train import init_train_state, load_metrics, make_eval_step, make_train_step
from vishwam.train.hooks import StepInfo, TensorBoardHook
from vishwam.train.metrics_db import events
from vishwam.train.optim import learning_rate_schedule
from vishwam.train.trainer import RunConfig, VishwamAITrainer

VOCAB, SEQ, BATCH = 32, 16, 8  # 8 rows: the tests see 8 simulated devices (data-parallel)


class TinyLM(eqx.Module):
    """A user's model from `equinox.nn` only: embedding, causal attention, MLP, norm, head."""

    embed: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.MLP
    norm: eqx.nn.RMSNorm
    head: eqx.nn.Linear

    def __init__(self, vocab: int, dim: int, *, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab, dim, key=k1)
        self.attn = eqx.nn.MultiheadAttention(2, dim, key=k2)
        self.mlp = eqx.nn.MLP(dim, dim, 2 * dim, 1, key=k3)
        self.norm = eqx.nn.RMSNorm(dim)
        self.head = eqx.nn.Linear(dim, vocab, use_bias=False, key=k4)

    def __call__(self, tokens, *, segment_ids=None, positions=None, key=None, inference=False):
        def row(ids, seg):
            x = jax.vmap(self.embed)(ids)
            mask = jnp.tril(jnp.ones((ids.shape[0], ids.shape[0]), bool)) & (seg[:, None] == seg[None, :])
            x = x + self.attn(x, x, x, mask=mask)
            x = x + jax.vmap(self.mlp)(x)
            return jax.vmap(self.head)(jax.vmap(self.norm)(x))

        segments = jnp.zeros_like(tokens) if segment_ids is None else segment_ids
        return jax.vmap(row)(tokens, segments), {}


class Batches:
    """Deterministic batches with a learnable rule (next token = token + 1), resumable."""

    def __init__(self):
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng(self.index)
        self.index += 1
        start = rng.integers(0, VOCAB, size=(BATCH, 1))
        tokens = ((start + np.arange(SEQ)) % VOCAB).astype(np.int32)
        return {"tokens": tokens, "targets": (tokens + 1) % VOCAB, "loss_mask": np.ones(tokens.shape, np.float32)}

    def state(self):
        return {"index": self.index}

    def restore(self, state):
        self.index = state["index"]


def _config(**changes) -> TrainConfig:
    return TrainConfig(**{**dict(learning_rate=3e-3, warmup_steps=2, total_steps=40, batch_size=BATCH,
                                 seq_len=SEQ, loss_chunk_size=None), **changes})


@pytest.fixture
def model():
    """A fresh model per test: the train step donates its state's arrays."""
    return TinyLM(VOCAB, 32, key=jax.random.key(0))


def _batch():
    return jax.tree.map(jnp.asarray, next(Batches()))


def test_user_model_trains_with_any_optimizer_and_accumulation(model):
    config = _config(accum_steps=2)
    optimizer = optax.inject_hyperparams(optax.lion)(learning_rate=1e-3)
    state = init_train_state(model, config, key=jax.random.key(1), optimizer=optimizer)
    step = make_train_step(None, config, optimizer=optimizer)
    losses = []
    for _ in range(12):
        state, metrics = step(state, _batch())
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5
    assert float(metrics["learning_rate"]) == pytest.approx(1e-3)
    assert "expert_load" not in metrics
    evaluation = make_eval_step(None)(state.model, _batch())
    assert float(evaluation["loss"]) == pytest.approx(float(metrics["loss"]), rel=0.2)


def test_frozen_parameters_get_no_state_and_no_update(model):
    config = _config(frozen=r"^(embed|head)\.")
    before = jax.tree.map(np.asarray, model)
    state = init_train_state(model, config, key=jax.random.key(1))
    moments = jax.tree_util.tree_leaves_with_path(state.opt_state)
    assert moments and not any("embed" in jax.tree_util.keystr(p) or "head" in jax.tree_util.keystr(p)
                               for p, _ in moments)
    new, _ = make_train_step(None, config)(state, _batch())
    np.testing.assert_array_equal(new.model.embed.weight, before.embed.weight)
    np.testing.assert_array_equal(new.model.head.weight, before.head.weight)
    assert not np.array_equal(new.model.mlp.layers[0].weight, before.mlp.layers[0].weight)
    only_attention = _config(trainable=r"^attn\.")
    state = init_train_state(TinyLM(VOCAB, 32, key=jax.random.key(0)), only_attention, key=jax.random.key(1))
    new, _ = make_train_step(None, only_attention)(state, _batch())
    np.testing.assert_array_equal(new.model.mlp.layers[0].weight, before.mlp.layers[0].weight)
    assert not np.array_equal(new.model.attn.query_proj.weight, before.attn.query_proj.weight)
    with pytest.raises(ValueError, match="no parameter trains"):
        init_train_state(new.model, _config(trainable="nothing-matches"), key=jax.random.key(1))
    with pytest.raises(ValueError, match="TrainConfig.frozen"):
        _config(frozen="(")


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_schedules(kind):
    config = _config(learning_rate=1.0, warmup_steps=10, total_steps=100, min_lr_ratio=0.1, lr_schedule=kind,
                     decay_fraction=0.2)
    lr = learning_rate_schedule(config)
    at = {n: float(lr(n)) for n in (0, 9, 10, 50, 80, 90, 100, 500)}
    assert at[0] == pytest.approx(0.1) and at[9] == pytest.approx(1.0) and at[10] == pytest.approx(1.0)
    expected = {"cosine": (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 40 / 90)), 0.1),
                "linear": (1.0 - 0.9 * 40 / 90, 0.1), "wsd": (1.0, 0.1), "constant": (1.0, 1.0)}[kind]
    assert at[50] == pytest.approx(expected[0], rel=1e-5)
    assert at[100] == pytest.approx(expected[1], rel=1e-5) and at[500] == pytest.approx(expected[1], rel=1e-5)
    if kind == "wsd":
        assert at[80] == pytest.approx(1.0) and at[90] == pytest.approx(0.55, rel=1e-5)


def _trainer(model, run_dir, **run) -> VishwamAITrainer:
    settings = dict(run_dir=str(run_dir), eval_every=0, checkpoint_every=3, progress=False, max_steps=6,
                    export_pipeline=False)
    return VishwamAITrainer(model, _config(), Batches(), run=RunConfig(**{**settings, **run}),
                            optimizer=optax.adamw(1e-3))


def test_user_model_through_the_trainer_resumes_bit_exact(model, tmp_path):
    whole = _trainer(model, tmp_path / "whole").train()
    _trainer(model, tmp_path / "split", max_steps=3).train()
    resumed = _trainer(model, tmp_path / "split").train()
    assert resumed.start_step == 3 and resumed.step == whole.step == 6
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(whole.state, eqx.is_inexact_array)),
                    jax.tree_util.tree_leaves(eqx.filter(resumed.state, eqx.is_inexact_array))):
        np.testing.assert_array_equal(a, b)
    one = load_metrics(tmp_path / "whole" / "metrics.duckdb", names=["loss"])["loss"]
    two = load_metrics(tmp_path / "split" / "metrics.duckdb", names=["loss"])["loss"]
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    assert list(one[0]) == [1, 2, 3, 4, 5, 6]


def test_hooks_see_state_and_metrics_log_and_stop(model, tmp_path):
    seen, lagged = [], []

    def probe(info: StepInfo):
        seen.append((info.step, type(info.state).__name__, info.metrics["loss"]))
        info.run.log({"custom/norm": float(optax.tree.norm(eqx.filter(info.state.model, eqx.is_inexact_array)))})
        if info.step == 4:
            info.run.stop("enough")

    trainer = _trainer(model, tmp_path, max_steps=10, checkpoint_every=0)
    trainer.add_hook(probe, every=2)
    trainer.add_hook(lambda info: lagged.append((info.step, info.state)), state=False)
    result = trainer.train()
    assert [s for s, _, _ in seen] == [2, 4] and all(kind == "TrainState" for _, kind, _ in seen)
    assert [s for s, _ in lagged] == [1, 2, 3, 4] and all(state is None for _, state in lagged)
    assert result.stop_reason == "enough" and result.step == 4 and result.checkpoint_step == 4
    database = tmp_path / "metrics.duckdb"
    custom = load_metrics(database, names=["custom/norm"])["custom/norm"]
    assert list(custom[0]) == [2, 4] and np.all(custom[1] > 0)
    losses = load_metrics(database, names=["loss"])["loss"]
    assert [loss for _, _, loss in seen] == pytest.approx([losses[1][1], losses[1][3]])
    assert {"kind": "stop", "step": 4} in [{"kind": e["kind"], "step": e["step"]} for e in events(database)]
    with pytest.raises(ValueError, match="every must be a positive integer"):
        trainer.add_hook(probe, every=0)


def _tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Scalars of tensorboard event files: TFRecords of `Event` protos (tensorboardX's own)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_hook_writes_the_metrics(model, tmp_path):
    trainer = _trainer(model, tmp_path, max_steps=4, checkpoint_every=0)
    trainer.add_hook(TensorBoardHook(), state=False)
    trainer.train()
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    losses = load_metrics(tmp_path / "metrics.duckdb", names=["loss"])["loss"]
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], losses[1], rtol=1e-6)
    assert "grad_norm" in scalars and "step_time" in scalars

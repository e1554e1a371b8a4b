"""Pictures of the experts: per-layer, per-expert MoE statistics from the layer to the step, the
eval step, the metrics database's `expert_metrics` table, `report.py`'s expert picture and `--sql`;
and padding, which takes no expert capacity from real tokens and counts in no statistic."""

import importlib.util
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam import ModelConfig, VishwamAI
from vishwam.config import TrainConfig
from vishwam.nn.moe import MoE
from vishwam.nn.moe.routing import router_entropy
from vishwam.parallel.expert import assign_slots, expert_capacity, position_priority
from vishwam.train.metrics_db import load_expert_metrics, load_metrics, query
from vishwam.train.run_config import RunConfig
from vishwam.train.step import make_eval_step
from vishwam.train.trainer import VishwamAITrainer

D, E, K = 16, 4, 2


# ------------------------------------------------------------- the layer
def _slots_oracle(indices, weights, capacity, mask, priority):
    """numpy: which assignments an expert keeps: by priority as given, or by weight with the
    uncounted tokens last; ties to the earlier assignment."""
    tokens, k = indices.shape
    keep = np.zeros((tokens, k), bool)
    for e in range(E):
        mine = [(0, priority[t], t * k + j) if priority is not None else (not mask[t], -weights[t, j], t * k + j)
                for t in range(tokens) for j in range(k) if indices[t, j] == e]
        for _, _, flat in sorted(mine)[:capacity]:
            keep[flat // k, flat % k] = True
    return keep


@pytest.mark.parametrize("use_priority", [True, False])
def test_assign_slots_counts_only_real_drops_and_ranks_padding_last_by_score(use_priority):
    rng = np.random.default_rng(0)
    tokens = 24
    indices = np.stack([rng.choice(E, K, replace=False, p=[0.55, 0.25, 0.1, 0.1]) for _ in range(tokens)])
    weights = rng.random((tokens, K)).astype(np.float32)
    mask = rng.random(tokens) > 0.3
    priority = rng.permutation(tokens).astype(np.int32) if use_priority else None
    capacity = expert_capacity(tokens, K, E, 0.5)
    slots = jax.jit(assign_slots, static_argnums=(2, 3))(
        jnp.asarray(indices, jnp.int32), jnp.asarray(weights), E, capacity,
        None if priority is None else jnp.asarray(priority), jnp.asarray(mask))
    keep = _slots_oracle(indices, weights, capacity, mask, priority)
    kept = np.asarray(slots.row) < E * capacity
    np.testing.assert_array_equal(kept, keep)
    lost = ~keep & mask[:, None]
    assert lost.sum() > 0  # something real was dropped: the statistics are not all zero
    assert (keep & ~mask[:, None]).any()  # and padding still fills capacity left free
    want = np.array([(lost & (indices == e)).sum() for e in range(E)], np.float32)
    np.testing.assert_array_equal(slots.dropped_counts, want)
    assert float(slots.counted) == mask.sum() * K
    assert float(slots.dropped) == pytest.approx(lost.sum() / (mask.sum() * K))


def test_position_priority_puts_padding_after_the_real_tokens_of_its_position():
    mask = jnp.asarray([[True, True, False], [True, False, False]]).reshape(-1)
    rank = np.asarray(position_priority(2, 3, mask)).reshape(2, 3)
    # position 0: both rows real; position 1: row 0 real, then row 1's padding; position 2: padding
    order = [divmod(int(i), 3) for i in np.argsort(rank.reshape(-1))]
    assert order == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    np.testing.assert_array_equal(position_priority(2, 3), np.asarray([0, 2, 4, 1, 3, 5]))


def test_position_rule_with_padding_stays_causal():
    """Training with drops, `capacity_priority="position"`, padding masked: changing any token
    (real or padding) after position t changes no output at positions <= t, in any row."""
    layer = MoE(D, 32, E, K, dispatch="capacity", capacity_factor=0.75, capacity_priority="position",
                key=jax.random.key(5))
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((3, 10, D)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 10)) > 0.3)
    run = jax.jit(lambda x: layer(x, mask=mask))
    y, aux = run(x)
    assert float(aux["dropped_fraction"]) > 0.1
    for t in (1, 3, 5):
        changed = x.at[:, t + 1:].set(jnp.asarray(rng.standard_normal((3, 9 - t, D)), jnp.float32))
        y2, _ = run(changed)
        np.testing.assert_array_equal(np.asarray(y2)[:, :t + 1], np.asarray(y)[:, :t + 1])
        assert np.max(np.abs(np.asarray(y2)[:, t + 1:t + 3] - np.asarray(y)[:, t + 1:t + 3])) > 0


@pytest.fixture(scope="module")
def capacity_layer():
    return MoE(D, 32, E, K, dispatch="capacity", capacity_factor=1.0, capacity_priority="score",
               key=jax.random.key(0))


def test_padding_content_never_changes_real_tokens_under_capacity(capacity_layer):
    """Score priority, drops: padding rows given router-pleasing inputs push out real tokens unless
    the layer's mask ranks them last; with the mask real outputs and statistics do not move."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 12, D)), jnp.float32)
    mask = jnp.ones((2, 12), bool).at[1, 6:].set(False)  # row 1 ends in padding
    loud = x.at[1, 6:].set(30.0 * jnp.sign(capacity_layer.router[:, 0]))  # all padding wants expert 0

    run = jax.jit(lambda layer, x, m: layer(x, mask=m))
    (y, aux), (y_loud, aux_loud) = run(capacity_layer, x, mask), run(capacity_layer, loud, mask)
    real = np.asarray(mask)
    scale = float(np.max(np.abs(np.asarray(y)[real])))
    np.testing.assert_allclose(np.asarray(y)[real], np.asarray(y_loud)[real], rtol=1e-6, atol=1e-6 * scale)
    for name in ("expert_dropped", "dropped_fraction", "expert_load", "router_entropy"):
        np.testing.assert_allclose(aux[name], aux_loud[name], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(jnp.sum(aux["expert_dropped"]), aux["dropped_fraction"], rtol=1e-6)
    # Without the mask the loud padding takes expert 0's capacity: real outputs change.
    (y0, _), (y0_loud, aux0_loud) = run(capacity_layer, x, None), run(capacity_layer, loud, None)
    assert np.max(np.abs(np.asarray(y0)[real] - np.asarray(y0_loud)[real])) > 0.1 * scale
    assert float(aux0_loud["dropped_fraction"]) > float(aux_loud["dropped_fraction"])


def test_router_entropy_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((10, E)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs[0] = [1.0, 0.0, 0.0, 0.0]  # a sure router: entropy 0, no NaN from 0 log 0
    mask = np.arange(10) % 3 != 1
    entropy = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(-1)
    got = router_entropy(jnp.asarray(probs, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(got, entropy[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(router_entropy(jnp.full((3, E), 1 / E)), np.log(E), rtol=1e-6)


# ------------------------------------------------------------- model and eval step
MODEL = ModelConfig.preset("tiny", capacity_factor=1.0, aux_free_bias=True, num_layers=3, first_dense_layers=1)
SEQ = 16


def _batch(seed: int, rows: int = 4, pad: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL.vocab_size, (rows, SEQ + 1)).astype(np.int32)
    loss_mask = np.ones((rows, SEQ), np.float32)
    segment_ids = np.ones((rows, SEQ), np.int32)
    if pad:
        loss_mask[-1, -pad:] = 0.0
        segment_ids[-1, -pad:] = 0
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=loss_mask, segment_ids=segment_ids)


@pytest.fixture(scope="module")
def model():
    return eqx.filter_jit(VishwamAI)(MODEL, key=jax.random.key(3))


def test_model_aux_has_per_layer_statistics(model):
    aux = eqx.filter_jit(lambda m, t: m(t)[1])(model, jnp.asarray(_batch(0)["tokens"]))
    layers = MODEL.num_moe_layers
    assert layers == 2
    assert aux["expert_dropped"].shape == aux["router_bias"].shape == (layers, E)
    assert aux["router_entropy"].shape == (layers,)
    assert np.all((np.asarray(aux["router_entropy"]) > 0) & (np.asarray(aux["router_entropy"]) <= np.log(E) + 1e-6))
    np.testing.assert_allclose(jnp.mean(jnp.sum(aux["expert_dropped"], -1)), aux["dropped_fraction"], rtol=1e-6)


def test_eval_step_reports_moe_statistics_over_real_tokens(model):
    evaluate = make_eval_step(MODEL, 8)
    plain = _batch(4, rows=2)
    padded = {k: np.concatenate([v, _batch(5, rows=1, pad=SEQ)[k]]) for k, v in plain.items()}  # + a row of padding
    a, b = evaluate(model, plain), evaluate(model, padded)
    assert a["expert_load"].shape == (2, E) and a["router_entropy"].shape == (2,)
    for name in ("expert_load", "router_entropy", "expert_load_max", "nll_sum"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert float(a["dropped_fraction"]) == 0.0  # evaluation is dropless


# ------------------------------------------------------------- a run, its table, its pictures
def _report_module():
    script = Path(__file__).resolve().parents[1] / "scripts" / "report.py"
    spec = importlib.util.spec_from_file_location("vishwam_report_experts", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(run_dir: Path, model, seed: int) -> None:
    train = TrainConfig(batch_size=4, seq_len=SEQ, total_steps=6, warmup_steps=1, learning_rate=3e-3, seed=seed)
    run = RunConfig(run_dir=str(run_dir), progress=False, mesh={"data": 1}, log_every=2, eval_every=3,
                    eval_batches=1, checkpoint_every=0, export_pipeline=False)
    batches = [_batch(10 + i, pad=3 * (i % 2)) for i in range(6)]
    VishwamAITrainer(model, train, batches, [_batch(99, pad=5)], run=run).train()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("experts")
    for i, name in enumerate(("a", "b")):
        _train(root / name, model, seed=i)
    return root


def test_a_run_logs_the_long_table_every_log_interval(two_runs):
    db = two_runs / "a" / "metrics.duckdb"
    steps, load = load_expert_metrics(db, "load")
    assert steps.tolist() == [2, 4, 6] and load.shape == (3, 2, E)  # log_every 2, two MoE layers
    np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-5)
    _, dropped = load_expert_metrics(db, "dropped")
    assert dropped.shape == (3, 2, E) and np.all(dropped >= 0) and dropped.sum() > 0  # capacity 1.0 drops
    _, entropy = load_expert_metrics(db, "router_entropy")
    assert entropy.shape == (3, 2) and np.all(entropy > 0)
    _, bias = load_expert_metrics(db, "bias")
    assert bias.shape == (3, 2, E) and np.any(bias != 0)  # the aux-free bias moved
    # The step's drop rate is the mean over layers of each layer's summed per-expert drops.
    metric_steps, fraction = load_metrics(db, names=["dropped_fraction"])["dropped_fraction"]
    np.testing.assert_allclose(fraction[np.isin(metric_steps, steps)], dropped.sum(-1).mean(-1), rtol=1e-5)
    val_steps, val_load = load_expert_metrics(db, "val_load")
    assert val_steps.tolist() == [0, 3, 6] and np.allclose(val_load.sum(-1), 1.0, rtol=1e-5)
    assert "val_expert_load_max" in load_metrics(db)


def test_report_draws_the_experts_and_answers_sql(two_runs, capsys):
    from PIL import Image

    report = _report_module()
    a, b = two_runs / "a", two_runs / "b"
    assert report.main([str(a)]) == 0
    out = capsys.readouterr().out
    png = a / "experts.png"
    assert f"experts plot: wrote {png}" in out
    first = png.read_bytes()
    assert Image.open(png).size == report.PLOT_PIXELS and len(first) > 10_000
    assert report.main([str(a), "--no-plot"]) == 0 and png.read_bytes() == first
    capsys.readouterr()

    sql = ("SELECT db, run_id, count(*) AS n, max(step) AS last FROM expert_metrics WHERE name = 'load' "
           "GROUP BY ALL ORDER BY db")
    assert report.main([str(a), str(b / "metrics.duckdb"), "--sql", sql]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["db", "|", "run_id", "|", "n", "|", "last"]
    assert [line.split() for line in lines[2:4]] == [["db0", "|", "a", "|", "24", "|", "6"],
                                                     ["db1", "|", "b", "|", "24", "|", "6"]]
    assert lines[-1] == "(2 rows)"
    _, rows = query([a / "metrics.duckdb"], "SELECT count(*) FROM db0.expert_metrics WHERE expert IS NULL")
    assert rows == [(3 * 2 + 3 * 2,)]  # router_entropy and val_router_entropy at 3 steps each, 2 layers
    assert report.main([str(a), "--sql", "SELECT nope FROM metrics"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main(["--help"])
    help_text = capsys.readouterr().out
    assert "attached as `db<i>`" in help_text and "expert_metrics(run_id, step, layer, expert" in help_text

"""MetricsDB: one row per (run, step, name) across a killed and resumed run, lock errors,
flush/close semantics, the read API and scripts/report.py."""

import importlib.util
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from vishwam.train.metrics_db import MetricsDB, MetricsDBLockedError, events, load_metrics, runs

CONFIG = {"preset": "tiny", "lr": 0.001, "steps": 40}


def _loss(step):
    """The same value every time a step is (re-)run: what an exact resume produces."""
    return 5.0 / (1.0 + 0.1 * step)


# The first run: flushes every 10 steps, checkpoints (and so flushes) at step 20,
# then dies by SIGKILL after logging step 27 with rows 21..27 partly unflushed.
_CRASHING_RUN = textwrap.dedent("""
    import os, signal, sys
    from vishwam.train.metrics_db import MetricsDB
    path, config = sys.argv[1], {"preset": "tiny", "lr": 0.001, "steps": 40}
    db = MetricsDB(path, "run-a", config, flush_every=10, process_index=0)
    for step in range(28):
        loss = 5.0 / (1.0 + 0.1 * step)
        db.log(step, {"train/loss": loss, "train/tokens_per_s": 1000.0 + step})
        if step == 20:
            db.flush()
            db.event(step, "checkpoint_saved", {"step": step})
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_and_resumed_run_keeps_one_row_per_step_and_name(tmp_path):
    path = tmp_path / "metrics.duckdb"
    crashed = subprocess.run([sys.executable, "-c", _CRASHING_RUN, str(path)],
                             capture_output=True, text=True, timeout=60)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    # Flushed at steps 9, 19, 20 (checkpoint); 21..27 were buffered and died with the process.
    steps, _ = load_metrics(path, "run-a")["train/loss"]
    np.testing.assert_array_equal(steps, np.arange(21))
    (row,) = runs(path)
    assert row["status"] == "running" and row["resumes"] == 0  # killed: nobody set a final status

    # Resume from the step-20 checkpoint with a changed step budget.
    with MetricsDB(path, "run-a", {**CONFIG, "steps": 50}, flush_every=7, process_index=0) as db:
        assert db.resumed
        db.event(20, "resume", {"from_step": 20})
        assert db.rewind(20) == 0
        for step in range(15, 40):  # overlaps flushed rows 15..20 on purpose
            db.log(step, {"train/loss": jnp.float32(_loss(step)), "train/tokens_per_s": 1000.0 + step})
        db.log(39, {"train/loss": _loss(39)})  # the same key twice in one batch: last wins

    metrics = load_metrics(path)
    assert sorted(metrics) == ["train/loss", "train/tokens_per_s"]
    steps, values = metrics["train/loss"]
    np.testing.assert_array_equal(steps, np.arange(40))
    np.testing.assert_allclose(values, [_loss(s) for s in range(40)], rtol=1e-6)
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        duplicates = con.execute("SELECT count(*) FROM (SELECT run_id, step, name FROM metrics "
                                 "GROUP BY ALL HAVING count(*) > 1)").fetchall()[0][0]
        total = con.execute("SELECT count(*) FROM metrics").fetchall()[0][0]
    assert duplicates == 0 and total == 80
    (row,) = runs(path)
    assert row["status"] == "finished" and row["resumes"] == 1
    assert row["config"]["steps"] == 50 and "jax" in row["versions"]
    kinds = [e["kind"] for e in events(path, "run-a")]
    assert kinds == ["checkpoint_saved", "config_changed", "resume"]
    assert events(path)[1]["detail"] == {"steps": [40, 50]}


def test_rewind_drops_rows_of_the_abandoned_trajectory(tmp_path):
    path = tmp_path / "m.duckdb"
    with MetricsDB(path, "r", CONFIG, process_index=0) as db:
        for step in range(10):
            db.log(step, {"loss": float(step)})
        db.flush()
        db.log(2, {"loss": -2.0})  # a re-run step replaces the stored row
        for step in range(10, 13):
            db.log(step, {"loss": float(step)})
        assert db.rewind(5) == 4  # rows 6..9 on disk; buffered 10..12 dropped as well
        db.log(6, {"loss": -6.0})
    steps, values = load_metrics(path, "r", ["loss"])["loss"]
    np.testing.assert_array_equal(steps, np.arange(7))
    np.testing.assert_array_equal(values, [0, 1, -2, 3, 4, 5, -6])


def test_flush_and_close_semantics(tmp_path):
    path = tmp_path / "m.duckdb"
    db = MetricsDB(path, "r", CONFIG, flush_every=3, process_index=0)
    db.log(0, {"a": 1.0, "b": np.float32(2.0)})
    db.log(1, {"a": jnp.asarray(np.nan)})
    # Read in-process while the writer is open: goes through the writer, which flushes first.
    assert load_metrics(path, "r", ["a"])["a"][0].tolist() == [0, 1]
    assert db.flush() == 0
    db.log(2, {"a": 3.0})
    db.log(3, {"a": 4.0})
    db.log(4, {"a": 5.0})  # the third log since the last flush writes all three
    assert db._steps == []
    db.log(5, {"a": 6.0})
    assert db.flush() == 1
    with pytest.raises(TypeError, match="'v' must be a scalar.*shape \\(2,\\)"):
        db.log(6, {"v": jnp.ones(2)})
    db.set_status("stopped")
    db.close()
    db.close()
    with pytest.raises(RuntimeError, match="is closed"):
        db.log(7, {"a": 1.0})
    steps, values = load_metrics(path)["a"]
    np.testing.assert_array_equal(steps, np.arange(6))
    assert np.isnan(values[1]) and values[5] == 6.0
    assert runs(path)[0]["status"] == "stopped"  # close() keeps a status set on purpose

    with pytest.raises(ZeroDivisionError), MetricsDB(path, "r2", CONFIG, process_index=0) as db2:
        db2.log(0, {"a": 1.0})
        1 / 0
    assert {r["run_id"]: r["status"] for r in runs(path)} == {"r": "stopped", "r2": "failed"}
    assert load_metrics(path, "r2")["a"][1].tolist() == [1.0]  # flushed on the way out

    with pytest.raises(KeyError, match="has no metric\\(s\\) \\['z'\\]; it has \\['a', 'b'\\]"):
        load_metrics(path, "r", ["z"])


def test_only_process_zero_writes(tmp_path):
    path = tmp_path / "m.duckdb"
    with MetricsDB(path, "r", CONFIG, process_index=1) as db:
        db.log(0, {"a": 1.0})
        db.event(0, "eval", {"loss": 1.0})
        assert not db.enabled and db.flush() == 0
    assert not path.exists()


_HOLDER = textwrap.dedent("""
    import sys, duckdb
    con = duckdb.connect(sys.argv[1])
    print("holding", flush=True)
    sys.stdin.read()
""")


def test_file_held_by_another_process_gives_a_clear_error(tmp_path):
    path = tmp_path / "metrics.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(MetricsDBLockedError) as info:
            MetricsDB(path, "r", CONFIG, process_index=0)
        message = str(info.value)
        assert str(path) in message and f"process {holder.pid}" in message
        assert "on_locked='fallback'" in message
        with pytest.raises(MetricsDBLockedError, match="read it after the run ends"):
            runs(path)
        with pytest.warns(UserWarning, match="logging to .*metrics.r.\\d+.duckdb instead"):
            db = MetricsDB(path, "r", CONFIG, process_index=0, on_locked="fallback")
        with db:
            db.log(0, {"a": 1.0})
        assert db.path != path and load_metrics(db.path)["a"][1].tolist() == [1.0]
    finally:
        holder.communicate("", timeout=30)
    with MetricsDB(path, "r", CONFIG, process_index=0) as db:  # free again
        db.log(0, {"a": 2.0})
    assert load_metrics(path)["a"][1].tolist() == [2.0]


def _report_module():
    script = Path(__file__).resolve().parents[1] / "scripts" / "report.py"
    spec = importlib.util.spec_from_file_location("vishwam_report", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_summarises_a_run_dir(tmp_path, capsys):
    import jax

    from vishwam.train.checkpoint import Checkpointer

    run_dir = tmp_path / "runs" / "demo"
    with MetricsDB(run_dir / "metrics.duckdb", "demo", CONFIG, process_index=0) as db:
        for step in range(30):
            db.log(step, {"train/loss": _loss(step), "train/tokens_per_s": 100.0 + step % 3})
        db.log(10, {"eval/loss": 2.5})
        db.log(20, {"eval/loss": 2.0})
        db.log(29, {"eval/loss": 2.1})
        db.event(29, "checkpoint_saved", {"step": 29})
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        ckpt.save(29, {"w": jax.numpy.zeros(2)}, {})

    assert _report_module().main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "run demo" in out and "status finished" in out
    assert f"train/loss: 30 points, first {_loss(0):.4g} @0, final {_loss(29):.4g} @29, " \
           f"best {_loss(29):.4g} @29" in out
    assert "eval/loss: 3 points, first 2.5 @10, final 2.1 @29, best 2 @20" in out
    assert "train/tokens_per_s: median 101" in out
    assert "checkpoints: steps [29], latest 29" in out
    assert "checkpoint_saved x1" in out
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in out
    else:
        assert (run_dir / "loss.png").stat().st_size > 0


def test_config_is_stored_as_json(tmp_path):
    path = tmp_path / "m.duckdb"
    with MetricsDB(path, "r", {"mesh": (2, 4), "path": Path("/x")}, process_index=0):
        pass
    assert runs(path)[0]["config"] == json.loads('{"mesh": [2, 4], "path": "/x"}')


def _demo_run(run_dir: Path, run_id: str, scale: float) -> None:
    """A run's rows as the trainer writes them: loss, val_loss, tokens, learning_rate."""
    with MetricsDB(run_dir / "metrics.duckdb", run_id, CONFIG, process_index=0) as db:
        for step in range(1, 31):
            db.log(step, {"loss": scale * _loss(step), "tokens": 100.0 + step, "learning_rate": 1e-3 / step})
        for step in (0, 10, 20, 30):
            db.log(step, {"val_loss": scale * _loss(step) + 0.1})


def test_report_picture_is_fixed_size_deterministic_and_overlays_runs(tmp_path, capsys):
    from PIL import Image

    report = _report_module()
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    _demo_run(a, "a", 1.0)
    _demo_run(b, "b", 1.3)
    assert report.main([str(a)]) == 0
    single = (a / "loss.png").read_bytes()
    assert Image.open(a / "loss.png").size == report.PLOT_PIXELS == (1350, 420)
    assert report.main([str(a)]) == 0
    assert (a / "loss.png").read_bytes() == single  # opened twice: the same bytes
    assert b"tIME" not in single and b"Matplotlib" not in single  # no timestamp, no version string

    capsys.readouterr()
    assert report.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    both = tmp_path / "runs" / "loss-a-vs-b.png"
    assert "run a " in out and "run b " in out and f"plot: wrote {both}" in out
    assert Image.open(both).size == report.PLOT_PIXELS and both.read_bytes() != single
    # The overlay holds run b's curves: more pixels drawn than in run a's picture alone.
    ink = lambda path: int((np.asarray(Image.open(path).convert("L")) < 250).sum())  # noqa: E731
    assert ink(both) > ink(a / "loss.png")
    assert report.main([str(a), str(b), "--run", "a"]) == 2  # bad input (vishwam.cli)
    assert "give one path with it" in capsys.readouterr().err


def test_files_from_before_the_compiled_memory_column_gain_it(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:  # the runs table as the first version wrote it
        con.execute("CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, started_at TIMESTAMP, updated_at TIMESTAMP, "
                    "status VARCHAR, config JSON, host VARCHAR, pid INTEGER, versions JSON, resumes INTEGER)")
        con.execute("INSERT INTO runs VALUES ('old', now(), now(), 'finished', '{}', 'h', 1, '{}', 0)")
    with MetricsDB(path, "new", CONFIG, process_index=0) as db:
        db.set_compiled_memory({"per_device": {"temp_size_in_bytes": 7}})
    rows = {r["run_id"]: r for r in runs(path)}
    assert rows["old"]["compiled_memory"] is None
    assert rows["new"]["compiled_memory"] == {"per_device": {"temp_size_in_bytes": 7}}


def test_expert_rows_are_replaced_on_relog_and_rewound_with_the_metrics(tmp_path):
    from vishwam.train.metrics_db import load_expert_metrics, query

    path = tmp_path / "m.duckdb"
    with MetricsDB(path, "r", CONFIG, process_index=0, flush_every=2) as db:
        for step in (2, 4, 6):
            db.log(step, {"loss": _loss(step)})
            db.log_experts(step, "load", jnp.full((2, 3), step, jnp.float32))  # device arrays are fine
            db.log_experts(step, "router_entropy", np.array([step, np.nan]))
        db.flush()
        db.log_experts(4, "load", np.ones((2, 3)))  # the same (step, name) again: replaces, not adds
        db.flush()
        assert db.rewind(4) == 1  # the metric row of step 6; its expert rows go too
        with pytest.raises(ValueError, match=r"\[layers, experts\] or \[layers\], got shape \(\)"):
            db.log_experts(8, "load", np.float32(1.0))
    steps, load = load_expert_metrics(path, "load")
    assert steps.tolist() == [2, 4] and load.shape == (2, 2, 3)
    np.testing.assert_array_equal(load[0], 2.0)
    np.testing.assert_array_equal(load[1], 1.0)
    steps, entropy = load_expert_metrics(path, "router_entropy")
    assert entropy.shape == (2, 2) and entropy[1, 0] == 4.0 and np.isnan(entropy[1, 1])  # NaN kept, not NULL
    _, rows = query([path], "SELECT count(*), count(expert) FROM expert_metrics")
    assert rows == [(2 * 6 + 2 * 2, 2 * 6)]  # per-layer rows have expert NULL
    with pytest.raises(KeyError, match=r"no expert statistic 'bias'; it has \['load', 'router_entropy'\]"):
        load_expert_metrics(path, "bias")

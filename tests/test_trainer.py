"""VishwamAITrainer and scripts/train.py: exact resume after kills, signals, locks, NaN guard, meshes.

The reliability checks run the real CLI (`scripts/train.py` through a small
driver that only adds an event callback) in real subprocesses: a run killed
with SIGKILL at a random step, one killed while an asynchronous checkpoint is
being written, one stopped by SIGTERM, then the same command again, and the
results compared with an uninterrupted run. Independent processes run
concurrently to keep the wall time down; all share the persistent compile cache.
"""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam.config import ModelConfig, TrainConfig
from vishwam.data import default_corpus, make_datasets
from vishwam.model import VishwamAI
from vishwam.parallel.sharding import path_string
from vishwam.pipeline import VishwamAIPipeline
from vishwam.tokenizer import VishwamAITokenizer
from vishwam.train import load_metrics, runs
from vishwam.train.checkpoint import checkpoint_steps
from vishwam.train.metrics_db import events
from vishwam.train.trainer import (
    MEMORY_METRICS,
    TIMING_METRICS,
    RunConfig,
    TrainingDiverged,
    VishwamAITrainer,
    abstract_model,
    load_run_state,
    model_flops_per_token,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
STEPS = 12

# The CLI with one addition: KILL_ON/KILL_AT/KILL_SIGNAL make the process send itself a
# real signal when the trainer reports that event (e.g. right after a checkpoint save starts).
DRIVER = textwrap.dedent(f"""
    import os, signal, sys
    sys.path.insert(0, {str(SCRIPTS)!r})
    import train

    on, at = os.environ.get("KILL_ON"), int(os.environ.get("KILL_AT", "-1"))
    sig = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))

    def kill(kind, step, detail):
        if kind == on and step == at:
            os.kill(os.getpid(), sig)

    sys.exit(train.main(sys.argv[1:], callbacks=[kill]))
""")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A ~400-piece tokenizer and a small JSONL corpus, made once for the module."""
    root = tmp_path_factory.mktemp("trainer")
    documents = default_corpus()[:24]
    with open(root / "corpus.jsonl", "w") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    tokenizer = VishwamAITokenizer.train(documents, root / "tok" / "tokenizer.model", vocab_size=400,
                                         hard_vocab_limit=False, input_kind="documents")
    tokenizer.save_pretrained(root / "tokenizer")
    return root


def _env(**extra):
    env = dict(os.environ)
    # One CPU device per child (conftest gives this process 8); same compile cache.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("VISHWAM_JAX_CACHE", str(jax.config.jax_compilation_cache_dir))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _args(ws: Path, name: str, *more: str) -> list[str]:
    return ["--preset", "tiny", "--tokenizer", str(ws / "tokenizer"), "--data", str(ws / "corpus.jsonl"),
            "--val-fraction", "0.2", "--steps", str(STEPS), "--batch", "4", "--seq-len", "32",
            "--eval-every", "6", "--eval-batches", "4", "--checkpoint-every", "3", "--no-progress",
            "--runs", str(ws / "runs"), "--name", name, *more]


def _start(ws: Path, name: str, *more: str, script: str | None = None, **env) -> subprocess.Popen:
    command = [sys.executable, "-c", DRIVER] if script is None else [sys.executable, str(SCRIPTS / script)]
    return subprocess.Popen(command + _args(ws, name, *more), env=_env(**env), cwd=ws, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(procs: dict[str, subprocess.Popen]) -> dict[str, tuple[int, str, str]]:
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done[name] = (proc.returncode, out, err)
    return done


def _trajectory(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every metric that does not depend on the wall clock or the process's memory."""
    metrics = load_metrics(run_dir / "metrics.duckdb")
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS + MEMORY_METRICS}


def _assert_same_run(reference: Path, other: Path) -> None:
    ref_state, ref_meta = load_run_state(reference)
    state, meta = load_run_state(other)
    assert meta["step"] == ref_meta["step"] == STEPS
    assert meta["data"] == ref_meta["data"]
    ref_leaves = jax.tree.leaves(jax.tree.map(np.asarray, eqx_arrays(ref_state)))
    leaves = jax.tree.leaves(jax.tree.map(np.asarray, eqx_arrays(state)))
    assert len(leaves) == len(ref_leaves) > 10
    for a, b in zip(ref_leaves, leaves, strict=True):
        np.testing.assert_array_equal(a, b)  # parameters, Adam moments, step, key: bit for bit
    ref, got = _trajectory(reference), _trajectory(other)
    assert sorted(got) == sorted(ref) and "loss" in ref and "val_loss" in ref
    for name in ref:
        np.testing.assert_array_equal(got[name][0], ref[name][0], err_msg=f"steps of {name}")
        np.testing.assert_array_equal(got[name][1], ref[name][1], err_msg=f"values of {name}")
    np.testing.assert_array_equal(ref["loss"][0], np.arange(1, STEPS + 1))


def eqx_arrays(state):
    import equinox as eqx

    arrays = eqx.filter(state, eqx.is_array)
    return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                        else x, arrays)


def test_kills_signals_and_locks_leave_resumable_runs_equal_to_an_uninterrupted_one(workspace):
    ws = workspace
    # After step 6's checkpoint started, step 3's is complete (a save waits for the one before).
    kill_at = random.Random().randint(7, STEPS - 1)
    import duckdb

    (ws / "runs" / "locked").mkdir(parents=True)
    holder = duckdb.connect(str(ws / "runs" / "locked" / "metrics.duckdb"))
    try:
        first = _wait({
            "reference": _start(ws, "reference"),
            "sigkill": _start(ws, "sigkill", KILL_ON="step", KILL_AT=kill_at),
            "mid_save": _start(ws, "mid_save", KILL_ON="checkpoint_started", KILL_AT=6),
            "sigterm": _start(ws, "sigterm", KILL_ON="step", KILL_AT=7, KILL_SIGNAL="SIGTERM"),
            "locked": _start(ws, "locked", script="train.py"),
        })
    finally:
        holder.close()
    rc, out, err = first["reference"]
    assert rc == 0, err[-3000:]
    runs_dir = ws / "runs"
    # The main-job contract: files in place, initial and final validation loss printed, loss falling.
    for name in ("config.json", "metrics.duckdb", "tokenizer/tokenizer.model", "pipeline/model.safetensors"):
        assert (runs_dir / "reference" / name).exists(), name
    line = next(x for x in out.splitlines() if x.startswith("validation loss:"))
    initial, final = (float(w) for w in line.split() if w.replace(".", "").isdigit() and "." in w)
    assert final < initial, line
    assert (runs_dir / "reference" / "checkpoints").is_dir() and str(runs_dir / "reference") in out

    rc, out, err = first["sigkill"]
    assert rc == -signal.SIGKILL, (kill_at, err[-3000:])
    # Checkpoints are written asynchronously: the kill may catch the latest one unfinished.
    complete_at_kill = checkpoint_steps(runs_dir / "sigkill" / "checkpoints")[0]
    assert complete_at_kill and 3 <= complete_at_kill[-1] <= kill_at, (kill_at, complete_at_kill)
    rc, out, err = first["mid_save"]
    assert rc == -signal.SIGKILL, err[-3000:]
    complete, unfinished = checkpoint_steps(runs_dir / "mid_save" / "checkpoints")
    assert complete == [3] and unfinished == ["6.orbax-checkpoint-tmp"], (complete, unfinished)

    rc, out, err = first["sigterm"]
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert "rerun the same command to resume" in out
    # The signal arrives while step 8 is in flight (the host reads step 7 as the device runs
    # step 8): that step completes, then the final checkpoint.
    assert checkpoint_steps(runs_dir / "sigterm" / "checkpoints") == ([3, 6, 8], [])
    [row] = runs(runs_dir / "sigterm" / "metrics.duckdb")  # opens: the writer closed the file
    assert row["status"] == "stopped"
    assert [e["detail"] for e in events(runs_dir / "sigterm" / "metrics.duckdb") if e["kind"] == "stop"] == [
        {"signal": "SIGTERM"}]
    assert load_metrics(runs_dir / "sigterm" / "metrics.duckdb", names=["loss"])["loss"][0].tolist() == list(
        range(1, 9))

    rc, out, err = first["locked"]
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert "held by" in err and f"process {os.getpid()}" in err and "--db-fallback" in err, err

    # The same commands again: each resumes and ends where the uninterrupted run ended.
    second = _wait({
        "sigkill": _start(ws, "sigkill"),
        "mid_save": _start(ws, "mid_save"),
        "sigterm": _start(ws, "sigterm"),
        "changed": _start(ws, "reference", "--lr", "0.01"),
        "distill": subprocess.Popen(
            [sys.executable, str(SCRIPTS / "distill.py"), "--teacher", str(runs_dir / "reference"), "--steps", "4",
             "--eval-every", "0", "--eval-batches", "2", "--no-progress"],
            env=_env(), cwd=ws, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    })
    for name, checkpoint in (("sigkill", complete_at_kill[-1]), ("mid_save", 3), ("sigterm", 8)):
        rc, out, err = second[name]
        assert rc == 0, (name, err[-3000:])
        resumed = [e["detail"]["checkpoint"] for e in events(runs_dir / name / "metrics.duckdb")
                   if e["kind"] == "resume"]
        assert resumed == [checkpoint], (name, kill_at, resumed)
        _assert_same_run(runs_dir / "reference", runs_dir / name)
    rc, out, err = second["distill"]
    assert rc == 0, err[-3000:]
    student = json.loads((runs_dir / "reference-student" / "config.json").read_text())
    assert (student["model"]["hidden_size"], student["model"]["num_layers"]) == (16, 1)
    assert student["teacher"]["hidden_size"] == 32 and student["tokenizer"]["fingerprint"] == json.loads(
        (runs_dir / "reference" / "config.json").read_text())["tokenizer"]["fingerprint"]
    distill = load_metrics(runs_dir / "reference-student" / "metrics.duckdb", names=["distill"])["distill"][1]
    assert len(distill) == 4 and np.all(np.isfinite(distill)) and np.all(distill > 0)
    rc, out, err = second["changed"]
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert "train.learning_rate: checkpoint=0.002, now=0.01" in err, err


# ------------------------------------------------------------------ in process
@pytest.fixture(scope="module")
def tiny(workspace):
    tokenizer = VishwamAITokenizer.from_pretrained(workspace / "tokenizer")
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)
    train_config = TrainConfig(batch_size=4, seq_len=32, total_steps=8, warmup_steps=1, learning_rate=2e-3)
    return tokenizer, config, train_config


class NaNAt:
    """The training batches with a NaN loss mask in batch number `at` (1-based)."""

    def __init__(self, loader, at: int):
        self.loader, self.at = loader, at

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.loader))
        if self.loader.position == self.at:
            batch["loss_mask"] = batch["loss_mask"].copy()
            batch["loss_mask"][0, 0] = np.nan
        return batch

    def state(self):
        return self.loader.state()

    def restore(self, state):
        self.loader.restore(state)


def _train(tiny, workspace, tmp_path, *, nan_at=None, policy="stop", mesh=None, abstract=False, **run):
    tokenizer, config, train_config = tiny
    train_config = train_config.replace(nan_policy=policy)
    train, val = make_datasets(tokenizer, workspace / "corpus.jsonl", seq_len=32, batch_size=4, val_fraction=0.2,
                               cache_dir=workspace / "cache", process_index=0, process_count=1)
    loader = train if nan_at is None else NaNAt(train, nan_at)
    # seed 0 either way: an abstract model is initialised by the trainer from TrainConfig.seed
    model = abstract_model(config) if abstract else VishwamAI(config, key=jax.random.key(0))
    pipeline = VishwamAIPipeline(model, tokenizer)
    run_config = RunConfig(run_dir=str(tmp_path), progress=False, mesh=mesh or {"data": 1}, eval_batches=2,
                           **run)
    try:
        return VishwamAITrainer(pipeline, train_config, loader, val, run=run_config).train()
    finally:
        train.close()
        val.close()


def test_nan_skip_leaves_the_state_unchanged_and_counts(tiny, workspace, tmp_path):
    result = _train(tiny, workspace, tmp_path, nan_at=3, policy="skip", eval_every=0, checkpoint_every=0)
    assert result.skipped_steps == 1 and result.step == 8 and result.stop_reason == "finished"
    assert int(result.state.step) == 7  # 8 batches, 7 updates
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(result.state.model) if hasattr(x, "dtype"))
    metrics = load_metrics(tmp_path / "metrics.duckdb", names=["nonfinite", "learning_rate", "skipped"])
    assert metrics["nonfinite"][1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    lr = metrics["learning_rate"][1]
    assert lr[3] == lr[2] and lr[4] != lr[3]  # the skipped update did not advance the schedule
    assert metrics["skipped"][1][-1] == 1
    assert [e["step"] for e in events(tmp_path / "metrics.duckdb") if e["kind"] == "nan"] == [3]
    assert result.final_val_loss < result.initial_val_loss


def test_nan_stop_points_at_the_last_good_checkpoint(tiny, workspace, tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        _train(tiny, workspace, tmp_path, nan_at=5, policy="stop", eval_every=0, checkpoint_every=2)
    message = str(info.value)
    assert info.value.step == 5 and info.value.last_good_checkpoint == 4
    assert "last good checkpoint is step 4" in message and str(tmp_path / "checkpoints") in message
    assert checkpoint_steps(tmp_path / "checkpoints") == ([2, 4], [])  # the diverged state was not saved
    [row] = runs(tmp_path / "metrics.duckdb")
    assert row["status"] == "nan"


class SigtermInPass:
    """Validation batches that send this process SIGTERM as batch `at` of pass `on_pass` is drawn."""

    def __init__(self, loader, *, on_pass: int, at: int):
        self.loader, self.on_pass, self.at = loader, on_pass, at
        self.passes, self.drawn = 0, []

    def reset(self):
        self.loader.reset()
        self.passes += 1
        self.drawn.append(0)

    def __iter__(self):
        for batch in self.loader:
            self.drawn[-1] += 1
            if self.passes == self.on_pass and self.drawn[-1] == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def test_sigterm_stops_an_evaluation_at_its_next_batch_and_checkpoints_are_logged_when_committed(
        tiny, workspace, tmp_path):
    tokenizer, config, train_config = tiny
    train, val = make_datasets(tokenizer, workspace / "corpus.jsonl", seq_len=32, batch_size=2, val_fraction=0.2,
                               cache_dir=workspace / "cache", process_index=0, process_count=1)
    assert len(val) >= 3
    interrupted = SigtermInPass(val, on_pass=2, at=2)
    seen = []
    pipeline = VishwamAIPipeline(VishwamAI(config, key=jax.random.key(0)), tokenizer)
    run = RunConfig(run_dir=str(tmp_path), progress=False, mesh={"data": 1}, eval_every=4, checkpoint_every=2)
    try:
        result = VishwamAITrainer(pipeline, train_config.replace(batch_size=2), train, interrupted, run=run,
                                  callbacks=[lambda kind, step, detail: seen.append((kind, step))]).train()
    finally:
        train.close()
        val.close()
    # The step-4 evaluation stopped when its second batch was drawn; the full first pass ran.
    assert interrupted.drawn == [len(val), 2] and result.stop_reason == "SIGTERM" and result.step == 4
    log = events(tmp_path / "metrics.duckdb")
    assert [e["step"] for e in log if e["kind"] == "eval"] == [0]  # a partial pass is not a validation loss
    # Each checkpoint event follows its save's start and names a step that is complete on disk.
    assert [e["step"] for e in log if e["kind"] == "checkpoint"] == [2, 4]
    assert checkpoint_steps(tmp_path / "checkpoints") == ([2, 4], [])
    for step in (2, 4):
        assert seen.index(("checkpoint_started", step)) < seen.index(("checkpoint", step))


def test_mesh_run_matches_single_device(tiny, workspace, tmp_path):
    one = _train(tiny, workspace, tmp_path / "one", eval_every=0, checkpoint_every=0, max_steps=4)
    # The model arrives abstract: the trainer builds it (and the moments) in their shardings.
    mesh = _train(tiny, workspace, tmp_path / "mesh", mesh={"data": 2, "expert": 2}, eval_every=0,
                  checkpoint_every=0, max_steps=4, abstract=True)
    spec = mesh.state.model.stages[0].blocks[0].mlp.experts.gate.sharding.spec
    assert "expert" in str(spec), spec
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(mesh.state.opt_state)
               if path_string(path).endswith("stages.0.blocks.0.mlp.experts.gate")]
    assert len(moments) == 2 and all(m.sharding.spec == spec for m in moments)  # mu and nu
    a = load_metrics(tmp_path / "one" / "metrics.duckdb", names=["loss"])["loss"][1]
    b = load_metrics(tmp_path / "mesh" / "metrics.duckdb", names=["loss"])["loss"][1]
    np.testing.assert_allclose(b, a, rtol=2e-5)
    assert b[-1] < b[0]


def test_flops_estimate_and_run_config_validation():
    config = ModelConfig.preset("small")
    per_token = model_flops_per_token(config, 128)
    dense_equivalent = 6 * (4 * (2 * 256 * 256 + 2 * 256 * 128 + 2 * 3 * 256 * 512) + 4096 * 256)
    assert per_token > dense_equivalent  # plus routers, norms and attention scores
    assert per_token < dense_equivalent * 1.1
    with pytest.raises(ValueError, match="RunConfig.resume"):
        RunConfig(resume="sometimes")
    with pytest.raises(ValueError, match="RunConfig.eval_every"):
        RunConfig(eval_every=-1)
    for window in ((4, 2), (0, 3)):
        with pytest.raises(ValueError, match=r"RunConfig.profile_steps: must be \(START, STOP\)"):
            RunConfig(profile_steps=window)
    with pytest.raises(ValueError, match="step 9 is beyond the run's last step 8"):
        RunConfig(profile_steps=(2, 9), max_steps=8)
    assert RunConfig(profile_steps=(2, 4)).profile_steps == (2, 4)


# ------------------------------------------------------- profiling and memory
def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"vishwam_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli_args(ws: Path, run_dir: Path, *more: str) -> list[str]:
    return ["--preset", "tiny", "--tokenizer", str(ws / "tokenizer"), "--data", str(ws / "corpus.jsonl"),
            "--val-fraction", "0.2", "--steps", "6", "--batch", "4", "--seq-len", "32", "--eval-every", "3",
            "--eval-batches", "2", "--checkpoint-every", "0", "--log-every", "2", "--mesh", "data=1",
            "--no-progress", "--run-dir", str(run_dir), *more]


def test_profile_window_memory_tracking_and_report(workspace, tmp_path, capsys):
    run_dir = tmp_path / "profiled"
    assert _script("train").main(_cli_args(workspace, run_dir, "--profile", "2:4")) == 0
    db = run_dir / "metrics.duckdb"
    run_events = events(db)

    # The trace: a non-empty session directory under run_dir/profile, logged once with its path.
    [profile] = [e for e in run_events if e["kind"] == "profile"]
    detail = profile["detail"]
    assert profile["step"] == 4 and (detail["start"], detail["stop"]) == (2, 4)
    session = Path(detail["path"])
    assert session.is_dir() and session.parent.parent.parent == run_dir / "profile"
    assert any(f.endswith(".xplane.pb") for f in detail["files"]) and "perfetto_trace.json.gz" in detail["files"]
    assert sum(f.stat().st_size for f in session.iterdir()) == detail["bytes"] > 0

    # Throughput leaves the traced steps out; their step time is still logged.
    metrics = load_metrics(db)
    for name in ("tokens_per_s", "mfu"):
        assert metrics[name][0].tolist() == [1, 5, 6], name
    assert metrics["step_time"][0].tolist() == [1, 2, 3, 4, 5, 6]

    # Memory every log interval (--log-every 2) and at the last step, all positive.
    allocator = jax.devices()[0].memory_stats() is not None
    expected = ["memory/live_array_bytes", "memory/host_rss_bytes", "memory/host_peak_rss_bytes"]
    expected += ["memory/device_bytes", "memory/device_peak_bytes"] if allocator else []
    for name in expected:
        steps, values = metrics[name]
        assert steps.tolist() == [2, 4, 6] and np.all(values > 0), (name, steps, values)
    # The CPU backend keeps no allocator statistics: those metrics are absent, not made up.
    assert ("memory/device_bytes" in metrics) == allocator
    assert np.all(metrics["memory/host_peak_rss_bytes"][1] >= metrics["memory/host_rss_bytes"][1])

    # The compiled step's footprint, per device, in the events and the runs table.
    [compiled] = [e for e in run_events if e["kind"] == "compiled_memory"]
    footprint = compiled["detail"]["per_device"]
    assert compiled["step"] == 0 and compiled["detail"]["allocator_stats"] == allocator
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "total_size_in_bytes"):
        assert footprint[field] > 0, field
    [row] = runs(db)
    assert row["compiled_memory"] == compiled["detail"]

    report = _script("report")
    capsys.readouterr()
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    total = footprint["total_size_in_bytes"]
    assert f"compiled train step: {total:,} bytes per device" in out, out
    assert f"profile: steps 2-4: {session}" in out, out
    peak = int(metrics["memory/host_peak_rss_bytes"][1].max())
    assert f"host peak RSS {peak:,} bytes" in out, out
    png = run_dir / "loss.png"
    first = png.read_bytes()
    from PIL import Image

    assert Image.open(png).size == report.PLOT_PIXELS and len(first) > 10_000
    assert report.main([str(run_dir)]) == 0
    assert png.read_bytes() == first  # the same run, the same picture, byte for byte


@pytest.mark.parametrize("window,words", [
    ("4:2", "START must be at least 1 and at most STOP"),
    ("a:b", "expected START:STOP, two step numbers"),
    ("5:9", "step 9 is beyond the run's last step 6"),
])
def test_bad_profile_values_are_one_error_line(workspace, tmp_path, capsys, window, words):
    assert _script("train").main(_cli_args(workspace, tmp_path / "bad", "--profile", window)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # one error line and the scripts' hint line (vishwam.cli), no traceback
    assert len(err) == 2 and err[0].startswith(f"error: --profile {window!r}: ") and words in err[0], err
    assert err[1].startswith("hint: "), err
    assert not (tmp_path / "bad" / "metrics.duckdb").exists()


def test_resume_keeps_the_run_settings_and_the_separator(workspace, tmp_path):
    """Flags not given again on a resume keep the run's values; `--separator` splits text files
    into documents (one file is then a validation set too) and is kept as well."""
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(default_corpus()[:24]))
    run_dir = tmp_path / "res"
    common = ["--tokenizer", str(workspace / "tokenizer"), "--data", str(text), "--mesh", "data=1", "--no-progress",
              "--run-dir", str(run_dir)]
    train = _script("train")
    assert train.main([*common, "--preset", "tiny", "--batch", "4", "--seq-len", "32", "--eval-batches", "1",
                       "--separator", "\\n\\n", "--val-fraction", "0.2", "--steps", "8", "--max-steps", "4",
                       "--eval-every", "2", "--checkpoint-every", "2", "--keep", "5"]) == 0
    assert train.main([*common, "--resume"]) == 0
    run_events = events(run_dir / "metrics.duckdb")
    assert [e["step"] for e in run_events if e["kind"] == "eval"] == [0, 2, 4, 6, 8]
    assert [e["step"] for e in run_events if e["kind"] == "checkpoint"] == [2, 4, 6, 8]
    assert checkpoint_steps(run_dir / "checkpoints")[0] == [2, 4, 6, 8]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["separator"] == "\n\n" and config["run"]["eval_every"] == 2


def test_one_text_document_warns_that_nothing_is_held_out(workspace, tmp_path):
    text = tmp_path / "one.txt"
    text.write_text("\n\n".join(default_corpus()[:8]))
    tokenizer = VishwamAITokenizer.from_pretrained(workspace / "tokenizer")
    with pytest.warns(UserWarning, match=r"no validation data: the source has 1 document\(s\).*separator"):
        train_iter, val_iter = make_datasets(tokenizer, [str(text)], seq_len=32, batch_size=4, val_fraction=0.1)
    assert val_iter is None
    train_iter.close()

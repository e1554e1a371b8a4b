"""Summarise a training run: losses, throughput, checkpoints, events, and a loss-curve PNG.

    python scripts/report.py runs/<name>               # a run directory
    python scripts/report.py runs/<name>/metrics.duckdb --run <run_id>

A run directory holds `metrics.duckdb` and `checkpoints/`. Metrics whose name
contains "loss" are summarised with their best (lowest) value and plotted;
names containing "tokens_per_s" are reported as throughput (median, so the
compile-heavy first steps do not skew it). The PNG needs matplotlib
(`pip install matplotlib`); without it the plot is skipped with a note.

Read a live run's database only after the run ends: DuckDB lets one process
hold the file, and the trainer is that process.
"""

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

from vishwam.cli import add_debug_flag, run_script
from vishwam.train.metrics_db import events, load_metrics, runs


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _metric_lines(metrics: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    lines = []
    for name, (steps, values) in metrics.items():
        if "tokens_per_s" in name:
            finite = values[np.isfinite(values)]
            median = _fmt(float(np.median(finite))) if finite.size else "n/a"
            lines.append(f"  {name}: median {median}, last {_fmt(values[-1])} ({len(values)} points)")
            continue
        line = (f"  {name}: {len(values)} points, first {_fmt(values[0])} @{steps[0]}, "
                f"final {_fmt(values[-1])} @{steps[-1]}")
        finite = np.isfinite(values)
        if "loss" in name and finite.any():
            best = int(np.argmin(np.where(finite, values, np.inf)))
            line += f", best {_fmt(values[best])} @{steps[best]}"
        if not finite.all():
            line += f" ({int((~finite).sum())} non-finite)"
        lines.append(line)
    return lines


def _checkpoint_lines(directory: Path) -> list[str]:
    if not directory.is_dir():
        return [f"checkpoints: none ({directory} does not exist)"]
    # Deferred: orbax (and jax) are only needed when there are checkpoints to list.
    from vishwam.train.checkpoint import checkpoint_steps

    complete, unfinished = checkpoint_steps(directory)
    latest = complete[-1] if complete else None
    line = f"checkpoints: steps {complete}, latest {latest} (in {directory})"
    if unfinished:
        line += f"; unfinished (killed saves): {unfinished}"
    return [line]


def _event_lines(run_events: list[dict]) -> list[str]:
    if not run_events:
        return ["events: none"]
    counts = collections.Counter(e["kind"] for e in run_events)
    lines = [f"events: {len(run_events)} (" + ", ".join(f"{k} x{n}" for k, n in counts.items()) + ")"]
    for e in run_events[-5:]:
        lines.append(f"  step {e['step']}: {e['kind']} {json.dumps(e['detail'], sort_keys=True)}")
    return lines


def _plot(metrics: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, title: str) -> str:
    losses = {n: sv for n, sv in metrics.items() if "loss" in n}
    if not losses:
        return "plot: skipped (no metric named *loss*)"
    try:
        import matplotlib
    except ImportError:
        return "plot: skipped, matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (steps, values) in losses.items():
        ax.plot(steps, values, label=name, marker="o" if len(steps) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return f"plot: wrote {out}"


def report(path: Path, run_id: str | None = None, plot_to: Path | None = None,
           plot: bool = True) -> str:
    """The summary text of one run (`run_id=None`: the latest in the file)."""
    if path.is_dir():
        run_dir, db_path = path, path / "metrics.duckdb"
    else:
        run_dir, db_path = path.parent, path
    all_runs = runs(db_path)
    if not all_runs:
        raise ValueError(f"{db_path} holds no runs.")
    by_id = {r["run_id"]: r for r in all_runs}
    if run_id is not None and run_id not in by_id:
        raise ValueError(f"No run {run_id!r} in {db_path}; runs: {list(by_id)}.")
    run = by_id[run_id] if run_id is not None else all_runs[-1]
    metrics = load_metrics(db_path, run["run_id"])
    lines = [
        f"run {run['run_id']}  status {run['status']}  host {run['host']}  "
        f"started {run['started_at']:%Y-%m-%d %H:%M:%S} UTC  "
        f"updated {run['updated_at']:%Y-%m-%d %H:%M:%S} UTC  resumes {run['resumes']}",
        f"database {db_path.absolute()} ({len(all_runs)} run(s))",
        "metrics:" if metrics else "metrics: none",
        *_metric_lines(metrics),
        *_checkpoint_lines(run_dir / "checkpoints"),
        *_event_lines(events(db_path, run["run_id"])),
    ]
    if plot:
        lines.append(_plot(metrics, plot_to or run_dir / "loss.png", run["run_id"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (`vishwam.cli`: 2 for a missing or unreadable run)."""
    return run_script(_main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="run directory or metrics .duckdb file")
    parser.add_argument("--run", dest="run_id", help="run id (default: the latest in the file)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: <run dir>/loss.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the loss curve")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    print(report(args.path, args.run_id, args.plot, plot=not args.no_plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())

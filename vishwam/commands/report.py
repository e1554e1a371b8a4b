"""Summarise training runs: losses, throughput, memory, profiles, checkpoints, events, and a loss picture.

    vishwam-report runs/<name>               # a run directory: writes runs/<name>/loss.png
    vishwam-report runs/<name>/metrics.duckdb --run <run_id>
    vishwam-report runs/a runs/b             # both summaries, one overlaid runs/loss-a-vs-b.png

A run directory holds `metrics.duckdb` and `checkpoints/`. Metrics whose name
contains "loss" are summarised with their best (lowest) value and plotted;
names containing "tokens_per_s" are reported as throughput (median, so the
compile-heavy first steps do not skew it). Memory: the compiled train step's
footprint (XLA's analysis, per device), the peak device memory where the
backend reports it, and the host's peak resident memory; then the traces
written by `train.py --profile`.

The picture (matplotlib, Agg backend) has three panels: loss against step,
loss against tokens (the running sum of the `tokens` metric: loss-mask tokens
trained on), and the learning rate against step. It is a function of the
stored metrics only (fixed size and PNG metadata, no timestamps), so a run
opened twice gives the same bytes.

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
from vishwam.errors import InvalidValueError

PLOT_INCHES, PLOT_DPI = (13.5, 4.2), 100
PLOT_PIXELS = (round(PLOT_INCHES[0] * PLOT_DPI), round(PLOT_INCHES[1] * PLOT_DPI))
"""(width, height) of the PNG."""

Metrics = dict[str, tuple[np.ndarray, np.ndarray]]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _metric_lines(metrics: Metrics) -> list[str]:
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


def _peak(metrics: Metrics, name: str) -> int | None:
    if name not in metrics:
        return None
    return int(np.nanmax(metrics[name][1]))


def _memory_lines(run: dict, metrics: Metrics) -> list[str]:
    lines = []
    compiled = run.get("compiled_memory")
    if compiled and compiled.get("per_device"):
        m = compiled["per_device"]
        lines.append(f"memory: compiled train step: {m['total_size_in_bytes']:,} bytes per device "
                     f"(arguments {m['argument_size_in_bytes']:,}, outputs {m['output_size_in_bytes']:,}, "
                     f"aliased {m['alias_size_in_bytes']:,}, temporaries {m['temp_size_in_bytes']:,}) "
                     f"on {compiled['devices']} x {compiled['device_kind']}")
    elif compiled:
        lines.append(f"memory: compiled train step: not analysed ({compiled.get('unavailable')})")
    device_peak = _peak(metrics, "memory/device_peak_bytes")
    if device_peak is not None:
        limit = (compiled or {}).get("device_bytes_limit")
        of = f" of {limit:,}" if limit else ""
        lines.append(f"memory: peak device {device_peak:,} bytes{of} (allocator, busiest device)")
    elif "memory/live_array_bytes" in metrics:
        platform = (compiled or {}).get("platform", "this")
        lines.append(f"memory: peak device not reported (the {platform} backend keeps no allocator statistics); "
                     f"live arrays at most {_peak(metrics, 'memory/live_array_bytes'):,} bytes on one device")
    host_peak = _peak(metrics, "memory/host_peak_rss_bytes")
    if host_peak is not None:
        rss = _peak(metrics, "memory/host_rss_bytes")
        lines.append(f"memory: host peak RSS {host_peak:,} bytes"
                     + ("" if rss is None else f" (largest RSS sampled {rss:,})"))
    return lines


def _profile_lines(run_events: list[dict]) -> list[str]:
    lines = []
    for e in run_events:
        if e["kind"] == "profile":
            d = e["detail"]
            lines.append(f"profile: steps {d['start']}-{d['stop']}: {d['path']} ({len(d['files'])} files, "
                         f"{d['bytes']:,} bytes; tensorboard --logdir {d['directory']})")
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


# ------------------------------------------------------------------- picture
def _tokens_at(metrics: Metrics, steps: np.ndarray) -> np.ndarray | None:
    """Tokens trained on by the end of each of `steps` (0 at step 0), from the `tokens` metric."""
    if "tokens" not in metrics:
        return None
    token_steps, counts = metrics["tokens"]
    return np.interp(steps, token_steps, np.cumsum(counts), left=0.0)


def plot_runs(series: list[tuple[str, Metrics]], out: Path) -> str:
    """Write the loss/learning-rate picture of one or more runs (overlaid) to `out`."""
    if not any("loss" in name for _, metrics in series for name in metrics):
        return "plot: skipped (no metric named *loss*)"
    try:
        import matplotlib
    except ImportError:
        return "plot: skipped, matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_tokens, lr) = plt.subplots(1, 3, figsize=PLOT_INCHES, dpi=PLOT_DPI)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(series) > 1
    no_tokens, no_lr = [], []
    for index, (label, metrics) in enumerate(series):
        for number, name in enumerate(sorted(n for n in metrics if "loss" in n)):
            steps, values = metrics[name]
            # Overlaid runs: one colour per run. Validation points are few and far apart: dashed, markers.
            held_out = "val" in name or "eval" in name
            style = dict(color=colors[(index if several else number) % len(colors)],
                         linestyle="--" if held_out else "-", marker="o" if held_out or len(steps) < 20 else None,
                         markersize=3, label=f"{label}: {name}" if several else name)
            by_step.plot(steps, values, **style)
            tokens = _tokens_at(metrics, steps)
            if tokens is not None:
                by_tokens.plot(tokens, values, **style)
            elif label not in no_tokens:
                no_tokens.append(label)
        rates = [n for n in sorted(metrics) if "learning_rate" in n or n == "lr"]
        for name in rates:
            steps, values = metrics[name]
            lr.plot(steps, values, color=colors[index % len(colors)] if several else None,
                    label=f"{label}: {name}" if several else name)
        if not rates:
            no_lr.append(label)
    for ax, xlabel, ylabel in ((by_step, "step", "loss"), (by_tokens, "tokens trained on", "loss"),
                               (lr, "step", "learning rate")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax, missing, what in ((by_tokens, no_tokens, "tokens"), (lr, no_lr, "learning-rate")):
        if missing:
            ax.text(0.5, 0.5, f"no {what} metric in {', '.join(missing)}", transform=ax.transAxes,
                    ha="center", va="center", fontsize=8, color="gray")
    by_step.set_title("loss by step")
    by_tokens.set_title("loss by tokens")
    lr.set_title("learning rate")
    fig.suptitle(" vs ".join(label for label, _ in series))
    fig.tight_layout()
    # Fixed size (no bbox_inches="tight") and metadata without a version string or date.
    fig.savefig(out, dpi=PLOT_DPI, metadata={"Software": None})
    plt.close(fig)
    return f"plot: wrote {out}"


# -------------------------------------------------------------------- report
def _open(path: Path, run_id: str | None) -> tuple[Path, Path, dict, int]:
    from vishwam.train.metrics_db import runs

    if path.is_dir():
        run_dir, db_path = path, path / "metrics.duckdb"
    else:
        run_dir, db_path = path.parent, path
    all_runs = runs(db_path)
    if not all_runs:
        raise InvalidValueError(f"{db_path} holds no runs.")
    by_id = {r["run_id"]: r for r in all_runs}
    if run_id is not None and run_id not in by_id:
        raise InvalidValueError(f"No run {run_id!r} in {db_path}; runs: {list(by_id)}.")
    return run_dir, db_path, by_id[run_id] if run_id is not None else all_runs[-1], len(all_runs)


def _summary(path: Path, run_id: str | None) -> tuple[str, str, Path, Metrics]:
    """(text, run id, run directory, metrics) of one run (`run_id=None`: the latest in the file)."""
    from vishwam.train.metrics_db import events, load_metrics

    run_dir, db_path, run, count = _open(path, run_id)
    metrics = load_metrics(db_path, run["run_id"])
    run_events = events(db_path, run["run_id"])
    lines = [
        f"run {run['run_id']}  status {run['status']}  host {run['host']}  "
        f"started {run['started_at']:%Y-%m-%d %H:%M:%S} UTC  "
        f"updated {run['updated_at']:%Y-%m-%d %H:%M:%S} UTC  resumes {run['resumes']}",
        f"database {db_path.absolute()} ({count} run(s))",
        "metrics:" if metrics else "metrics: none",
        *_metric_lines(metrics),
        *_memory_lines(run, metrics),
        *_profile_lines(run_events),
        *_checkpoint_lines(run_dir / "checkpoints"),
        *_event_lines(run_events),
    ]
    return "\n".join(lines), run["run_id"], run_dir, metrics


def report(path: Path, run_id: str | None = None, plot_to: Path | None = None,
           plot: bool = True) -> str:
    """The summary text of one run (`run_id=None`: the latest in the file), writing its picture."""
    return compare([path], run_id, plot_to, plot)


def compare(paths: list[Path], run_id: str | None = None, plot_to: Path | None = None,
            plot: bool = True) -> str:
    """The summaries of several runs, one after the other, and one picture overlaying them.

    The picture goes to `plot_to`, by default `<run dir>/loss.png` for one run and
    `<first run's parent>/loss-<a>-vs-<b>.png` for several.
    """
    if run_id is not None and len(paths) > 1:
        raise InvalidValueError("--run picks a run inside one database; give one path with it.")
    summaries = [_summary(path, run_id) for path in paths]
    text = "\n\n".join(s[0] for s in summaries)
    if not plot:
        return text
    if plot_to is None:
        first_dir = summaries[0][2]
        plot_to = (first_dir / "loss.png" if len(summaries) == 1
                   else first_dir.parent / ("loss-" + "-vs-".join(s[1] for s in summaries) + ".png"))
    return text + "\n" + plot_runs([(s[1], s[3]) for s in summaries], plot_to)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (`vishwam.cli`: 2 for a missing or unreadable run)."""
    return run_script(_main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="path",
                        help="run directory or metrics .duckdb file; several are compared")
    parser.add_argument("--run", dest="run_id", help="run id (default: the latest in the file)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: <run dir>/loss.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the picture")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    print(compare(args.paths, args.run_id, args.plot, plot=not args.no_plot))
    return 0


def entry() -> None:
    """The `vishwam-report` console command."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

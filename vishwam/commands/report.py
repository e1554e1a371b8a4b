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

A run of a MoE model also gets `experts.png` in its run directory, from the
`expert_metrics` table (logged every `log_every` steps): the expert-load heatmap
(layers x experts, each expert's share of its layer's assignments over the uniform
share, at the last logged step), the load over steps (one row per layer and expert),
and the drop rate over steps (per layer, and the step's `dropped_fraction`).

    vishwam-report runs/a runs/b --sql "SELECT db, run_id, min(value) FROM metrics WHERE name = 'loss' GROUP BY ALL"

`--sql` runs one query over the given runs' databases and prints the result as a
table, instead of the summaries. The i-th database is attached as `db<i>` (`db0.metrics`);
the names `runs`, `metrics`, `events` and `expert_metrics` are views over all of them
with a `db` column (`db0`, `db1`, ...) saying which file a row came from. Columns:
runs(run_id, started_at, updated_at, status, config, host, pid, versions, resumes,
compiled_memory), metrics(run_id, step, name, value, wall_time), events(run_id, step,
kind, detail, wall_time), expert_metrics(run_id, step, layer, expert, name, value,
wall_time) with names `load`, `dropped`, `router_entropy` (expert NULL), `bias`, and
`val_load`, `val_router_entropy` from evaluations.

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


def plot_experts(db_path: Path, run_id: str, metrics: Metrics, out: Path) -> str | None:
    """Write the expert picture of one run to `out`; None when the run logged no expert statistics."""
    from vishwam.train.metrics_db import load_expert_metrics

    try:
        steps, load = load_expert_metrics(db_path, "load", run_id)
    except KeyError:
        return None
    try:
        import matplotlib
    except ImportError:
        return "experts plot: skipped, matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts = load.shape[1:]
    fig, (last, over_steps, drops) = plt.subplots(1, 3, figsize=PLOT_INCHES, dpi=PLOT_DPI)
    image = last.imshow(load[-1] * experts, aspect="auto", cmap="viridis", interpolation="nearest")
    last.set_title(f"expert load at step {steps[-1]} (1 = uniform)")
    last.set_xlabel("expert")
    last.set_ylabel("MoE layer")
    last.set_yticks(range(layers))
    fig.colorbar(image, ax=last)
    rows = load.reshape(len(steps), layers * experts).T * experts  # (layer * expert, steps)
    half = (steps[-1] - steps[0]) / max(len(steps) - 1, 1) / 2 or 0.5  # each logged step a column
    image = over_steps.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest",
                              extent=(steps[0] - half, steps[-1] + half, layers * experts - 0.5, -0.5))
    for layer in range(1, layers):
        over_steps.axhline(layer * experts - 0.5, color="white", linewidth=0.8)
    over_steps.set_yticks([layer * experts + (experts - 1) / 2 for layer in range(layers)],
                          [f"layer {layer}" for layer in range(layers)])
    over_steps.set_title(f"load over steps ({experts} experts per layer, top down)")
    over_steps.set_xlabel("step")
    fig.colorbar(image, ax=over_steps)
    try:
        drop_steps, dropped = load_expert_metrics(db_path, "dropped", run_id)
        for layer in range(dropped.shape[1]):
            drops.plot(drop_steps, dropped[:, layer].sum(-1), marker="o" if len(drop_steps) < 20 else None,
                       markersize=3, label=f"layer {layer}")
    except KeyError:
        pass
    if "dropped_fraction" in metrics:
        drops.plot(*metrics["dropped_fraction"], color="black", linewidth=0.8, label="dropped_fraction (all layers)")
    drops.set_title("dropped assignments over steps")
    drops.set_xlabel("step")
    drops.set_ylabel("fraction dropped")
    drops.grid(alpha=0.3)
    if drops.lines:
        drops.legend(fontsize=7)
    else:
        drops.text(0.5, 0.5, "no drop statistics", transform=drops.transAxes, ha="center", va="center",
                   fontsize=8, color="gray")
    fig.suptitle(f"{run_id}: experts")
    fig.tight_layout()
    fig.savefig(out, dpi=PLOT_DPI, metadata={"Software": None})
    plt.close(fig)
    return f"experts plot: wrote {out}"


def sql_table(paths: list[Path], sql: str) -> str:
    """`sql` over the runs' databases (`vishwam.train.metrics_db.query`), as an aligned text table."""
    from vishwam.train.metrics_db import query

    files = [path / "metrics.duckdb" if path.is_dir() else path for path in paths]
    columns, rows = query(files, sql)
    if not columns:
        return "(no result)"
    cells = [[str(c) for c in columns]] + [["NULL" if v is None else _fmt(v) if isinstance(v, float) else str(v)
                                            for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines + [f"({len(rows)} row{'s' if len(rows) != 1 else ''})"])


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


def _summary(path: Path, run_id: str | None) -> tuple[str, str, Path, Metrics, Path]:
    """(text, run id, run directory, metrics, database) of one run (`run_id=None`: the latest in the file)."""
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
    return "\n".join(lines), run["run_id"], run_dir, metrics, db_path


def report(path: Path, run_id: str | None = None, plot_to: Path | None = None,
           plot: bool = True) -> str:
    """The summary text of one run (`run_id=None`: the latest in the file), writing its picture."""
    return compare([path], run_id, plot_to, plot)


def compare(paths: list[Path], run_id: str | None = None, plot_to: Path | None = None,
            plot: bool = True) -> str:
    """The summaries of several runs, one after the other, and one picture overlaying them.

    The picture goes to `plot_to`, by default `<run dir>/loss.png` for one run and
    `<first run's parent>/loss-<a>-vs-<b>.png` for several; each run with expert statistics
    also gets `<run dir>/experts.png` (`plot_experts`).
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
    lines = [plot_runs([(s[1], s[3]) for s in summaries], plot_to)]
    for _, name, run_dir, metrics, db_path in summaries:
        lines.append(plot_experts(db_path, name, metrics, run_dir / "experts.png"))
    return text + "\n" + "\n".join(line for line in lines if line is not None)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (`vishwam.cli`: 2 for a missing or unreadable run)."""
    return run_script(_main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="--sql: " + __doc__.split("`--sql` ")[1].split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, metavar="path",
                        help="run directory or metrics .duckdb file; several are compared")
    parser.add_argument("--run", dest="run_id", help="run id (default: the latest in the file)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: <run dir>/loss.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the picture")
    parser.add_argument("--sql", metavar="QUERY",
                        help="run QUERY over the paths' databases and print the result (see below)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.sql is not None:
        print(sql_table(args.paths, args.sql))
        return 0
    print(compare(args.paths, args.run_id, args.plot, plot=not args.no_plot))
    return 0


def entry() -> None:
    """The `vishwam-report` console command."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

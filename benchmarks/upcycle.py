"""Upcycled MoE vs the dense model it came from, trained on for the same tokens (loss curves, not timing).

Claim: a MoE upcycled from a dense checkpoint (`vishwam.upcycle`: experts copy the MLPs, the
dense function at the start) starts at the dense model's loss and, trained on for the same
tokens with the same schedule, ends at a lower loss than the dense model continued alone.

Three runs of the main train command (`vishwam.commands.train`, the README's main job) on the
built-in corpus, in one process:
1. `dense`: the `small` preset made dense (`num_experts=1`), `--dense-steps` steps from scratch;
2. `dense-continued`: `--init-from` the dense run's pipeline, `--steps` more steps;
3. `upcycled`: `vishwam-upcycle` of the same pipeline (`--experts`, `--top-k`), then
   `--init-from` it for the same `--steps` with the same schedule, data order and seed.
Prints each run's validation losses, writes `upcycle.png` (train and validation loss over
tokens seen, both continuations from the dense run's end) and a markdown table.

    python benchmarks/upcycle.py                                   # dense 150 + 150 steps, 4 experts top-2
    python benchmarks/upcycle.py --preset tiny --dense-steps 4 --steps 4 --runs /tmp/up   # smoke
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = Path(__file__).resolve().parent


def _train(run_dir: Path, *args: str) -> None:
    from vishwam.commands import train

    code = train.main([*args, "--run-dir", str(run_dir), "--no-progress", "--new"])
    if code != 0:
        sys.exit(f"benchmark: training {run_dir.name} failed with exit code {code}")


def _curves(run_dir: Path) -> dict:
    from vishwam.train import load_metrics

    metrics = load_metrics(run_dir / "metrics.duckdb", names=["ce", "val_loss"])
    return {name: (steps.tolist(), values.tolist()) for name, (steps, values) in metrics.items()}


def _plot(curves: dict, tokens_per_step: int, dense_steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    colours = {"dense": "black", "dense-continued": "tab:blue", "upcycled": "tab:red"}
    for name, curve in curves.items():
        offset = 0 if name == "dense" else dense_steps
        for ax, metric in zip(axes, ("ce", "val_loss")):
            steps, values = curve[metric]
            ax.plot([(s + offset) * tokens_per_step / 1e3 for s in steps], values, label=name, color=colours[name],
                    marker="o" if metric == "val_loss" else None, markersize=3, linewidth=1)
    for ax, title in zip(axes, ("train cross-entropy", "validation loss")):
        ax.axvline(dense_steps * tokens_per_step / 1e3, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("thousand tokens seen")
        ax.set_title(title)
        ax.legend()
    # The continuations' difference: the two curves above lie almost on top of each other.
    ax = axes[2]
    for metric, window, style in (("ce", 10, "-"), ("val_loss", 1, "o-")):
        steps, upcycled = (np.asarray(v) for v in curves["upcycled"][metric])
        difference = upcycled - np.asarray(curves["dense-continued"][metric][1])
        if window > 1:  # a moving mean over `window` steps
            difference = np.convolve(difference, np.ones(window) / window, mode="valid")
            steps = steps[window - 1:]
        ax.plot((steps + dense_steps) * tokens_per_step / 1e3, difference, style, markersize=3, linewidth=1,
                label=f"{'train CE, mean of 10 steps' if metric == 'ce' else 'validation loss'}")
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set_xlabel("thousand tokens seen")
    ax.set_title("upcycled minus dense-continued")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dense-steps", type=int, default=150, help="steps of the dense run from scratch")
    parser.add_argument("--steps", type=int, default=150, help="steps of each continuation")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the dense run")
    parser.add_argument("--continue-lr", type=float, default=1e-3, help="peak learning rate of both continuations")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--runs", type=Path, default=Path("runs/upcycle-benchmark"))
    parser.add_argument("--png", type=Path, default=HERE / "upcycle.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the picture from the runs in --runs")
    args = parser.parse_args()

    from vishwam.compile_cache import enable_compile_cache

    enable_compile_cache()
    common = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--eval-every", str(args.eval_every),
              "--checkpoint-every", str(10 ** 6)]
    began = time.perf_counter()
    runs = {name: (args.runs / name).absolute() for name in ("dense", "dense-continued", "upcycled")}
    if not args.replot:
        _train_all(args, runs, common)
    wall = time.perf_counter() - began

    curves = {name: _curves(path) for name, path in runs.items()}
    tokens_per_step = args.batch * args.seq_len
    _plot(curves, tokens_per_step, args.dense_steps, args.png)
    print(json.dumps({"wall_s": round(wall), "load_average": os.getloadavg(), "curves": curves}))
    print("\n| run | steps | validation loss (step: value) |\n|---|---|---|")
    for name, curve in curves.items():
        steps, values = curve["val_loss"]
        shown = ", ".join(f"{s}: {v:.4f}" for s, v in zip(steps, values))
        print(f"| {name} | {args.dense_steps if name == 'dense' else args.steps} | {shown} |")
    print(f"\npicture: {args.png}; {wall:.0f} s in all")


def _train_all(args, runs: dict, common: list) -> None:
    from vishwam.commands import upcycle as upcycle_command

    _train(runs["dense"], "--preset", args.preset, "--set", "num_experts=1", "--set", "experts_per_token=1",
           "--steps", str(args.dense_steps), "--lr", str(args.lr), *common)
    moe_dir = args.runs.absolute() / "upcycled-pipeline"
    code = upcycle_command.main([str(runs["dense"] / "pipeline"), str(moe_dir), "--experts", str(args.experts),
                                 "--top-k", str(args.top_k), "--verify", "--overwrite"])
    if code != 0:
        sys.exit(f"benchmark: upcycling failed with exit code {code}")
    # The same schedule, data order and seed for both continuations (a new seed: another order than phase 1).
    phase_two = ["--steps", str(args.steps), "--lr", str(args.continue_lr), "--seed", "1", *common]
    _train(runs["dense-continued"], "--init-from", str(runs["dense"] / "pipeline"), *phase_two)
    _train(runs["upcycled"], "--init-from", str(moe_dir), *phase_two)


if __name__ == "__main__":
    main()

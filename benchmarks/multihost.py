"""Step time of 2 processes x 4 CPU devices vs 1 process x 8 devices, the same mesh.

The same `scripts/train.py` job (preset `--preset`, mesh `data=2,expert=4`) runs once as one
process holding 8 simulated CPU devices and once as two processes of 4 (`python -m
vishwam.launch -n 2 --cpu-devices 4`), which exchange activations and gradients through
gloo over 127.0.0.1 instead of in-process copies. The figure is the cost of those
cross-process collectives on one machine (both runs share the same cores): an overhead,
not a speed-up claim. Step time is the median `step_time` metric of the steps after the
first `--skip` (compilation), read from the run's DuckDB. Runs alternate `--pairs` times.

    python benchmarks/multihost.py [--preset tiny --steps 30 --batch 16 --seq-len 128 --pairs 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="first steps left out (compilation, warm-up)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--pairs", type=int, default=2)
    args = p.parse_args()

    from vishwam.data import default_corpus
    from vishwam.tokenizer import VishwamAITokenizer
    from vishwam.train import load_metrics

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    results: dict[str, list[float]] = {"1 x 8": [], "2 x 4": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        documents = default_corpus()
        with open(tmp / "corpus.jsonl", "w") as f:
            for doc in documents:
                f.write(json.dumps({"text": doc}) + "\n")
        VishwamAITokenizer.train(documents, tmp / "tok" / "tokenizer.model", vocab_size=1024,
                                 hard_vocab_limit=False).save_pretrained(tmp / "tokenizer")
        for pair in range(args.pairs):
            for name in results:
                run = f"{name.replace(' ', '')}-{pair}"
                train = [str(ROOT / "scripts" / "train.py"), "--preset", args.preset, "--tokenizer",
                         str(tmp / "tokenizer"), "--data", str(tmp / "corpus.jsonl"), "--steps", str(args.steps),
                         "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--eval-every", "0",
                         "--eval-batches", "1", "--checkpoint-every", "0", "--val-fraction", "0",
                         "--no-progress", "--mesh", "data=2,expert=4", "--runs", str(tmp / "runs"), "--name", run]
                if name == "1 x 8":
                    _run([sys.executable, *train],
                         {**env, "XLA_FLAGS": " ".join([*flags, "--xla_force_host_platform_device_count=8"])})
                else:
                    _run([sys.executable, "-m", "vishwam.launch", "-n", "2", "--cpu-devices", "4", "--", *train],
                         {**env, "XLA_FLAGS": " ".join(flags)})
                steps, times = load_metrics(tmp / "runs" / run / "metrics.duckdb", names=["step_time"])["step_time"]
                results[name].append(float(np.median(times[steps > args.skip])))
                print(f"pair {pair} {name}: median step {results[name][-1] * 1e3:.1f} ms "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    one, two = np.median(results["1 x 8"]), np.median(results["2 x 4"])
    print(f"\n{args.preset}, batch {args.batch} x {args.seq_len}, mesh data=2,expert=4: 1 process x 8 devices "
          f"{one * 1e3:.1f} ms/step, 2 processes x 4 devices {two * 1e3:.1f} ms/step: {two / one:.2f}x "
          f"(median of {args.pairs}; load {os.getloadavg()})")


if __name__ == "__main__":
    main()

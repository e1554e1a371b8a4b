"""XLA:CPU flags against the train step: does any flag make vishwam's CPU step faster?

    python benchmarks/xla_cpu_flags.py                   # in the `compare` venv (it reuses
    python benchmarks/xla_cpu_flags.py --shapes dense,mixtral --rounds 2   # vs_transformers.py)

Each flag set (`FLAG_SETS`, passed through `XLA_FLAGS`) trains the comparison shapes of
`benchmarks/vs_transformers.py` (`--train-one vishwam SHAPE`: the same weights, fp32,
AdamW, dropless MoE) in a fresh process: median step time of `--steps` steps after
the compile (with `vishwam.memory.keep_host_memory`, as `vs_transformers.py`'s timed
processes). Order per round: default, every flag set, default again; each flag set is
compared with the mean of the two default runs of its round, so drift of the machine's
load hits both sides. Other runnable tasks are sampled before each run; a ratio is
marked unreliable when they exceed 0.5 x cores.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vs_transformers import background_load  # noqa: E402

FLAG_SETS = {
    "default": "",
    # XLA:CPU's library fusions: YNNPACK (on by default for some dots in jax 0.10), XNNPACK,
    # oneDNN; "individual_dot" hands every dot to the library, "dot,eltwise,reduce" also
    # fuses the elementwise and reduction work around it.
    "ynn individual_dot": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "ynn dot,eltwise,reduce": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "xnn individual_dot": "--xla_cpu_experimental_xnn_fusion_type=individual_dot",
    "onednn individual_dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=individual_dot",
    "onednn dot + ynn eltwise,reduce": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type="
                                        "individual_dot --xla_cpu_experimental_ynn_fusion_type=eltwise,reduce"),
    # Numerics-changing (not safe to set from a library): recorded to see what it is worth.
    "fast math": "--xla_cpu_enable_fast_math=true",
    "512-bit vectors": "--xla_cpu_prefer_vector_width=512",
}


def run(shape: str, flags: str, steps: int) -> tuple[float, float]:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", VISHWAM_BENCH_MALLOC="keep")
    script = Path(__file__).parent / "vs_transformers.py"
    others = background_load()
    out = subprocess.run([sys.executable, str(script), "--train-one", "vishwam", shape, "--steps", str(steps)],
                         capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return statistics.median(result["step_s"]), others


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="dense", help="vs_transformers TRAIN_SHAPES, comma-separated")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default=None,
                        help="FLAG_SETS names separated by ';' (names hold commas; default: all)")
    args = parser.parse_args()
    names = [n for n in FLAG_SETS if n != "default" and (args.only is None or n in args.only.split(";"))]
    cores = os.cpu_count() or 1
    for shape in args.shapes.split(","):
        ratios = {n: [] for n in names}
        worst = 0.0
        for rnd in range(args.rounds):
            base_a, load = run(shape, "", args.steps)
            worst = max(worst, load)
            times = {}
            for name in names:
                times[name], load = run(shape, FLAG_SETS[name], args.steps)
                worst = max(worst, load)
                print(f"  {shape} round {rnd + 1} {name:>24}: {times[name]:.3f} s/step (other runnable tasks "
                      f"{load:.2f})", flush=True)
            base_b, load = run(shape, "", args.steps)
            worst = max(worst, load)
            base = (base_a + base_b) / 2
            print(f"  {shape} round {rnd + 1} {'default':>24}: {base_a:.3f} and {base_b:.3f} s/step", flush=True)
            for name in names:
                ratios[name].append(base / times[name])
        reliable = worst <= 0.5 * cores
        for name in names:
            print(f"{shape} {name}: speed {statistics.median(ratios[name]):.3f}x default"
                  f"{'' if reliable else ' (unreliable: machine loaded)'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile time of a MoE train step (forward + backward + AdamW) against the expert count.

    python benchmarks/moe_compile.py [--experts 8 64 256] [--repeats 2] [--expert-parallel]

A fine-grained shape (hidden 256, 2 layers, top-8 of experts with FFN 128, dropless
`grouped` dispatch, batch 2 x 128) through `vishwam.train.make_train_step`; for each
expert count: seconds to trace and lower (`step.lower`) and to compile (`.compile()`),
the persistent compilation cache off, best of `--repeats` (a fresh step each time);
then the median time of `--steps` compiled steps. The grouped kernel's loops must not
grow with the expert count: the goal is a 256-expert / 8-expert compile ratio well
under the 32x a per-expert loop costs.
With `--expert-parallel` the step runs on 8 simulated CPU devices under a mesh with
`expert=8` (all-to-all dispatch, capacity factor 1.25; batch 8 x 128 so that every
device has tokens): this measures the program's size, not parallel speed.
Compare two trees by running this script under each `PYTHONPATH`, alternately, on a
quiet machine; the load average is printed before and after.
"""

import os
import sys

if "--expert-parallel" in sys.argv:  # before jax starts its backend
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vishwam import ModelConfig, VishwamAI  # noqa: E402
from vishwam.config import TrainConfig  # noqa: E402
from vishwam.parallel import make_mesh, shard_batch, shard_model  # noqa: E402
from vishwam.train import init_train_state, make_train_step  # noqa: E402


def load_average() -> str:
    return f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores"


def config_for(experts: int, mesh) -> ModelConfig:
    return ModelConfig(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_dim=128, num_experts=experts, experts_per_token=8, max_seq_len=128,
                       attention_block_size=64, capacity_factor=None if mesh is None else 1.25,
                       moe_dispatch="grouped")


def on_mesh(mesh):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def setup(experts: int, batch: int, seq: int, mesh):
    """A fresh train step, its state and a batch of random tokens (placed on `mesh` if any)."""
    config = config_for(experts, mesh)
    train_config = TrainConfig(batch_size=batch, warmup_steps=1, total_steps=10)
    state = init_train_state(VishwamAI(config, key=jax.random.key(0)), train_config, key=jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (batch, seq + 1), 0, config.vocab_size)
    data = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((batch, seq), jnp.float32)}
    if mesh is not None:
        state, data = shard_model(state, mesh), shard_batch(data, mesh)
    return make_train_step(config, train_config), state, data


def compile_seconds(experts: int, batch: int, seq: int, mesh) -> tuple[float, float]:
    """(trace + lower, compile) seconds of one fresh train step."""
    step, state, data = setup(experts, batch, seq, mesh)
    with on_mesh(mesh):
        start = time.perf_counter()
        lowered = step.lower(state, data)
        traced = time.perf_counter()
        lowered.compile()
    return traced - start, time.perf_counter() - traced


def step_seconds(experts: int, batch: int, seq: int, mesh, steps: int) -> float:
    """Median seconds of a compiled train step (after one warm-up call)."""
    step, state, data = setup(experts, batch, seq, mesh)
    times = []
    with on_mesh(mesh):
        for _ in range(steps + 1):  # the first call compiles
            start = time.perf_counter()
            state, metrics = step(state, data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 2, 8 with EP)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per expert count (0: none)")
    parser.add_argument("--expert-parallel", action="store_true", help="mesh expert=8 on 8 simulated devices")
    args = parser.parse_args()
    mesh = make_mesh(expert=8) if args.expert_parallel else None
    batch = args.batch or (2 if mesh is None else 8)
    jax.config.update("jax_enable_compilation_cache", False)
    import vishwam

    print(f"jax {jax.__version__} on {platform.machine()}, {jax.default_backend()}; vishwam from "
          f"{os.path.dirname(vishwam.__file__)}; {'one device' if mesh is None else 'mesh expert=8'}, "
          f"batch {batch} x {args.seq}")
    print(f"load before: {load_average()}")
    print("| experts | trace+lower (s) | compile (s) | total (s) | total vs first | step (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    first = None
    for experts in args.experts:
        runs = [compile_seconds(experts, batch, args.seq, mesh) for _ in range(args.repeats)]
        lower, compile_ = min(runs, key=sum)
        total = lower + compile_
        first = total if first is None else first
        step = f"{step_seconds(experts, batch, args.seq, mesh, args.steps) * 1e3:.1f}" if args.steps else "-"
        print(f"| {experts} | {lower:.2f} | {compile_:.2f} | {total:.2f} | {total / first:.2f} | {step} |",
              flush=True)
    print(f"load after: {load_average()}")


if __name__ == "__main__":
    main()

"""Runner overhead: steps/s of `VishwamAITrainer` (DuckDB metrics every step, progress bar,
async orbax checkpoints) against a bare loop over the same jitted step, in one process.

    python benchmarks/runner_overhead.py                      # small preset, batch 8 x 128, 20 steps x 2 rounds
    python benchmarks/runner_overhead.py --preset tiny --steps 200 --checkpoint-every 50

Both loops use the same step function (`make_train_step`), the same prefetching data
iterator over the built-in corpus and start from the same state. Compilation is
excluded from both: the bare loop runs one warm-up step first; the runner is timed
from the end of its first step to the end of its last (its `step` events), so the
checkpoints it writes on the way (every `--checkpoint-every` steps) and its metric
flushes count, the final checkpoint after the last step does not. The two are run
alternately (bare, runner, bare, ...), each runner against the mean of the bare
loops around it, so that a drifting machine load cancels to first order. Reported
twice: steps per second of wall time (the goal), and per second of this process's
CPU time (all threads), which a load shared with other jobs disturbs much less.
Goal: runner / bare >= 0.97 (wall time).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from vishwam.compile_cache import enable_compile_cache

    enable_compile_cache()

    from vishwam.config import ModelConfig, TrainConfig
    from vishwam.data import default_corpus, make_datasets
    from vishwam.model import VishwamAI
    from vishwam.pipeline import VishwamAIPipeline
    from vishwam.tokenizer import VishwamAITokenizer
    from vishwam.train.step import init_train_state, make_train_step
    from vishwam.train.trainer import RunConfig, VishwamAITrainer

    scratch = Path(tempfile.mkdtemp(prefix="runner-overhead-"))
    preset = ModelConfig.preset(args.preset)
    tokenizer = VishwamAITokenizer.train(default_corpus(), scratch / "tok" / "tokenizer.model",
                                         vocab_size=max(preset.vocab_size, 512), hard_vocab_limit=False,
                                         input_kind="documents")
    config = preset.replace(vocab_size=tokenizer.vocab_size)
    steps = args.steps + 1  # + the compile step, not timed
    train_config = TrainConfig(batch_size=args.batch, seq_len=args.seq_len, total_steps=steps, warmup_steps=1)
    model = VishwamAI(config, key=jax.random.key(0))

    def loader():
        train, _ = make_datasets(tokenizer, None, seq_len=args.seq_len, batch_size=args.batch, val_fraction=0.0,
                                 cache_dir=scratch / "cache")
        return train

    step = make_train_step(config, train_config)

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def rates(start, end) -> tuple[float, float]:
        """Steps per second of wall time, and per second of this process's CPU time (all threads)."""
        return args.steps / (end[0] - start[0]), args.steps / (end[1] - start[1])
    device = jax.devices()[0]

    def bare() -> float:
        data = loader()
        state = init_train_state(jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, model),
                                 train_config, key=jax.random.key(1))
        state, metrics = step(state, jax.device_put(next(data), device))
        jax.block_until_ready(metrics)
        start = clocks()
        for _ in range(args.steps):
            state, metrics = step(state, jax.device_put(next(data), device))
        jax.block_until_ready((state, metrics))
        end = clocks()
        data.close()
        return rates(start, end)

    def runner(index: int) -> float:
        data = loader()
        marks = {}

        def on_event(kind, step_number, detail):
            if kind == "step" and step_number in (1, steps):
                marks[step_number] = clocks()

        run = RunConfig(run_dir=str(scratch / f"run{index}"), eval_every=0, checkpoint_every=args.checkpoint_every,
                        export_pipeline=False, handle_signals=False)
        pipeline = VishwamAIPipeline(model, tokenizer)
        VishwamAITrainer(pipeline, train_config, data, None, run=run, callbacks=[on_event]).train()
        data.close()
        return rates(marks[1], marks[steps])

    print(f"{args.preset} preset, batch {args.batch} x {args.seq_len}, {args.steps} timed steps, checkpoint every "
          f"{args.checkpoint_every}, metrics every step; {jax.devices()[0].device_kind}", flush=True)
    # bare, runner, bare, runner, ..., bare: each runner is compared with the mean of the
    # bare loops just before and after it, which cancels a load that drifts linearly.
    bare_rates = [bare()]
    wall, cpu = [], []
    for index in range(args.rounds):
        r = runner(index)
        bare_rates.append(bare())
        before, after = bare_rates[-2], bare_rates[-1]
        wall.append(r[0] / ((before[0] + after[0]) / 2))
        cpu.append(r[1] / ((before[1] + after[1]) / 2))
        print(f"round {index}: wall steps/s bare {before[0]:.3f} / {after[0]:.3f}, runner {r[0]:.3f} -> "
              f"{wall[-1]:.3f}; per CPU-second bare {before[1]:.3f} / {after[1]:.3f}, runner {r[1]:.3f} -> "
              f"{cpu[-1]:.3f}", flush=True)
    ratio = statistics.median(wall)
    print(f"runner / bare, wall time: {ratio:.3f} (median of {', '.join(f'{x:.3f}' for x in wall)}); "
          f"goal >= 0.97: {'met' if ratio >= 0.97 else 'NOT met'}")
    print(f"runner / bare, process CPU time: {statistics.median(cpu):.3f} "
          f"(median of {', '.join(f'{x:.3f}' for x in cpu)})")

if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of a distillation train step: full logits against the chunked KL.

    python benchmarks/distill_memory.py [--vocab 131072] [--batch 1] [--seq 512] [--hidden 256] [--chunk 128]

One distillation step (`make_train_step(..., teacher=...)`: student forward and backward,
teacher forward, AdamW update) is compiled three ways: `full` (`loss_chunk_size=None`:
`[batch, seq, vocab]` student and teacher logits, the only path distillation had before the
chunked KL), `chunked` (`loss_chunk_size=--chunk`, a `VishwamAI` teacher: its final hidden
states and head enter the chunk scan) and `chunked, logits teacher` (the same student, a
teacher that only returns logits, whose `[batch, seq, vocab]` logits remain). For each: XLA's
`memory_analysis()` of the compiled step (temporaries, and the total with arguments and
outputs), then, in a fresh process each, the peak resident memory (`ru_maxrss`) of a
process that builds the models and runs two steps, and the step's loss (equal across
the three up to fp32 rounding).
"""

import argparse
import datetime
import json
import platform
import subprocess
import sys

import equinox as eqx
import jax

from vishwam import ModelConfig, VishwamAI
from vishwam.config import TrainConfig
from vishwam.memory import host_peak_rss_bytes, memory_stats
from vishwam.train.step import init_train_state, make_train_step

MIB = 2.0**20
VARIANTS = ("full", "chunked", "chunked, logits teacher")


class LogitsOnlyTeacher(eqx.Module):
    """A teacher that returns logits only (no `features`): the fallback path."""

    model: VishwamAI

    def __call__(self, tokens, *, segment_ids=None, positions=None):
        return self.model(tokens, segment_ids=segment_ids, positions=positions, inference=True)


def build(args, variant: str):
    config = ModelConfig.preset("tiny", vocab_size=args.vocab, hidden_size=args.hidden, num_heads=4, num_kv_heads=2,
                                ffn_dim=2 * args.hidden, max_seq_len=args.seq, attention_block_size=128)
    train = TrainConfig(batch_size=args.batch, seq_len=args.seq, warmup_steps=0, total_steps=10,
                        distill_alpha=0.5, distill_temperature=2.0,
                        loss_chunk_size=None if variant == "full" else args.chunk)
    teacher = VishwamAI(config, key=jax.random.key(1))
    if variant == "chunked, logits teacher":
        teacher = LogitsOnlyTeacher(teacher)
    state = init_train_state(VishwamAI(config, key=jax.random.key(0)), train, key=jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(3), (args.batch, args.seq), 0, args.vocab)
    batch = {"tokens": tokens, "targets": jax.numpy.roll(tokens, -1, axis=1),
             "loss_mask": jax.numpy.ones((args.batch, args.seq), jax.numpy.float32)}
    return make_train_step(config, train, teacher=teacher), state, batch


def run_one(args) -> dict:
    """In a child process: compile, run two steps, report memory."""
    step, state, batch = build(args, args.variant)
    stats = memory_stats(step.lower(state, batch).compile())
    for _ in range(2):
        state, metrics = step(state, batch)
    return {"temp": stats["temp_size_in_bytes"], "total": stats["total_size_in_bytes"],
            "peak_rss": host_peak_rss_bytes(), "loss": float(metrics["loss"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_one(args)))
        return
    print(f"# distillation step memory: student = teacher = 2 layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"batch {args.batch} x seq {args.seq}, chunk {args.chunk}")
    print(f"# {jax.default_backend()} ({jax.devices()[0].device_kind}), {platform.node()}, "
          f"{datetime.date.today()}, jax {jax.__version__}")
    logits_mib = args.batch * args.seq * args.vocab * 4 / MIB
    print(f"# one [batch, seq, vocab] fp32 logits array: {logits_mib:.0f} MiB")
    print("| variant | temp MiB | total MiB (args + out + temp) | peak RSS MiB | loss |")
    print("|---|---|---|---|---|")
    forwarded = [f"--{name}={getattr(args, name)}" for name in ("vocab", "batch", "seq", "hidden", "chunk")]
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, *forwarded, "--variant", variant],
                               capture_output=True, text=True, check=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"| {variant} | {r['temp'] / MIB:.1f} | {r['total'] / MIB:.1f} | {r['peak_rss'] / MIB:.0f} "
              f"| {r['loss']:.5f} |")


if __name__ == "__main__":
    main()

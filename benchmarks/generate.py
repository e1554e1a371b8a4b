"""KV-cache generation vs recomputing the full sequence every step.

Measures, for the `small` preset (MoE, 4 layers, hidden 256, vocab 4096) with
`max_seq_len` raised to fit the longest run:

1. decode tokens/s of `generate` (KV cache, one compiled while-loop) and of
   `generate_without_cache` (full forward over the `[batch, prompt + new]` buffer each
   step), at 128 and 512 new tokens; goal: cache >= 10x recompute at 512.
2. per-token decode time late vs early (goal: ratio <= 1.3): one decode step (the
   jitted step of `generate_stream`, cache donated) at position prompt+4 vs
   prompt+508, alternated on the same cache; then one streamed sequence, median of
   its last 32 steps / median of steps 1-32; and the per-token time of the whole
   loop at 512 vs 128 new tokens (a 4x longer cache).
3. prefill tokens/s (`generate` with one new token) against the plain forward pass
   over the same tokens.

Every timing is the median of `--repeats` runs after a compile-and-warm-up call,
except the recompute baseline: one run after its warm-up (at 512 new tokens one
run takes about a minute on a 2-core CPU).
Run: `python benchmarks/generate.py [--batch 1] [--prompt 16] [--repeats 3]`.
Against transformers' `model.generate` (same weights, alternated processes):
`python benchmarks/vs_transformers.py --skip-numerics --skip-train --generate` (its own venv).
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from vishwam import ModelConfig, VishwamAI

# The jitted pieces of `generate_stream`, to time single steps at chosen positions.
from vishwam.generation import (
    _prepare,
    _stream_first,
    _stream_fixed,
    _stream_step,
    generate,
    generate_stream,
    generate_without_cache,
)


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up (a whole run: the compile is tied to the length)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_steps(model, prompt, new: int, early: int, late: int, pairs: int = 100) -> tuple[float, float]:
    """Median time of one decode step at position `early` and at `late`, alternating the two
    on one cache of `prompt + new - 1` slots, so that load drift hits both alike."""
    dynamic, _ = _prepare(model, prompt, new, None, 0.0, None, None, None, None, 0, "benchmark")
    sampling = dict(greedy=True, top_k=None, use_top_p=False)
    layers = model.decode_layers()
    token, cache = _stream_first(model, layers, dynamic["prompt"], dynamic["lengths"], dynamic["temperature"],
                                 dynamic["top_p"], dynamic["key"], cache_len=prompt.shape[1] + new - 1, **sampling)
    leaves, treedef = _stream_fixed(model, layers, dynamic["temperature"], dynamic["top_p"], dynamic["key"])
    step = _stream_step(treedef, **sampling)
    times = {early: [], late: []}
    for _ in range(pairs + 2):  # the first pair compiles and warms up
        for position in (early, late):
            start = time.perf_counter()
            # Step t feeds its token at `lengths + t - 1`; every row's length is the prompt width.
            token, cache = step(leaves, cache, token, dynamic["lengths"], np.int32(position - prompt.shape[1] + 1))
            jax.block_until_ready(token)
            times[position].append(time.perf_counter() - start)
    return statistics.median(times[early][2:]), statistics.median(times[late][2:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per row (decode runs)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens per row (prefill run)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    lengths = (128, 512)
    max_len = max(args.prompt + max(lengths), args.prefill + 1)
    config = ModelConfig.preset(args.preset, max_seq_len=max_len)
    model = VishwamAI(config, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, config.vocab_size, (args.batch, args.prompt), dtype=np.int32)
    print(f"device: {jax.devices()[0].device_kind}; preset {args.preset} (max_seq_len={max_len}), batch {args.batch}, "
          f"prompt {args.prompt}, median of {args.repeats}")

    print("\n1. decode throughput (greedy, no EOS: every row generates all tokens)")
    per_token = {}
    for new in lengths:
        cached = timed(lambda n=new: generate(model, prompt, n, temperature=0.0), args.repeats)
        recompute = timed(lambda n=new: generate_without_cache(model, prompt, n, temperature=0.0), 1)
        per_token[new] = cached / new
        tokens = args.batch * new
        print(f"   {new:4d} new tokens: cache {tokens / cached:9.1f} tok/s, recompute {tokens / recompute:8.1f} tok/s, "
              f"speed-up {recompute / cached:6.1f}x (goal >= 10x at 512)")

    print("\n2. per-token decode time, late vs early")
    new = max(lengths)
    near, far = interleaved_steps(model, prompt, new, args.prompt + 4, args.prompt + new - 4)
    print(f"   single steps, alternated (same cache): position {args.prompt + 4} {near * 1e3:.3f} ms, position "
          f"{args.prompt + new - 4} {far * 1e3:.3f} ms, ratio {far / near:.2f} (goal <= 1.3)")
    rounds = []
    for _ in range(args.repeats + 1):  # the first round compiles
        stamps = [time.perf_counter()]
        for _tokens, _active in generate_stream(model, prompt, new, temperature=0.0):
            stamps.append(time.perf_counter())
        rounds.append(np.diff(stamps))
    steps = np.median(np.stack(rounds[1:]), axis=0)  # steps[t]: time to produce token t
    # Medians: on a shared machine single steps catch stalls from other jobs.
    early, late = np.median(steps[1:33]), np.median(steps[-32:])
    print(f"   one streamed sequence of {new}: steps 1-32 {early * 1e3:.3f} ms/token (median), last 32 "
          f"{late * 1e3:.3f} ms/token, ratio {late / early:.2f} (includes drift of the machine's load over the run)")
    print(f"   whole loop: {per_token[512] * 1e3:.3f} ms/token at 512 new tokens vs {per_token[128] * 1e3:.3f} at 128, "
          f"ratio {per_token[512] / per_token[128]:.2f}")

    print("\n3. prefill")
    long_prompt = rng.integers(4, config.vocab_size, (args.batch, args.prefill), dtype=np.int32)
    prefill = timed(lambda: generate(model, long_prompt, 1, temperature=0.0), args.repeats)
    forward = eqx.filter_jit(lambda m, t: m(t, inference=True)[0])
    plain = timed(lambda: forward(model, long_prompt), args.repeats)
    tokens = args.batch * args.prefill
    print(f"   {args.prefill} prompt tokens x {args.batch}: prefill {tokens / prefill:9.1f} tok/s, plain forward "
          f"{tokens / plain:9.1f} tok/s, ratio {prefill / plain:.2f} (prefill time / forward time)")


if __name__ == "__main__":
    main()

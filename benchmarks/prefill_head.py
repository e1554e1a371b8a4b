"""A prefill's LM head on each row's last prompt token (`vishwam.generation.prefill`) against the
head on every prompt position (`VishwamAI.decode`'s logits, then each row's last): compiled
temporaries and time, in one process, the two ways alternated.

    python benchmarks/prefill_head.py [--preset small] [--vocab 131072] [--batch 4] [--width 512] [--rounds 2]

Random weights of `--preset` at `--vocab` (the seed's vocabulary by default: there the head is the
largest product of a prefill and its `[batch, width, vocab]` fp32 output the largest array).
Prints each way's temporary bytes (XLA's memory analysis of the compiled prefill) and the best of
3 calls per round after a warm-up.
"""

import argparse
import time

from vishwam.cli import skip_absent_tpu

skip_absent_tpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from vishwam import ModelConfig, VishwamAI
    from vishwam.generation import prefill

    config = ModelConfig.preset(args.preset, vocab_size=args.vocab, max_seq_len=args.width)
    model = VishwamAI(config, key=jax.random.key(0))
    batch, width = args.batch, args.width
    tokens = jnp.ones((batch, width), jnp.int32)
    lengths = jnp.full((batch,), width, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))

    def every_position(m, t, n, c):
        logits, c = m.decode(t, positions, c)
        return logits[jnp.arange(batch), n - 1], c

    def last_token(m, t, n, c):
        return prefill(m, None, t, n, c)

    ways = {"head on every position": every_position, "head on the last token": last_token}
    compiled = {name: eqx.filter_jit(f) for name, f in ways.items()}
    best = {}
    for name, f in ways.items():
        cache = model.init_cache(batch, width)
        temp = eqx.filter_jit(f).lower(model, tokens, lengths, cache).compile().compiled.memory_analysis()
        print(f"{name}: compiled temporaries {temp.temp_size_in_bytes / 2**20:.0f} MiB", flush=True)
        jax.block_until_ready(compiled[name](model, tokens, lengths, cache))
    for _ in range(args.rounds):
        for name in ways:
            cache = model.init_cache(batch, width)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                jax.block_until_ready(compiled[name](model, tokens, lengths, cache))
                times.append(time.perf_counter() - start)
            best.setdefault(name, []).append(min(times))
            print(f"{name}: {1e3 * min(times):.0f} ms", flush=True)
    old, new = (min(best[name]) for name in ways)
    print(f"ratio (every position / last token): {old / new:.2f}x")


if __name__ == "__main__":
    main()

"""VishwamAITokenizer speed against raw SentencePiece, measured in the same process.

    python benchmarks/tokenizer.py [--vocab-size 4096] [--copies 3] [--rounds 7]

1. batch_encode throughput vs raw `SentencePieceProcessor.encode(list)` on the same unique
   lines (cache cold every round, and cache off).                         goal >= 0.9x
2. speed-up from the cache on a corpus of repeated lines (cold start, a whole pass),
   per-line `encode` and `batch_encode` in chunks, vs the same tokenizer with cache_size=0.
                                                                          goal >= 3x
3. decode tokens/s: batch_decode vs raw sp decode(list), a decode loop vs a raw sp loop.

Training text: the stdlib's pydoc_data topics (the default corpus source). Each figure is
the best of --rounds interleaved rounds, so that load from other jobs hits all sides alike;
"raw sp again" repeats the baseline to show the noise band of the machine.
"""

import argparse
import gc
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from pydoc_data.topics import topics

from vishwam.tokenizer import VishwamAITokenizer


def best_times(functions: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall time of each function over `rounds` interleaved rounds.

    As in `timeit`, the cyclic garbage collector is off while timing: otherwise whichever
    function happens to trigger a full collection of the big result lists pays for it.
    """
    best = {name: float("inf") for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                function()
                best[name] = min(best[name], time.perf_counter() - start)
            finally:
                gc.enable()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--copies", type=int, default=3, help="numbered copies of the corpus lines")
    parser.add_argument("--unique", type=int, default=2000, help="distinct lines of the repeated corpus")
    parser.add_argument("--repeats", type=int, default=10, help="mean occurrences of each of them")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    documents = [topics[name] for name in sorted(topics)]
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        tok = VishwamAITokenizer.train(documents, Path(scratch) / "bench.model", vocab_size=args.vocab_size)
        print(f"trained vocab_size={tok.vocab_size} in {time.perf_counter() - start:.2f} s")
        no_cache = VishwamAITokenizer(tok.model_path, cache_size=0)
    run(args, documents, tok, no_cache)


def run(
    args: argparse.Namespace, documents: list[str], tok: VishwamAITokenizer, no_cache: VishwamAITokenizer
) -> None:
    sp = tok._sp  # the raw processor the tokenizer wraps: the same model, the same threads

    lines = [line for document in documents for line in document.split("\n") if line.strip()]
    unique = [f"{copy}:{i} {line}" for copy in range(args.copies) for i, line in enumerate(lines)]
    chars = sum(map(len, unique))
    tokens = sum(map(len, sp.encode(unique)))
    print(f"corpus: {len(unique)} unique lines, {chars} characters, {tokens} tokens")

    # 1. batch encode vs raw sentencepiece.
    def cold_batch():
        tok.cache_clear()
        return tok.batch_encode(unique)

    assert cold_batch() == sp.encode(unique)
    t = best_times(
        {
            "raw sp encode(list)": lambda: sp.encode(unique),
            "batch_encode, cold cache": cold_batch,
            "batch_encode, cache off": lambda: no_cache.batch_encode(unique),
            "raw sp again (noise check)": lambda: sp.encode(unique),
        },
        args.rounds,
    )
    print("\n1. batch encode throughput (goal >= 0.9x raw)")
    for name, seconds in t.items():
        ratio = t["raw sp encode(list)"] / seconds
        print(f"   {name:26s} {tokens / seconds / 1e6:6.2f} M tokens/s  {ratio:5.2f}x raw")

    # 2. cache on repeated lines: Zipf-like draws from `unique` distinct lines.
    rng = random.Random(0)
    pool = unique[: args.unique]
    weights = [1 / (rank + 1) for rank in range(len(pool))]
    repeated = rng.choices(pool, weights=weights, k=args.unique * args.repeats)
    distinct = len(set(repeated))
    chunk = 1000

    def per_line(tokenizer):
        tokenizer.cache_clear()
        return [tokenizer.encode(line) for line in repeated]

    def chunked(tokenizer):
        tokenizer.cache_clear()
        chunks = (repeated[i : i + chunk] for i in range(0, len(repeated), chunk))
        return [ids for texts in chunks for ids in tokenizer.batch_encode(texts)]

    assert per_line(tok) == per_line(no_cache) == chunked(tok)
    t = best_times(
        {
            "encode loop, cache off": lambda: per_line(no_cache),
            "encode loop, cache on": lambda: per_line(tok),
            "batch_encode, cache off": lambda: chunked(no_cache),
            "batch_encode, cache on": lambda: chunked(tok),
        },
        args.rounds,
    )
    print(
        f"\n2. cache on {len(repeated)} lines drawn from {distinct} distinct ones "
        f"(cold start each pass; batches of {chunk}; goal >= 3x)"
    )
    for mode in ("encode loop", "batch_encode"):
        off, on = t[f"{mode}, cache off"], t[f"{mode}, cache on"]
        print(f"   {mode:13s} off {off * 1e3:8.1f} ms   on {on * 1e3:8.1f} ms   speed-up {off / on:5.2f}x")
    print(f"   cache_info after a pass: {tok.cache_info()}")

    # 3. decode.
    encoded = tok.batch_encode(unique)
    assert tok.batch_decode(encoded) == unique
    t = best_times(
        {
            "raw sp decode(list)": lambda: sp.decode(encoded),
            "batch_decode": lambda: tok.batch_decode(encoded),
            "raw sp decode loop": lambda: [sp.decode(ids) for ids in encoded],
            "decode loop": lambda: [tok.decode(ids) for ids in encoded],
            "raw sp again (noise check)": lambda: sp.decode(encoded),
        },
        args.rounds,
    )
    print("\n3. decode")
    for name, seconds in t.items():
        base = t["raw sp decode loop" if "loop" in name else "raw sp decode(list)"]
        print(f"   {name:26s} {tokens / seconds / 1e6:6.2f} M tokens/s  {base / seconds:5.2f}x raw")


if __name__ == "__main__":
    main()

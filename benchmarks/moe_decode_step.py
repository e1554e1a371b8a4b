"""One decode call of the serve engine on a MoE, by row count: each chosen expert on every row
against each expert on its own rows (`vishwam.nn.moe.split_all_rows`).

    python benchmarks/moe_decode_step.py [--rows 4 8 16 32] [--pairs 2]

The model is `benchmarks/serve.py`'s default (6 layers, hidden 512, 8 experts top-2 of FFN 1024,
8 heads / 2 kv heads, fp32, random weights, cache of 256 positions per row). For each row count:
`_step_slots` with 8 greedy steps, rows at positions 20-150, the median of 10 calls after 3
warm-ups, in a fresh process per way, the two ways alternated `--pairs` times. "all rows" forces
`split_all_rows` to always say yes (the rule before it), "own rows" to always say no; the library's
rule picks all rows while `rows * k <= experts`.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time


def child(rows: int, all_rows: bool) -> float:
    import jax
    import numpy as np

    import vishwam.nn.moe.dispatch as dispatch
    from vishwam import ModelConfig, VishwamAI
    from vishwam.generation import cached_decode_layers
    from vishwam.serve._engine import _step_slots

    dispatch.split_all_rows = lambda tokens, k, num_experts: all_rows
    from serve import SHAPES  # benchmarks/serve.py's default model

    config = ModelConfig.preset("small", vocab_size=2000, max_seq_len=256, **SHAPES["medium"])
    model = VishwamAI(config, key=jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten((model, cached_decode_layers(model)))
    steps = 8
    call = jax.jit(functools.partial(_step_slots, treedef=treedef, count=steps), donate_argnums=(1,))
    cache = model.init_cache(rows, 256)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, rows).astype(np.int32)
    positions = rng.integers(20, 150, rows).astype(np.int32)
    zeros, ones = np.zeros(rows, np.int32), np.ones(rows, np.float32)
    args = (tokens, positions, np.zeros(rows, np.uint32), zeros, np.zeros(rows, np.float32), zeros, ones)
    times = []
    for i in range(13):
        start = time.perf_counter()
        out, cache = call(leaves, cache, *args)
        jax.block_until_ready(out)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1] == "all")))
        return 0
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    for rows in args.rows:
        ms = {"all": [], "own": []}
        for _ in range(args.pairs):
            for way in ms:
                out = subprocess.run([sys.executable, __file__, "--child", str(rows), way], capture_output=True,
                                     text=True, check=True)
                ms[way].append(json.loads(out.stdout.strip().splitlines()[-1]))
        ratio = statistics.median(ms["own"]) / statistics.median(ms["all"])
        print(f"{rows:3d} rows: ms per decode step, all rows {[round(x, 2) for x in ms['all']]}, own rows "
              f"{[round(x, 2) for x in ms['own']]} (own / all {ratio:.2f}x)", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

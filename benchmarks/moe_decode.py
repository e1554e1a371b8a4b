"""KV-cache decoding of a MoE over split experts against stacked ones, by expert count.

    python benchmarks/moe_decode.py [--shapes 8:1024:2 64:128:8 256:64:8] [--pairs 2]

For each shape (experts : expert FFN : top-k; 4 layers, hidden 512, 8 heads / 4 kv heads,
fp32) `vishwam.generate` makes 64 greedy tokens after a 16-token prompt, with the decode
layers' experts split per expert (`split_experts`: one array each, a branch per expert in
the program) or kept stacked (the `grouped` dispatch's run-time loop), forced through
`vishwam.model.lm.SPLIT_EXPERTS_MAX`. Each measurement is a fresh process (so the first
call's time is the compile), the two ways alternated `--pairs` times: the compile + first
call, and the median of 5 warm calls. Prints stacked / split ratios; the library splits up
to `SPLIT_EXPERTS_MAX` experts.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(experts: int, ffn: int, k: int, split: bool) -> dict:
    import jax
    import numpy as np

    import vishwam.model.lm as lm
    from vishwam import ModelConfig, VishwamAI
    from vishwam.generation import generate

    lm.SPLIT_EXPERTS_MAX = experts if split else 0
    config = ModelConfig.preset("small", vocab_size=2000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
                                ffn_dim=1024, moe_ffn_dim=ffn, num_experts=experts, experts_per_token=k,
                                max_seq_len=256, capacity_factor=None)
    model = VishwamAI(config, key=jax.random.key(0))
    prompt = np.ones((1, 16), np.int32)
    start = time.perf_counter()
    jax.block_until_ready(generate(model, prompt, 64, temperature=0.0))
    first = time.perf_counter() - start
    warm = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(generate(model, prompt, 64, temperature=0.0))
        warm.append(time.perf_counter() - start)
    return {"first_s": first, "warm_ms": 1e3 * statistics.median(warm)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["8:1024:2", "64:128:8", "256:64:8"],
                   help="experts:expert_ffn:top_k per shape")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        experts, ffn, k, split = args.child
        print(json.dumps(child(int(experts), int(ffn), int(k), split == "split")))
        return 0
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    for shape in args.shapes:
        experts, ffn, k = (int(v) for v in shape.split(":"))
        runs = {"split": [], "stacked": []}
        for _ in range(args.pairs):
            for way in runs:
                out = subprocess.run([sys.executable, __file__, "--child", str(experts), str(ffn), str(k), way],
                                     capture_output=True, text=True, check=True)
                runs[way].append(json.loads(out.stdout.strip().splitlines()[-1]))
        first = {w: statistics.median(r["first_s"] for r in rs) for w, rs in runs.items()}
        warm = {w: statistics.median(r["warm_ms"] for r in rs) for w, rs in runs.items()}
        print(f"{experts:4d} experts top-{k} of FFN {ffn}: compile + first call split {first['split']:.1f} s, "
              f"stacked {first['stacked']:.1f} s ({first['stacked'] / first['split']:.2f}x); 64 tokens split "
              f"{warm['split']:.0f} ms, stacked {warm['stacked']:.0f} ms ({warm['stacked'] / warm['split']:.2f}x)",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `seed` preset and a Mixtral-8x7B-sized model compiled for NVIDIA GPU nodes on this CPU.

    python benchmarks/plan_gpu.py                          # everything below (about 20 min on 2 cores)
    python benchmarks/plan_gpu.py --only seed-h100         # one group

Needs JAX's CUDA plugin (`pip install -e ".[gpu-aot]"`), no GPU. For each topology `vishwam.plan.search_plans`
ranks meshes x remat x accum by the roofline estimate and compiles the best `--compile-top` with the real
XLA GPU compiler (per-GPU memory from its memory analysis, Triton flash attention inside). Memory figures
and compile times are measured here; step times and MFU are roofline ESTIMATES from published peaks and
NVLink / InfiniBand bandwidths (`vishwam.model.flops.CHIPS`), not GPU measurements. Batch: one
4096-token row per GPU (seed) and as stated for the Mixtral-sized model.
"""

import argparse
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from plan_seed import row  # noqa: E402

from vishwam import ModelConfig  # noqa: E402
from vishwam.config import TrainConfig  # noqa: E402
from vishwam.plan import search_plans, topology_devices  # noqa: E402

SEED = ModelConfig.preset("seed")
# Mixtral-8x7B's shapes (HF config.json: 32 layers, hidden 4096, 32 heads / 8 kv heads, 8 experts top-2 of
# FFN 14336, vocab 32000), trained like `seed` (fp32 master weights, bf16 compute, capacity 1.25, full remat).
MIXTRAL = ModelConfig.preset("seed", vocab_size=32000, num_kv_heads=8, ffn_dim=14336, rope_theta=1e6)
# (group, model, topologies, rows per GPU, compile_top)
GROUPS = (
    ("seed-h100", SEED, ("h100:16", "h100:32", "h100:64"), 1, 2),
    ("seed-h200", SEED, ("h200:8", "h200:16"), 1, 2),
    ("seed-b200", SEED, ("b200:8", "b200:16"), 1, 2),
    ("mixtral-h100", MIXTRAL, ("h100:8", "h100:16", "h100:32"), 1, 2),
    # MaxText's published Mixtral 8x7B run: 256 H200, 5 rows of 4096 per GPU; estimate only (no compile).
    ("mixtral-h200-256", MIXTRAL, ("h200:256",), 5, 0),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated groups: " + ",".join(g[0] for g in GROUPS))
    parser.add_argument("--json", help="also append one JSON line per plan to this file")
    args = parser.parse_args()
    wanted = None if args.only is None else set(args.only.split(","))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    for group, config, topologies, rows, compile_top in GROUPS:
        if wanted is not None and group not in wanted:
            continue
        print(f"\n{group}\n\n| topology | mesh | remat | accum | args GiB | temp GiB | total / HBM GiB | fits 0.8 | "
              "compile s | est. step s | est. MFU |\n|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|", flush=True)
        for topology in topologies:
            devices = topology_devices(topology)
            train = TrainConfig(batch_size=rows * len(devices), seq_len=4096, warmup_steps=0, total_steps=1000)
            plans = search_plans(config, train, topology, compile_top=compile_top, devices=devices)
            shown = [p for p in plans if p.compiled or p.error] or plans[:1]
            for p in shown:
                print(row(p) + (f" network: {','.join(p.network_axes)}" if p.network_axes else ""), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    for p in shown:
                        f.write(json.dumps({"group": group, **p.to_json()}, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

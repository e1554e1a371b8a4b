"""The `seed` preset's whole train step compiled for TPU pods on this CPU (libtpu's compiler).

    python benchmarks/plan_seed.py                      # v5p-64 at fsdp=8,expert=8, then a search per topology
    python benchmarks/plan_seed.py --only v5p:4x4x4 --no-search

For each topology: per-chip memory from XLA:TPU's memory analysis of the compiled step
(AdamW, fp32 master weights and moments, bf16 compute, capacity 1.25, full remat, one
4096-token row per chip), whether it fits in 0.8 x HBM, the compile time here, and the
roofline ESTIMATE of step time and MFU (`vishwam.plan.Plan`). Memory figures come from a
real compile; times and MFU are estimates, not TPU measurements.
"""

import argparse
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from vishwam import ModelConfig  # noqa: E402
from vishwam.config import TrainConfig  # noqa: E402
from vishwam.plan import plan, search_plans, tpu_devices  # noqa: E402

GIB = 2**30
# (topology, the mesh compiled first); `--search` then ranks meshes x remat x accum.
TOPOLOGIES = (("v5p:4x4x4", {"fsdp": 8, "expert": 8}), ("v5p:4x4x8", {"fsdp": 16, "expert": 8}),
              ("v6e:8x8", {"fsdp": 8, "expert": 8}))


def row(p) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1)
    if p.per_chip_bytes is None:
        return (f"| {p.topology} | {mesh} | {p.remat_policy} | {p.accum_steps} | not compiled"
                f"{' (' + p.error + ')' if p.error else ''} | | | | | {p.estimated_step_s:.2f} | "
                f"{p.estimated_mfu:.1%} |")
    b = p.per_chip_bytes
    return (f"| {p.topology} | {mesh} | {p.remat_policy} | {p.accum_steps} | {b['arguments'] / GIB:.1f} | "
            f"{b['temporaries'] / GIB:.1f} | {b['total'] / GIB:.1f} / {p.hbm_bytes / GIB:.1f} | "
            f"{'yes' if p.fits else 'NO'} | {p.compile_s:.0f} | {p.estimated_step_s:.2f} | {p.estimated_mfu:.1%} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated topologies (default: all three)")
    parser.add_argument("--no-search", action="store_true", help="only the first mesh of each topology")
    parser.add_argument("--compile-top", type=int, default=2)
    parser.add_argument("--json", help="also append one JSON line per plan to this file")
    args = parser.parse_args()
    wanted = None if args.only is None else set(args.only.split(","))
    config = ModelConfig.preset("seed")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    print("| topology | mesh | remat | accum | args GiB | temp GiB | total / HBM GiB | fits 0.8 | compile s | "
          "est. step s | est. MFU |\n|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|", flush=True)
    for topology, mesh in TOPOLOGIES:
        if wanted is not None and topology not in wanted:
            continue
        devices = tpu_devices(topology)
        train = TrainConfig(batch_size=len(devices), seq_len=config.max_seq_len, warmup_steps=0, total_steps=1000)
        plans = [plan(config, train, topology, mesh, devices=devices)]
        print(row(plans[0]), flush=True)
        if not args.no_search:
            for p in search_plans(config, train, topology, compile_top=args.compile_top, devices=devices):
                if p.compiled or p.error:  # what was compiled, and what failed to
                    print(row(p), flush=True)
                    plans.append(p)
        if args.json:
            with open(args.json, "a") as f:
                for p in plans:
                    f.write(json.dumps(p.to_json(), sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

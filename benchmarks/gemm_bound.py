"""The dense train step's matrix products alone, XLA:CPU (jax) vs torch, and the bound they set.

Issue 16 asks for a vishwam train step >= 1.2x the transformers/torch step at equal
shapes and fp32. Both steps do the same matrix products (the same model); a step can
be no faster than its own products. This script times every product of one training
step of the issue's dense shape (vocab 8192, hidden 512, 6 layers, 8 heads, ffn 1408,
batch 8 x 512), in both frameworks, in one process, alternating the framework for every
shape (torch with 2 threads; XLA:CPU as jax sets it up), and prints:

- each product's GFLOP/s in each framework (forward `X W`, and the backward's
  `dY W^T` and `X^T dY`, per linear layer; attention's batched `Q K^T` and `P V` and
  their backward products, full square; a causal kernel skips up to half of them);
- the sum over one step of the linear layers' products (each shape times its count per
  step): a floor under each framework's step time that no implementation of this model
  avoids;
- with `--torch-step`, the transformers step of the same shape timed in this process, and
  `torch.profiler`'s split of that step by operator (products vs the rest);
- the bound: vishwam's step >= its linear layers' products, so the goal needs
  `linear_products_jax <= torch_step / 1.2`; and a tighter one (an estimate) that adds half
  of attention's full-square products, the least a causal step computes, with the best
  ratio over the transformers step those products allow if every other op were free.

    JAX_PLATFORMS=cpu python benchmarks/gemm_bound.py --torch-step       # needs torch + transformers
    XLA_FLAGS="--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=individual_dot" \\
        JAX_PLATFORMS=cpu python benchmarks/gemm_bound.py                # XLA's oneDNN dots instead

Estimates: counted FLOPs (2 M K N per product); the times are measurements.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TOKENS, HIDDEN, FFN, VOCAB, LAYERS, HEADS, SEQ = 8 * 512, 512, 1408, 8192, 6, 8, 512
BATCH_HEADS, HEAD_DIM = 8 * HEADS, HIDDEN // HEADS


def products() -> list[tuple[str, tuple[int, ...], tuple[int, ...], int]]:
    """(name, lhs shape, rhs shape, count per step); lhs @ rhs, batched when 3-D."""
    out = []
    linears = [("attention q/k/v/o", HIDDEN, HIDDEN, 4 * LAYERS), ("mlp gate/up", HIDDEN, FFN, 2 * LAYERS),
               ("mlp down", FFN, HIDDEN, LAYERS), ("lm head", HIDDEN, VOCAB, 1)]
    for name, k, n, count in linears:
        out += [(f"{name} X W", (TOKENS, k), (k, n), count),
                (f"{name} dY W^T", (TOKENS, n), (n, k), count),
                (f"{name} X^T dY", (k, TOKENS), (TOKENS, n), count)]
    b, t, d = BATCH_HEADS, SEQ, HEAD_DIM
    out += [("attention Q K^T, dO V^T", (b, t, d), (b, d, t), 2 * LAYERS),
            ("attention P V, dS K, dS^T Q, P^T dO", (b, t, t), (b, t, d), 4 * LAYERS)]
    return out


def flops(lhs, rhs) -> float:
    batch = lhs[0] if len(lhs) == 3 else 1
    return 2.0 * batch * lhs[-2] * lhs[-1] * rhs[-1]


def time_calls(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--torch-step", action="store_true",
                        help="also time and profile the transformers step of this shape (3 steps)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(2)
    cpu = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "?")
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in cpu]
    print(f"machine: {model}, {os.cpu_count()} cores, ISA {isa}; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"load average before: {os.getloadavg()}")

    matmul = jax.jit(jnp.matmul)
    rng = np.random.default_rng(0)
    rows, totals, attention = [], {"jax": 0.0, "torch": 0.0}, {"jax": 0.0, "torch": 0.0}
    for index, (name, lhs_shape, rhs_shape, count) in enumerate(products()):
        lhs = rng.standard_normal(lhs_shape, dtype=np.float32)
        rhs = rng.standard_normal(rhs_shape, dtype=np.float32)
        jl, jr = jnp.asarray(lhs), jnp.asarray(rhs)
        tl, tr = torch.from_numpy(lhs), torch.from_numpy(rhs)
        runs = {"jax": lambda: matmul(jl, jr).block_until_ready(), "torch": lambda: torch.matmul(tl, tr)}
        order = ("jax", "torch") if index % 2 == 0 else ("torch", "jax")
        seconds = {framework: time_calls(runs[framework], args.reps) for framework in order}
        got = np.asarray(matmul(jl, jr))
        np.testing.assert_allclose(got, torch.matmul(tl, tr).numpy(), rtol=2e-3, atol=2e-2 * np.sqrt(lhs_shape[-1]))
        work = flops(lhs_shape, rhs_shape)
        for framework in totals:
            (attention if name.startswith("attention ") and len(lhs_shape) == 3 else totals)[framework] += \
                count * seconds[framework]
        rows.append((name, lhs_shape, rhs_shape, count, work, seconds))
        print(f"  {name:<38} {str(lhs_shape):>16} @ {str(rhs_shape):<16} x{count:<3} "
              f"jax {work / seconds['jax'] / 1e9:6.1f} GFLOP/s, torch {work / seconds['torch'] / 1e9:6.1f} GFLOP/s "
              f"(torch / jax time {seconds['torch'] / seconds['jax']:.2f})", flush=True)
    linear_flops = sum(count * work for _, lhs, _, count, work, _ in rows if len(lhs) == 2)
    attention_flops = sum(count * work for _, lhs, _, count, work, _ in rows if len(lhs) == 3)
    print(f"load average after: {os.getloadavg()}")
    print(f"\none step: linear layers' products {linear_flops / 1e9:.0f} GFLOP, attention's (full square) "
          f"{attention_flops / 1e9:.0f} GFLOP (counted)")
    for framework in totals:
        print(f"  {framework:>5}: linear products {totals[framework]:.2f} s per step "
              f"({linear_flops / totals[framework] / 1e9:.0f} GFLOP/s); attention products {attention[framework]:.2f} s")

    if not args.torch_step:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vs_transformers as vt

    family, dims, (batch, seq) = vt.TRAIN_SHAPES["dense"]
    hf_model = vt.build_hf(vt.tiny_config(family, **dims), seed=2)
    run = vt.torch_trainer(hf_model, 1e-4)
    data = np.random.default_rng(1).integers(0, dims["vocab_size"], (4, 2, batch, seq))
    run(*data[0])
    times = []
    for tokens, targets in data[1:]:
        start = time.perf_counter()
        run(tokens, targets)
        times.append(time.perf_counter() - start)
    torch_step = statistics.median(times)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(*data[0])
    by_op = {}
    for event in prof.key_averages():
        by_op[event.key] = by_op.get(event.key, 0.0) + event.self_cpu_time_total / 1e6
    traced = sum(by_op.values())
    gemm_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
    gemm = sum(v for k, v in by_op.items() if k in gemm_ops)
    print(f"\ntransformers dense step: {torch_step:.2f} s (median of 3) = {batch * seq / torch_step:,.0f} tok/s")
    print(f"torch.profiler, one step (self CPU time {traced:.2f} s, both threads' work):")
    for key, value in sorted(by_op.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {key:<48} {value:7.3f} s  {100 * value / traced:5.1f}%")
    print(f"  matrix products ({', '.join(gemm_ops)}): {gemm:.2f} s = {100 * gemm / traced:.0f}% of the traced time")
    need = torch_step / 1.2

    def verdict(products: float) -> str:
        return (f"{'reachable in principle' if products <= need else 'NOT reachable with these products'}"
                f" (products / allowed = {products / need:.2f}")

    print(f"\nbound: vishwam's step >= its linear layers' products = {totals['jax']:.2f} s; the goal (>= 1.2x) needs "
          f"<= {need:.2f} s: {verdict(totals['jax'])})")
    # A causal step also does at least the lower triangle of attention's products: half of the full
    # square (an estimate: it assumes the kernel's tiles run no faster than the full-square products).
    floor = totals["jax"] + 0.5 * attention["jax"]
    print(f"bound with causal attention (linear + half the full-square attention products, an estimate): "
          f"{floor:.2f} s against <= {need:.2f} s allowed: {verdict(floor)}; "
          f"the best ratio these products allow, every other op free: {torch_step / floor:.2f}x)")


if __name__ == "__main__":
    main()

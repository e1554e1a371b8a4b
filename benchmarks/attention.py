"""Attention implementations: time and compiled temporary memory.

CPU (always): `flash_attention(implementation="xla")` against the naive
`reference` and `jax.nn.dot_product_attention`, forward and forward+backward,
fp32, causal. Times are the minimum over interleaved rounds (the machine may be
shared); memory is `temp_size_in_bytes` of the compiled executable, which needs
no run, so it is reported up to long lengths.

GPU (when `jax.default_backend() == "gpu"`): `pallas` against
`jax.nn.dot_product_attention(implementation="cudnn")` and `"xla"`, bf16, causal,
head_dim 128, TFLOP/s forward and forward+backward.

Goals: at 8192, xla fwd+bwd temp memory <= 1/4 of the reference's; at
2048 causal fwd+bwd, xla time <= 0.7x the faster of reference and jax.nn; on an
H100, pallas >= 0.7x cuDNN.

Sliding window (`--window W`): only the window's band of tiles is visited,
so the blockwise path (xla on CPU, pallas on GPU) with a window `W` should take about
`(W + block) / (length / 2)` of its causal time. Reported instead of the tables above.

    python benchmarks/attention.py                      # CPU defaults, a few minutes
    python benchmarks/attention.py --time-lengths 512 1024 2048 4096 --rounds 5
    python benchmarks/attention.py --window 256 --time-lengths 2048 4096
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vishwam.kernels import flash_attention


def _inputs(batch, length, heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal((batch, length, heads, head_dim), np.float32)).astype(dtype) for _ in range(3)
    )


def _impls(block_size, backend):
    impls = {
        "xla": lambda q, k, v: flash_attention(q, k, v, block_size=block_size, causal=True, implementation="xla"),
        "reference": lambda q, k, v: flash_attention(q, k, v, causal=True, implementation="reference"),
        "jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
    }
    if backend == "gpu":
        impls = {
            "pallas": lambda q, k, v: flash_attention(q, k, v, block_size=block_size, causal=True, implementation="pallas"),
            "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
            "jax.nn xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
            "xla": impls["xla"],
        }
    return impls


def _programs(f):
    def fwd_bwd(q, k, v):
        return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    return {"fwd": jax.jit(f), "fwd+bwd": jax.jit(fwd_bwd)}


def _time(programs, args, rounds):
    """Min over `rounds` interleaved rounds of each program (after one warm-up call)."""
    for fn in programs.values():
        jax.block_until_ready(fn(*args))
    best = dict.fromkeys(programs, float("inf"))
    for _ in range(rounds):
        for name, fn in programs.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _temp_mib(fn, args):
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return fn.lower(*avals).compile().memory_analysis().temp_size_in_bytes / 2**20


def cpu(args):
    impls = _impls(args.block_size, "cpu")
    shape = f"batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, fp32, causal, xla block {args.block_size}"
    print(f"# CPU: {shape}")
    print("\n## time (s, min over rounds)\n")
    print("| length | pass | xla | reference | jax.nn | xla / min(ref, jax.nn) |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for length in args.time_lengths:
        qkv = _inputs(args.batch, length, args.heads, args.head_dim, jnp.float32)
        programs = {(n, p): fn for n, f in impls.items() for p, fn in _programs(f).items()}
        best = _time(programs, qkv, args.rounds)
        for p in ("fwd", "fwd+bwd"):
            x, r, n = best["xla", p], best["reference", p], best["jax.nn", p]
            ratios[length, p] = x / min(r, n)
            print(f"| {length} | {p} | {x:.4f} | {r:.4f} | {n:.4f} | {ratios[length, p]:.2f} |", flush=True)

    print("\n## compiled temporary memory (MiB)\n")
    print("| length | pass | xla | reference | jax.nn | xla / reference |")
    print("|---|---|---|---|---|---|")
    mem = {}
    for length in args.memory_lengths:
        qkv = [jax.ShapeDtypeStruct((args.batch, length, args.heads, args.head_dim), jnp.float32)] * 3
        for p in ("fwd", "fwd+bwd"):
            m = {n: _temp_mib(_programs(f)[p], qkv) for n, f in impls.items()}
            mem[length, p] = m["xla"] / m["reference"]
            print(
                f"| {length} | {p} | {m['xla']:.1f} | {m['reference']:.1f} | {m['jax.nn']:.1f} | {mem[length, p]:.3f} |",
                flush=True,
            )

    print()
    if (2048, "fwd+bwd") in ratios:
        r = ratios[2048, "fwd+bwd"]
        print(f"goal: 2048 causal fwd+bwd xla <= 0.7x min(reference, jax.nn): {r:.2f}x -> {'MET' if r <= 0.7 else 'NOT MET'}")
    if (8192, "fwd+bwd") in mem:
        r = mem[8192, "fwd+bwd"]
        print(f"goal: 8192 fwd+bwd xla temp memory <= 1/4 of reference: {r:.3f} -> {'MET' if r <= 0.25 else 'NOT MET'}")


def window(args):
    """Blockwise attention with a sliding window against the same without one."""
    backend = jax.default_backend()
    impl, dtype = ("pallas", jnp.bfloat16) if backend == "gpu" else ("xla", jnp.float32)
    impls = {
        "causal": lambda q, k, v: flash_attention(q, k, v, block_size=args.block_size, causal=True,
                                                  implementation=impl),
        f"window {args.window}": lambda q, k, v: flash_attention(q, k, v, block_size=args.block_size, causal=True,
                                                                 window=args.window, implementation=impl),
    }
    print(f"# {backend} {impl}: batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, "
          f"{jnp.dtype(dtype).name}, block {args.block_size}")
    print(f"\n| length | pass | causal (s) | window {args.window} (s) | window / causal | "
          "expected (W + block) / (length / 2) |")
    print("|---|---|---|---|---|---|")
    for length in args.time_lengths:
        qkv = _inputs(args.batch, length, args.heads, args.head_dim, dtype)
        programs = {(n, p): fn for n, f in impls.items() for p, fn in _programs(f).items()}
        best = _time(programs, qkv, args.rounds)
        expected = min(1.0, (args.window + args.block_size) / (length / 2))
        for p in ("fwd", "fwd+bwd"):
            c, w = best["causal", p], best[f"window {args.window}", p]
            print(f"| {length} | {p} | {c:.4f} | {w:.4f} | {w / c:.2f} | {expected:.2f} |", flush=True)


def gpu(args):
    impls = _impls(args.block_size, "gpu")
    heads, head_dim, batch = args.heads, 128, args.batch
    print(f"# GPU {jax.devices()[0].device_kind}: batch {batch}, heads {heads}, head_dim 128, bf16, causal")
    print("\n| length | pass | " + " | ".join(impls) + " | pallas / cudnn |")
    print("|---|---|" + "---|" * (len(impls) + 1))
    for length in args.gpu_lengths:
        qkv = _inputs(batch, length, heads, head_dim, jnp.bfloat16)
        fwd_flops = 4 * batch * heads * length * length * head_dim / 2  # causal: half the pairs
        programs = {(n, p): fn for n, f in impls.items() for p, fn in _programs(f).items()}
        best = _time(programs, qkv, args.rounds)
        for p, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
            tflops = {n: flops / best[n, p] / 1e12 for n in impls}
            cells = " | ".join(f"{tflops[n]:.1f}" for n in impls)
            print(f"| {length} | {p} | {cells} | {tflops['pallas'] / tflops['cudnn']:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--time-lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--gpu-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--window", type=int, default=None, help="time a sliding window of this many keys instead")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}\n")
    if args.window is not None:
        window(args)
    elif jax.default_backend() == "gpu":
        gpu(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()

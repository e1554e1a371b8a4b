"""fp8 GEMMs: error against fp32 for both scaling modes, what the compiled program
really multiplies in, and speed against the fp32/bf16 matmul on this backend.

    python benchmarks/fp8.py [--m 1024 --k 1024 --n 1024] [--block 128] [--repeats 5]

1. Error: relative Frobenius error of y = x @ w, dx and dw (fp8 vs float64 exact)
   for Gaussian inputs and for inputs with a few outliers of growing magnitude.
2. Program: dtypes of every dot's operands in the lowered StableHLO (what vishwam
   asks for) and in the compiled HLO (what the backend runs). On a GPU this also
   looks for cuBLASLt fp8 GEMM custom calls.
3. Speed: forward and forward+backward time of fp8 (both modes) relative to the
   plain matmul in fp32 and bf16, measured in this process on this backend.
4. Train step: tokens/s of a `small` model's step (loss, grads, AdamW) with
   `fp8="none"` vs `"all"`, compute dtype bf16 on a GPU, fp32 elsewhere.
"""

import argparse
import datetime
import platform
import re
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vishwam import ModelConfig, VishwamAI
from vishwam.memory import next_token_loss
from vishwam.nn.fp8 import fp8_matmul

OUTLIERS = (0.0, 1e2, 1e3, 1e4, 1e5)


def make_inputs(m, k, n, outlier, seed=0):
    kx, kw, kg, ko = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (m, k))
    w = jax.random.normal(kw, (k, n)) / np.sqrt(k)
    g = jax.random.normal(kg, (m, n))
    if outlier:  # eight entries, as activation outliers sit in a few channels
        rows = jax.random.randint(ko, (8,), 0, m)
        cols = jax.random.randint(jax.random.fold_in(ko, 1), (8,), 0, k)
        x = x.at[rows, cols].set(outlier)
    return x, w, g


def value_and_grads(scaling, block):
    def f(x, w, g):
        def loss(x, w):
            y = x @ w if scaling is None else fp8_matmul(x, w, scaling=scaling, block_size=block)
            return jnp.sum(y * g), y

        (_, y), (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
        return y, dx, dw

    return jax.jit(f)


def errors(args):
    print("\n## 1. Relative error vs exact (float64), m=k=n as given\n")
    print("| outliers (x typical) | mode | y | dx | dw | y on outlier-free rows |")
    print("|---|---|---|---|---|---|")
    fns = {s: value_and_grads(s, args.block) for s in ("tensor", "block")}
    for outlier in OUTLIERS:
        x, w, g = make_inputs(args.m, args.k, args.n, outlier)
        x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
        exact = (x64 @ w64, g64 @ w64.T, x64.T @ g64)
        clean = ~np.any(np.abs(x64) > 50, axis=1)
        for scaling, fn in fns.items():
            got = [np.asarray(a, np.float64) for a in fn(x, w, g)]
            rel = [np.linalg.norm(a - e) / np.linalg.norm(e) for a, e in zip(got, exact, strict=True)]
            rel_clean = np.linalg.norm((got[0] - exact[0])[clean]) / np.linalg.norm(exact[0][clean])
            label = "none (Gaussian)" if not outlier else f"8 x {outlier:.0e}"
            print(f"| {label} | {scaling} | {rel[0]:.4f} | {rel[1]:.4f} | {rel[2]:.4f} | {rel_clean:.4f} |")


def lowered_dot_types(text):
    pattern = r"stablehlo\.dot_general[^\n]*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)"
    return sorted(set(re.findall(pattern, text)))


def compiled_ops(text):
    """(dot operand type pairs, number of converts from an f8 type) in compiled HLO text.
    HLO instruction names are unique per module, so operands resolve by name."""
    types, dots, upcasts = {}, set(), 0
    lines = text.splitlines()
    for line in lines:
        found = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[", line)
        if found:
            types[found.group(1)] = found.group(2)
    for line in lines:
        if (dot := re.search(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)", line)):
            dots.add((types.get(dot.group(1), "?"), types.get(dot.group(2), "?")))
        if (cvt := re.search(r" convert\(%?([\w.\-]+)\)", line)):
            upcasts += types.get(cvt.group(1), "").startswith("f8")
    return sorted(dots), upcasts


def program(args):
    print("\n## 2. What the program multiplies in (value and both gradients, 256^3)\n")
    x, w, g = make_inputs(256, 256, 256, 0.0)
    for scaling in ("tensor", "block"):
        lowered = value_and_grads(scaling, args.block).lower(x, w, g)
        compiled = lowered.compile().as_text()
        dots, upcasts = compiled_ops(compiled)
        print(f"- {scaling}: lowered StableHLO dot operands {lowered_dot_types(lowered.as_text())}; "
              f"compiled HLO dot operands {dots}, converts from f8: {upcasts}")
        if jax.default_backend() == "gpu":
            calls = sorted(set(re.findall(r'custom_call_target="([^"]*)"', compiled)))
            print(f"  GPU custom calls: {calls}")


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def speed(args):
    print(f"\n## 3. Speed, {args.m}x{args.k} @ {args.k}x{args.n} (best of {args.repeats})\n")
    x, w, g = make_inputs(args.m, args.k, args.n, 0.0)
    flops = 2 * args.m * args.k * args.n
    base = {}
    print("| variant | forward ms | vs fp32 | fwd+bwd ms | vs fp32 | forward GFLOP/s |")
    print("|---|---|---|---|---|---|")
    variants = [("fp32 matmul", None, jnp.float32), ("bf16 matmul", None, jnp.bfloat16),
                ("fp8 tensor (fp32 in)", "tensor", jnp.float32), ("fp8 block (fp32 in)", "block", jnp.float32),
                ("fp8 tensor (bf16 in)", "tensor", jnp.bfloat16)]
    for name, scaling, dtype in variants:
        xs, ws, gs = (a.astype(dtype) for a in (x, w, g))
        forward = jax.jit(lambda x, w, s=scaling: x @ w if s is None
                          else fp8_matmul(x, w, scaling=s, block_size=args.block))
        fwd = timed(forward, xs, ws, repeats=args.repeats)
        both = timed(value_and_grads(scaling, args.block), xs, ws, gs, repeats=args.repeats)
        base = base or {"fwd": fwd, "both": both}
        print(f"| {name} | {fwd * 1e3:.1f} | {fwd / base['fwd']:.2f} | {both * 1e3:.1f} "
              f"| {both / base['both']:.2f} | {flops / fwd / 1e9:.0f} |", flush=True)


def train_steps(args):
    compute = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    print(f"\n## 4. Train step, small preset, batch {args.batch} x seq {args.seq}, compute {compute} "
          f"(best of {args.repeats} interleaved rounds)\n")
    base = ModelConfig.preset("small", max_seq_len=args.seq, moe_dispatch="dense", capacity_factor=None,
                              attention_impl=args.attention, compute_dtype=compute)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, base.vocab_size)
    optimizer = optax.adamw(1e-3)
    runs = {}
    for label, overrides in (("fp8 none", dict(fp8="none")), ("fp8 all, tensor", dict(fp8="all")),
                             ("fp8 all, block", dict(fp8="all", fp8_scaling="block"))):
        model = VishwamAI(base.replace(**overrides), key=jax.random.key(0))
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def step(params, opt_state, tokens, static=static):
            loss, grads = jax.value_and_grad(lambda p: next_token_loss(eqx.combine(p, static), tokens))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        runs[label] = {"step": jax.jit(step, donate_argnums=(0, 1)),
                       "state": (params, optimizer.init(params)), "times": []}
    for r in range(args.repeats + 1):  # round 0 compiles and warms up
        for run in runs.values():
            start = time.perf_counter()
            params, opt_state, loss = run["step"](*run["state"], tokens)
            loss.block_until_ready()
            run["state"], run["loss"] = (params, opt_state), float(loss)
            if r:
                run["times"].append(time.perf_counter() - start)
    print("| variant | step ms | tokens/s | speed vs fp8 none | loss after the steps |")
    print("|---|---|---|---|---|")
    first = None
    for label, run in runs.items():
        best = min(run["times"])
        first = first or best
        print(f"| {label} | {best * 1e3:.0f} | {args.batch * args.seq / best:.0f} | {first / best:.2f}x "
              f"| {run['loss']:.4f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--attention", default="reference")
    args = parser.parse_args()
    print(f"# fp8 GEMMs on {jax.default_backend()} ({jax.devices()[0].device_kind}), {platform.node()}, "
          f"{datetime.date.today()}, jax {jax.__version__}, block {args.block}")
    errors(args)
    program(args)
    speed(args)
    train_steps(args)


if __name__ == "__main__":
    main()

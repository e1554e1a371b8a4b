"""MoE dispatch speed: forward+backward of one MoE layer per dispatch, against `dense`.

    python benchmarks/moe_dispatch.py [--tokens 1024 4096] [--hidden 256] [--ffn 512] [--reps 5]
    python benchmarks/moe_dispatch.py --tokens 4096 --hidden 512 --ffn 704 --reps 3 --no-expert-parallel
    python benchmarks/moe_dispatch.py --tokens 4096 --hidden 512 --ffn 128 --experts 64 --top-k 8 \
        --dispatches grouped --reps 7 --no-expert-parallel

(the second: the Mixtral shape of benchmarks/vs_transformers.py, one device only; the third: its
fine-grained shape, 64 experts top-8 of FFN 128, `grouped` against `dense`).

Part 1 (one device): `dense` (oracle), `capacity` with factor 1.25, `capacity`
dropless (capacity = tokens), `ragged` (`jax.lax.ragged_dot`) and `grouped`
(dropless blocks, a loop of GEMMs per used expert; what `auto` runs on CPU without a
capacity factor), 8 experts top-2 unless `--experts` / `--top-k`; `--dispatches` picks
which (dense is always run: the baseline); time of `value_and_grad` of the whole layer (router +
dispatch), median over repetitions run round-robin (so load spikes on a shared
machine hit every variant alike); ratio = time / dense time. Goals: capacity 1.25
<= 0.5x dense; grouped (dropless) about capacity 1.25's time. The load average is
printed before and after: timings under load are not results.

Part 2 (8 simulated devices): the expert-parallel layer (shard_map +
all_to_all) on meshes `expert=8` and `data=2, expert=4`: max difference from the
single-device dense layer (dropless, values and gradients) and time against the
single-device `capacity` layer (the expert-parallel path is the same whatever the
single-device dispatch, so `ragged` and `grouped` are not repeated there).
Simulated devices share the host's cores, so this measures overhead, not scaling.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vishwam.nn.moe import MoE  # noqa: E402
from vishwam.parallel import make_mesh, shard_batch, shard_model  # noqa: E402

EXPERTS, TOP_K = 8, 2  # defaults of --experts, --top-k


def _loss(layer, x):
    y, aux = layer(x)
    return jnp.sum(y * y) + aux["load_balancing_loss"]


def _grad_fn():
    return eqx.filter_jit(eqx.filter_value_and_grad(_loss))


def load_average() -> str:
    """Load averages over 1, 5 and 15 minutes, and the core count."""
    return f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores"


def time_round_robin(calls: dict, reps: int) -> dict:
    """Median seconds of each zero-argument call; one warm-up (compile) each first."""
    for call in calls.values():
        jax.block_until_ready(call())
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


DISPATCH_NAMES = ("dense", "capacity 1.25", "capacity dropless", "ragged", "grouped")


def layers(hidden: int, ffn: int, experts: int = EXPERTS, top_k: int = TOP_K, names=DISPATCH_NAMES) -> dict:
    common = dict(key=jax.random.key(0))
    kwargs = {"dense": dict(dispatch="dense"), "capacity 1.25": dict(dispatch="capacity", capacity_factor=1.25),
              "capacity dropless": dict(dispatch="capacity", capacity_factor=None),
              "ragged": dict(dispatch="ragged"), "grouped": dict(dispatch="grouped")}
    return {name: MoE(hidden, ffn, experts, top_k, **kwargs[name], **common) for name in names}


def single_device(tokens_list, hidden, ffn, reps, experts=EXPERTS, top_k=TOP_K, names=DISPATCH_NAMES):
    print(f"## One device: fwd+bwd of one MoE layer, {experts} experts, top-{top_k}, "
          f"hidden={hidden}, ffn={ffn}")
    print("| tokens | dispatch | time (ms) | ratio vs dense | dropped |")
    print("|---:|---|---:|---:|---:|")
    grad = _grad_fn()
    for tokens in tokens_list:
        x = jax.random.normal(jax.random.key(1), (tokens, hidden))
        mods = layers(hidden, ffn, experts, top_k, names)
        times = time_round_robin({name: (lambda m=m: grad(m, x)) for name, m in mods.items()}, reps)
        for name, m in mods.items():
            dropped = float(eqx.filter_jit(lambda m, x: m(x)[1]["dropped_fraction"])(m, x))
            print(f"| {tokens} | {name} | {times[name] * 1e3:.1f} | {times[name] / times['dense']:.2f} | "
                  f"{dropped:.3f} |")


def expert_parallel(tokens, hidden, ffn, reps):
    print(f"\n## Expert parallel on {len(jax.devices())} simulated devices: tokens={tokens}, "
          f"hidden={hidden}, ffn={ffn}")
    x = jax.random.normal(jax.random.key(1), (tokens, hidden))
    mods = layers(hidden, ffn)
    grad = _grad_fn()
    ref_loss, ref_grads = grad(mods["dense"], x)
    print("| mesh | dispatch | max abs diff vs dense (loss, grads) | time (ms) | ratio vs 1-device capacity 1.25 |")
    print("|---|---|---:|---:|---:|")
    base = time_round_robin({"c": lambda: grad(mods["capacity 1.25"], x)}, reps)["c"]
    print(f"| 1 device | capacity 1.25 | - | {base * 1e3:.1f} | 1.00 |")
    for sizes in (dict(expert=8), dict(data=2, expert=4)):
        mesh = make_mesh(sizes)
        xs = shard_batch(x, mesh)
        dense, capped = shard_model(mods["dense"], mesh), shard_model(mods["capacity 1.25"], mesh)
        with jax.set_mesh(mesh):
            ep_grad = _grad_fn()
            loss, grads = ep_grad(dense, xs)
            diffs = [abs(float(loss - ref_loss))] + [
                float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(grads),
                                                               jax.tree_util.tree_leaves(ref_grads))]
            times = time_round_robin({"dropless": lambda: ep_grad(dense, xs),
                                      "capacity 1.25": lambda: ep_grad(capped, xs)}, reps)
        label = ", ".join(f"{k}={v}" for k, v in sizes.items())
        for name, t in times.items():
            diff = f"{max(diffs):.1e}" if name == "dropless" else "(drops per device)"
            print(f"| {label} | EP {name} | {diff} | {t * 1e3:.1f} | {t / base:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ep-tokens", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=EXPERTS, help="part 1 only")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="part 1 only")
    parser.add_argument("--dispatches", default=",".join(DISPATCH_NAMES),
                        help="part 1's dispatches, comma-separated (dense is always timed: the baseline)")
    parser.add_argument("--no-expert-parallel", action="store_true", help="skip part 2")
    args = parser.parse_args()
    names = tuple(dict.fromkeys(["dense", *args.dispatches.split(",")]))
    unknown = [n for n in names if n not in DISPATCH_NAMES]
    if unknown:
        parser.error(f"unknown dispatch {unknown[0]!r}; choose from {', '.join(DISPATCH_NAMES)}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {len(jax.devices())} devices")
    print(f"load before: {load_average()}")
    single_device(args.tokens, args.hidden, args.ffn, args.reps, args.experts, args.top_k, names)
    if not args.no_expert_parallel:
        expert_parallel(args.ep_tokens, args.hidden, args.ffn, args.reps)
    print(f"\nload after: {load_average()}")


if __name__ == "__main__":
    main()

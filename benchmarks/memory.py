"""Temporary memory and step time of the training step under each remat policy.

    python benchmarks/memory.py [--preset small] [--batch 4] [--seq 256] [--steps 5]

One jitted step = loss + gradient + AdamW update, parameters and optimizer state
donated. For every policy the same step is compiled once; `memory_analysis()`
gives its temporaries (where saved activations live), then the step is timed
(the fastest of `--steps` rounds after a warm-up, policies interleaved). Ratios are against `none`, measured in
the same process.
"""

import argparse
import datetime
import platform
import time

import equinox as eqx
import jax
import optax

from vishwam import ModelConfig, VishwamAI
from vishwam.memory import REMAT_POLICIES, memory_stats, next_token_loss

MIB = 2.0**20


def compile_step(config, tokens):
    model = VishwamAI(config, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(eqx.combine(p, static), tokens))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
    return compiled, (params, opt_state), time.perf_counter() - start


def time_rounds(runs, tokens, rounds):
    """One step of every policy per round, `rounds` times: on a shared machine the
    policies then see the same background load; the minimum is the least disturbed."""
    times = {policy: [] for policy in runs}
    losses = {}
    for r in range(rounds + 1):
        for policy, (compiled, state) in runs.items():
            start = time.perf_counter()
            params, opt_state, loss = compiled(*state, tokens)
            loss.block_until_ready()
            if r:  # round 0 warms up
                times[policy].append(time.perf_counter() - start)
            runs[policy] = (compiled, (params, opt_state))
            losses[policy] = float(loss)
    return {p: min(t) for p, t in times.items()}, losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attention", default="reference",
                        help="attention_impl; 'reference' materialises the score matrix, "
                             "which makes the policies' differences larger")
    parser.add_argument("--moe-dispatch", default="dense")
    args = parser.parse_args()

    config = ModelConfig.preset(args.preset, max_seq_len=args.seq, attention_impl=args.attention,
                                moe_dispatch=args.moe_dispatch, capacity_factor=None)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, config.vocab_size)
    print(f"# remat policies: {args.preset} preset ({config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_experts} experts, {args.moe_dispatch} dispatch, {args.attention} attention), "
          f"batch {args.batch} x seq {args.seq}")
    print(f"# {jax.default_backend()} ({jax.devices()[0].device_kind}), {platform.node()}, "
          f"{datetime.date.today()}, jax {jax.__version__}")
    runs, stats, compile_s = {}, {}, {}
    for policy in REMAT_POLICIES:
        compiled, state, compile_s[policy] = compile_step(config.replace(remat_policy=policy), tokens)
        stats[policy] = memory_stats(compiled)
        runs[policy] = (compiled, state)
    step_s, losses = time_rounds(runs, tokens, args.steps)
    base_mem, base_time = stats["none"]["temp_size_in_bytes"], step_s["none"]
    print("| policy | temp MiB | temp / none | host temp MiB | step ms (min) | step / none | compile s | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for policy in REMAT_POLICIES:
        temp = stats[policy]["temp_size_in_bytes"]
        print(f"| {policy} | {temp / MIB:.1f} | {temp / base_mem:.2f} "
              f"| {stats[policy]['host_temp_size_in_bytes'] / MIB:.1f} | {step_s[policy] * 1e3:.0f} "
              f"| {step_s[policy] / base_time:.2f} | {compile_s[policy]:.1f} | {losses[policy]:.4f} |")


if __name__ == "__main__":
    main()

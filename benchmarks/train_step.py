"""Train-step throughput and model FLOP utilisation (MFU) of `make_train_step`.

    python benchmarks/train_step.py [--reps 3] [--only ref,ref-accum4,plain,small-dense,small-moe]

Variants (fp32, one device, random tokens, every token in the loss, no packing):

- `ref`: the issue's reference shapes, a 23.5M-parameter dense model (hidden 512,
  6 layers, 8 heads, SwiGLU ffn 1408, vocab 8192 tied), seq 512, batch 8.
- `ref-accum4`: the same batch as 4 accumulated micro-batches of 2 (goal: step
  time within 10% of `ref`).
- `plain`: baseline in this process, a plain-JAX step of the same shapes and
  parameter count (`jax.nn.dot_product_attention`, `lax.scan` over layers, optax
  AdamW, no RoPE): what the library's step should at least match.
- `small-dense` / `small-moe`: the `small` preset (hidden 256, 4 layers, seq 256,
  batch 16) with one dense MLP per layer / with its 4 experts, top-2, capacity 1.25.
- `ref-full-logits` / `small-moe-full-logits`: as `ref` / `small-moe` with
  `loss_chunk_size=None`: the LM head writes all `[batch, seq, vocab]` fp32 logits
  before the loss, instead of the fused head + cross-entropy over chunks of
  `--chunk` positions (default `TrainConfig.loss_chunk_size`). `--memory` also prints the compiled step's temporaries of both.

MFU = model FLOPs per second / best fp32 matmul FLOP/s over two large shapes,
measured in every repetition next to the steps (median over repetitions). Model
FLOPs per token are PaLM's `6 N + 12 L H Q T` (`vishwam.train.model_flops_per_token`:
active parameters only, so top-k experts for MoE; LM head included, embedding
lookup excluded). Steps are timed round-robin (one step of every variant per
repetition, so load spikes on a shared machine hit every variant alike); the
median is reported. The first call of each variant (compile) is timed apart.
"""

import argparse
import math
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vishwam import ModelConfig, VishwamAI
from vishwam.config import TrainConfig
from vishwam.memory import compiled_memory
from vishwam.plan import fresh_train_state
from vishwam.train import init_train_state, make_train_step, model_flops_per_token
from vishwam.train.step import train_update

REF = ModelConfig(vocab_size=8192, hidden_size=512, num_layers=6, num_heads=8, ffn_dim=1408, num_experts=1,
                  experts_per_token=1, max_seq_len=512, tie_embeddings=True)
SMALL = ModelConfig.preset("small")


def peak_matmul_flops(shapes=((2048, 2048, 2048), (4096, 2048, 1024)), reps=2) -> float:
    """Best fp32 FLOP/s of a jitted `a @ b` over `shapes` (m, k, n)."""
    best = 0.0
    matmul = jax.jit(jnp.matmul)
    for m, k, n in shapes:
        a = jnp.ones((m, k), jnp.float32)
        b = jnp.ones((k, n), jnp.float32)
        matmul(a, b).block_until_ready()
        for _ in range(reps):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return dict(tokens=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]),
                loss_mask=jnp.ones((batch, seq), jnp.float32))


# --------------------------------------------------------------- vishwam step
LOSS_CHUNK = {"size": TrainConfig().loss_chunk_size}  # --chunk sets it


def vishwam_variant(model_config: ModelConfig, batch: int, seq: int, accum: int, chunk: int | None = -1):
    chunk = LOSS_CHUNK["size"] if chunk == -1 else chunk
    train_config = TrainConfig(batch_size=batch, seq_len=seq, accum_steps=accum, warmup_steps=10,
                               total_steps=1000, loss_chunk_size=chunk)
    model = eqx.filter_jit(VishwamAI)(model_config, key=jax.random.key(0))
    holder = {"state": init_train_state(model, train_config, key=jax.random.key(1))}
    step = make_train_step(model_config, train_config)
    data = random_batch(batch, seq, model_config.vocab_size)

    def run():
        holder["state"], metrics = step(holder["state"], data)
        return metrics["loss"]

    return run, model_flops_per_token(model_config, seq) * batch * seq


# ---------------------------------------------------------- plain-JAX baseline
def _rms(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def plain_params(config: ModelConfig, key) -> dict:
    d, f, n = config.hidden_size, config.ffn_dim, config.num_layers
    keys = iter(jax.random.split(key, 8))

    def normal(*shape):
        return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

    return dict(
        embed=normal(config.vocab_size, d), norm=jnp.ones((d,)),
        layers=dict(wq=normal(n, d, d), wk=normal(n, d, d), wv=normal(n, d, d), wo=normal(n, d, d),
                    w1=normal(n, d, f), w3=normal(n, d, f), w2=normal(n, f, d),
                    n1=jnp.ones((n, d)), n2=jnp.ones((n, d))),
    )


def plain_loss(params, tokens, targets, num_heads: int):
    b, t = tokens.shape
    x = params["embed"][tokens]  # (B, T, D)

    def layer(x, p):
        h = _rms(x, p["n1"])
        q, k, v = (jnp.reshape(h @ p[w], (b, t, num_heads, -1)) for w in ("wq", "wk", "wv"))  # (B, T, H, Q)
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, -1)
        x = x + a @ p["wo"]
        h = _rms(x, p["n2"])
        return x + (jax.nn.silu(h @ p["w1"]) * (h @ p["w3"])) @ p["w2"], None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    logits = _rms(x, params["norm"]) @ params["embed"].T  # (B, T, V)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def plain_variant(config: ModelConfig, batch: int, seq: int):
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1))
    params = plain_params(config, jax.random.key(0))
    holder = {"state": (params, optimizer.init(params))}
    data = random_batch(batch, seq, config.vocab_size)

    def update(state, tokens, targets):
        params, opt_state = state
        loss, grads = jax.value_and_grad(plain_loss)(params, tokens, targets, config.num_heads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(update, donate_argnums=0)

    def run():
        holder["state"], loss = step(holder["state"], data["tokens"], data["targets"])
        return loss

    return run, model_flops_per_token(config, seq) * batch * seq


def step_temporaries(model_config: ModelConfig, batch: int, seq: int, chunk: int | None) -> int:
    """Temporary bytes of the compiled train step (XLA's memory analysis, abstract inputs)."""
    train_config = TrainConfig(batch_size=batch, seq_len=seq, warmup_steps=10, total_steps=1000,
                               loss_chunk_size=chunk)
    state = eqx.filter_eval_shape(fresh_train_state, model_config, train_config)
    data = jax.eval_shape(lambda: random_batch(batch, seq, model_config.vocab_size))
    stats = compiled_memory(train_update(model_config, train_config), (data, None), state, donate=True)
    return stats["temp_size_in_bytes"]


VARIANTS = {
    "ref": lambda: vishwam_variant(REF, 8, 512, 1),
    "ref-full-logits": lambda: vishwam_variant(REF, 8, 512, 1, None),
    "small-moe-full-logits": lambda: vishwam_variant(SMALL, 16, 256, 1, None),
    "ref-accum4": lambda: vishwam_variant(REF, 8, 512, 4),
    "plain": lambda: plain_variant(REF, 8, 512),
    "small-dense": lambda: vishwam_variant(SMALL.replace(num_experts=1, experts_per_token=1), 16, 256, 1),
    "small-moe": lambda: vishwam_variant(SMALL, 16, 256, 1),
}
TOKENS = {"ref": 8 * 512, "ref-full-logits": 8 * 512, "ref-accum4": 8 * 512, "plain": 8 * 512,
          "small-dense": 16 * 256, "small-moe": 16 * 256, "small-moe-full-logits": 16 * 256}
SAME_SHAPES_AS_PLAIN = ("ref", "ref-full-logits", "ref-accum4", "plain")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--chunk", type=int, default=LOSS_CHUNK["size"],
                        help="positions per chunk of the fused head+CE (default: TrainConfig's)")
    parser.add_argument("--memory", action="store_true",
                        help="also print the compiled step's temporaries, fused-chunked vs full-logits loss")
    args = parser.parse_args()
    LOSS_CHUNK["size"] = args.chunk
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)", flush=True)
    runs, flops, compile_s = {}, {}, {}
    for name in names:
        start = time.perf_counter()
        runs[name], flops[name] = VARIANTS[name]()
        loss = float(runs[name]())
        compile_s[name] = time.perf_counter() - start
        if not math.isfinite(loss):
            raise RuntimeError(f"{name}: non-finite loss {loss}")
        print(f"{name}: built + compiled + first step in {compile_s[name]:.1f} s (loss {loss:.3f})", flush=True)

    # Each repetition measures the matmul peak next to one step of every variant, and
    # MFU is taken per repetition: the machine's load drifts between repetitions.
    times, mfus, peaks = {n: [] for n in names}, {n: [] for n in names}, []
    for rep in range(args.reps):
        peaks.append(peak_matmul_flops())
        for name in names:
            start = time.perf_counter()
            jax.block_until_ready(runs[name]())
            times[name].append(time.perf_counter() - start)
            mfus[name].append(flops[name] / times[name][-1] / peaks[-1])
        print(f"rep {rep}: peak {peaks[-1] / 1e9:.1f} GFLOP/s, "
              + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    print("\n| variant | step (s) | tokens/s | model GFLOP/s | MFU | vs plain | compile+1st (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        t = median[name]
        vs_plain = f"{median['plain'] / t:.2f}x" if "plain" in median and name in SAME_SHAPES_AS_PLAIN else "-"
        print(f"| {name} | {t:.2f} | {TOKENS[name] / t:.0f} | {flops[name] / t / 1e9:.1f} | "
              f"{statistics.median(mfus[name]):.1%} | {vs_plain} | {compile_s[name]:.0f} |")
    print(f"\nmatmul peak per repetition (GFLOP/s): {', '.join(f'{p / 1e9:.1f}' for p in peaks)}")
    if "ref" in median and "ref-accum4" in median:
        print(f"accum 4 / accum 1 step time: {median['ref-accum4'] / median['ref']:.3f} (goal <= 1.10)")
    for fused, full in (("ref", "ref-full-logits"), ("small-moe", "small-moe-full-logits")):
        if fused in median and full in median:
            print(f"{fused}: fused chunked head+CE is {median[full] / median[fused]:.2f}x the full-logits step")
    if args.memory:
        for label, config, batch, seq in (("ref", REF, 8, 512), ("small-moe", SMALL, 16, 256)):
            fused, full = (step_temporaries(config, batch, seq, chunk) for chunk in (args.chunk, None))
            print(f"{label}: compiled step temporaries {fused / 2**20:.1f} MiB fused-chunked vs "
                  f"{full / 2**20:.1f} MiB full logits ({fused / full:.2f}x)")


if __name__ == "__main__":
    main()

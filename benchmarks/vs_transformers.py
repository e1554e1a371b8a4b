"""vishwam against transformers: numerics of imported checkpoints and train-step speed.

    pip install -e '.[compare]'        # torch==2.13.0 (CPU) and transformers, in their own venv
    python benchmarks/vs_transformers.py                   # numerics, then 3 alternated pairs per shape
    python benchmarks/vs_transformers.py --skip-numerics --shapes dense --pairs 3

For a tiny Llama (GQA) and a tiny Mixtral (8 experts, top-2) with random weights
(scaled so activations and logits are O(1)), built and saved by transformers:

1. import into vishwam with `load_hf_checkpoint`; max |logit difference| in fp32
   (goal <= 1e-4), and the reverse: `save_hf_checkpoint` loaded back by transformers,
   its parameters compared bit for bit with the originals;
2. greedy generation, vishwam (`vishwam.generate`, KV cache) against
   `model.generate(do_sample=False)`: identical tokens?
3. train-step tokens/s (forward, backward, AdamW, clipping; fp32) on the same weights
   and shapes (`TRAIN_SHAPES`: a dense Llama, a Mixtral 8-expert top-2 model, a
   fine-grained Qwen3-MoE (64 experts top-8 of FFN 128), all dropless, and the `small`
   preset's shape). Each framework runs alone in its own process, the processes
   alternate (transformers, vishwam, ...) for `--pairs` pairs, the load average is
   printed before each, and a ratio is printed only on a quiet machine (load <= 0.5 x
   cores). Goals: vishwam >= 1.2x transformers; >= 1.5x on `finegrained`.
4. generation tokens/s (`--generate`): `vishwam.generate` (KV cache, one
   compiled loop) against `model.generate` (KV cache) on the same weights, greedy and
   sampled (temperature 0.8, top-k 50, top-p 0.9), batch 1 and 8, every row generating
   all its tokens (no EOS), alternated whole processes as above (`GENERATE_CASES`);
   time to first token (`max_new_tokens=1`) and, for vishwam, `generate_stream`'s
   per-token time against the loop's. Goal: vishwam >= 1.2x transformers.

    python benchmarks/vs_transformers.py --skip-numerics --skip-train --generate
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

# The timed child processes (both frameworks alike) start with malloc set to keep freed memory
# (`vishwam.memory.keep_host_memory`) unless `--malloc default`; it must happen before torch's
# and XLA's threads take their arenas, so here, before either is imported.
if os.environ.get("VISHWAM_BENCH_MALLOC") == "keep":
    from vishwam.memory import keep_host_memory

    keep_host_memory()

import numpy as np

try:
    import torch
    import transformers
except ImportError as error:
    raise SystemExit(f"benchmarks/vs_transformers.py needs the `compare` extra ({error}); "
                     "install torch==2.13.0 (CPU) and transformers into a separate venv.") from None

import equinox as eqx
import jax
import jax.numpy as jnp

from vishwam.config import TrainConfig
from vishwam.hf import load_hf_checkpoint, save_hf_checkpoint

torch.set_grad_enabled(False)


def tiny_config(family: str, **shape):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rope_theta=5000.0, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    common.update(shape)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**{"num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 128,
                                              "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                                              "head_dim": common["hidden_size"] // common["num_attention_heads"],
                                              "router_aux_loss_coef": 0.001, **common})
    return transformers.MixtralConfig(**{"num_local_experts": 8, "num_experts_per_tok": 2,
                                         "router_aux_loss_coef": 0.01, **common})


def build_hf(config, seed: int):
    """A transformers model whose weights give O(1) activations (the default init's
    std 0.02 makes every logit ~0, which would hide layout errors)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif "embed_tokens" in name:
            p.copy_(torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model.eval()


def import_into_vishwam(hf_model, folder: str):
    hf_model.save_pretrained(folder)
    return load_hf_checkpoint(folder)


# ---------------------------------------------------------------------- numerics
def check_logits(family: str, hf_model, model, rng) -> dict:
    tokens = rng.integers(0, hf_model.config.vocab_size, size=(2, 48))
    ours = np.asarray(eqx.filter_jit(lambda m, t: m(t)[0])(model, jnp.asarray(tokens, jnp.int32)))
    theirs = hf_model(torch.tensor(tokens)).logits.numpy()
    return {"max_abs_diff": float(np.max(np.abs(ours - theirs))), "max_abs_logit": float(np.max(np.abs(theirs)))}


def check_export(hf_model, model, config, folder: str) -> bool:
    """vishwam -> HF files -> transformers: every parameter bit-identical to the original."""
    save_hf_checkpoint(model, config, folder)
    back = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = dict(hf_model.state_dict())
    mine = dict(back.state_dict())
    return theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs)


def greedy_vishwam(model, prompt: np.ndarray, new: int) -> np.ndarray:
    try:
        from vishwam.generation import generate
    except ImportError:
        generate = None
    if generate is not None:
        tokens, _ = generate(model, jnp.asarray(prompt, jnp.int32), new, temperature=0.0)
        return np.asarray(tokens)
    tokens = jnp.asarray(prompt, jnp.int32)  # full recompute, one token at a time
    step = eqx.filter_jit(lambda m, t: jnp.argmax(m(t)[0][:, -1], axis=-1).astype(jnp.int32))
    for _ in range(new):
        tokens = jnp.concatenate([tokens, step(model, tokens)[:, None]], axis=1)
    return np.asarray(tokens)


def check_greedy(hf_model, model, rng, new: int = 32) -> dict:
    prompt = rng.integers(0, hf_model.config.vocab_size, size=(2, 8))
    ours = greedy_vishwam(model, prompt, new)
    theirs = hf_model.generate(torch.tensor(prompt), max_new_tokens=new, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
    same = ours.shape == theirs.shape and bool(np.array_equal(ours, theirs))
    first = None if same else int(np.argmax(np.any(ours != theirs, axis=0)))
    return {"identical": same, "new_tokens": new, "first_difference_at": first}


# ----------------------------------------------------------------------- training
# The comparison shapes: hidden 512, 6 layers, 8 heads, vocab 8192, batch 8 x 512, fp32, AdamW;
# and the `small` preset's (hidden 256, 4 layers, 4 heads / 2 kv, ffn 512, 4 experts top-2,
# vocab 4096, tied embeddings) at the main job's batch 8 x 256.
TRAIN_SHAPES = {
    "dense": ("llama", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                            num_key_value_heads=8, vocab_size=8192, max_position_embeddings=512), (8, 512)),
    "mixtral": ("mixtral", dict(hidden_size=512, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
                                num_key_value_heads=8, vocab_size=8192, max_position_embeddings=512), (8, 512)),
    "small": ("mixtral", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=4096, max_position_embeddings=256,
                              num_local_experts=4, tie_word_embeddings=True), (8, 256)),
    # Fine-grained experts (Qwen3-MoE layout: QK-norm, 64 experts top-8 of FFN 128, renormalised top-k).
    "finegrained": ("qwen3_moe", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=8192,
                                      max_position_embeddings=512), (8, 512)),
}
TRAIN_GOALS = {"finegrained": 1.5}
"""vishwam / transformers train-step speed goals other than the default 1.2x."""


def vishwam_trainer(model, config, batch: int, seq: int, lr: float):
    from vishwam.train.step import init_train_state, make_train_step

    train_config = TrainConfig(learning_rate=lr, warmup_steps=0, total_steps=10_000, min_lr_ratio=1.0,
                               weight_decay=0.1, grad_clip=1.0, batch_size=batch, seq_len=seq)
    step = make_train_step(config, train_config)
    state = {"s": init_train_state(model, train_config, key=jax.random.key(0))}

    def run(tokens, targets):
        data = {"tokens": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray(targets, jnp.int32),
                "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
        state["s"], metrics = step(state["s"], data)
        return float(jax.block_until_ready(metrics["loss"]))

    return run


def torch_trainer(hf_model, lr: float):
    hf_model.train()
    opt = torch.optim.AdamW(hf_model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    is_moe = hasattr(hf_model.config, "num_local_experts") or hasattr(hf_model.config, "num_experts")

    def run(tokens, targets):
        with torch.enable_grad():
            inputs = torch.tensor(tokens)
            out = hf_model(input_ids=inputs, labels=torch.tensor(targets), output_router_logits=is_moe)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(out.loss)

    return run


def train_one(framework: str, shape: str, steps: int) -> dict:
    """One framework alone in this process: build the same weights, warm up (compile), time
    `steps` steps. Both frameworks are dropless (vishwam's MoE layers as imported:
    `capacity_factor=None`, dispatch `auto`)."""
    family, dims, (batch, seq) = TRAIN_SHAPES[shape]
    hf_model = build_hf(tiny_config(family, **dims), seed=2)
    if framework == "vishwam":
        with tempfile.TemporaryDirectory() as folder:
            model, config = import_into_vishwam(hf_model, folder)
        del hf_model
        run = vishwam_trainer(model, config, batch, seq, 1e-4)
    else:
        run = torch_trainer(hf_model, 1e-4)
    rng = np.random.default_rng(0)
    data = [(rng.integers(0, dims["vocab_size"], (batch, seq)), rng.integers(0, dims["vocab_size"], (batch, seq)))
            for _ in range(steps + 1)]
    start = time.perf_counter()
    run(*data[0])
    warmup = time.perf_counter() - start
    times = []
    for tokens, targets in data[1:]:
        start = time.perf_counter()
        run(tokens, targets)
        times.append(time.perf_counter() - start)
    return {"framework": framework, "shape": shape, "tokens_per_s": batch * seq / statistics.median(times),
            "step_s": times, "warmup_s": warmup}


def background_load(samples: int = 20, interval: float = 0.05) -> float:
    """Runnable tasks other than this one, averaged over a second (from /proc/loadavg's
    running count). Unlike the 1-minute load average it does not still count the
    benchmark process that just finished."""
    import os

    if not os.path.exists("/proc/loadavg"):
        return float("nan")
    total = 0.0
    for _ in range(samples):
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        total += max(running - 1, 0)
        time.sleep(interval)
    return total / samples


def train_alternating(shapes: list[str], pairs: int, steps: int) -> bool:
    """Whole processes, alternating (torch, vishwam, torch, vishwam, ...), each after its own
    warm-up; the load average and the other runnable tasks (`background_load`) are printed
    before each. Medians and spreads over the pairs; a ratio is printed only when no process
    started with more than 0.5 x cores of other runnable tasks."""
    import json
    import subprocess

    cores = os.cpu_count() or 1
    ok = True
    for shape in shapes:
        runs, loads = {"transformers": [], "vishwam": []}, []
        for pair in range(pairs):
            for framework in ("transformers", "vishwam"):
                load, others = os.getloadavg()[0], background_load()
                loads.append(others)
                out = subprocess.run([sys.executable, __file__, "--train-one", framework, shape, "--steps",
                                      str(steps)], capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[framework].append(result["tokens_per_s"])
                print(f"  {shape} pair {pair + 1} {framework:>12}: {result['tokens_per_s']:7.0f} tok/s "
                      f"(median of {steps} steps; warm-up {result['warmup_s']:.1f} s; before: load average "
                      f"{load:.2f}, other runnable tasks {others:.2f})",
                      flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        spread = {k: f"{min(v):.0f}-{max(v):.0f}" for k, v in runs.items()}
        quiet = max(loads) <= 0.5 * cores
        ratio = med["vishwam"] / med["transformers"]
        goal = TRAIN_GOALS.get(shape, 1.2)
        verdict = (f"ratio {ratio:.2f}x ({'met' if ratio >= goal else 'NOT met'}: goal {goal}x)" if quiet else
                   f"ratio not reported: {max(loads):.2f} other runnable tasks > 0.5 x {cores} cores (unreliable)")
        print(f"{shape}: transformers {med['transformers']:.0f} tok/s [{spread['transformers']}], vishwam "
              f"{med['vishwam']:.0f} tok/s [{spread['vishwam']}] over {pairs} pairs; {verdict}", flush=True)
        ok &= quiet and ratio >= goal
    return ok


# --------------------------------------------------------------------- generation
# (shape, batch, prompt, new tokens, sampled): the generation table (prompt 32 + 256 new,
# greedy, batch 1 and 8), sampling at batch 8, prompt 512 + 512 new, sampling at batch 1.
GENERATE_CASES = [
    ("dense", 1, 32, 256, False), ("dense", 8, 32, 256, False),
    ("mixtral", 1, 32, 256, False), ("mixtral", 8, 32, 256, False),
    ("dense", 8, 32, 256, True), ("mixtral", 8, 32, 256, True),
    ("dense", 1, 512, 512, False), ("dense", 8, 512, 512, False),
    ("mixtral", 1, 512, 512, False), ("mixtral", 8, 512, 512, False),
    ("dense", 1, 32, 256, True), ("mixtral", 1, 32, 256, True),
]
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9)


def generate_one(framework: str, case: int, repeats: int) -> dict:
    """One framework alone in this process: time `repeats` whole generations after a
    warm-up one (vishwam: its compile), then the first token alone."""
    shape, batch, prompt_len, new, sampled = GENERATE_CASES[case]
    family, dims, _ = TRAIN_SHAPES[shape]
    dims = dict(dims, max_position_embeddings=prompt_len + new)
    hf_model = build_hf(tiny_config(family, **dims), seed=2)
    prompt = np.random.default_rng(0).integers(0, dims["vocab_size"], (batch, prompt_len))
    extra = {}
    if framework == "vishwam":
        from vishwam.generation import generate, generate_stream

        with tempfile.TemporaryDirectory() as folder:
            model, _ = import_into_vishwam(hf_model, folder)
        del hf_model
        prompt = jnp.asarray(prompt, jnp.int32)
        options = dict(SAMPLING, key=jax.random.key(0)) if sampled else dict(temperature=0.0)

        def run(n):
            return jax.block_until_ready(generate(model, prompt, n, **options)[0])

        def stream():
            for _ in generate_stream(model, prompt, new, **options):
                pass
    else:
        inputs = torch.tensor(prompt)
        mask = torch.ones(inputs.shape, dtype=torch.long)
        options = dict(do_sample=True, **SAMPLING) if sampled else dict(do_sample=False)

        def run(n):
            torch.manual_seed(0)
            return hf_model.generate(inputs, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     eos_token_id=None, pad_token_id=0, **options)

    def timed(fn, count):
        fn()  # warm-up (compile)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    seconds = timed(lambda: run(new), repeats)
    if framework == "vishwam" and not sampled and prompt_len + new <= 288:
        extra["stream_per_token_ratio"] = timed(stream, repeats) / seconds
    return {"tokens_per_s": batch * new / seconds, "first_token_s": timed(lambda: run(1), 3), **extra}


def generate_alternating(cases: list[int], pairs: int, repeats: int) -> bool:
    """`train_alternating` for generation: whole processes alternated per case."""
    import json
    import os
    import subprocess

    cores = os.cpu_count() or 1
    ok = True
    for case in cases:
        shape, batch, prompt_len, new, sampled = GENERATE_CASES[case]
        label = f"{shape} batch {batch}, prompt {prompt_len} + {new} new, {'sampled' if sampled else 'greedy'}"
        runs, loads = {"transformers": [], "vishwam": []}, []
        for pair in range(pairs):
            for framework in ("transformers", "vishwam"):
                load, others = os.getloadavg()[0], background_load()
                loads.append(others)
                out = subprocess.run([sys.executable, __file__, "--generate-one", framework, str(case), "--repeats",
                                      str(repeats)], capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[framework].append(result)
                stream = (f", stream/loop per token {result['stream_per_token_ratio']:.2f}"
                          if "stream_per_token_ratio" in result else "")
                print(f"  {label} pair {pair + 1} {framework:>12}: {result['tokens_per_s']:7.1f} tok/s, first token "
                      f"{result['first_token_s'] * 1e3:.0f} ms{stream} (before: load average {load:.2f}, other "
                      f"runnable tasks {others:.2f})", flush=True)
        med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
        first = {k: statistics.median(r["first_token_s"] for r in v) for k, v in runs.items()}
        spread = {k: f"{min(r['tokens_per_s'] for r in v):.1f}-{max(r['tokens_per_s'] for r in v):.1f}"
                  for k, v in runs.items()}
        quiet = max(loads) <= 0.5 * cores
        ratio = med["vishwam"] / med["transformers"]
        goal = TRAIN_GOALS.get(shape, 1.2)
        verdict = (f"ratio {ratio:.2f}x ({'met' if ratio >= goal else 'NOT met'}: goal {goal}x)" if quiet else
                   f"ratio not reported: {max(loads):.2f} other runnable tasks > 0.5 x {cores} cores (unreliable)")
        print(f"{label}: transformers {med['transformers']:.1f} tok/s [{spread['transformers']}], first token "
              f"{first['transformers'] * 1e3:.0f} ms; vishwam {med['vishwam']:.1f} tok/s [{spread['vishwam']}], "
              f"first token {first['vishwam'] * 1e3:.0f} ms; {verdict}", flush=True)
        ok &= quiet and ratio >= 1.2
    return ok


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per process")
    parser.add_argument("--pairs", type=int, default=3, help="alternated (transformers, vishwam) process pairs")
    parser.add_argument("--shapes", default=",".join(TRAIN_SHAPES), help=f"train shapes: {', '.join(TRAIN_SHAPES)}")
    parser.add_argument("--skip-numerics", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--generate", action="store_true", help="also compare generation (GENERATE_CASES)")
    parser.add_argument("--cases", default=None, help="comma-separated GENERATE_CASES indices (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per process")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="the timed processes' malloc: keep freed memory (vishwam.memory.keep_host_memory, "
                             "both frameworks; the default) or glibc's defaults")
    parser.add_argument("--train-one", nargs=2, metavar=("FRAMEWORK", "SHAPE"), help=argparse.SUPPRESS)
    parser.add_argument("--generate-one", nargs=2, metavar=("FRAMEWORK", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.train_one or args.generate_one:
        import json

        result = (train_one(*args.train_one, args.steps) if args.train_one else
                  generate_one(args.generate_one[0], int(args.generate_one[1]), args.repeats))
        print(json.dumps(result))
        return 0
    os.environ["VISHWAM_BENCH_MALLOC"] = args.malloc  # read by the timed children, at their top
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; timed processes' "
          f"malloc: {'keeps freed memory (keep_host_memory)' if args.malloc == 'keep' else 'glibc defaults'}",
          flush=True)
    ok = True
    if not args.skip_numerics:
        print("numerics (fp32, tiny models, random O(1) weights):", flush=True)
        for family in ("llama", "mixtral"):
            hf_model = build_hf(tiny_config(family), seed=1)
            with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
                model, config = import_into_vishwam(hf_model, a)
                logits = check_logits(family, hf_model, model, rng)
                exported = check_export(hf_model, model, config, b)
            greedy = check_greedy(hf_model, model, rng)
            good = logits["max_abs_diff"] <= 1e-4 and greedy["identical"] and exported
            ok &= good
            print(f"  {family}: max |logit diff| {logits['max_abs_diff']:.2e} (max |logit| "
                  f"{logits['max_abs_logit']:.1f}), greedy {greedy['new_tokens']} tokens identical: "
                  f"{greedy['identical']}"
                  f"{'' if greedy['identical'] else ' (first difference at ' + str(greedy['first_difference_at']) + ')'}"
                  f", export bit-identical in transformers: {exported} -> {'OK' if good else 'FAIL'}", flush=True)
    if not args.skip_train:
        print("train step, tokens/s (fp32, same weights and shapes, dropless MoE on both sides; whole processes "
              "alternated):", flush=True)
        goal = train_alternating([s for s in args.shapes.split(",") if s], args.pairs, args.steps)
        print(f"speed goal (vishwam >= 1.2x transformers on every shape, 1.5x on finegrained, quiet machine): "
              f"{'met' if goal else 'NOT met'}")
    if args.generate:
        print("generation, tokens/s (fp32, same weights, KV cache on both sides, no EOS; whole processes "
              "alternated):", flush=True)
        cases = range(len(GENERATE_CASES)) if args.cases is None else [int(c) for c in args.cases.split(",")]
        goal = generate_alternating(list(cases), args.pairs, args.repeats)
        print(f"generation goal (vishwam >= 1.2x transformers in every case, quiet machine): "
              f"{'met' if goal else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

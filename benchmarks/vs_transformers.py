"""vishwam against transformers: numerics of imported checkpoints and train-step speed.

    pip install -e '.[compare]'        # torch==2.13.0 (CPU) and transformers, in their own venv
    python benchmarks/vs_transformers.py                   # default shapes (a few minutes on 2 cores)
    python benchmarks/vs_transformers.py --quick           # smaller train shapes, fewer steps

For a tiny Llama (GQA) and a tiny Mixtral (8 experts, top-2) with random weights
(scaled so activations and logits are O(1)), built and saved by transformers:

1. import into vishwam with `load_hf_checkpoint`; max |logit difference| in fp32
   (goal <= 1e-4), and the reverse: `save_hf_checkpoint` loaded back by transformers,
   its parameters compared bit for bit with the originals;
2. greedy generation, vishwam (`vishwam.generate.generate`, KV cache) against
   `model.generate(do_sample=False)`: identical tokens?
3. train-step tokens/s (forward, backward, AdamW, clipping) on the same weights and
   shapes: a dense `small`-like Llama and a Mixtral 8-expert top-2 model. Steps of
   the two frameworks alternate, so machine load hits both alike; the median is
   reported. Goal: vishwam >= 1.2x transformers.
"""

import argparse
import math
import statistics
import sys
import tempfile
import time

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
    return transformers.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01,
                                      **common)


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
        from vishwam.generate import generate
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
    is_moe = hasattr(hf_model.config, "num_local_experts")

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


def time_training(label: str, hf_model, model, config, batch: int, seq: int, steps: int, rng) -> dict:
    ours = vishwam_trainer(model, config, batch, seq, 1e-4)
    theirs = torch_trainer(hf_model, 1e-4)
    data = [(rng.integers(0, config.vocab_size, (batch, seq)), rng.integers(0, config.vocab_size, (batch, seq)))
            for _ in range(steps + 1)]
    start = time.perf_counter()
    ours(*data[0])  # compiles
    compile_s = time.perf_counter() - start
    theirs(*data[0])
    times = {"vishwam": [], "transformers": []}
    losses = {"vishwam": [], "transformers": []}
    for tokens, targets in data[1:]:
        for name, run in (("vishwam", ours), ("transformers", theirs)):
            start = time.perf_counter()
            losses[name].append(run(tokens, targets))
            times[name].append(time.perf_counter() - start)
    tokens = batch * seq
    result = {name: tokens / statistics.median(t) for name, t in times.items()}
    result["ratio"] = result["vishwam"] / result["transformers"]
    print(f"  {label}: vishwam {result['vishwam']:.0f} tok/s (first step incl. compile {compile_s:.1f} s), "
          f"transformers {result['transformers']:.0f} tok/s, ratio {result['ratio']:.2f}x "
          f"(median of {steps}; losses vishwam {losses['vishwam'][0]:.3f}->{losses['vishwam'][-1]:.3f}, "
          f"transformers {losses['transformers'][0]:.3f}->{losses['transformers'][-1]:.3f})", flush=True)
    return result


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller train shapes and fewer steps")
    parser.add_argument("--steps", type=int, default=None, help="timed train steps per framework")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 3)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}", flush=True)
    ok = True

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
        print(f"  {family}: max |logit diff| {logits['max_abs_diff']:.2e} (max |logit| {logits['max_abs_logit']:.1f}), "
              f"greedy {greedy['new_tokens']} tokens identical: {greedy['identical']}"
              f"{'' if greedy['identical'] else ' (first difference at step ' + str(greedy['first_difference_at']) + ')'}, "
              f"export bit-identical in transformers: {exported} -> {'OK' if good else 'FAIL'}", flush=True)

    print("train step, tokens/s (same weights, same shapes, alternating steps):", flush=True)
    if args.quick:
        dense = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=4096, max_position_embeddings=256)
        moe = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=4096, max_position_embeddings=256)
        dense_shape, moe_shape = (4, 256), (4, 256)
    else:
        dense = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512)
        moe = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=4096, max_position_embeddings=256)
        dense_shape, moe_shape = (8, 512), (8, 256)
    results = {}
    runs = (("llama", dense, dense_shape, None), ("mixtral", moe, moe_shape, None), ("mixtral", moe, moe_shape, 1.25))
    for family, shape, (batch, seq), capacity_factor in runs:
        # Fresh weights per run: the vishwam step donates its state, the torch step updates in place.
        with tempfile.TemporaryDirectory() as folder:
            hf_model = build_hf(tiny_config(family, **shape), seed=2)
            model, config = import_into_vishwam(hf_model, folder)
        label = f"{family} hidden {shape['hidden_size']} x {shape['num_hidden_layers']} layers"
        if family == "mixtral":
            label += ", 8 experts top-2"
            if capacity_factor is None:
                label += ", vishwam dispatch as imported (capacity, dropless)"
            else:
                config = config.replace(capacity_factor=capacity_factor)
                model = model.with_config(config)
                label += f", vishwam capacity factor {capacity_factor} (may drop)"
        label += f", batch {batch} x seq {seq}"
        results[label] = time_training(label, hf_model, model, config, batch, seq, steps, rng)
    goal = all(r["ratio"] >= 1.2 for r in results.values())
    print(f"speed goal (vishwam >= 1.2x transformers on every shape): {'met' if goal else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

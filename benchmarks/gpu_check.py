"""Everything RESULTS.md needs from the first GPU vishwam runs on, in one script, one JSON line per figure.

    timeout 900 python benchmarks/gpu_check.py                 # on an NVIDIA GPU: a few minutes
    python benchmarks/gpu_check.py --compile-only              # anywhere with the CUDA plugin: compile only

Figures (bf16 unless named; one GPU):
- `attention_error`: vishwam's Pallas (Triton) flash attention against the fp32 `reference`, causal,
  head_dim 128, at 4096 and 8192 tokens: the largest absolute error of the output and of dq, dk, dv.
- `attention`: TFLOP/s, forward and forward+backward, of the Pallas kernels and of
  `jax.nn.dot_product_attention` with `implementation="xla"` and `"cudnn"`, causal, head_dim 128, 16 heads,
  16k tokens per call (4 x 4096, 2 x 8192). FLOPs: `4 b h s^2 d / 2` forward (causal), 2.5x that backward
  (FlashAttention-2's convention).
- `gemm`: TFLOP/s of an 8192^3 fp8 (e4m3) dot with fp32 accumulation, the same in bf16, and vishwam's
  `fp8_matmul` (quantisation included).
- `train_step`: the whole train step (`vishwam.plan.compile_train_step`: AdamW, fp32 master weights, bf16
  compute) of the `small` preset and of a 1.1B-parameter MoE; tokens/s and MFU against the GPU's published
  bf16 peak (`vishwam.model.flops.CHIPS`); the third, issue 33's fine-grained MoE shape (64 experts top-8).
- `moe_dispatch`: that fine-grained step under each MoE dispatch (`ragged`, `grouped`, `dense`, and
  `capacity` at factor 1.25), to measure the rule `vishwam.nn.moe.resolve_dispatch` follows on GPUs.
- `decode`: the serve engine's decode call (8 greedy steps of `vishwam.serve`'s engine) on
  `benchmarks/serve.py`'s default model (6 layers, hidden 512, 8 experts top-2 of FFN 1024, fp32, a cache
  of 256 positions per row) at 1, 4, 8, 16 and 32 rows: ms per step and tokens/s. What continuous
  batching buys on a GPU (issue 36: on the 2-core CPU a 32-row step costs ~6x a one-row step).

`--compile-only` compiles every program above for one abstract H100 (JAX's CUDA plugin, no GPU:
`pip install -e ".[gpu-aot]"`) and prints, per program, the compile time, its Triton kernels and its
GEMMs' operand types; tests/test_gpu_aot.py runs it. On a GPU each figure is printed as soon as it is
measured, so a run cut short by its timeout keeps what it finished.
"""

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable

from vishwam.cli import skip_absent_tpu

# Before JAX starts: on a machine without accelerators, the CPU (no plugin traceback); else the GPU.
skip_absent_tpu()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from vishwam import ModelConfig  # noqa: E402
from vishwam.config import TrainConfig  # noqa: E402
from vishwam.gpu_targets import dot_operand_types, gpu_devices, pallas_calls  # noqa: E402
from vishwam.kernels import flash_attention  # noqa: E402
from vishwam.kernels.flash_pallas import KERNEL_NAMES  # noqa: E402
from vishwam.model.flops import chip_of, model_flops_per_token  # noqa: E402
from vishwam.nn.fp8 import fp8_matmul  # noqa: E402
from vishwam.parallel import make_mesh  # noqa: E402
from vishwam.plan import (  # noqa: E402
    abstract_batch,
    compile_train_step,
    init_sharded_state,
    no_persistent_cache_unless_runnable,
)

HEADS, HEAD_DIM = 16, 128
# (attention lengths, tokens per attention call, GEMM size): the figures', and --quick's for a smoke test.
FULL, QUICK = ((4096, 8192), 16384, 8192), ((256,), 512, 512)
# A 1.1B-parameter MoE (0.5B active): seed-like layout at a size one 80 GB GPU trains.
MOE_1B = dict(vocab_size=32768, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8, ffn_dim=1024,
              num_experts=8, experts_per_token=2, max_seq_len=2048, capacity_factor=1.25, param_dtype="float32",
              compute_dtype="bfloat16", remat_policy="full")
# Issue 33's fine-grained shape (64 experts top-8 of FFN 128, dropless `grouped` dispatch), here in bf16.
FINEGRAINED = dict(vocab_size=8192, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8, ffn_dim=1408,
                   moe_ffn_dim=128, num_experts=64, experts_per_token=8, max_seq_len=512, capacity_factor=None,
                   qk_norm="head", router_aux_loss_coef=0.001,
                   param_dtype="float32", compute_dtype="bfloat16")
TRAIN_STEPS = (("small", ModelConfig.preset("small", compute_dtype="bfloat16"), 32, 256),
               ("moe-1b", ModelConfig.from_dict(MOE_1B), 8, 2048),
               ("finegrained-moe", ModelConfig.from_dict(FINEGRAINED), 8, 512))
# The fine-grained step under each MoE dispatch (`auto` picks `ragged` on GPU when dropless); `capacity`
# at factor 1.25 (it drops tokens: a different computation, timed for what the bound buys).
DISPATCHES = (("ragged", None), ("grouped", None), ("dense", None), ("capacity", 1.25))


def emit(**figure) -> None:
    print(json.dumps(figure, sort_keys=True), flush=True)


def failed(figure: dict, error: Exception) -> None:
    """One figure's failure as a figure: the run goes on to the next (a GPU lease is too short to lose them)."""
    emit(**figure, error=f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}")


def spec(mesh, shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def compile_for(mesh, fn: Callable, *specs):
    """`fn` jitted and compiled for `mesh`'s devices; `(compiled, seconds)`."""
    start = time.perf_counter()
    with jax.set_mesh(mesh), no_persistent_cache_unless_runnable(mesh):
        compiled = jax.jit(fn).lower(*specs).compile()
    return compiled, time.perf_counter() - start


def describe(compiled) -> dict:
    """What the compiled program runs: its Triton kernels and its GEMMs' operand types."""
    text = compiled.as_text()
    calls = pallas_calls(text, KERNEL_NAMES)
    return {"triton_kernels": {k: v["triton"] for k, v in calls.items() if v["triton"]},
            "interpreted_kernels": sorted(k for k, v in calls.items() if v["interpreted"]),
            "dot_operands": sorted({"x".join(t) for t in dot_operand_types(text)})}


def time_ms(compiled, args, reps: int) -> float:
    """Median milliseconds of `compiled(*args)` over `reps` runs after two warm-ups."""
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def real(specs, seed=0):
    """Random inputs (normal, scaled by 0.5) with `specs`' shapes, dtypes and shardings."""
    rng = np.random.default_rng(seed)
    return [jax.device_put(jnp.asarray(0.5 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype), s.sharding)
            for s in specs]


def attention_programs():
    """(name, fn, FLOPs factor) of each attention under test; the factor multiplies the forward FLOPs."""
    def ours(q, k, v):
        return flash_attention(q, k, v, causal=True, implementation="pallas")

    def jax_nn(impl):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    def with_backward(f):
        def run(q, k, v, d_out):
            out, vjp = jax.vjp(f, q, k, v)
            return out, vjp(d_out)
        return run

    for name, f in (("pallas", ours), ("jax_nn_xla", jax_nn("xla")), ("jax_nn_cudnn", jax_nn("cudnn"))):
        yield name, "fwd", f, 1.0
        yield name, "fwd+bwd", with_backward(f), 3.5


def check_attention(mesh, compile_only: bool, reps: int, lengths=FULL[0], tokens=FULL[1]) -> None:
    for length in lengths:
        batch = tokens // length
        shape = (batch, length, HEADS, HEAD_DIM)
        fwd_flops = 4 * batch * HEADS * length**2 * HEAD_DIM / 2
        for name, direction, fn, factor in attention_programs():
            specs = [spec(mesh, shape)] * (3 if direction == "fwd" else 4)
            figure = dict(figure="attention", impl=name, direction=direction, batch=batch, seq_len=length,
                          heads=HEADS, head_dim=HEAD_DIM)
            try:  # cuDNN may refuse a shape: a result, not a crash
                compiled, seconds = compile_for(mesh, fn, *specs)
                if compile_only:
                    emit(**figure, compile_s=round(seconds, 2), **describe(compiled))
                    continue
                ms = time_ms(compiled, real(specs), reps)
                emit(**figure, ms=round(ms, 3), tflops=round(factor * fwd_flops / ms / 1e9, 1))
            except Exception as error:  # noqa: BLE001
                failed(figure, error)
        try:
            check_attention_error(mesh, length, compile_only)
        except Exception as error:  # noqa: BLE001
            failed(dict(figure="attention_error", seq_len=length), error)


def check_attention_error(mesh, length: int, compile_only: bool) -> None:
    """Pallas (bf16 inputs) against the reference (the same values in fp32): output and gradients."""
    shape = (1, length, HEADS, HEAD_DIM)

    def outputs(impl, dtype):
        def run(q, k, v, d_out):
            f = lambda q, k, v: flash_attention(q, k, v, causal=True, implementation=impl)  # noqa: E731
            cast = [x.astype(dtype) for x in (q, k, v)]
            out, vjp = jax.vjp(f, *cast)
            return (out, *vjp(d_out.astype(dtype)))
        return run

    specs = [spec(mesh, shape)] * 4
    compiled = {impl: compile_for(mesh, outputs(impl, dtype), *specs)[0]
                for impl, dtype in (("pallas", jnp.bfloat16), ("reference", jnp.float32))}
    if compile_only:
        emit(figure="attention_error", seq_len=length, compiled=True, **describe(compiled["pallas"]))
        return
    args = real(specs, seed=1)
    got, want = (jax.device_get(compiled[impl](*args)) for impl in ("pallas", "reference"))
    errors = {name: float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32))))
              for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
    emit(figure="attention_error", seq_len=length, dtype="bfloat16 vs fp32 reference", **errors)


def check_gemm(mesh, compile_only: bool, reps: int, size: int = FULL[2]) -> None:
    flops = 2.0 * size**3
    programs = (
        ("fp8_e4m3", jnp.float8_e4m3fn,
         lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
        ("bf16", jnp.bfloat16, lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
        ("vishwam_fp8_matmul", jnp.bfloat16, fp8_matmul),
    )
    for name, dtype, fn in programs:
        specs = [spec(mesh, (size, size), dtype)] * 2
        try:
            compiled, seconds = compile_for(mesh, fn, *specs)
            if compile_only:
                emit(figure="gemm", kind=name, size=size, compile_s=round(seconds, 2), **describe(compiled))
                continue
            ms = time_ms(compiled, real(specs), reps)
            emit(figure="gemm", kind=name, size=size, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
        except Exception as error:  # noqa: BLE001
            failed(dict(figure="gemm", kind=name, size=size), error)


def check_train_steps(mesh, compile_only: bool, steps: int, presets=TRAIN_STEPS) -> None:
    chip = chip_of(mesh.devices.flat[0])
    for name, model_config, batch, seq in presets:
        try:
            check_train_step(mesh, chip, compile_only, steps, name, model_config, batch, seq)
        except Exception as error:  # noqa: BLE001
            failed(dict(figure="train_step", preset=name, batch=batch, seq_len=seq), error)


def check_train_step(mesh, chip, compile_only: bool, steps: int, name: str, model_config, batch: int, seq: int) -> None:
    train_config = TrainConfig(batch_size=batch, seq_len=seq, warmup_steps=0, total_steps=1000)
    compiled, seconds = compile_train_step(model_config, train_config, mesh)
    figure = dict(figure="train_step", preset=name, batch=batch, seq_len=seq, compile_s=round(seconds, 1))
    if compile_only:
        emit(**figure, **describe(compiled))
        return
    arrays = eqx.filter(init_sharded_state(model_config, train_config, mesh), eqx.is_array)
    rng = np.random.default_rng(0)
    batch_specs = abstract_batch(train_config, mesh)
    tokens = rng.integers(0, model_config.vocab_size, (batch, seq + 1), dtype=np.int32)
    values = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
              "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
              "loss_mask": np.ones((batch, seq), np.float32)}
    data = {k: jax.device_put(values[k], s.sharding) for k, s in batch_specs.items()}
    arrays, metrics = compiled(arrays, data)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        arrays, metrics = compiled(arrays, data)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    tokens_per_s = batch * seq / step_s
    mfu = model_flops_per_token(model_config, seq) * tokens_per_s / (chip.bf16_flops * mesh.size) if chip else None
    emit(**figure, step_ms=round(1e3 * step_s, 2), tokens_per_s=round(tokens_per_s),
         mfu=None if mfu is None else round(mfu, 4), loss=float(metrics["loss"]))


DECODE_ROWS = (1, 4, 8, 16, 32)


def check_decode(mesh, compile_only: bool, reps: int, rows_list=DECODE_ROWS, steps: int = 8) -> None:
    from serve import SHAPES  # benchmarks/serve.py: the model the CPU serving figures use

    from vishwam.model import VishwamAI, abstract_model
    from vishwam.serve._engine import _step_slots

    config = ModelConfig.preset("small", vocab_size=2048, max_seq_len=256, **SHAPES["medium"])
    model = abstract_model(config) if compile_only else VishwamAI(config, key=jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten((model, None))  # None: no split layers off the CPU
    call = jax.jit(functools.partial(_step_slots, treedef=treedef, count=steps), donate_argnums=(1,))
    base = None
    for rows in rows_list:
        figure = dict(figure="decode", rows=rows, steps_per_call=steps)
        try:
            cache = jax.eval_shape(lambda: model.init_cache(rows, 256))  # noqa: B023
            positions = np.random.default_rng(0).integers(20, 150, rows).astype(np.int32)
            zeros = np.zeros(rows, np.int32)
            inputs = (zeros, positions, np.zeros(rows, np.uint32), zeros, np.zeros(rows, np.float32), zeros,
                      np.ones(rows, np.float32))
            if compile_only:
                specs = [spec(mesh, x.shape, x.dtype) for x in leaves]
                cache_specs = jax.tree.map(lambda x: spec(mesh, x.shape, x.dtype), cache)
                input_specs = [spec(mesh, x.shape, x.dtype) for x in inputs]
                start = time.perf_counter()
                with jax.set_mesh(mesh), no_persistent_cache_unless_runnable(mesh):
                    compiled = call.lower(specs, cache_specs, *input_specs).compile()
                emit(**figure, compile_s=round(time.perf_counter() - start, 2), **describe(compiled))
                continue
            state = {"cache": jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), cache)}

            def once():
                tokens, state["cache"] = call(leaves, state["cache"], *inputs)  # noqa: B023
                return tokens

            for _ in range(2):
                jax.block_until_ready(once())
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                jax.block_until_ready(once())
                times.append(time.perf_counter() - start)
            ms = 1e3 * statistics.median(times) / steps
            base = ms if rows == 1 else base
            emit(**figure, ms_per_step=round(ms, 3), tokens_per_s=round(rows * 1e3 / ms),
                 step_cost_vs_one_row=None if base is None else round(ms / base, 2))
        except Exception as error:  # noqa: BLE001
            failed(figure, error)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    p.add_argument("--compile-only", action="store_true", help="compile for an abstract H100; run nothing")
    p.add_argument("--reps", type=int, default=10, help="timed runs per kernel figure (median; default 10)")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per preset (default 10)")
    p.add_argument("--only", choices=("attention", "gemm", "train_step", "moe_dispatch", "decode"), action="append",
                   help="run only these figures (repeatable)")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke test of the script, not figures)")
    p.add_argument("--any-device", action="store_true",
                   help="run on whatever JAX has, e.g. the CPU (with --quick: a smoke test of the timing code)")
    args = p.parse_args(argv)
    if args.compile_only:
        devices = gpu_devices("h100:1")
    else:
        devices = jax.devices()[:1]
        if devices[0].platform != "gpu" and not args.any_device:
            print(f"error: no GPU here (JAX sees {devices[0].device_kind}); use --compile-only", file=sys.stderr)
            return 2
    mesh = make_mesh({}, devices=devices)
    emit(figure="device", device_kind=devices[0].device_kind, compile_only=args.compile_only, jax=jax.__version__)
    only = set(args.only or ("attention", "gemm", "train_step", "moe_dispatch", "decode"))
    lengths, tokens, gemm = QUICK if args.quick else FULL
    if "attention" in only:
        check_attention(mesh, args.compile_only, args.reps, lengths, tokens)
    if "gemm" in only:
        check_gemm(mesh, args.compile_only, args.reps, gemm)
    if "train_step" in only:
        presets = ((TRAIN_STEPS[0][0], TRAIN_STEPS[0][1], 2, 64),) if args.quick else TRAIN_STEPS
        check_train_steps(mesh, args.compile_only, args.steps, presets)
    if "moe_dispatch" in only:
        name, config, batch, seq = TRAIN_STEPS[-1]
        if args.quick:
            config, batch, seq = dataclasses.replace(config, num_layers=1), 2, 64
        check_train_steps(mesh, args.compile_only, args.steps,
                          [(f"{name}/{dispatch}" + (f"@{factor}" if factor else ""),
                            dataclasses.replace(config, moe_dispatch=dispatch, capacity_factor=factor), batch, seq)
                           for dispatch, factor in DISPATCHES])
    if "decode" in only:
        check_decode(mesh, args.compile_only, args.reps, DECODE_ROWS[:2] if args.quick else DECODE_ROWS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

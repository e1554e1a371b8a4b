"""Will it fit on a TPU pod or GPU nodes, and how fast could it be? Compiles the whole train
step for an abstract TPU topology or set of NVIDIA GPUs on this machine (no TPU or GPU needed:
libtpu, or JAX's CUDA plugin from `pip install "vishwam[gpu-aot]"`, brings the compiler).

    vishwam-plan --preset seed --topology v5p:4x4x4 --mesh fsdp=8,expert=8
    vishwam-plan --preset seed --topology v5p:4x4x4 --search            # try meshes, remat, accum
    vishwam-plan --preset seed --topology v6e:8x8 --batch 64 --seq-len 4096 --json
    vishwam-plan --preset seed --topology h100:64 --search              # 8 nodes x 8 H100
    vishwam-plan --preset small --topology h100:8 --dump-hlo small.hlo.txt

Prints per chip: arguments (parameters, AdamW moments, the batch), temporaries,
outputs, the total against the chip's HBM and whether it fits (total <= --hbm-fraction
x HBM); the model FLOPs of one step (6N + 12LHQT per token); and a roofline ESTIMATE of
the step time (FLOPs / bf16 peak vs HBM bytes / bandwidth, published chip figures in
`vishwam.plan.CHIPS`) with the MFU it implies. Estimates assume ideal kernels and
perfect overlap: they bound, they do not measure. A seed-size compile takes minutes here.
GPU topologies: h100:N, h200:N, b200:N, a100:N (8 GPUs per node) or NAME:NODESxGPUS; the
target descriptions ship with vishwam, --gpu-spec FILE reads another (a GpuTargetConfigProto).

Exit codes: 0 planned (whether or not it fits), 2 bad input or no libtpu / CUDA plugin.
"""

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from vishwam.errors import InvalidValueError

GIB = 2**30


def _parse_args(argv):
    first, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=first, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=rest)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", default=None, help="model preset: tiny, small, seed (default seed)")
    model.add_argument("--config", type=Path, help="JSON ModelConfig, or a run's config.json ('model' section)")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x4 (64 chips), v5e:16x16, v6e:8x8; "
                                                     "or GPUs: h100:64 (8 nodes of 8), h200:8x8, b200:16, a100:8")
    p.add_argument("--gpu-spec", type=Path, help="GPU target description (GpuTargetConfigProto text) instead of the "
                                                 "shipped one of the topology's GPU")
    p.add_argument("--dump-hlo", type=Path, help="write the compiled program's text to this file (with --search: "
                                                 "a folder, one file per compiled configuration)")
    p.add_argument("--mesh", help="axis sizes, e.g. fsdp=8,expert=8 (default: all chips on fsdp)")
    p.add_argument("--batch", type=int, help="global batch in rows (default: one row per chip)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the model's max_seq_len)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (gradient accumulation; default 1)")
    p.add_argument("--remat", help="remat policy: none, full, dots_saveable, save_attention_output "
                                   "(default: the config's)")
    p.add_argument("--search", action="store_true", help="try meshes x remat x accum; compile the fastest few")
    p.add_argument("--compile-top", type=int, default=3, help="with --search: how many to compile (default 3)")
    p.add_argument("--hbm-fraction", type=float, default=0.8, help="fits = total <= this x HBM (default 0.8)")
    p.add_argument("--json", action="store_true", help="one JSON object per configuration, one per line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for item in text.split(","):
        axis, sep, size = item.partition("=")
        if not sep or not size.strip().lstrip("-").isdigit():
            raise InvalidValueError(f"--mesh {text!r}: expected AXIS=SIZE pairs such as fsdp=8,expert=8")
        sizes[axis.strip()] = int(size)
    return sizes


def _model_config(args):
    from vishwam.config import ModelConfig

    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file")
        from vishwam.files import read_json_object

        data = read_json_object(args.config, what="--config")
        return ModelConfig.from_dict(data.get("model", data))
    return ModelConfig.preset(args.preset or "seed")


@contextlib.contextmanager
def _ticking(label: str, quiet: bool):
    """Tell the user a long compile is alive: a line every 30 s on stderr."""
    done = threading.Event()
    start = time.perf_counter()

    def tick():
        while not done.wait(30.0):
            print(f"  ... {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    if not quiet:
        print(f"{label} (minutes for a large model on a CPU) ...", file=sys.stderr, flush=True)
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def _row(p) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1) or "1 chip"
    if p.per_chip_bytes is None:
        memory = f"{'(not compiled' + (': ' + p.error if p.error else '') + ')':>46}"
    else:
        b = p.per_chip_bytes
        memory = (f"{b['arguments'] / GIB:7.2f} {b['temporaries'] / GIB:7.2f} {b['outputs'] / GIB:7.2f} "
                  f"{b['total'] / GIB:7.2f}/{(p.hbm_bytes or 0) / GIB:<6.1f}{'yes' if p.fits else 'NO':>4}")
    compile_s = "" if p.compile_s is None else f"{p.compile_s:6.0f}"
    return (f"{mesh:<34} {p.remat_policy:<14} {p.accum_steps:>5}  {memory}  {compile_s:>7} "
            f"{p.estimated_step_s:9.3f} {100 * p.estimated_mfu:6.1f}%")


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        return _run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, json.JSONDecodeError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU or GPU; run nothing here
    if args.accum <= 0 or (args.batch is not None and args.batch <= 0) or (args.seq_len is not None
                                                                           and args.seq_len <= 0):
        raise InvalidValueError("--batch, --seq-len and --accum must be positive integers")
    if not 0 < args.hbm_fraction <= 1:
        raise InvalidValueError(f"--hbm-fraction {args.hbm_fraction}: must be in (0, 1]")
    mesh = None if args.mesh is None else _parse_mesh(args.mesh)
    model_config = _model_config(args)
    if args.remat is not None:
        model_config = model_config.replace(remat_policy=args.remat)

    from vishwam.config import TrainConfig
    from vishwam.plan import plan, search_plans, topology_devices

    spec = None
    if args.gpu_spec is not None:
        if not args.gpu_spec.is_file():
            raise FileNotFoundError(f"--gpu-spec {args.gpu_spec}: no such file")
        spec = args.gpu_spec.read_text()
    if args.dump_hlo is not None and args.search and args.dump_hlo.is_file():
        raise InvalidValueError(f"--dump-hlo {args.dump_hlo}: with --search it is a folder (one file per compiled "
                                "configuration), and this is a file")
    devices = topology_devices(args.topology, spec)
    hlo_path = args.dump_hlo
    if hlo_path is not None and not args.search and hlo_path.is_dir():
        hlo_path = hlo_path / "train_step.hlo.txt"
    seq = args.seq_len or model_config.max_seq_len
    train_config = TrainConfig(batch_size=args.batch or len(devices), seq_len=seq, accum_steps=args.accum,
                               warmup_steps=0, total_steps=1000)
    if seq > model_config.max_seq_len:
        raise InvalidValueError(f"--seq-len {seq} exceeds the model's max_seq_len={model_config.max_seq_len}")
    say = (lambda *a: None) if args.json else print
    say(f"{args.topology}: {len(devices)} x {devices[0].device_kind}; batch {train_config.batch_size} x {seq} "
        f"tokens, {model_config.num_layers} layers x {model_config.hidden_size}, {model_config.num_experts} "
        f"experts, vocab {model_config.vocab_size}, compute {model_config.compute_dtype}, params "
        f"{model_config.param_dtype}")
    if args.search:
        def progress(text):
            print(text, file=sys.stderr, flush=True)

        with _ticking("searching", args.json):
            plans = search_plans(model_config, train_config, args.topology, compile_top=args.compile_top,
                                 hbm_fraction=args.hbm_fraction, progress=progress, devices=devices,
                                 hlo_dir=args.dump_hlo)
    else:
        with _ticking(f"compiling the train step for {args.topology}", args.json):
            plans = [plan(model_config, train_config, args.topology, mesh, hbm_fraction=args.hbm_fraction,
                          devices=devices, hlo_path=hlo_path)]
    if args.json:
        for p in plans:
            print(json.dumps(p.to_json(), sort_keys=True))
        return 0
    print(f"\n{'mesh':<34} {'remat':<14} {'accum':>5}  {'args':>7} {'temp':>7} {'out':>7} {'total/HBM GiB':>13} "
          f"{'fits':>4}  {'compile':>7} {'est. s':>9} {'est.MFU':>7}")
    for p in plans:
        print(_row(p))
    network = f"; collectives of {','.join(plans[0].network_axes)} cross nodes" if plans[0].network_axes else ""
    print(f"\nmodel FLOPs/step {plans[0].model_flops_per_step:.3e}; est. s and est.MFU are roofline ESTIMATES "
          f"(published peaks and link bandwidths, perfect overlap), not measurements{network}. fits: total <= "
          f"{args.hbm_fraction:g} x HBM.")
    return 0


def entry() -> None:
    """The `vishwam-plan` console command."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

"""Upcycle a dense model into a Mixture-of-Experts whose experts start as copies of its MLPs.

    vishwam-upcycle TinyLlama-1.1B/ runs/tinyllama-8x --experts 8 --top-k 2
    vishwam-upcycle runs/dense runs/dense-4x --experts 4 --verify       # a vishwam run or pipeline
    vishwam-train --init-from runs/dense-4x --steps 500                 # continue training the MoE

SOURCE is a dense transformers checkpoint (Llama, Mistral, Qwen2: config.json, safetensors and
tokenizer files), a vishwam pipeline directory, a run directory (its `pipeline/`, else its
latest checkpoint) or a `config.json` + `model.safetensors` pair with `--tokenizer`. OUT
becomes a vishwam pipeline directory (`VishwamAIPipeline.load`), written whole or not at all,
which `vishwam-train --init-from OUT` trains further. With the defaults the MoE computes the
dense model's function exactly at the start (experts are copies, top-k weights renormalised,
dropless); `--noise` and `--reinit-fraction` perturb the copies instead (see `vishwam.upcycling`).
`--verify` runs both models on random tokens and prints the largest logit difference.
"""

import argparse
import sys
from pathlib import Path

from vishwam.cli import add_debug_flag, run_script
from vishwam.errors import InvalidValueError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="dense HF checkpoint, vishwam pipeline, run directory or weights pair")
    p.add_argument("out", type=Path, help="the pipeline directory to write")
    p.add_argument("--experts", type=int, required=True, help="experts per MoE layer (>= 2)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2; with 1 the router never "
                   "learns from the language-model loss)")
    p.add_argument("--moe-every", type=int, default=1, help="every N-th layer becomes MoE (default 1: all)")
    p.add_argument("--first-dense-layers", type=int, default=0, help="keep the first N layers dense (default 0)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="training capacity of the capacity dispatch (default: dropless, exact at the start)")
    p.add_argument("--aux-free-bias", action="store_true", help="add DeepSeek's aux-loss-free selection bias")
    p.add_argument("--noise", type=float, default=0.0,
                   help="Gaussian noise on each copy, relative to the weight's std (default 0: exact copies)")
    p.add_argument("--reinit-fraction", type=float, default=0.0,
                   help="drop-upcycling: re-draw this fraction of each expert's neurons (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers and perturbations (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype of an HF source (default: the checkpoint's)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory to bundle (needed when SOURCE has none)")
    p.add_argument("--verify", action="store_true",
                   help="compare the MoE's logits with the dense model's on random tokens and print the difference")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (once the new one is complete)")
    add_debug_flag(p)
    return p


def _source_has_tokenizer(folder: Path) -> bool:
    """Whether `vishwam.upcycling.load_dense` finds a tokenizer with the model in `folder`."""
    return any((folder / name).exists() for name in ("tokenizer.model", "tokenizer.json", "tokenizer",
                                                     "pipeline.json", "pipeline/pipeline.json"))


def _check_args(args) -> None:
    """What can be refused before any weight is read."""
    if not args.source.is_dir():
        raise FileNotFoundError(f"{args.source}: no such directory.")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite or choose another directory.")
    if args.tokenizer is not None and not args.tokenizer.is_dir():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such directory.")
    if args.tokenizer is None and not _source_has_tokenizer(args.source):
        raise InvalidValueError(f"{args.source} has no tokenizer; pass --tokenizer DIR (the one the dense model was "
                                "trained with), so that OUT is a pipeline vishwam-train can continue.")
    if args.experts < 2:
        raise InvalidValueError(f"--experts {args.experts}: a MoE needs at least 2 experts.")
    if not 1 <= args.top_k <= args.experts:
        raise InvalidValueError(f"--top-k {args.top_k}: must be in [1, --experts {args.experts}].")
    if args.noise < 0:
        raise InvalidValueError(f"--noise {args.noise}: must be >= 0.")
    if not 0 <= args.reinit_fraction <= 1:
        raise InvalidValueError(f"--reinit-fraction {args.reinit_fraction}: must be in [0, 1].")


def max_logit_difference(dense, moe, *, batch: int = 2, seq: int = 32, seed: int = 0) -> float:
    """The largest |logit difference| between two models on the same random tokens (inference mode)."""
    import jax
    import jax.numpy as jnp

    seq = min(seq, dense.config.max_seq_len)
    tokens = jax.random.randint(jax.random.key(seed), (batch, seq), 0, dense.config.vocab_size)
    return float(jnp.max(jnp.abs(moe(tokens, inference=True)[0] - dense(tokens, inference=True)[0])))


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    from vishwam.compile_cache import enable_compile_cache

    enable_compile_cache()
    import jax

    from vishwam.model import count_parameters
    from vishwam.pipeline import VishwamAIPipeline
    from vishwam.tokenizer import load_hf_tokenizer
    from vishwam.upcycling import load_dense, upcycle

    dense, pipeline = load_dense(args.source, dtype=args.dtype)
    if pipeline is None and args.tokenizer is None:
        raise InvalidValueError(f"{args.source}: no tokenizer was found with the model; pass --tokenizer DIR.")
    if args.tokenizer is not None:
        pipeline = VishwamAIPipeline(dense, load_hf_tokenizer(args.tokenizer),
                                     eos_ids=None if pipeline is None else pipeline.eos_ids)
    result = upcycle(pipeline, args.experts, args.top_k, moe_every=args.moe_every,
                     first_dense_layers=args.first_dense_layers, capacity_factor=args.capacity_factor,
                     aux_free_bias=args.aux_free_bias, noise=args.noise, reinit_fraction=args.reinit_fraction,
                     key=jax.random.key(args.seed))
    before, after = count_parameters(dense.config), count_parameters(result.config)
    print(f"{args.source}: {dense.config.num_layers} layers x {dense.config.hidden_size}, "
          f"{before['total'] / 1e6:,.2f} M parameters (dense)", file=sys.stderr)
    print(f"-> {result.config.num_moe_layers} MoE layers of {args.experts} experts (top-{args.top_k}): "
          f"{after['total'] / 1e6:,.2f} M parameters, {after['active'] / 1e6:,.2f} M active per token", file=sys.stderr)
    if args.verify:
        exact = args.noise == 0 and args.reinit_fraction == 0
        print(f"max |logit difference| from the dense model on random tokens: "
              f"{max_logit_difference(dense, result.model):.3g}"
              f"{'' if exact else ' (the copies are perturbed, so not zero)'}", file=sys.stderr)
    result.save(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}; continue training with: vishwam-train --init-from {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (`vishwam.cli`: 2 for bad input)."""
    return run_script(_main, argv)


def entry() -> None:
    """The `vishwam-upcycle` console command."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

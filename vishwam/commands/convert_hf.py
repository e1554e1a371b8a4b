"""Convert between HuggingFace Llama/Mistral/Qwen2/Mixtral checkpoints and vishwam weights.

    vishwam-convert-hf to-vishwam HF_DIR OUT_DIR [--dtype bfloat16]
    vishwam-convert-hf to-hf VISHWAM_DIR OUT_DIR [--max-shard-size 5GB]

`to-vishwam` reads an HF directory (config.json + safetensors, single or sharded)
and writes a vishwam directory: `config.json` (the `ModelConfig`) and
`model.safetensors` (every array leaf under its pytree path, the format of
`VishwamAIPipeline.save` and `vishwam.pipeline.load_model_weights`). When the HF
directory has a tokenizer `load_hf_tokenizer` accepts (a SentencePiece
`tokenizer.model` or a `tokenizer.json`), it writes a whole pipeline directory
instead (`tokenizer/` and `pipeline.json` too), loadable with `VishwamAIPipeline.load`.
A progress bar on stderr (when it is a terminal; `--no-progress` turns it off) counts
the bytes of the tensors read or written.

`to-hf` reads such a vishwam directory (weights or pipeline) and writes an HF
directory that transformers loads (`AutoModelForCausalLM.from_pretrained`), with
the tokenizer files when the input has a `tokenizer/`.
"""

import argparse
import sys
from pathlib import Path

import equinox as eqx
import jax

from vishwam.cli import add_debug_flag, run_script
from vishwam.files import atomic_directory, atomic_write_text


def _named_arrays(model) -> dict:
    """The `VishwamAIPipeline.save` naming: pytree path -> host array."""
    import numpy as np

    leaves, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _fresh_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"convert_hf: {path} already exists; pass --overwrite or choose another directory.")


def to_vishwam(source: Path, target: Path, dtype: str | None, overwrite: bool, progress: bool = False) -> str:
    from vishwam.hf import generation_eos_ids, load_hf_checkpoint, load_hf_tokenizer
    from vishwam.tokenizer import has_hf_tokenizer

    _fresh_output(target, overwrite)
    model, config = load_hf_checkpoint(source, dtype=dtype, progress=progress)
    tokenizer, why = None, "no tokenizer.model or tokenizer.json"
    if has_hf_tokenizer(source):
        try:
            tokenizer = load_hf_tokenizer(source)
        except ValueError as error:
            why = str(error)
    if tokenizer is not None:
        from vishwam.pipeline import VishwamAIPipeline

        VishwamAIPipeline(model, tokenizer, eos_ids=generation_eos_ids(source) or None).save(target, overwrite=overwrite)
        return f"pipeline (model + tokenizer, vocab {tokenizer.vocab_size})"
    from safetensors.numpy import save_file

    # Staged beside the target and swapped in: never a half-written directory, and an
    # existing target is replaced only once the new one is complete.
    with atomic_directory(target, overwrite=overwrite) as staging:
        atomic_write_text(staging / "config.json", config.to_json())
        save_file(_named_arrays(model), str(staging / "model.safetensors"), metadata={"format": "vishwam"})
    return f"weights only ({why})"


def to_hf(source: Path, target: Path, max_shard_size: str | None, overwrite: bool, progress: bool = False) -> str:
    from vishwam.config import ModelConfig
    from vishwam.hf import load_hf_tokenizer, save_hf_checkpoint
    from vishwam.pipeline import load_model_weights

    _fresh_output(target, overwrite)
    if not source.is_dir():
        raise FileNotFoundError(f"convert_hf: {source}: no such directory.")
    missing = [name for name in ("config.json", "model.safetensors") if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"convert_hf: {source} lacks {missing}; expected a vishwam directory written by "
                                "`convert_hf.py to-vishwam` or VishwamAIPipeline.save.")
    config = ModelConfig.from_json(source / "config.json")
    model = load_model_weights(source / "model.safetensors", config)
    tokenizer = load_hf_tokenizer(source / "tokenizer") if (source / "tokenizer").is_dir() else None
    ids = None if tokenizer is None else {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id,
                                          "eos_token_id": tokenizer.eos_id}
    with atomic_directory(target, overwrite=overwrite) as staging:
        save_hf_checkpoint(model, config, staging, max_shard_size=max_shard_size, token_ids=ids, progress=progress)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return "model" if tokenizer is None else "model + tokenizer"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (`vishwam.cli`: 2 for bad input)."""
    return run_script(_main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("to-vishwam", help="HF directory -> vishwam weights (or pipeline) directory")
    a.add_argument("source", type=Path)
    a.add_argument("target", type=Path)
    a.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype (default: the checkpoint's)")
    b = sub.add_parser("to-hf", help="vishwam weights (or pipeline) directory -> HF directory")
    b.add_argument("source", type=Path)
    b.add_argument("target", type=Path)
    b.add_argument("--max-shard-size", default=None, help="e.g. 5GB: split into shards with an index")
    for p in (a, b):
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing target directory (once the new one is complete)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr is "
                       "not a terminal)")
        add_debug_flag(p)
    args = parser.parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    if args.direction == "to-vishwam":
        what = to_vishwam(args.source, args.target, args.dtype, args.overwrite, progress)
    else:
        what = to_hf(args.source, args.target, args.max_shard_size, args.overwrite, progress)
    print(f"{args.source} -> {args.target}: {what}", file=sys.stderr)
    return 0


def entry() -> None:
    """The `vishwam-convert-hf` console command."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

"""Distil a trained run into a smaller student that shares its tokenizer.

    vishwam-distill --teacher runs/small                 # half width/depth -> runs/small-student
    vishwam-distill --teacher runs/small --scale 0.25 --steps 500 --distill-alpha 0.3

The student starts from the teacher's `config.json` (model and optimiser settings,
data source) with `hidden_size`, `ffn_dim` and `num_layers` scaled by `--scale`;
the loss is `distill_alpha * CE + (1 - distill_alpha) * T^2 * KL(teacher || student)`
with the teacher frozen inside the same jitted step, the KL computed chunk by chunk from
both models' final hidden states and heads (`loss_chunk_size`; no `[batch, seq, vocab]`
logits of either model). Every other option is passed
to vishwam-train (`--steps`, `--batch`, `--lr`, `--name`, `--set FIELD=VALUE`,
`--new`, ...), so a student run resumes, checkpoints and logs like any run.
"""

import argparse
import json
import sys
from pathlib import Path

from vishwam.commands import train as train_script


def student_overrides(teacher_model: dict, scale: float) -> dict:
    """ModelConfig fields that shrink the teacher by `scale`; vocabulary and context stay."""
    heads = int(teacher_model["num_heads"])
    # hidden_size must split into `heads` even head dims (rotary embeddings).
    unit = 2 * heads
    hidden = max(unit, round(teacher_model["hidden_size"] * scale / unit) * unit)
    ffn = max(8, round(teacher_model["ffn_dim"] * scale / 8) * 8)
    layers = max(1, round(teacher_model["num_layers"] * scale))
    first_dense = min(int(teacher_model.get("first_dense_layers", 0)), layers)
    moe_every = int(teacher_model.get("moe_every", 1))
    if (layers - first_dense) % moe_every:
        moe_every = 1
    return {"hidden_size": hidden, "ffn_dim": ffn, "num_layers": layers, "head_dim": None,
            "first_dense_layers": first_dense, "moe_every": moe_every}


def main(argv: list[str] | None = None, *, callbacks=(), own_process: bool = False) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, metavar="RUN_DIR",
                        help="a run directory with checkpoints")
    parser.add_argument("--scale", type=float, default=0.5, help="student width and depth relative to the teacher")
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    args, rest = parser.parse_known_args(argv)
    if args.debug:
        rest.append("--debug")
    config_path = args.teacher / "config.json"
    if not config_path.is_file():
        print(f"error: {config_path} not found; --teacher must be a run directory written by vishwam-train",
              file=sys.stderr)
        return 2
    if not 0 < args.scale <= 1:
        print(f"error: --scale {args.scale} must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        teacher = json.loads(config_path.read_text(encoding="utf-8"))
        teacher_model = teacher["model"]
        overrides = student_overrides(teacher_model, args.scale)
    except (ValueError, KeyError, TypeError) as error:
        print(f"error: {config_path} is not a run's config.json ({type(error).__name__}: {error}); --teacher must "
              "be a run directory written by vishwam-train", file=sys.stderr)
        return 2
    forwarded = ["--config", str(config_path), "--teacher", str(args.teacher)]
    for field, value in overrides.items():
        forwarded += ["--set", f"{field}={json.dumps(value)}"]
    source = teacher.get("data", {}).get("source")
    if "--data" not in rest and isinstance(source, list):
        forwarded += ["--data", *source]
    return train_script.main(forwarded + rest, callbacks=callbacks, own_process=own_process)


def entry() -> None:
    """The `vishwam-distill` console command."""
    sys.exit(main(own_process=True))


if __name__ == "__main__":
    entry()

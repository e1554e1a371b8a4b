"""Complete a prompt with a saved pipeline or a training run.

    vishwam-generate runs/small "Once upon a time" --max-new-tokens 64 --temperature 0.8 --top-p 0.95
    vishwam-generate runs/small "Once upon a time" --step 1500     # a checkpoint of the run
    vishwam-generate my_pipeline/ "Once upon a time" --temperature 0  # greedy

DIRECTORY is any model directory `vishwam.model_dirs.load_model_dir` reads that has a tokenizer:
- a pipeline directory (`VishwamAIPipeline.save`: config.json, model.safetensors,
  tokenizer/, pipeline.json);
- a training run directory (`runs/<name>/`): its exported `pipeline/` when the run
  finished, otherwise (or with `--step`) the model weights of an orbax checkpoint in
  `checkpoints/`, with the run's `config.json` and `tokenizer/`;
- a transformers checkpoint with its tokenizer files.

The completion streams to stdout token by token (`--no-stream`: printed at the end, with
a progress bar on stderr when it is a terminal). At the end a line on stderr gives the
tokens generated, tokens/s and the time to the first token (compiles included);
`--no-progress` turns the line and the bar off (and `--no-stream` then runs the whole
loop as one compiled call).
"""

import argparse
import sys
import time
from pathlib import Path

from vishwam.cli import add_debug_flag, run_script
from vishwam.errors import InvalidValueError


def load_pipeline(directory: str | Path, step: int | None = None):
    """The pipeline in `directory`: any kind `vishwam.model_dirs.load_model_dir` reads (a
    pipeline, a run or a checkpoint of it, an HF checkpoint), as long as it has a tokenizer."""
    from vishwam.model_dirs import load_model_dir

    _, pipeline = load_model_dir(directory, step=step)
    if pipeline is None:
        raise InvalidValueError(f"{directory} holds a model but no tokenizer, so it cannot complete text; pass a "
                                "directory with one (a pipeline, a run with tokenizer/, an HF checkpoint with its "
                                "tokenizer files).")
    return pipeline


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (`vishwam.cli`: 2 for bad input)."""
    return run_script(_main, argv)


def _check_sampling(args) -> None:
    """Sampling flags that cannot work, refused before the model is loaded."""
    if args.max_new_tokens < 1:
        raise InvalidValueError(f"--max-new-tokens {args.max_new_tokens}: must be a positive integer.")
    if not args.temperature >= 0:
        raise InvalidValueError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy).")
    if args.top_k is not None and args.top_k < 1:
        raise InvalidValueError(f"--top-k {args.top_k}: must be a positive integer (or leave it out).")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise InvalidValueError(f"--top-p {args.top_p}: must be in (0, 1] (or leave it out).")
    if args.step is not None and args.step < 0:
        raise InvalidValueError(f"--step {args.step}: must be a checkpoint step >= 0.")
    if not args.prompt:
        raise InvalidValueError("the prompt is empty; give some text to complete.")


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="pipeline or training-run directory")
    parser.add_argument("prompt", help="text to complete")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: its final "
                        "pipeline/, else the latest checkpoint)")
    parser.add_argument("--no-stream", action="store_true", help="print the completion once it is complete")
    parser.add_argument("--no-progress", action="store_true", help="no tokens/s line or progress bar on stderr")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    _check_sampling(args)

    pipeline = load_pipeline(args.directory, args.step)
    meter = None if args.no_progress else _TokenMeter(args.max_new_tokens, bar=args.no_stream and sys.stderr.isatty())

    prompt_shown = []

    def show_prompt() -> None:
        # Written with the first token, not before: a prompt the pipeline refuses leaves only the error line.
        if not prompt_shown:
            sys.stdout.write(args.prompt)
            prompt_shown.append(True)

    def show(row: int, token: int, text: str) -> None:
        if meter is not None:
            meter.tick()
        if not args.no_stream:
            show_prompt()
            sys.stdout.write(text)
            sys.stdout.flush()

    streaming = not args.no_stream or meter is not None
    [completion] = pipeline(args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, callback=show if streaming else None)
    show_prompt()
    if args.no_stream:
        sys.stdout.write(completion)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if meter is not None:
        print(meter.summary(), file=sys.stderr)
    return 0


class _TokenMeter:
    """Counts generated tokens: tokens/s and the time to the first one (which includes the
    compiles), optionally as a live tqdm bar on stderr."""

    def __init__(self, total: int, *, bar: bool):
        self.start = time.perf_counter()
        self.first: float | None = None
        self.count = 0
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="tok", desc="generating", file=sys.stderr, leave=False)

    def tick(self) -> None:
        self.count += 1
        if self.first is None:
            self.first = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.update()

    def summary(self) -> str:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.perf_counter() - self.start
        if self.count == 0 or self.first is None:
            return f"generated no tokens in {elapsed:.2f} s"
        rest = elapsed - self.first
        rate = f"{(self.count - 1) / rest:.1f} tokens/s after the first" if self.count > 1 and rest > 0 else "one token"
        return (f"generated {self.count} tokens in {elapsed:.2f} s: {rate}; first token after {self.first:.2f} s "
                "(compiles included)")


def entry() -> None:
    """The `vishwam-generate` console command."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

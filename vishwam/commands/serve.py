"""Serve a model over an OpenAI-compatible HTTP API, with continuous batching.

    vishwam-serve runs/small                          # http://127.0.0.1:8000/v1
    vishwam-serve my_pipeline/ --port 8080 --slots 32
    vishwam-serve Qwen3-0.6B/ --api-key "$KEY" --host 0.0.0.0

DIRECTORY is a pipeline directory, a training run directory (its exported `pipeline/`, else
its latest checkpoint) or a HuggingFace checkpoint directory, as for `vishwam-generate`.
Routes: `/v1/completions`, `/v1/chat/completions` (the chat template of the directory's
`tokenizer_config.json` when it has one), `/v1/models`, `/health`; any OpenAI client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="vishwam", prompt="Once upon a time", max_tokens=32)

The server binds to 127.0.0.1 unless `--host` says otherwise; `--api-key` (or the
environment variable VISHWAM_API_KEY) makes every /v1 request need that bearer key.
SIGTERM or Ctrl-C stops accepting connections, finishes the requests in flight, then exits.
All programs are compiled before the server starts listening.
"""

import argparse
import os
import sys
from pathlib import Path

from vishwam.cli import add_debug_flag, run_script
from vishwam.errors import InvalidValueError


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (`vishwam.cli`: 2 for bad input)."""
    return run_script(_main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="pipeline, training-run or HF checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine "
                        "only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--slots", type=int, default=16, help="requests decoded together at most (default 16)")
    parser.add_argument("--max-len", type=int, default=None, help="prompt + completion tokens per request at most "
                        "(default: the model's max_seq_len)")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps per compiled call at most while "
                        "no request waits for a slot (default 8; 1 streams every token as soon as it exists)")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the directory's "
                        "name)")
    parser.add_argument("--api-key", default=None, help="require this bearer key (default: $VISHWAM_API_KEY, else "
                        "none)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: its final "
                        "pipeline/, else the latest checkpoint)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (default warning; info logs every request)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise InvalidValueError(f"--port {args.port}: must be in [0, 65535].")
    if args.decode_steps < 1:
        raise InvalidValueError(f"--decode-steps {args.decode_steps}: must be a positive integer.")
    if args.slots < 1:
        raise InvalidValueError(f"--slots {args.slots}: must be a positive integer.")
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise InvalidValueError(f"serving needs the serve extra ({error.name} is missing): "
                                'pip install "vishwam[serve]".') from None

    from vishwam.commands.generate import load_pipeline
    from vishwam.serve import ChatTemplate, find_chat_template, serve

    pipeline = load_pipeline(args.directory, args.step)
    template, tokens = find_chat_template(args.directory)
    name = args.model_name or args.directory.resolve().name
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({args.slots} slots; compiling first)",
          file=sys.stderr, flush=True)
    serve(pipeline, host=args.host, port=args.port, slots=args.slots, max_len=args.max_len,
          max_decode_steps=args.decode_steps, model_name=name,
          api_key=args.api_key or os.environ.get("VISHWAM_API_KEY") or None,
          chat_template=ChatTemplate(template, tokens), log_level=args.log_level)
    return 0


def entry() -> None:
    """The `vishwam-serve` console command."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

"""Train a VishwamAI SentencePiece tokenizer and save it in the HuggingFace layout.

    vishwam-train-tokenizer --output runs/tokenizer                 # default corpus
    vishwam-train-tokenizer --input a.txt b.txt --vocab-size 32000 --output runs/tok

Prints the vocabulary size, the coverage (fraction of characters encoded by vocabulary
pieces rather than byte fallback) and a decode(encode(line)) == line check, both measured
on the training text (its first --check-lines lines). Exits 1 if the round trip fails.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from vishwam.cli import add_debug_flag, run_script
from vishwam.errors import InvalidValueError

DEFAULT_CORPUS_VOCAB = 4096
FILES_VOCAB = 131072  # the VishwamAI vocabulary


def _default_documents() -> list[str]:
    try:
        from vishwam.data import default_corpus
    except ImportError as error:
        raise SystemExit(
            f"the default corpus (vishwam.data.default_corpus) is not available ({error}); "
            "pass --input FILES instead."
        ) from None
    return default_corpus()


def _check_lines(documents: list[str] | None, files: list[Path] | None, limit: int) -> list[str]:
    lines: list[str] = []
    if documents is not None:
        for document in documents:
            lines.extend(document.split("\n"))
            if len(lines) >= limit:
                break
    else:
        for path in files or []:
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    lines.append(line.rstrip("\n"))
                    if len(lines) >= limit:
                        break
            if len(lines) >= limit:
                break
    return lines[:limit]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (`vishwam.cli`: 2 for bad input, 1 for a failed round trip)."""
    return run_script(_main, argv)


def _main(argv: list[str]) -> int:
    from vishwam.tokenizer import VishwamAITokenizer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files (default: the default corpus)"
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"pieces in the model (default: {DEFAULT_CORPUS_VOCAB}, or {FILES_VOCAB} with --input)",
    )
    parser.add_argument("--output", type=Path, default=Path("runs/tokenizer"), help="save_pretrained directory")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--user-symbols", nargs="*", default=[], metavar="SYM", help="kept whole, ids from 4")
    parser.add_argument("--max-length", type=int, default=512, help="model_max_length of the tokenizer")
    parser.add_argument(
        "--soft-vocab-limit", action="store_true", help="accept a smaller vocabulary if the corpus is small"
    )
    parser.add_argument("--character-coverage", type=float, default=0.9995, help="characters kept as pieces")
    parser.add_argument("--check-lines", type=int, default=20000, help="lines for coverage and round trip")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr "
                        "is not a terminal)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 1:
        raise InvalidValueError(f"--vocab-size {args.vocab_size}: must be a positive integer.")
    if args.check_lines < 1:
        raise InvalidValueError(f"--check-lines {args.check_lines}: must be a positive integer.")
    if args.output.exists() and not args.output.is_dir():
        raise FileExistsError(f"--output {args.output} is a file; pass a directory for the tokenizer.")
    for path in args.input or []:
        if not path.is_file():
            raise FileNotFoundError(f"--input {path}: no such file.")

    documents = None if args.input else _default_documents()
    vocab_size = args.vocab_size or (FILES_VOCAB if args.input else DEFAULT_CORPUS_VOCAB)
    source = f"{len(args.input)} file(s)" if args.input else f"default corpus ({len(documents)} documents)"
    print(f"training a {args.model_type} tokenizer with vocab_size={vocab_size} on {source}")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            tokenizer = VishwamAITokenizer.train(
                args.input if args.input else documents,
                Path(scratch) / "tokenizer.model",
                vocab_size=vocab_size,
                model_type=args.model_type,
                user_symbols=args.user_symbols,
                hard_vocab_limit=not args.soft_vocab_limit,
                max_length=args.max_length,
                input_kind="files" if args.input else "documents",
                character_coverage=args.character_coverage,
                progress=not args.no_progress and sys.stderr.isatty(),
            )
        except (ValueError, TypeError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            if "hard_vocab_limit" in str(error):
                print("hint: on the command line, --vocab-size N or --soft-vocab-limit", file=sys.stderr)
            return 2
        trained = time.perf_counter() - start
        tokenizer.save_pretrained(args.output)
    tokenizer = VishwamAITokenizer.from_pretrained(args.output)

    lines = _check_lines(documents, args.input, args.check_lines)
    ids = tokenizer.batch_encode(lines)
    decoded = tokenizer.batch_decode(ids)
    failures = [i for i, (line, text) in enumerate(zip(lines, decoded)) if line != text]
    tokens, chars = sum(map(len, ids)), sum(map(len, lines))

    print(f"trained in {trained:.1f} s; saved to {args.output} (fingerprint {tokenizer.fingerprint[:16]})")
    print(f"vocab size: {tokenizer.vocab_size}")
    print(f"coverage:   {tokenizer.coverage(lines):.4%} of {chars} characters in {len(lines)} lines")
    print(f"chars/token: {chars / max(tokens, 1):.2f}")
    if failures:
        print(f"round trip: FAILED on {len(failures)} of {len(lines)} lines, first: line {failures[0]}")
        return 1
    print(f"round trip: ok ({len(lines)} lines, decode(encode(line)) == line)")
    return 0


def entry() -> None:
    """The `vishwam-train-tokenizer` console command."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

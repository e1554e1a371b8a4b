"""Tokenise a corpus once, streaming, into a directory that many training runs memory-map.

    vishwam-prepare-data 'texts/*.txt' --tokenizer runs/tok --out data/texts
    vishwam-prepare-data corpus/*.parquet --tokenizer runs/tok --out data/web --chunk-mb 4
    vishwam-train --data data/web --steps 2000      # the prepared directory (tokenizer included)

SOURCE is one or more text/.jsonl/.parquet/.csv files or globs (all tables, or all
text), as for `vishwam-train --data`. The corpus is read and encoded in chunks of
about --chunk-mb MB of text, so memory stays near two chunks whatever the corpus
size; from the second chunk on, --workers processes (default: one per core) encode
whole chunks in turn, so every core encodes all the time; the token arrays are appended to files in a temporary folder that is renamed
to --out at the end, so an interrupted run leaves no --out (run it again). --out
gets `tokens.npy`, `offsets.npy`, `doc_hashes.npy`, `meta.json` and `tokenizer/`.
Exit codes: 0 done, 2 bad input (the message says what to fix).
"""

import argparse
import sys
import time
from pathlib import Path

from vishwam.errors import InvalidValueError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="files or globs (text, or .jsonl/.parquet/.csv)")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer directory (vishwam-train-tokenizer)")
    p.add_argument("--out", type=Path, required=True, help="directory to create")
    p.add_argument("--text-column", default="text", help="column of the documents in table files")
    p.add_argument("--separator", help="split text files into documents on this string, backslash escapes allowed "
                   "(e.g. '\\n\\n'; default: one document per file)")
    p.add_argument("--add-bos", action="store_true", help="start every document with BOS")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="MB of text read and encoded at a time")
    p.add_argument("--workers", type=int, help="encoding processes (default: one per usable core; 1: this "
                   "process only, with SentencePiece's threads)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from vishwam.data import TableFiles, TextFiles, as_source, prepare_corpus
    from vishwam.tokenizer import VishwamAITokenizer

    began = time.perf_counter()
    try:
        if args.chunk_mb <= 0:
            raise InvalidValueError(f"--chunk-mb must be > 0, got {args.chunk_mb}.")
        if args.workers is not None and args.workers < 1:
            raise InvalidValueError(f"--workers must be >= 1, got {args.workers}.")
        tokenizer = VishwamAITokenizer.from_pretrained(args.tokenizer)
        source = as_source(args.sources)
        if isinstance(source, TableFiles):
            source = TableFiles(source.patterns, text_column=args.text_column)
        elif isinstance(source, TextFiles) and args.separator is not None:
            source = TextFiles(source.patterns, separator=args.separator.encode().decode("unicode_escape"))
        corpus = prepare_corpus(source, tokenizer, args.out, add_bos=args.add_bos,
                                chunk_chars=int(args.chunk_mb * 2**20), progress=not args.no_progress,
                                overwrite=args.overwrite, workers=args.workers)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - began
    print(f"prepared {args.out}: {corpus.num_documents:,} documents, {corpus.num_tokens:,} tokens "
          f"({corpus.tokens.dtype}) in {seconds:.1f} s ({corpus.num_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    if corpus.replaced:
        print(f"  {corpus.replaced} undecodable byte(s) were replaced with U+FFFD")
    return 0


def entry() -> None:
    """The `vishwam-prepare-data` console command."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

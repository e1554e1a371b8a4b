"""SentencePiece training for `VishwamAITokenizer.train`: the fixed lossless options, the
training input (documents or files, split into lines and cut to fit), a progress bar, and
SentencePiece's errors turned into ones that say what to change."""

import io
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from ..errors import InvalidTypeError, InvalidValueError
from ..files import atomic_write_bytes
from ._format import BOS_ID, DEFAULT_SPECIAL_TOKENS, EOS_ID, PAD_ID, UNK_ID

# Trainer options that define the format (lossless, fixed ids); the caller may not change them.
_LOSSLESS_TRAINER_OPTIONS = {
    "pad_id": PAD_ID,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_piece": DEFAULT_SPECIAL_TOKENS[0],
    "unk_piece": DEFAULT_SPECIAL_TOKENS[1],
    "bos_piece": DEFAULT_SPECIAL_TOKENS[2],
    "eos_piece": DEFAULT_SPECIAL_TOKENS[3],
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "byte_fallback": True,
    "add_dummy_prefix": True,
}
_RESERVED_TRAINER_OPTIONS = frozenset(_LOSSLESS_TRAINER_OPTIONS) | {
    "input",
    "model_prefix",
    "model_writer",
    "sentence_iterator",
    "sentence_reader",
    "vocab_size",
    "model_type",
    "user_defined_symbols",
    "control_symbols",
    "hard_vocab_limit",
    "normalization_rule_tsv",
}
# Llama-style defaults the caller may override through **sentencepiece_options.
_DEFAULT_TRAINER_OPTIONS = {
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "max_sentence_length": 4192,
    "minloglevel": 2,
}

_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_sentencepiece(
    input: Iterable[str] | Iterable[str | os.PathLike] | str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str,
    user_symbols: Sequence[str],
    hard_vocab_limit: bool,
    input_kind: str,
    progress: bool,
    **sentencepiece_options: Any,
) -> Path:
    """Train a lossless SentencePiece model and write it atomically to `output_path`
    (returned); the arguments are those of `VishwamAITokenizer.train`."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise InvalidValueError(f"vocab_size must be a positive int, got {vocab_size!r}.")
    if model_type not in ("bpe", "unigram"):
        raise InvalidValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
    reserved = sorted(_RESERVED_TRAINER_OPTIONS.intersection(sentencepiece_options))
    if reserved:
        raise InvalidValueError(
            f"SentencePiece options {reserved} are fixed by VishwamAITokenizer.train (lossless "
            "normalisation, special ids 0-3) or are its own arguments (vocab_size, model_type, "
            "user_symbols, hard_vocab_limit, input); remove them."
        )
    symbols = _check_user_symbols(user_symbols)
    output = Path(output_path)
    if output.is_dir():
        raise IsADirectoryError(f"output_path {output} is a directory; pass the .model file to write.")

    options = {**_DEFAULT_TRAINER_OPTIONS, **sentencepiece_options}
    bar = _TrainingProgress() if progress else None
    feed = _SentenceFeed(_training_sentences(input, input_kind), int(options["max_sentence_length"]), bar)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(feed),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            user_defined_symbols=list(symbols),
            hard_vocab_limit=hard_vocab_limit,
            **_LOSSLESS_TRAINER_OPTIONS,
            **options,
        )
    except RuntimeError as error:
        raise _training_error(error, feed, vocab_size, model_type) from None
    finally:
        if bar is not None:
            bar.close()
    atomic_write_bytes(output, model.getvalue())
    return output


def _check_user_symbols(symbols: object) -> tuple[str, ...]:
    if isinstance(symbols, str):
        raise InvalidTypeError(f"user_symbols must be a sequence of str, got the str {symbols!r}; put it in a list.")
    symbols = tuple(symbols)
    for symbol in symbols:
        if not isinstance(symbol, str):
            raise InvalidTypeError(f"user_symbols must hold str, got {type(symbol).__name__} {symbol!r}.")
        if not symbol:
            raise InvalidValueError("user_symbols may not contain the empty string.")
        if symbol in DEFAULT_SPECIAL_TOKENS:
            raise InvalidValueError(f"user symbol {symbol!r} is already a special token (ids 0-3).")
    if len(set(symbols)) != len(symbols):
        duplicates = sorted({s for s in symbols if symbols.count(s) > 1})
        raise InvalidValueError(f"user_symbols has duplicates: {duplicates}.")
    return symbols


def _training_sentences(input: Any, input_kind: str) -> Iterator[str]:
    """Lines of the training documents or files, in order (files are checked here, eagerly)."""
    if input_kind not in ("auto", "documents", "files"):
        raise InvalidValueError(f"input_kind must be 'auto', 'documents' or 'files', got {input_kind!r}.")
    if isinstance(input, (str, os.PathLike)) and input_kind != "documents":
        if isinstance(input, str) and not _names_file(input):
            raise FileNotFoundError(
                f"training file not found: {input!r:.80}. To train on text, pass a list of documents."
            )
        return _file_lines(_check_files([input]))
    if isinstance(input, (str, bytes)):
        raise InvalidTypeError("input_kind='documents' needs an iterable of str; put the single document in a list.")
    if input_kind == "files":
        return _file_lines(_check_files(list(input)))
    if input_kind == "auto" and isinstance(input, (list, tuple)) and input:
        named = [isinstance(x, os.PathLike) or (isinstance(x, str) and _names_file(x)) for x in input]
        if all(named):
            return _file_lines(_check_files(list(input)))
        if any(isinstance(x, os.PathLike) for x in input):
            index = named.index(False)
            raise InvalidValueError(
                f"input mixes file paths and documents: item {index} ({input[index]!r:.80}) is not an "
                "existing file. Pass input_kind='files' or 'documents'."
            )
    return _document_lines(input)


def _names_file(text: str) -> bool:
    return "\n" not in text and len(text) < 4096 and os.path.isfile(text)


def _document_lines(documents: Iterable[str]) -> Iterator[str]:
    for index, document in enumerate(documents):
        if not isinstance(document, str):
            raise InvalidTypeError(
                f"training input item {index} is {type(document).__name__}, expected str "
                "(a document) or pass input_kind='files' with paths."
            )
        yield from document.split("\n")


def _check_files(paths: list) -> list[Path]:
    for raw in paths:
        if not isinstance(raw, (str, os.PathLike)):
            raise InvalidTypeError(f"training file paths must be str or Path, got {type(raw).__name__}.")
        if not Path(raw).is_file():
            raise FileNotFoundError(f"training file not found: {raw}")
    return [Path(raw) for raw in paths]


def _file_lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        try:
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    yield line.rstrip("\n")
        except UnicodeDecodeError as error:
            raise InvalidValueError(f"training file {path} is not UTF-8 text ({error}).") from None


class _SentenceFeed:
    """The sentences handed to SentencePiece, counted; long ones cut to fit.

    SentencePiece turns an exception raised in the iterator into a bare RuntimeError and
    reports empty input with an empty message, so both are kept here for `_training_error`.
    """

    def __init__(self, sentences: Iterator[str], max_bytes: int, progress: "_TrainingProgress | None" = None):
        self._sentences = sentences
        self._max_chars = max(1, max_bytes // 4)  # UTF-8 uses at most 4 bytes a character
        self._progress = progress
        self.count = 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for sentence in self._sentences:
                if not sentence.strip():
                    continue
                for start in range(0, len(sentence), self._max_chars):
                    self.count += 1
                    if self._progress is not None:
                        self._progress.update()
                    yield sentence[start : start + self._max_chars]
        except Exception as error:
            self.error = error
            raise
        if self._progress is not None:
            self._progress.training()


class _TrainingProgress:
    """A tqdm bar on stderr for `VishwamAITokenizer.train`: lines read, then (SentencePiece
    trains in C++ and reports nothing countable) the elapsed time, refreshed by a thread."""

    def __init__(self):
        from tqdm.auto import tqdm

        self._bar = tqdm(desc="tokenizer: reading", unit=" lines", file=sys.stderr, mininterval=0.5,
                         dynamic_ncols=True)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def update(self) -> None:
        self._bar.update()

    def training(self) -> None:
        self._bar.set_description("tokenizer: training on the lines read", refresh=True)

        def tick():
            while not self._stop.wait(0.5):
                self._bar.refresh()

        self._ticker = threading.Thread(target=tick, daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self._bar.close()


def _training_error(error: RuntimeError, feed: _SentenceFeed, vocab_size: int, model_type: str) -> Exception:
    if feed.error is not None:
        return feed.error
    if feed.count == 0:
        return ValueError(
            "training input is empty: no line with non-whitespace text was found. Pass documents "
            "(a list of str) or text files with content."
        )
    message = str(error)
    if match := _TOO_HIGH.search(message):
        largest = int(match.group(2))
        return ValueError(
            f"vocab_size={vocab_size} is more than this corpus supports with model_type={model_type!r}: "
            f"the largest that works is {largest}. Pass vocab_size<={largest}, add text, or pass "
            "hard_vocab_limit=False to accept a smaller vocabulary."
        )
    if match := _TOO_SMALL.search(message):
        needed = int(match.group(2))
        return ValueError(
            f"vocab_size={vocab_size} is too small: this corpus needs at least {needed} pieces (4 special "
            "tokens, user symbols, 256 byte-fallback pieces and its characters). Pass "
            f"vocab_size>={needed} or a lower character_coverage."
        )
    return RuntimeError(f"SentencePiece training failed: {message}")

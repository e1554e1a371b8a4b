"""Checks of the texts and ids handed to a tokenizer, with errors that name the method."""

from collections.abc import Sequence

import numpy as np

from ..errors import InvalidTypeError, InvalidValueError


def _text_type_error(method: str, value: object) -> str:
    return f"{method} expects str, got {type(value).__name__}: {value!r:.80}"


def _check_texts(method: str, texts: object) -> list[str]:
    if isinstance(texts, (str, bytes)):
        kind = type(texts).__name__
        raise InvalidTypeError(f"{method} expects a list of str, got a single {kind}; put it in a list.")
    if not isinstance(texts, list):
        if not isinstance(texts, (tuple, Sequence)):
            raise InvalidTypeError(f"{method} expects a list of str, got {type(texts).__name__}.")
        texts = list(texts)
    if not all(isinstance(text, str) for text in texts):
        index, value = next((i, t) for i, t in enumerate(texts) if not isinstance(t, str))
        kind = type(value).__name__
        raise InvalidTypeError(f"{method} expects a list of str, but item {index} is {kind}: {value!r:.80}")
    return texts


def _as_id_list(ids: object, ndim: int, method: str) -> list:
    """`ids` as a list (of lists), without copying lists; sp checks the element types."""
    if hasattr(ids, "tolist") and hasattr(ids, "ndim"):  # numpy / JAX arrays
        if ids.ndim != ndim:
            raise InvalidValueError(f"{method} expects a {ndim}-D array of ids, got shape {tuple(ids.shape)}.")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InvalidTypeError(f"{method} expects integer ids, got dtype {ids.dtype}.")
        return ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidTypeError(f"{method} expects a sequence of int ids, got {type(ids).__name__}.")
    if ndim == 1:
        rows = [ids if type(ids) is list else list(ids)]
    else:
        rows = [row if type(row) is list else _as_id_list(row, 1, method) for row in ids]
    # sp reads a sequence that starts with a str as pieces, not ids.
    first = next((row[0] for row in rows if row), None)
    if isinstance(first, (str, bytes)):
        raise InvalidTypeError(f"{method} expects int ids, got {type(first).__name__}: {first!r:.80}")
    return rows[0] if ndim == 1 else rows

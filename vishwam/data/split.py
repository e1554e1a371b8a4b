"""The train/validation split, by document hash."""

import numpy as np

from ..errors import InvalidValueError


def split_documents(doc_hashes: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split by document.

    A document goes to validation when its text hash, read as a number in
    [0, 1), is below `val_fraction`. The decision depends on the document's
    text alone, so adding, removing or reordering other documents never moves
    it, and duplicated documents land on the same side. When `val_fraction > 0`
    but no document falls below it (tiny corpora), the document with the
    smallest hash becomes the validation set, so validation is never empty.

    Returns:
        `(train_indices, val_indices)`, int64 document indices in ascending order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    hashes = np.asarray(doc_hashes, dtype=np.uint64)
    unit = (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53
    is_val = unit < val_fraction
    if val_fraction > 0 and not is_val.any() and len(hashes) > 1:
        is_val[np.argmin(hashes)] = True
    train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(train) == 0:
        raise InvalidValueError(f"the split left no training documents ({len(hashes)} document(s), "
                                f"val_fraction={val_fraction}); lower val_fraction or add documents.")
    return train, val

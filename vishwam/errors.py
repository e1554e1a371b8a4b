"""The library's own error for bad input: what validation raises when a config, an argument, a
file or a directory is refused. The message names the input and the fix.

`InvalidValueError` is a `ValueError` and `InvalidTypeError` a `TypeError`, so code that catches
those keeps working; both are `InputError`, which the scripts report as bad input (exit 2, one
`error: ...` line) while any other exception is a bug (exit 1, `--debug` shows the traceback).
"""


class InputError(Exception):
    """Bad input refused by vishwam's validation (the base of the two below)."""


class InvalidValueError(InputError, ValueError):
    """A value vishwam refuses: out of range, contradictory, malformed, or not matching its data."""


class InvalidTypeError(InputError, TypeError):
    """An argument of the wrong kind (a string where a list is expected, a legacy PRNG key, ...)."""

"""Stopping a run cleanly: SIGTERM or SIGINT (Ctrl-C) ask the loop to stop after the current step.

The loop then writes a final checkpoint, closes the database (`status = 'stopped'`) and
returns; an evaluation in progress stops at its next batch and is not logged. A second
signal raises `KeyboardInterrupt` at once (cleanup still runs). With several processes the
loop stops on a signal any of them received, so all save the same step together.
"""

import signal
import threading
from typing import Any

import jax
import numpy as np


class StopSignals:
    """SIGTERM/SIGINT set `signum`, which the loop checks between steps; a second
    signal raises `KeyboardInterrupt` at once (cleanup still runs)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}) while stopping")
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def agreed(self) -> str | None:
        """The name of the signal to stop for, the same in every process: with several
        processes, one that any of them received (a tiny all-gather per call), so that
        all stop after the same step and save the checkpoint together."""
        if jax.process_count() == 1:
            return self.name
        from jax.experimental import multihost_utils

        signum = int(np.max(multihost_utils.process_allgather(np.int32(self.signum or 0))))
        return None if signum == 0 else signal.Signals(signum).name

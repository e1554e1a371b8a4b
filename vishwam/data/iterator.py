"""The batch iterator: shuffled, resumable, sharded across processes, prefetched on a thread."""

import queue
import threading
import weakref
from typing import Any

import numpy as np

from vishwam.data.handoff import put_unless_stopped
from vishwam.data.packing import Batch, PackedRows

from ..errors import InvalidTypeError, InvalidValueError


class _End:
    """Queue marker: a finite iterator has no more batches."""


class _Schedule:
    """Which rows make up each batch: the pure function behind `DataIterator`.

    The prefetch thread gets its own copy (its own permutation cache), so it
    shares no mutable state with the consumer.
    """

    def __init__(self, rows: PackedRows, batch_size: int, local_batch_size: int, seed: int,
                 shuffle: bool, repeat: bool, process_index: int):
        self.rows, self.batch_size, self.local_batch_size = rows, batch_size, local_batch_size
        self.seed, self.shuffle, self.repeat, self.process_index = seed, shuffle, repeat, process_index
        self._orders: dict[int, np.ndarray] = {}

    def copy(self) -> "_Schedule":
        return _Schedule(self.rows, self.batch_size, self.local_batch_size, self.seed, self.shuffle,
                         self.repeat, self.process_index)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            n = self.rows.num_rows
            self._orders[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n)
                                   if self.shuffle else np.arange(n))
        return self._orders[epoch]

    def exhausted(self, position: int) -> bool:
        return not self.repeat and position * self.batch_size >= self.rows.num_rows

    def batch(self, position: int) -> Batch:
        first = position * self.batch_size + self.process_index * self.local_batch_size
        slots = first + np.arange(self.local_batch_size)
        n = self.rows.num_rows
        if self.repeat:
            epochs = slots // n
            rows = np.empty_like(slots)
            for epoch in np.unique(epochs):
                here = epochs == epoch
                rows[here] = self._order(int(epoch))[slots[here] % n]
        else:
            rows = np.where(slots < n, slots, -1)
        return self.rows.batch(rows)


class DataIterator:
    """Deterministic, resumable batches of `PackedRows`, prefetched on a thread.

    Global batch `b` is made of the rows at slots `b * batch_size ...
    (b + 1) * batch_size - 1` of an endless sequence of epochs; epoch `e` lists
    every row once, in the order `np.random.default_rng([seed, e]).permutation`
    (or in order without `shuffle`). A batch may straddle two epochs, so no row
    is ever skipped. This process yields the `batch_size // process_count` rows
    of slot range `process_index`, so the processes together see each global
    batch exactly once. Every batch is a pure function of its index, which is
    why `state()` is just that index plus the settings it must match.

    With `repeat=False` (validation) the iterator walks one unshuffled epoch and
    stops; the last batch is filled with all-padding rows (`loss_mask` 0), so
    every batch has the same shape and every row is seen once. `len()` is the
    number of batches; `reset()` starts over.

    `prefetch > 0` computes that many batches ahead on a daemon thread (a
    bounded queue); an exception there is re-raised by `next()` (with a note),
    and the next call restarts from the failed batch. `close()` (or leaving a
    `with` block, or dropping the iterator) stops the thread.
    """

    def __init__(self, rows: PackedRows, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 repeat: bool = True, process_index: int | None = None, process_count: int | None = None,
                 prefetch: int = 2):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        if not 0 <= process_index < process_count:
            raise InvalidValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
        if batch_size % process_count:
            raise InvalidValueError(f"batch_size={batch_size} is the global batch and must be divisible by "
                                    f"process_count={process_count}; use a multiple of {process_count}.")
        if prefetch < 0:
            raise InvalidValueError(f"prefetch must be >= 0, got {prefetch}.")
        self.rows = rows
        self.batch_size = batch_size
        """Global batch size (all processes); each batch here has `local_batch_size` rows."""
        self.local_batch_size = batch_size // process_count
        self.seed, self.shuffle, self.repeat = int(seed), bool(shuffle), bool(repeat)
        self.process_index, self.process_count = process_index, process_count
        self.prefetch = prefetch
        self._schedule = _Schedule(rows, batch_size, self.local_batch_size, self.seed, self.shuffle,
                                   self.repeat, process_index)
        self._position = 0
        self._worker: tuple[threading.Thread, threading.Event, queue.Queue, weakref.finalize] | None = None
        self._closed = False

    def __len__(self) -> int:
        if self.repeat:
            raise InvalidTypeError("a repeating DataIterator is endless; len() exists only with repeat=False.")
        return -(-self.rows.num_rows // self.batch_size)

    @property
    def position(self) -> int:
        """Index of the next global batch."""
        return self._position

    @property
    def epoch(self) -> int:
        """Epoch of the first row of the next batch."""
        return self._position * self.batch_size // self.rows.num_rows

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one local batch, padding included."""
        return self.local_batch_size * self.rows.seq_len

    def batch_at(self, position: int) -> Batch:
        """This process's batch number `position` (what `next()` yields there)."""
        return self._schedule.batch(position)

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("this DataIterator is closed; build a new one (and restore() its "
                               "state) to continue.")
        if self.prefetch == 0:
            if self._schedule.exhausted(self._position):
                raise StopIteration
            batch = self._schedule.batch(self._position)
        else:
            if self._worker is None:
                self._start()
            item = self._worker[2].get()
            if isinstance(item, BaseException):
                self._stop()
                item.add_note(f"(raised in the vishwam.data prefetch thread at batch {self._position})")
                raise item
            if item is _End:
                self._stop()
                raise StopIteration
            position, batch = item
            assert position == self._position, (position, self._position)
        self._position += 1
        return batch

    def _start(self):
        stop, buffer = threading.Event(), queue.Queue(maxsize=self.prefetch)
        # The thread holds no reference to `self`, so an iterator dropped
        # without close() is collected and the finalizer stops its thread.
        thread = threading.Thread(target=_produce, args=(self._schedule.copy(), self._position, stop, buffer),
                                  name="vishwam-data-prefetch", daemon=True)
        self._worker = (thread, stop, buffer, weakref.finalize(self, stop.set))
        thread.start()

    def _stop(self):
        if self._worker is None:
            return
        thread, stop, _, finalizer = self._worker
        stop.set()
        thread.join()
        finalizer.detach()
        self._worker = None

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position; `restore` on an iterator over the same rows continues here."""
        return {"format": "vishwam.data.DataIterator/1", "position": self._position, "seed": self.seed,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "repeat": self.repeat,
                "rows": self.rows.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from `state()` of an iterator over the same rows and settings.

        The process index and count may differ (resuming on another number of
        hosts): the position counts global batches.
        """
        mine = self.state()
        wrong = {k: (state.get(k), mine[k]) for k in mine if k != "position" and state.get(k) != mine[k]}
        if wrong:
            raise InvalidValueError(f"DataIterator.restore: the state was saved with other data or settings "
                                    f"(saved, current): {wrong}. Rebuild the iterator with the same source, "
                                    "tokenizer, seq_len, split, seed and batch_size, or start afresh.")
        position = state.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise InvalidValueError(f"DataIterator.restore: position must be an integer >= 0, got {position!r}.")
        self._stop()
        self._position = position

    def reset(self) -> None:
        """Back to batch 0 (e.g. before each validation pass)."""
        self._stop()
        self._position = 0

    def close(self) -> None:
        """Stops the prefetch thread; the iterator cannot be used afterwards."""
        self._stop()
        self._closed = True

    def __enter__(self) -> "DataIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _produce(schedule: _Schedule, position: int, stop: threading.Event, buffer: queue.Queue):
    def put(item) -> bool:
        return put_unless_stopped(buffer, item, stop)

    try:
        while not stop.is_set():
            if schedule.exhausted(position):
                put(_End)
                return
            if not put((position, schedule.batch(position))):
                return
            position += 1
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
        put(e)

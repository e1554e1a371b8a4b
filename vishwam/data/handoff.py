"""Handing items from a producer thread to a consumer without ever blocking a stopped producer."""

import queue
import threading


def put_unless_stopped(buffer: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` into the bounded `buffer`, polling `stop` while it is full, so a consumer
    that gave up (and set `stop`) never leaves the producer blocked. False if stopped first."""
    while not stop.is_set():
        try:
            buffer.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False

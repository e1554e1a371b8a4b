"""Orbax's restore event loops, made to end quietly when a read in them fails.

Orbax runs each restore in a fresh event loop (`run_until_complete`, then `close`) and,
unlike `asyncio.run`, does not cancel what is still pending. When one read of a damaged
checkpoint fails, its error propagates while sibling reads are still in flight, and
"Event loop is closed", "Task exception was never retrieved" and "Exception ignored in
<coroutine ...>" tracebacks would follow the one-line `CheckpointError`. Within
`pending_reads_cancelled_on_failure()`, new event loops cancel and await what is pending
before they close, so none of that is printed.
"""

import asyncio
import contextlib
import threading
from typing import Any


class DrainingLoopPolicy(asyncio.AbstractEventLoopPolicy):
    """`base`'s event loops, made to end quietly when the restore run in them fails. A loop of this policy:

    - on `close`, first cancels its pending tasks and awaits them, which also cancels the
      TensorStore reads they wait on (asyncio.run does the same);
    - drops a callback that TensorStore's threads send after `close` (a read that completed
      just before its cancel): it could only resolve a future nobody awaits any more, and
      asyncio itself drops a `concurrent.futures` result that arrives after `close`;
    - does not log "exception was never retrieved" for the failed siblings of the read whose
      error `Checkpointer._read` reports (every other report goes to asyncio's default handler).
    """

    def __init__(self, base: asyncio.AbstractEventLoopPolicy):
        self._base = base

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        return self._base.get_event_loop()

    def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._base.set_event_loop(loop)

    def get_child_watcher(self) -> Any:  # asyncio subprocesses on Unix, Python < 3.14
        return self._base.get_child_watcher()

    def set_child_watcher(self, watcher: Any) -> None:
        self._base.set_child_watcher(watcher)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._base.new_event_loop()
        close, call_soon_threadsafe = loop.close, loop.call_soon_threadsafe

        def cancel_pending_then_close():
            pending = asyncio.all_tasks(loop) if not loop.is_closed() and not loop.is_running() else ()
            if pending:
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            close()

        def call_soon_threadsafe_unless_closed(callback, *args, context=None):
            try:
                return call_soon_threadsafe(callback, *args, context=context)
            except RuntimeError:
                if loop.is_closed():  # checked after the failure: a loop never reopens
                    return None
                raise

        def report(_, context):
            if not context.get("message", "").endswith("exception was never retrieved"):
                loop.default_exception_handler(context)

        loop.close = cancel_pending_then_close
        loop.call_soon_threadsafe = call_soon_threadsafe_unless_closed
        loop.set_exception_handler(report)
        return loop


# The policy is process-wide: restores take turns, so that each one puts back the policy it found.
_POLICY_LOCK = threading.Lock()


@contextlib.contextmanager
def pending_reads_cancelled_on_failure():
    """Within: new event loops (orbax's restore loops) are `DrainingLoopPolicy`'s."""
    with _POLICY_LOCK:
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(DrainingLoopPolicy(previous))
        try:
            yield
        finally:
            asyncio.set_event_loop_policy(previous)

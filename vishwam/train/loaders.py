"""A data loader's position in a checkpoint: save it as JSON, put the loader back there.

Two kinds of loader resume exactly: vishwam's `DataIterator` (`state()` / `restore(state)`)
and grain's iterators (`get_state()` / `set_state(state)`: a `grain.python.DataLoader`'s
gives bytes of JSON, a grain dataset's a dict). Any other iterable trains, but a resumed
run cannot continue its data where it stopped.
"""

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidValueError


def is_resumable(loader: Any) -> bool:
    """Whether `loader` reports and restores its position (either kind above)."""
    return (hasattr(loader, "state") and hasattr(loader, "restore")) or \
        (hasattr(loader, "get_state") and hasattr(loader, "set_state"))


def loader_state(loader: Any) -> Any:
    """The loader's position as JSON: `state()` as it is (vishwam's `DataIterator`), or grain's
    `get_state()` (bytes of JSON from a `DataLoader` iterator, a dict from a dataset iterator)
    wrapped as `{"get_state": ...}`."""
    if hasattr(loader, "state") and hasattr(loader, "restore"):
        return loader.state()
    value = loader.get_state()
    if isinstance(value, bytes):
        return {"get_state": {"bytes": value.decode("utf-8")}}
    return {"get_state": {"value": value}}


def restore_loader(loader: Any, state: Any) -> None:
    """Puts the loader back at `state`, as returned by `loader_state`."""
    if hasattr(loader, "state") and hasattr(loader, "restore"):
        loader.restore(state)
        return
    if not (isinstance(state, Mapping) and isinstance(state.get("get_state"), Mapping)):
        raise InvalidValueError(f"the checkpoint's data position {str(state)[:200]} was not written by a loader with "
                                "get_state()/set_state(); resume with the loader the run was started with.")
    saved = state["get_state"]
    loader.set_state(saved["bytes"].encode("utf-8") if "bytes" in saved else saved["value"])

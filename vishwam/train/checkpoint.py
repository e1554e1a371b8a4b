"""Orbax checkpoints of a training state: async saves, keep-last-K, exact restore.

A checkpoint step holds three orbax items: `state`, the array leaves of the state pytree
stored flat under their leaf index (typed PRNG keys as their raw `uint32` key data);
`manifest`, one JSON entry per leaf (`jax.tree_util.keystr` path, shape, dtype, key
implementation), against which a restore target is matched by path, so a target that does
not fit fails with the paths named instead of restoring half a state; and `meta`, the
caller's JSON (config dict, data-iterator state, tokenizer path, ...). Flattening ourselves
also avoids orbax's silent `None`-leaf skip: an `eqx.partition`ed model keeps its `None`s.

    with Checkpointer(run_dir / "checkpoints", keep=3) as ckpt:
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(None, abstract_state, expected_config=config)
        metrics_db.flush()  # before every save: see `MetricsDB`
        ckpt.save(step, state, {"config": config, "data": loader.state()})
"""

import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

from ..arrays import abstract_arrays as abstract_arrays
from ..arrays import combine_arrays as combine_arrays
from ..arrays import is_array_like as is_array_like
from ..arrays import partition_arrays as partition_arrays
from ..config import config_diff as config_diff
from ..errors import InvalidTypeError, InvalidValueError
from ._orbax_loops import pending_reads_cancelled_on_failure

_STATE, _META, _MANIFEST = "state", "meta", "manifest"
_FORMAT = 1
_LISTED = 8  # paths shown per category in an error message

_OPEN: set["Checkpointer"] = set()


def _close_open_checkpointers() -> None:
    for ckpt in list(_OPEN):
        ckpt.close()


# Not `atexit`: by the time atexit hooks run, concurrent.futures has shut its
# thread pools and orbax's background finalisation fails ("cannot schedule new
# futures after shutdown"), leaving only `<step>.orbax-checkpoint-tmp`. Hooks
# registered here run first (LIFO, and orbax imported concurrent.futures above).
threading._register_atexit(_close_open_checkpointers)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or restored as asked."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The restore target does not fit the checkpoint (leaves, shapes or dtypes)."""


class IncompatibleConfigError(CheckpointError, ValueError):
    """The checkpoint was written by a run whose config differs from this one; `diff` holds
    `{dotted field: (checkpoint value, current value)}`."""

    def __init__(self, message: str, diff: dict[str, tuple[Any, Any]] | None = None):
        super().__init__(message)
        self.diff = dict(diff or {})


# ----------------------------------------------------------------------------- configs
def check_compatible(saved_config: Mapping[str, Any] | None, config: Mapping[str, Any], *,
                     ignore: Iterable[str] = ()) -> None:
    """Raise `IncompatibleConfigError` listing every differing field.

    Arguments:
        saved_config: the config stored in the checkpoint's meta.
        config: the config of the run that wants to resume.
        ignore: dotted field names allowed to change on resume (e.g. the total
            number of steps, or logging intervals).
    """
    if saved_config is None:
        raise IncompatibleConfigError(
            "The checkpoint's meta has no 'config' to compare with; save with "
            "`meta={'config': config.to_dict(), ...}` or restore without `expected_config`.")
    ignored = set(ignore)
    diff = {k: v for k, v in config_diff(saved_config, config).items() if k not in ignored}
    if diff:
        lines = "\n".join(f"  {k}: checkpoint={a!r}, now={b!r}" for k, (a, b) in diff.items())
        raise IncompatibleConfigError(
            f"Cannot resume: {len(diff)} config field(s) differ from the checkpoint's:\n{lines}\n"
            "Use the checkpoint's config (it is in the checkpoint meta), start a new run "
            "directory, or list fields that may change in `ignore=`.", diff)


# ------------------------------------------------------------------------- leaves
def _is_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _describe(shape: Iterable[int], dtype: Any) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]"


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {p}" for p in items[:_LISTED])
    more = f"\n    ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"  {len(items)} {title}:\n{shown}{more}"


def _flatten(tree: PyTree, *, what: str, allow_structs: bool) -> tuple[list[tuple[str, Any]], Any]:
    """Leaves as `(path, leaf)` plus the treedef; rejects leaves that are not arrays."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for path, leaf in with_path:
        name = jax.tree_util.keystr(path)
        ok = isinstance(leaf, (jax.Array, np.ndarray)) or (
            allow_structs and isinstance(leaf, jax.ShapeDtypeStruct))
        if not ok:
            kinds = "arrays or jax.ShapeDtypeStruct" if allow_structs else "arrays"
            raise InvalidTypeError(
                f"{what}: leaf {name} is a {type(leaf).__name__} ({leaf!r:.60}); only {kinds} "
                "go into checkpoint state. Wrap numbers with jnp.asarray, put JSON-able "
                "values in `meta`, and split Equinox modules with `partition_arrays`.")
        leaves.append((name, leaf))
    return leaves, treedef


# --------------------------------------------------------------------- checkpointer
class Checkpointer:
    """Keep-last-K orbax checkpoints of `(state pytree, JSON meta)` in one directory.

    Use as a context manager (or call `close()`): an async save still in flight
    when the process exits is otherwise lost. As a safety net every open
    `Checkpointer` is also closed at normal interpreter exit (not on a signal:
    the runner's SIGTERM handler must close it).

    Arguments:
        directory: where step folders `<step>/` go; created if missing. Left-over
            `<step>.orbax-checkpoint-tmp` folders of killed saves are removed.
        keep: number of most recent steps kept; `None` keeps all.
        async_save: write in a background thread; `save` returns once the arrays
            are copied off the device (so they may be donated right after).
    """

    def __init__(self, directory: str | Path, *, keep: int | None = 3, async_save: bool = True):
        if keep is not None and keep < 1:
            raise InvalidValueError(f"Checkpointer(keep={keep}): keep at least 1 step, or None for all.")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _META, _MANIFEST))
        # orbax 0.12 removes the left-over tmp folders in a background future that only its
        # next save awaits; wait here, so that a constructed Checkpointer has removed them
        # (a restore or a listing right after no longer races the deletion).
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if callable(await_cleanup):
            await_cleanup()
        self._closed = False
        _OPEN.add(self)

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait(self) -> None:
        """Block until pending saves are on disk (re-raises a failed background save)."""
        self._manager.wait_until_finished()

    def saving(self) -> bool:
        """True while an asynchronous save is still being written (not yet committed)."""
        return self._manager.is_saving_in_progress()

    def close(self) -> None:
        """Finish pending saves and release the manager. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._manager.close()

    # ------------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        """Saved steps (including one still being written by this process), ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON meta of `step` (default: latest) without reading any array."""
        step = self._existing_step(step)
        return self._read(step, {_META: ocp.args.JsonRestore()})[_META]

    # ---------------------------------------------------------------------- save
    def save(self, step: int, state: PyTree, meta: Mapping[str, Any]) -> bool:
        """Start saving `state` (arrays, typed keys) and `meta` (JSON) as `step`.

        Returns True when a save started, False when `step` is already the
        latest checkpoint (e.g. a final save right after a periodic one).
        Raises `CheckpointError` for a step older than the latest one: that
        means a run restarted without restoring, and would interleave two runs.
        """
        self._check_open("save")
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step == latest:
            return False
        if latest is not None and step < latest:
            raise CheckpointError(
                f"save(step={step}): {self.directory} already holds step {latest}. A run that "
                "resumes must restore the latest step first; a fresh run needs a new directory.")
        leaves, _ = _flatten(state, what=f"save(step={step})", allow_structs=False)
        if not leaves:
            raise CheckpointError(f"save(step={step}): the state has no array leaves; nothing to save.")
        if not isinstance(meta, Mapping):
            raise InvalidTypeError(f"save(step={step}): meta must be a dict of JSON values, got {type(meta).__name__}.")
        try:
            meta = json.loads(json.dumps(dict(meta)))
        except (TypeError, ValueError) as err:
            raise InvalidTypeError(f"save(step={step}): meta is not JSON-serialisable ({err}); store "
                                   "paths as str and configs as dicts (e.g. `config.to_dict()`).") from err

        arrays, manifest = {}, []
        for i, (path, leaf) in enumerate(leaves):
            entry = {"path": path, "shape": list(leaf.shape), "dtype": str(leaf.dtype), "key_impl": None}
            if _is_key(leaf.dtype):
                entry["key_impl"] = str(jax.random.key_impl(leaf))
                leaf = jax.random.key_data(leaf)
                entry["key_data"] = {"shape": list(leaf.shape), "dtype": str(leaf.dtype)}
            arrays[str(i)] = leaf
            manifest.append(entry)
        started = self._manager.save(step, force=True, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(arrays),
            _META: ocp.args.JsonSave(meta),
            _MANIFEST: ocp.args.JsonSave({"format": _FORMAT, "leaves": manifest}),
        }))
        if not started:
            raise CheckpointError(f"orbax declined to save step {step} in {self.directory}.")
        return True

    # ------------------------------------------------------------------- restore
    def restore(self, step: int | None, target_like: PyTree, *,
                expected_config: Mapping[str, Any] | None = None,
                ignore: Iterable[str] = ()) -> tuple[PyTree, dict[str, Any]]:
        """Restore `step` (None: the latest) into the structure of `target_like`.

        Arguments:
            target_like: the state's structure with arrays or `jax.ShapeDtypeStruct`
                leaves (`None` subtrees allowed). Each leaf's sharding, when it has
                one, is where the restored array lands; otherwise device 0.
                Typed keys: give a key array or a struct with the key dtype.
            expected_config: if given, compared with `meta["config"]` first
                (`check_compatible`), before any array is read.
            ignore: config fields allowed to differ.

        Returns:
            `(state, meta)`: state has `target_like`'s structure.

        Raises:
            CheckpointMismatchError: naming every target path that is missing from
                the checkpoint, every checkpoint path not in the target, and
                every shape/dtype/sharding that differs; also if orbax returned
                fewer leaves than asked.
        """
        self._check_open("restore")
        step = self._existing_step(step)
        saved = self._read(step, {_META: ocp.args.JsonRestore(), _MANIFEST: ocp.args.JsonRestore()})
        meta, manifest = saved[_META], saved[_MANIFEST]
        if manifest.get("format") != _FORMAT:
            raise CheckpointError(f"Step {step} in {self.directory} has manifest format "
                                  f"{manifest.get('format')!r}; this vishwam reads format {_FORMAT}.")
        if expected_config is not None:
            check_compatible(meta.get("config"), expected_config, ignore=ignore)

        where = f"checkpoint step {step} in {self.directory}"
        leaves, treedef = _flatten(target_like, what=f"restore({step}) target_like", allow_structs=True)
        if not leaves:
            raise CheckpointMismatchError(
                f"restore target for {where} has no array leaves, so nothing would be restored. "
                "An abstract model split with `eqx.partition(m, eqx.is_array)` is all None; "
                "use `partition_arrays(m)` (keeps ShapeDtypeStruct leaves).")
        entries = {e["path"]: (i, e) for i, e in enumerate(manifest["leaves"])}
        self._match(where, leaves, entries)

        request = {}
        for path, leaf in leaves:
            i, entry = entries[path]
            shape = tuple(entry["shape"])
            # Explicitly device 0: left None, orbax would rebuild the saved sharding, which
            # fails for a checkpoint written on another topology (e.g. by several processes).
            sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            if entry["key_impl"] is not None:
                # The trailing key-data axis stays unsharded: a PartitionSpec
                # shorter than the rank replicates the remaining axes.
                raw = entry["key_data"]
                request[str(i)] = jax.ShapeDtypeStruct(tuple(raw["shape"]), raw["dtype"], sharding=sharding)
            elif isinstance(leaf, np.ndarray):
                request[str(i)] = leaf
            else:
                request[str(i)] = jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)
        restored = self._read(step, {_STATE: ocp.args.StandardRestore(request)})[_STATE]

        values, problems = [], []
        for path, leaf in leaves:
            i, entry = entries[path]
            value = restored.get(str(i)) if isinstance(restored, Mapping) else None
            if value is None:
                problems.append(path)
                values.append(None)
                continue
            if entry["key_impl"] is not None:
                value = jax.random.wrap_key_data(value, impl=entry["key_impl"])
            sharding = getattr(leaf, "sharding", None)
            if sharding is not None and not value.sharding.is_equivalent_to(sharding, value.ndim):
                problems.append(f"{path} (landed on {value.sharding}, asked for {sharding})")
            values.append(value)
        if problems:
            raise CheckpointMismatchError(
                f"Restored {len(leaves) - len(problems)} of {len(leaves)} leaves from {where}; "
                f"not restored as asked:\n{_listing('leaves', problems)}")
        return jax.tree_util.tree_unflatten(treedef, values), meta

    # ------------------------------------------------------------------- helpers
    def _read(self, step: int, items: dict[str, Any]) -> Any:
        """Orbax's restore of `items`; a damaged step (a truncated or half-copied file) raises
        `CheckpointError` naming it. Orbax and TensorStore report these as bare exceptions, and
        leave the failed read's sibling reads pending unless `pending_reads_cancelled_on_failure` cancels them."""
        try:
            with pending_reads_cancelled_on_failure():
                return self._manager.restore(step, args=ocp.args.Composite(**items))
        except (CheckpointError, FileNotFoundError):
            raise
        except Exception as error:  # noqa: BLE001  (whatever the storage layer raises for unreadable bytes)
            first = (str(error).strip().splitlines() or [type(error).__name__])[0].split(" See full")[0][:200]
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be read ({first}); the files are damaged "
                "(truncated or partly copied). Restore an earlier step, or delete this one.") from error

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise CheckpointError(f"{what}: this Checkpointer for {self.directory} is closed.")

    def _existing_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                                    f"saved steps are {steps}.")
        return int(step)

    @staticmethod
    def _match(where: str, leaves: list[tuple[str, Any]], entries: dict[str, tuple[int, dict]]) -> None:
        paths = [p for p, _ in leaves]
        missing = [p for p in paths if p not in entries]
        unexpected = sorted(set(entries) - set(paths))
        differ = []
        for path, leaf in leaves:
            if path not in entries:
                continue
            entry = entries[path][1]
            if tuple(entry["shape"]) != tuple(leaf.shape) or entry["dtype"] != str(leaf.dtype):
                differ.append(f"{path}: checkpoint {_describe(entry['shape'], entry['dtype'])}, "
                              f"target {_describe(leaf.shape, leaf.dtype)}")
        if missing or unexpected or differ:
            parts = []
            if missing:
                parts.append(_listing("target leaves not in the checkpoint", missing))
            if unexpected:
                parts.append(_listing("checkpoint leaves not in the target", unexpected))
            if differ:
                parts.append(_listing("leaves with a different shape/dtype", differ))
            raise CheckpointMismatchError(
                f"The restore target does not match {where} "
                f"({len(entries)} saved leaves, {len(leaves)} in the target):\n" + "\n".join(parts)
                + "\nBuild the target from the config in the checkpoint's meta (`read_meta`).")


def checkpoint_steps(directory: str | Path) -> tuple[list[int], list[str]]:
    """`(complete steps, names of unfinished tmp folders)` in a checkpoint directory.

    Reads the directory only: no manager, no clean-up (for reports).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return [], []
    complete = sorted(ocp.path.step.checkpoint_steps(directory))
    unfinished = sorted(p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)
    return complete, unfinished


"""Run metrics in one DuckDB file: a buffered writer for the runner and a small read API.

Tables (long format):

- `runs(run_id PK, started_at, updated_at, status, config JSON, host, pid, versions JSON, resumes,
  compiled_memory JSON)`; times are UTC. `compiled_memory` is the train step's XLA memory
  analysis as the runner last compiled it (`set_compiled_memory`).
- `metrics(run_id, step, name, value, wall_time)`, primary key `(run_id, step, name)`.
  A resumed run re-runs the steps after its checkpoint; their rows *replace* the
  earlier ones, so the table always describes the trajectory that produced the
  latest checkpoints (with exact resume the values are equal anyway).
- `events(run_id, step, kind, detail JSON, wall_time)`: history, never replaced.

`wall_time` is Unix seconds. NaN/inf values are stored as they are.

Exact resume needs two calls from the runner:

- `flush()` before each checkpoint save, so every step the checkpoint covers is
  on disk (buffered rows die with the process);
- `rewind(restored_step)` after a restore, so rows of the abandoned trajectory
  beyond the checkpoint disappear even if the resumed run stops earlier.

DuckDB lets one process hold the file (see DEPENDENCY-NOTES); a connection is
used from the thread that opened it. `duckdb` is imported inside functions so
that `import vishwam` does not need it.
"""

import contextlib
import datetime
import json
import operator
import os
import platform
import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..config import config_diff
from ..errors import InvalidTypeError, InvalidValueError

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, started_at TIMESTAMP, updated_at TIMESTAMP,
        status VARCHAR, config JSON, host VARCHAR, pid INTEGER, versions JSON,
        resumes INTEGER)""",
    # Added after the first files were written: older files gain the column on open.
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS compiled_memory JSON",
    """CREATE TABLE IF NOT EXISTS metrics (
        run_id VARCHAR, step BIGINT, name VARCHAR, value DOUBLE, wall_time DOUBLE,
        PRIMARY KEY (run_id, step, name))""",
    """CREATE TABLE IF NOT EXISTS events (
        run_id VARCHAR, step BIGINT, kind VARCHAR, detail JSON, wall_time DOUBLE)""",
)

# Rows go through the Appender into a per-connection staging table (a numpy
# batch scan would turn NaN into NULL), then one merge. Last row wins both inside
# a batch (QUALIFY: the same key logged twice before a flush) and against the
# table (ON CONFLICT: a resumed run re-logging a step).
_STAGE = """CREATE TEMP TABLE IF NOT EXISTS _vishwam_stage (
    step BIGINT, name VARCHAR, value DOUBLE, wall_time DOUBLE, seq BIGINT)"""
_MERGE = """
    INSERT INTO metrics
    SELECT $run_id, step, name, value, wall_time FROM _vishwam_stage
    QUALIFY row_number() OVER (PARTITION BY step, name ORDER BY seq DESC) = 1
    ON CONFLICT (run_id, step, name) DO UPDATE
    SET value = excluded.value, wall_time = excluded.wall_time"""

_VERSIONED = ("vishwam", "jax", "jaxlib", "equinox", "optax", "orbax-checkpoint", "duckdb",
              "numpy", "sentencepiece")

# Files this process has open for writing: readers in the same process go
# through the writer's connection (DuckDB refuses a second, read-only one).
_WRITERS: dict[Path, "MetricsDB"] = {}


class MetricsDBLockedError(RuntimeError):
    """Another process holds the DuckDB file."""


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def _lock_message(path: Path, err: Exception, doing: str) -> str:
    text = str(err)
    pid = re.search(r"PID (\d+)", text)
    exe = re.search(r"held in (.+?) \(PID", text)
    holder = f"process {pid.group(1)}" if pid else "another process"
    if exe:
        holder += f" ({exe.group(1)})"
    return (f"Cannot {doing} {path}: the file is held by {holder}. DuckDB lets one process "
            "hold a database file at a time, and a reader counts (a notebook, the duckdb CLI, "
            "report.py on a live run). Stop that process or wait for it to finish")


def _connect(path: Path, *, read_only: bool, doing: str):
    import duckdb

    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as err:
        if "lock" not in str(err).lower():
            raise
        raise MetricsDBLockedError(_lock_message(path, err, doing) + ".") from err


class MetricsDB:
    """Buffered writer of one run's metrics, events and status.

    Arguments:
        path: the `.duckdb` file (created with its tables if missing).
        run_id: the run's name; opening an existing `run_id` is a resume
            (`resumed` is True, `resumes` counts up, a changed config is
            recorded as a `config_changed` event).
        config: the run's config as JSON-able dict (stored in `runs.config`).
        flush_every: write the buffer every this many `log` calls (and on
            `flush`, `close`, and exit of the `with` block).
        process_index: only process 0 writes; the others get a writer whose
            methods do nothing. `None` asks `jax.process_index()`.
        on_locked: another process holds `path`: `"raise"` a
            `MetricsDBLockedError`, or `"fallback"` to write to
            `<stem>.<run_id>.<pid>.duckdb` beside it (with a warning; see `path`).

    Values passed to `log` may be device scalars: they are fetched in one batch
    at flush time, so logging never waits for the device.
    """

    def __init__(self, path: str | Path, run_id: str, config: Mapping[str, Any], *,
                 flush_every: int = 100, process_index: int | None = None,
                 on_locked: Literal["raise", "fallback"] = "raise"):
        if flush_every < 1:
            raise InvalidValueError(f"MetricsDB(flush_every={flush_every}): must be >= 1.")
        if on_locked not in ("raise", "fallback"):
            raise InvalidValueError(f"MetricsDB(on_locked={on_locked!r}): choose 'raise' or 'fallback'.")
        if not run_id:
            raise InvalidValueError("MetricsDB: run_id must be a non-empty string.")
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.path = Path(path).absolute()
        self.run_id = str(run_id)
        self.flush_every = flush_every
        self.enabled = process_index == 0
        self.resumed = False
        self.status: str | None = None
        self._steps: list[int] = []
        self._names: list[str] = []
        self._values: list[Any] = []
        self._times: list[float] = []
        self._pending_logs = 0
        self._con = None
        if not self.enabled:
            return
        self._config_json = json.dumps(dict(config), sort_keys=True, default=str)
        self._con = self._open(on_locked)
        self._appender = self._con.appender("_vishwam_stage")
        _WRITERS[self.path] = self
        self._register_run(json.loads(self._config_json))

    # ---------------------------------------------------------------- opening
    def _open(self, on_locked: str):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = _connect(self.path, read_only=False, doing="open the metrics database")
        except MetricsDBLockedError as err:
            if on_locked == "raise":
                raise MetricsDBLockedError(
                    f"{err} Or pass `on_locked='fallback'` to log into a separate file.") from err
            fallback = self.path.with_name(f"{self.path.stem}.{self.run_id}.{os.getpid()}{self.path.suffix}")
            warnings.warn(f"{err}; logging to {fallback} instead.", stacklevel=3)
            self.path = fallback
            con = _connect(self.path, read_only=False, doing="open the fallback metrics database")
        for statement in (*_SCHEMA, _STAGE):
            con.execute(statement)
        return con

    def _register_run(self, config: dict[str, Any]) -> None:
        now = _utcnow()
        previous = self._con.execute(
            "SELECT config FROM runs WHERE run_id = ?", [self.run_id]).fetchall()
        identity = [socket.gethostname(), os.getpid(), json.dumps(_versions(), sort_keys=True)]
        if previous:
            self.resumed = True
            self._con.execute(
                "UPDATE runs SET status = 'running', updated_at = ?, config = ?, host = ?, pid = ?, "
                "versions = ?, resumes = resumes + 1 WHERE run_id = ?",
                [now, self._config_json, *identity, self.run_id])
            changed = config_diff(json.loads(previous[0][0]), config)
            if changed:
                self.event(None, "config_changed", {k: list(v) for k, v in changed.items()})
        else:
            self._con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, 'running', ?, ?, ?, ?, 0, NULL)",
                [self.run_id, now, now, self._config_json, *identity])
        self.status = "running"

    # ---------------------------------------------------------------- writing
    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Buffer `{name: scalar}` for `step` (Python/NumPy numbers or 0-d arrays)."""
        if not self.enabled:
            return
        self._check_open("log")
        step = operator.index(step)
        if not isinstance(values, Mapping):
            raise InvalidTypeError(f"log(step={step}, ...): values must be a dict name -> scalar, "
                                   f"got {type(values).__name__}.")
        now = time.time()
        for name, value in values.items():
            if not isinstance(name, str):
                raise InvalidTypeError(f"log(step={step}): metric names are str, got {name!r}.")
            if not (isinstance(value, (int, float, np.number)) or getattr(value, "shape", None) == ()):
                raise InvalidTypeError(f"log(step={step}): {name!r} must be a scalar, got "
                                       f"{type(value).__name__} with shape {getattr(value, 'shape', None)}; "
                                       "reduce it (e.g. .mean()) or log its parts under separate names.")
            self._steps.append(step)
            self._names.append(name)
            self._values.append(value)
            self._times.append(now)
        self._pending_logs += 1
        if self._pending_logs >= self.flush_every:
            self.flush()

    def flush(self) -> int:
        """Write buffered rows in one transaction; returns how many were written."""
        if not self.enabled or self._con is None or not self._steps:
            return 0
        values = self._values
        jax = sys.modules.get("jax")  # device scalars exist only if jax was imported
        if jax is not None:
            # One transfer for all device scalars instead of one sync per value.
            values = jax.device_get(values)
        values = np.asarray(values, dtype=np.float64).tolist()
        count = len(values)
        con = self._con
        con.begin()
        try:
            self._appender.append_rows(zip(self._steps, self._names, values, self._times, range(count)))
            self._appender.flush()
            con.execute(_MERGE, {"run_id": self.run_id})
            con.execute("DELETE FROM _vishwam_stage")
            con.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", [_utcnow(), self.run_id])
            con.commit()
        except BaseException:
            con.rollback()
            self._appender.clear()
            raise
        self._steps, self._names, self._values, self._times = [], [], [], []
        self._pending_logs = 0
        return count

    def event(self, step: int | None, kind: str, detail: Mapping[str, Any] | None = None) -> None:
        """Record an event now (not buffered): checkpoint, eval, nan, resume, stop, ..."""
        if not self.enabled:
            return
        self._check_open("event")
        step = None if step is None else operator.index(step)
        self._con.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", [
            self.run_id, step, kind, json.dumps(dict(detail or {}), sort_keys=True, default=str),
            time.time()])

    def rewind(self, step: int) -> int:
        """Delete this run's metric rows after `step` (call after restoring `step`).

        Buffered rows after `step` are dropped too. Returns the number of rows deleted.
        """
        if not self.enabled:
            return 0
        self._check_open("rewind")
        step = operator.index(step)
        keep = [i for i, s in enumerate(self._steps) if s <= step]
        self._steps = [self._steps[i] for i in keep]
        self._names = [self._names[i] for i in keep]
        self._values = [self._values[i] for i in keep]
        self._times = [self._times[i] for i in keep]
        deleted = self._con.execute(
            "DELETE FROM metrics WHERE run_id = ? AND step > ?", [self.run_id, step]).fetchall()
        return int(deleted[0][0])

    def set_compiled_memory(self, analysis: Mapping[str, Any]) -> None:
        """Store the train step's memory analysis (JSON-able) in `runs.compiled_memory`."""
        if not self.enabled:
            return
        self._check_open("set_compiled_memory")
        self._con.execute("UPDATE runs SET compiled_memory = ?, updated_at = ? WHERE run_id = ?",
                          [json.dumps(dict(analysis), sort_keys=True, default=str), _utcnow(), self.run_id])

    def set_status(self, status: str) -> None:
        """E.g. `running`, `finished`, `stopped` (signal), `failed`, `nan`."""
        if not self.enabled:
            return
        self._check_open("set_status")
        self._con.execute("UPDATE runs SET status = ?, updated_at = ? WHERE run_id = ?",
                          [status, _utcnow(), self.run_id])
        self.status = status

    def close(self, status: str | None = None) -> None:
        """Flush, set `status` (default: `finished` if still `running`), close. Idempotent."""
        if self._con is None:
            return
        try:
            self.flush()
            if status is not None or self.status == "running":
                self.set_status(status or "finished")
        finally:
            if _WRITERS.get(self.path) is self:
                del _WRITERS[self.path]
            self._con.close()
            self._con = None

    def __enter__(self) -> "MetricsDB":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.close("interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")

    def _check_open(self, what: str) -> None:
        if self._con is None:
            raise RuntimeError(f"MetricsDB.{what}: the database {self.path} is closed.")


# --------------------------------------------------------------------- reading
@contextlib.contextmanager
def _reading(path: str | Path) -> Iterator[Any]:
    path = Path(path).absolute()
    writer = _WRITERS.get(path)
    if writer is not None:
        writer.flush()
        cursor = writer._con.cursor()
        try:
            yield cursor
        finally:
            cursor.close()
        return
    if not path.is_file():
        raise FileNotFoundError(f"No metrics database at {path}.")
    try:
        con = _connect(path, read_only=True, doing="read")
    except MetricsDBLockedError as err:
        raise MetricsDBLockedError(
            f"{err}. A running trainer holds its metrics file: read it after the run ends.") from err
    try:
        yield con
    finally:
        con.close()


def _resolve_run(con: Any, path: str | Path, run_id: str | None) -> str:
    known = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY started_at").fetchall()]
    if not known:
        raise InvalidValueError(f"{path} holds no runs.")
    if run_id is None:
        return known[-1]
    if run_id not in known:
        raise KeyError(f"No run {run_id!r} in {path}; runs: {known}.")
    return run_id


def runs(path: str | Path) -> list[dict[str, Any]]:
    """Every run in the file, oldest first, with `config`, `versions` and `compiled_memory` parsed."""
    with _reading(path) as con:
        cursor = con.execute("SELECT * FROM runs ORDER BY started_at")
        columns = [d[0] for d in cursor.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:
        row["config"] = json.loads(row["config"])
        row["versions"] = json.loads(row["versions"])
        memory = row.get("compiled_memory")
        row["compiled_memory"] = None if memory is None else json.loads(memory)
    return rows


def load_metrics(path: str | Path, run_id: str | None = None,
                 names: list[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{name: (steps int64, values float64)}` sorted by step.

    `run_id=None` reads the most recently started run. Asking for a name the
    run never logged raises `KeyError` listing the names it has.
    """
    with _reading(path) as con:
        run_id = _resolve_run(con, path, run_id)
        data = con.execute(
            "SELECT name, step, value FROM metrics WHERE run_id = ? ORDER BY name, step",
            [run_id]).fetchnumpy()
    all_names = np.asarray(data["name"], dtype=object)
    steps = np.asarray(data["step"], dtype=np.int64)
    values = np.asarray(data["value"], dtype=np.float64)
    present = list(dict.fromkeys(all_names.tolist()))
    wanted = present if names is None else list(names)
    missing = [n for n in wanted if n not in present]
    if missing:
        raise KeyError(f"Run {run_id!r} in {path} has no metric(s) {missing}; it has {present}.")
    out = {}
    for name in wanted:
        rows = all_names == name
        out[name] = (steps[rows], values[rows])
    return out


def events(path: str | Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """The run's events in order of time (`run_id=None`: latest run), `detail` parsed."""
    with _reading(path) as con:
        run_id = _resolve_run(con, path, run_id)
        rows = con.execute(
            "SELECT step, kind, detail, wall_time FROM events WHERE run_id = ? ORDER BY wall_time",
            [run_id]).fetchall()
    return [{"step": s, "kind": k, "detail": json.loads(d), "wall_time": t} for s, k, d, t in rows]

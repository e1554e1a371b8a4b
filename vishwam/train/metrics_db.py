"""Run metrics in one DuckDB file: the buffered writer for the runner (`MetricsDB`).

The read API (`runs`, `load_metrics`, `events`, `load_expert_metrics`, `query`) lives in
`vishwam.train.metrics_read` and is importable from here too.

Tables (long format):

- `runs(run_id PK, started_at, updated_at, status, config JSON, host, pid, versions JSON, resumes,
  compiled_memory JSON)`; times are UTC. `compiled_memory` is the train step's XLA memory
  analysis as the runner last compiled it (`set_compiled_memory`).
- `metrics(run_id, step, name, value, wall_time)`, primary key `(run_id, step, name)`.
  A resumed run re-runs the steps after its checkpoint; their rows *replace* the
  earlier ones, so the table always describes the trajectory that produced the
  latest checkpoints (with exact resume the values are equal anyway).
- `events(run_id, step, kind, detail JSON, wall_time)`: history, never replaced.
- `expert_metrics(run_id, step, layer, expert, name, value, wall_time)`: pictures of the
  experts (`log_experts`), one row per MoE layer (numbered 0.. in layer order among the MoE
  layers) and expert; `expert` is NULL for a value of the whole layer (`router_entropy`).
  Rows of a `(step, name)` logged again replace the earlier ones, as in `metrics`.

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
import socket
import sys
import time
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..config import config_diff
from ..errors import InvalidTypeError, InvalidValueError
from .metrics_read import _WRITERS, _connect
from .metrics_read import TABLES as TABLES
from .metrics_read import MetricsDBLockedError as MetricsDBLockedError
from .metrics_read import events as events
from .metrics_read import load_expert_metrics as load_expert_metrics
from .metrics_read import load_metrics as load_metrics
from .metrics_read import query as query
from .metrics_read import runs as runs

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
    """CREATE TABLE IF NOT EXISTS expert_metrics (
        run_id VARCHAR, step BIGINT, layer INTEGER, expert INTEGER, name VARCHAR, value DOUBLE,
        wall_time DOUBLE)""",
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
_EXPERT_STAGE = """CREATE TEMP TABLE IF NOT EXISTS _vishwam_expert_stage (
    step BIGINT, layer INTEGER, expert INTEGER, name VARCHAR, value DOUBLE, wall_time DOUBLE)"""
_EXPERT_MERGE = (
    """DELETE FROM expert_metrics AS e WHERE run_id = $run_id AND EXISTS (
        SELECT 1 FROM _vishwam_expert_stage AS s WHERE s.step = e.step AND s.name = e.name)""",
    """INSERT INTO expert_metrics
        SELECT $run_id, step, layer, expert, name, value, wall_time FROM _vishwam_expert_stage""",
    "DELETE FROM _vishwam_expert_stage",
)

_VERSIONED = ("vishwam", "jax", "jaxlib", "equinox", "optax", "orbax-checkpoint", "duckdb",
              "numpy", "sentencepiece")


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


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
        self._expert_rows: list[tuple[int, str, Any, float]] = []
        self._con = None
        if not self.enabled:
            return
        self._config_json = json.dumps(dict(config), sort_keys=True, default=str)
        self._con = self._open(on_locked)
        self._appender = self._con.appender("_vishwam_stage")
        self._expert_appender = self._con.appender("_vishwam_expert_stage")
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
        for statement in (*_SCHEMA, _STAGE, _EXPERT_STAGE):
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

    def log_experts(self, step: int, name: str, values: Any) -> None:
        """Buffer one statistic per MoE layer and expert (`[layers, experts]`) or per layer
        (`[layers]`, stored with `expert` NULL) for `step`, as `expert_metrics` rows. `values`
        may be a device array: it is fetched at flush time with the scalars."""
        if not self.enabled:
            return
        self._check_open("log_experts")
        step = operator.index(step)
        if not isinstance(name, str):
            raise InvalidTypeError(f"log_experts(step={step}): the name must be a str, got {name!r}.")
        if len(getattr(values, "shape", ())) not in (1, 2):
            raise InvalidValueError(f"log_experts(step={step}, {name!r}): values must be [layers, experts] or "
                                    f"[layers], got shape {getattr(values, 'shape', None)}.")
        # The last values of a (step, name) win, here as against the table.
        self._expert_rows = [row for row in self._expert_rows if row[:2] != (step, name)]
        self._expert_rows.append((step, name, values, time.time()))

    def flush(self) -> int:
        """Write buffered rows in one transaction; returns how many were written."""
        if not self.enabled or self._con is None or not (self._steps or self._expert_rows):
            return 0
        values, expert_values = self._values, [row[2] for row in self._expert_rows]
        jax = sys.modules.get("jax")  # device scalars exist only if jax was imported
        if jax is not None:
            # One transfer for all device values instead of one sync per value.
            values, expert_values = jax.device_get((values, expert_values))
        values = np.asarray(values, dtype=np.float64).tolist()
        expert_rows = [row for (step, name, _, now), array in zip(self._expert_rows, expert_values)
                       for row in _expert_rows(step, name, array, now)]
        count = len(values) + len(expert_rows)
        con = self._con
        con.begin()
        try:
            if values:
                self._appender.append_rows(zip(self._steps, self._names, values, self._times, range(len(values))))
                self._appender.flush()
                con.execute(_MERGE, {"run_id": self.run_id})
                con.execute("DELETE FROM _vishwam_stage")
            if expert_rows:
                self._expert_appender.append_rows(expert_rows)
                self._expert_appender.flush()
                for statement in _EXPERT_MERGE:
                    con.execute(statement, {"run_id": self.run_id} if "$run_id" in statement else None)
            con.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", [_utcnow(), self.run_id])
            con.commit()
        except BaseException:
            con.rollback()
            self._appender.clear()
            self._expert_appender.clear()
            raise
        self._steps, self._names, self._values, self._times = [], [], [], []
        self._expert_rows = []
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
        self._expert_rows = [row for row in self._expert_rows if row[0] <= step]
        deleted = self._con.execute(
            "DELETE FROM metrics WHERE run_id = ? AND step > ?", [self.run_id, step]).fetchall()
        self._con.execute("DELETE FROM expert_metrics WHERE run_id = ? AND step > ?", [self.run_id, step])
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


def _expert_rows(step: int, name: str, array: Any, now: float) -> list[tuple]:
    """`(step, layer, expert, name, value, wall_time)` rows of a `[layers, experts]` or `[layers]` array."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 1:
        return [(step, layer, None, name, float(v), now) for layer, v in enumerate(array.tolist())]
    return [(step, layer, expert, name, float(v), now)
            for layer, row in enumerate(array.tolist()) for expert, v in enumerate(row)]



"""Reading run metrics databases (written by `vishwam.train.metrics_db.MetricsDB`).

- `runs`: every run a file holds, with its config, versions and compiled memory.
- `load_metrics`: per-step metrics of a run as NumPy arrays.
- `events`: a run's events in order of time.
- `load_expert_metrics`: one per-layer, per-expert MoE statistic of a run over steps.
- `query`: SQL over one or several files, with each table also a view over all of them.

The opening of a file is shared with the writer: `MetricsDBLockedError` when another process
holds it, and the registry of files this process has open for writing (a reader in the same
process goes through the writer's connection). `duckdb` is imported inside functions so that
`import vishwam` does not need it.
"""

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidValueError

TABLES = ("runs", "metrics", "events", "expert_metrics")
"""The tables of a metrics database (described in `vishwam.train.metrics_db`)."""

# Files this process has open for writing: readers in the same process go
# through the writer's connection (DuckDB refuses a second, read-only one).
_WRITERS: dict[Path, Any] = {}  # path -> its `vishwam.train.metrics_db.MetricsDB`


class MetricsDBLockedError(RuntimeError):
    """Another process holds the DuckDB file."""


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


def load_expert_metrics(path: str | Path, name: str,
                        run_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One `expert_metrics` statistic of a run (`run_id=None`: the latest) as
    `(steps int64 [steps], values float64 [steps, layers, experts])`, or `[steps, layers]`
    for a per-layer statistic; entries never logged are NaN. A name the run never logged
    raises `KeyError` listing the names it has."""
    with _reading(path) as con:
        run_id = _resolve_run(con, path, run_id)
        present = [r[0] for r in con.execute(
            "SELECT DISTINCT name FROM expert_metrics WHERE run_id = ? ORDER BY name", [run_id]).fetchall()]
        if name not in present:
            raise KeyError(f"Run {run_id!r} in {path} has no expert statistic {name!r}; it has {present}.")
        rows = con.execute("SELECT step, layer, expert, value FROM expert_metrics WHERE run_id = ? AND name = ? "
                           "ORDER BY step, layer, expert", [run_id, name]).fetchall()
    steps = np.unique(np.asarray([r[0] for r in rows], np.int64))
    layers = 1 + max(r[1] for r in rows)
    per_layer = all(r[2] is None for r in rows)
    shape = (len(steps), layers) if per_layer else (len(steps), layers, 1 + max(r[2] for r in rows if r[2] is not None))
    values = np.full(shape, np.nan)
    where = {int(s): i for i, s in enumerate(steps)}
    for step, layer, expert, value in rows:
        values[(where[step], layer) if per_layer else (where[step], layer, expert)] = value
    return steps, values


def query(paths: list[str | Path], sql: str) -> tuple[list[str], list[tuple]]:
    """Run `sql` over one or several metrics databases; returns `(column names, rows)`.

    The files are attached read-only in an in-memory database, the i-th as `db<i>`
    (`db0.metrics`, `db1.runs`, ...). Each table name of `TABLES` is also a view over every
    attached file that has it (`UNION ALL BY NAME`), with a `db` column naming the file it
    came from (`db0`, ...): `SELECT db, run_id, min(value) FROM metrics WHERE name = 'loss'
    GROUP BY ALL` compares runs kept in separate files.
    """
    import duckdb

    if not paths:
        raise InvalidValueError("query: give at least one metrics database.")
    files = [Path(p).absolute() for p in paths]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"No metrics database at {path}.")
        if path in _WRITERS:
            raise MetricsDBLockedError(f"query: {path} is open for writing in this process; query it after "
                                       "the run ends.")
    con = duckdb.connect(":memory:")
    try:
        for i, path in enumerate(files):
            try:
                con.execute(f"ATTACH '{_sql_string(path)}' AS db{i} (READ_ONLY)")
            except duckdb.IOException as err:
                if "lock" not in str(err).lower():
                    raise
                raise MetricsDBLockedError(_lock_message(path, err, "read") + ".") from err
        for table in TABLES:
            parts = [f"SELECT 'db{i}' AS db, * FROM db{i}.{table}" for i in range(len(files))
                     if con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND table_name = ?",
                                    [f"db{i}", table]).fetchone()[0]]
            if parts:
                con.execute(f"CREATE VIEW {table} AS " + " UNION ALL BY NAME ".join(parts))
        try:
            cursor = con.execute(sql)
        except duckdb.Error as err:
            raise InvalidValueError(f"query: {type(err).__name__}: {str(err).splitlines()[0]}") from err
        if cursor.description is None:
            return [], []
        return [d[0] for d in cursor.description], cursor.fetchall()
    finally:
        con.close()


def _sql_string(path: Path) -> str:
    return str(path).replace("'", "''")

"""What the training loop measures and shows besides the step's own metrics.

- `Throughput`: tokens/s and the estimated model FLOP utilisation (`TIMING_METRICS`).
- `memory_values` (every `log_every` steps, `MEMORY_METRICS`) and `compiled_memory`
  (XLA's analysis of the train step as compiled for the run, once before the first step).
- `Profiler`: a `jax.profiler` trace of `RunConfig.profile_steps` into `run_dir/profile/`;
  the traced steps log their step time but no tokens/s or MFU.
- `Progress`: the tqdm bar (loss, tokens/s, ETA) and the run's console notes (process 0).
- `log_expert_stats`: the step's per-layer, per-expert MoE statistics (`EXPERT_STAT_NAMES`)
  as `expert_metrics` rows, every `log_every` steps (the arrays leave the device only then).
"""

import collections
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from ..memory import device_memory, host_peak_rss_bytes, host_rss_bytes, live_array_bytes, memory_stats

# Metrics that depend on the wall clock, not on the trajectory.
TIMING_METRICS = ("step_time", "tokens_per_s", "mfu")
# Metrics of the process's memory (every `log_every` steps), not of the trajectory either.
MEMORY_METRICS = ("memory/device_bytes", "memory/device_peak_bytes", "memory/live_array_bytes",
                  "memory/host_rss_bytes", "memory/host_peak_rss_bytes")
_THROUGHPUT_WINDOW = 10  # steps
EXPERT_STAT_NAMES = {"expert_load": "load", "expert_dropped": "dropped", "router_entropy": "router_entropy",
                     "router_bias": "bias"}
"""Step metric (`vishwam.train.step.EXPERT_STATS`) -> its name in the `expert_metrics` table:
`load` (the expert's share of its layer's assignments), `dropped` (its share of the assignments
dropped for capacity), `router_entropy` (per layer, `expert` NULL), `bias` (aux-free selection bias)."""


class Throughput:
    """Tokens/s and MFU over the last `_THROUGHPUT_WINDOW` steps of one `train()` call."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.intervals: collections.deque[float] = collections.deque(maxlen=_THROUGHPUT_WINDOW)
        self.compiled = False

    def values(self, elapsed: float, *, traced: bool) -> dict[str, float]:
        """`tokens_per_s` and `mfu` after a step that took `elapsed` seconds on the host;
        nothing for a `traced` step (it ran under the profiler)."""
        # Host observations of a run-ahead device are uneven step by step; their sum over
        # a window is exact up to one step, so throughput is taken over the last few steps.
        # The first step of a call includes compilation: logged, but kept out of the window.
        if traced:
            self.compiled = True
            return {}
        if self.compiled:
            self.intervals.append(elapsed)
            window = self.intervals
        else:
            window, self.compiled = [elapsed], True
        tokens_per_s = len(window) * self.tokens_per_step / max(sum(window), 1e-9)
        return {"tokens_per_s": tokens_per_s, "mfu": self.flops_per_token * tokens_per_s / self.peak_flops}


def log_expert_stats(db, step: int, stats: dict, *, prefix: str = "", names: Sequence[str] | None = None) -> None:
    """Log the per-layer arrays of `stats` (step metrics, device or host arrays) that
    `EXPERT_STAT_NAMES` knows, restricted to `names` if given, as `expert_metrics` rows named
    `prefix + EXPERT_STAT_NAMES[key]` (`db` a `MetricsDB`)."""
    for key, name in EXPERT_STAT_NAMES.items():
        if key in stats and (names is None or key in names):
            db.log_experts(step, prefix + name, stats[key])


# ----------------------------------------------------------------------------- memory
def compiled_memory(train_step, state: Any, batch: dict, devices: Sequence[jax.Device],
                    local_devices: Sequence[jax.Device]) -> dict[str, Any]:
    """XLA's memory analysis of the train step as compiled for this run (per device).

    Compiling here is not a second compile: the executable is cached and the
    first step runs it.
    """
    detail: dict[str, Any] = {"devices": len(devices), "device_kind": devices[0].device_kind,
                              "platform": devices[0].platform}
    try:
        detail["per_device"] = memory_stats(train_step.lower(state, batch).compile())
    except RuntimeError as error:  # a backend without memory analysis: say so, train anyway
        detail["per_device"], detail["unavailable"] = None, str(error)
    allocator = device_memory(local_devices)
    detail["allocator_stats"] = allocator is not None
    if allocator is not None and "bytes_limit" in allocator:
        detail["device_bytes_limit"] = allocator["bytes_limit"]
    return detail


def memory_values(devices: Sequence[jax.Device]) -> dict[str, float]:
    """Memory now, as `MEMORY_METRICS`; the device allocator's only where the backend keeps it.

    `memory/device_bytes`, `memory/device_peak_bytes`: bytes in use and the peak
    so far on the busiest of `devices` (the local ones; `Device.memory_stats()`; absent
    on CPU, whose backend keeps no statistics). `memory/live_array_bytes`: live arrays'
    bytes on the busiest device (every backend). `memory/host_rss_bytes`,
    `memory/host_peak_rss_bytes`: this process's resident memory now and at its
    peak (on CPU, device memory is host memory, so the latter bounds the device peak).
    """
    values = {"memory/live_array_bytes": float(max(live_array_bytes(devices).values()))}
    rss = host_rss_bytes()
    if rss is not None:
        values["memory/host_rss_bytes"] = float(rss)
    # The kernel's high-water mark can trail the RSS just read by a few pages (its
    # per-thread counters sync lazily); the peak is at least what was just measured.
    values["memory/host_peak_rss_bytes"] = float(max(host_peak_rss_bytes(), rss or 0))
    allocator = device_memory(devices)
    if allocator is not None:
        values["memory/device_bytes"] = float(allocator["bytes_in_use"])
        values["memory/device_peak_bytes"] = float(allocator["peak_bytes_in_use"])
    return values


# ---------------------------------------------------------------------------- profile
class Profiler:
    """A `jax.profiler` trace of one window of steps into `run_dir/profile/`."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.window: tuple[int, int] | None = None
        """The steps this call traces (1-based, inclusive); None: no trace."""
        self.trace: tuple[Path, set[str], int] | None = None
        """While tracing: (directory, sessions already in it, first traced step)."""

    def plan(self, steps: tuple[int, int] | None, start: int) -> tuple[int, int] | None:
        """Set the window for a call that starts after step `start`: `steps`, unless it resumes past START."""
        self.window = steps if steps and steps[0] > start else None
        return self.window

    def traces(self, step: int) -> bool:
        return self.window is not None and self.window[0] <= step <= self.window[1]

    def start(self, first_step: int) -> None:
        directory = self.run_dir / "profile"
        if jax.process_count() > 1:  # processes on one host would write the same file names
            directory = directory / f"process{jax.process_index()}"
        sessions = directory / "plugins" / "profile"
        before = {p.name for p in sessions.iterdir()} if sessions.is_dir() else set()
        jax.profiler.start_trace(str(directory), create_perfetto_trace=True)
        self.trace = (directory, before, first_step)

    def stop(self, last_step: int) -> dict[str, Any] | None:
        """Stop a running trace (at STOP, or when the run ends inside the window); its
        `profile` event's detail, or None when no trace was running."""
        if self.trace is None:
            return None
        directory, before, first = self.trace
        self.trace = None
        jax.profiler.stop_trace()
        sessions = directory / "plugins" / "profile"
        new = sorted(p for p in sessions.iterdir() if p.name not in before) if sessions.is_dir() else []
        files = sorted(f for session in new for f in session.rglob("*") if f.is_file())
        return {"start": first, "stop": last_step, "directory": str(directory),
                "path": str(new[-1]) if new else None, "files": [f.name for f in files],
                "bytes": sum(f.stat().st_size for f in files)}


# --------------------------------------------------------------------------- progress
class Progress:
    """The tqdm bar of a run and its console notes; silent off process 0."""

    def __init__(self, *, is_main: bool, bar: bool, name: str, max_steps: int, log_every: int):
        self.is_main = is_main
        self.bar = bar
        self.name = name
        self.max_steps = max_steps
        self.log_every = log_every
        self.pbar = None
        self.postfix: dict[str, str] = {}

    def open(self, start: int) -> None:
        if not (self.bar and self.is_main) or start >= self.max_steps:
            return
        from tqdm.auto import tqdm

        interactive = sys.stderr.isatty()
        self.pbar = tqdm(total=self.max_steps, initial=start, unit="step", desc=self.name, dynamic_ncols=True,
                         mininterval=0.5 if interactive else 10.0, smoothing=0.1, file=sys.stderr)

    def step(self, step: int, values: dict[str, float], *, nonfinite: bool, skipped: int) -> None:
        """Advance the bar by one step; refresh loss and tokens/s every `log_every` steps."""
        if self.pbar is None:
            return
        tokens_per_s = values.get("tokens_per_s")
        if (step % self.log_every == 0 or step == self.max_steps or nonfinite) and tokens_per_s is not None:
            self.postfix = {"loss": f"{values['loss']:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if skipped:
                self.postfix["skipped"] = str(skipped)
            self.pbar.set_postfix(self.postfix, refresh=False)
        self.pbar.update(1)

    def note(self, text: str) -> None:
        if not self.is_main:
            return
        if self.pbar is not None:
            self.pbar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None

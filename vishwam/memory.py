"""What a compiled program needs in device memory, to choose a remat policy before training.

`compiled_memory(fn, *args)` compiles `fn` for these arguments (arrays or
`jax.ShapeDtypeStruct`s, so nothing needs allocating) and returns XLA's
`memory_analysis()` as a dict; `memory_stats(compiled)` does the same for a
program you compiled yourself (and go on to run). `remat_memory(config, ...)` does it for a model's
loss-and-gradient under every remat policy: temporaries are where the saved
activations live, which is what the policies trade against recomputation.

While a program runs: `device_memory(devices)` reads the allocator's bytes in
use and peak where the backend keeps them (`Device.memory_stats()`: GPU, TPU;
the CPU backend returns None), `live_array_bytes(devices)` adds up the shards
of the live `jax.Array`s on each device (any backend), and `host_rss_bytes()` /
`host_peak_rss_bytes()` read the process's resident memory from the OS.
`keep_host_memory()` (for a program that owns its process) makes glibc's malloc keep
freed memory, so XLA:CPU's per-step buffers stop page-faulting on every step.
"""

import math
import os
import resource
import sys
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from .arrays import is_array_like
from .config import ModelConfig
from .errors import InvalidValueError
from .model import VishwamAI, abstract_model
from .nn.stack import REMAT

_FIELDS = (
    "temp_size_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
    "host_temp_size_in_bytes",
    "host_argument_size_in_bytes",
    "host_output_size_in_bytes",
    "host_alias_size_in_bytes",
)
REMAT_POLICIES: tuple[str, ...] = tuple(REMAT)


def compiled_memory(fn, *args, donate: bool = False, compiler_options: dict | None = None,
                    **kwargs) -> dict[str, int]:
    """Compile `fn(*args, **kwargs)` and return its memory analysis in bytes.

    Arrays and `jax.ShapeDtypeStruct` leaves are traced; every other leaf (static
    module fields, Python numbers) is baked in, as `eqx.filter_jit` would. An
    already-jitted `fn` is inlined into this compilation.

    Arguments:
        donate: donate every traced argument, as a train step that donates its
            state does (donated inputs show up in `alias_size_in_bytes`).
        compiler_options: passed to `.compile()`. `{"xla_backend_optimization_level": 0}`
            halves XLA:CPU compile time and left every figure here unchanged
            (buffers are assigned before LLVM runs).

    Returns:
        The fields of `memory_analysis()` (`temp_size_in_bytes`: scratch space the
        program allocates itself, saved activations included; `argument_...`,
        `output_...`, `alias_...`; `host_...` for memory offloaded to the host)
        plus `total_size_in_bytes` = arguments + outputs - aliased + temporaries,
        the device footprint while the program runs.
    """
    dynamic, static = eqx.partition((args, kwargs), is_array_like)

    def run(dynamic):
        a, k = eqx.combine(dynamic, static)
        return fn(*a, **k)

    lowered = jax.jit(run, donate_argnums=0 if donate else ()).lower(dynamic)
    return memory_stats(lowered.compile(compiler_options=compiler_options))


def memory_stats(compiled) -> dict[str, int]:
    """`compiled.memory_analysis()` of a `jax.stages.Compiled` as a dict (see `compiled_memory`)."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(
            f"memory_stats: backend {jax.default_backend()!r} reports no memory analysis "
            "for compiled programs; measure on a backend that does (CPU, GPU and TPU do)."
        )
    out = {name: int(getattr(stats, name)) for name in _FIELDS}
    out["total_size_in_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                  - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def next_token_loss(model: VishwamAI, tokens) -> jax.Array:
    """Mean cross-entropy of predicting `tokens[:, 1:]` from `tokens[:, :-1]` (fp32)."""
    logits, _ = model(tokens[:, :-1])
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))


def remat_memory(
    config: ModelConfig,
    *,
    batch: int,
    seq_len: int,
    policies: tuple[str, ...] = REMAT_POLICIES,
    loss_fn=next_token_loss,
    compiler_options: dict | None = None,
) -> dict[str, dict[str, int]]:
    """Memory of `value_and_grad(loss_fn)(model, tokens)` per remat policy.

    The model is abstract (`eqx.filter_eval_shape`): nothing is allocated, so this
    also answers for configs far larger than the machine. `seq_len` counts the
    tokens fed to the model (one more is loaded for the shifted targets).

    Returns:
        `{policy: compiled_memory(...)}`.
    """
    unknown = [p for p in policies if p not in REMAT_POLICIES]
    if unknown:
        raise InvalidValueError(f"remat_memory: unknown polic(ies) {unknown}; choose from {list(REMAT_POLICIES)}.")
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    step = eqx.filter_value_and_grad(loss_fn)
    report = {}
    for policy in policies:
        cfg = config.replace(remat_policy=policy)
        model = abstract_model(cfg)
        report[policy] = compiled_memory(step, model, tokens, compiler_options=compiler_options)
    return report


# ---------------------------------------------------------------- while running
def device_memory(devices: Sequence[jax.Device]) -> dict[str, int] | None:
    """The allocator's figures on the busiest of `devices` (the one that runs out first).

    Returns:
        `{"bytes_in_use", "peak_bytes_in_use"}` (each the maximum over `devices`,
        plus `bytes_limit` where reported), or None when any device's backend
        keeps no allocator statistics (`memory_stats()` is None, as on CPU).
    """
    stats = [device.memory_stats() for device in devices]
    if not stats or any(not s or "bytes_in_use" not in s for s in stats):
        return None
    out = {"bytes_in_use": max(int(s["bytes_in_use"]) for s in stats),
           "peak_bytes_in_use": max(int(s.get("peak_bytes_in_use", s["bytes_in_use"])) for s in stats)}
    limits = [int(s["bytes_limit"]) for s in stats if "bytes_limit" in s]
    if limits:
        out["bytes_limit"] = min(limits)
    return out


def live_array_bytes(devices: Sequence[jax.Device]) -> dict[jax.Device, int]:
    """Bytes of every live (not deleted or donated) `jax.Array`'s shards on each of `devices`.

    What the process holds between programs (parameters, optimiser state,
    batches, results); a program's temporaries are not arrays and not counted.
    """
    wanted = set(devices)
    held = dict.fromkeys(devices, 0)
    for array in jax.live_arrays():
        sharding = array.sharding
        shard = math.prod(sharding.shard_shape(array.shape)) * array.dtype.itemsize
        for device in sharding.addressable_devices & wanted:
            held[device] += shard
    return held


def host_rss_bytes() -> int | None:
    """This process's resident set size now (`/proc/self/statm`); None where there is no procfs."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def host_peak_rss_bytes() -> int:
    """The most resident memory this process has used so far (`getrusage` maximum RSS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_host_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse instead of handing it back to
    the kernel; True if applied (glibc), False elsewhere (nothing changed).

    XLA:CPU allocates a step's temporaries afresh on every run; with glibc's defaults the
    large ones are `mmap`ed and unmapped again, so every train step page-faults its whole
    working set back in (measured 1.05-1.21x faster steps on a 2-core CPU with this;
    benchmarks/RESULTS.md). This sets, through `mallopt`: no `mmap` for allocations, no
    trimming of the heap's top and one arena. The process's resident memory then stays at
    its peak, as with any caching allocator: worth it on the CPU backend only.

    Process-wide, so the library never calls it: a program that owns its process and runs
    on the CPU does, before JAX starts (the arena limit only reaches threads that have not
    allocated yet); `scripts/train.py` and `scripts/distill.py` do when the platform is CPU.
    """
    import ctypes

    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl has mallopt as a no-op)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    applied = [mallopt(param, value) == 1 for param, value in settings]  # every one, then the verdict
    return all(applied)

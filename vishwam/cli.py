"""How the scripts end: one `error: ...` line instead of a traceback, and fixed exit codes.

Every script in `scripts/` runs its `main` through `run_script`:

| exit code | meaning |
|---|---|
| 0 | done |
| 1 | an internal error (a bug: rerun with `--debug` and report the traceback) |
| 2 | bad input: a config, flag, file or directory the library refused (the message names it and the fix) |
| 3 | a diverged run (`TrainingDiverged`: a non-finite loss) |
| 128 + N | stopped by signal N (130 for Ctrl-C, 143 for SIGTERM) |

Bad input is what the library's validation raises (`vishwam.errors.InputError`: configs,
flags, shapes, formats), `CheckpointError` and `MetricsDBLockedError`; an `OSError` (a missing,
unreadable or existing path, a full disk) exits 2 too, named as one. Any other exception,
a `ValueError` from deep inside a dependency included, is a bug: exit 1 and a pointer to
`--debug`, which lets the exception propagate with its traceback.
SIGTERM raises `Terminated` (a `KeyboardInterrupt`) so that `finally` blocks and
`vishwam.files.atomic_directory` clean up what they were writing.
"""

import argparse
import glob
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from .errors import InputError

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM while a script runs (outside the trainer's own handler)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug`: show the traceback of an error instead of the one-line message; `--typecheck`:
    check shapes and dtypes of vishwam's annotated code at run time (`run_script` acts on it)."""
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    parser.add_argument("--typecheck", action="store_true",
                        help="check array shapes and dtypes of vishwam's functions and modules at run time "
                             "(jaxtyping + beartype; slower tracing); same as VISHWAM_RUNTIME_CHECKS=1")


def _library_error(error: BaseException, name: str) -> bool:
    # The classes come from modules a failed script may never have imported; an error of
    # such a class cannot have been raised without its module being loaded.
    module, _, cls = name.rpartition(".")
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(error, getattr(loaded, cls))


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def run_script(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` and turn the library's errors into an exit code (see the module docstring).

    Arguments:
        main: the script's entry point; returns its exit code (None means 0).
        argv: the arguments (default `sys.argv[1:]`); `--debug` among them re-raises errors.

    Returns:
        The exit code, for `sys.exit`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if "--typecheck" in argv:
        from .runtime_checks import enable_runtime_checks

        enable_runtime_checks()
    skip_absent_tpu()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt as error:
        if debug:
            raise
        signum = error.signum if isinstance(error, Terminated) else signal.SIGINT
        print(f"error: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except Exception as error:  # noqa: BLE001  (sorted below; anything else is reported as a bug)
        if debug:
            raise
        if _library_error(error, "vishwam.train.run_config.TrainingDiverged"):
            print(f"error: {error}", file=sys.stderr)
            return EXIT_DIVERGED
        if _library_error(error, "vishwam.train.metrics_db.MetricsDBLockedError"):
            print(f"error: {error}", file=sys.stderr)
            print("hint: wait for that process, or rerun with --db-fallback to log into a separate file",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(error, InputError) or _library_error(error, "vishwam.train.checkpoint.CheckpointError"):
            print(f"error: {_describe(error)}", file=sys.stderr)
            print("hint: fix the input named above; --debug shows the traceback", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(error, OSError):
            # The system's errors (an errno: a full disk, no permission) are named as such; the
            # library's own path refusals (no errno) already say what is wrong.
            named = f"{type(error).__name__}: " if error.errno is not None else ""
            print(f"error: {named}{_describe(error)}", file=sys.stderr)
            print("hint: a file or system error (a missing or unreadable path, a full disk, no permission); "
                  "--debug shows the traceback", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"error: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        print("hint: this is a bug in vishwam; rerun with --debug and report the traceback", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def skip_absent_tpu() -> None:
    """With libtpu installed (`.[dev]` brings it, for ahead-of-time TPU compiles) JAX probes
    for TPU chips at start-up: seconds of delay and a screen of warnings on a machine with
    none; with the CUDA plugin installed (`.[gpu-aot]`, for ahead-of-time GPU compiles) on a
    machine without an NVIDIA GPU, JAX prints a plugin traceback (cuInit fails) before falling
    back to the CPU. When no device node of an installed accelerator plugin exists and the user
    chose no platform, pin JAX to the CPU before it starts (the scripts' CPU runs then start as
    fast and as quietly as without the plugins; compiling for abstract TPUs and GPUs still works)."""
    if "JAX_PLATFORMS" in os.environ:
        return
    present = {
        "libtpu": bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")),
        "jax_cuda12_plugin": bool(glob.glob("/dev/nvidia[0-9]*")),
        "jax_cuda13_plugin": bool(glob.glob("/dev/nvidia[0-9]*")),
        "jax_rocm7_plugin": os.path.exists("/dev/kfd"),
        "jax_rocm60_plugin": os.path.exists("/dev/kfd"),
    }
    installed = [name for name in present if importlib.util.find_spec(name) is not None]
    if not installed or any(present[name] for name in installed):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"  # read when jax is imported (here, and by child processes)
    if "jax" in sys.modules:  # imported already: before its first computation the config still counts
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def _describe(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        # `[Errno 2] No such file or directory: 'x'` -> `x: no such file or directory`
        text = f"{error.filename}: {error.strerror[0].lower()}{error.strerror[1:]}"
    return text or type(error).__name__

"""Test set-up: 8 simulated CPU devices, a persistent compile cache, a PRNG key.

Run-time shape checking (jaxtyping + beartype over the `vishwam` package) is
switched on by `--jaxtyping-packages` in pyproject.toml's pytest options.
"""

import os

# Must happen before jax initialises its backend: the sharding and
# expert-parallel tests need 8 devices.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# Compiling dominates this suite on a 2-core CPU; LLVM at -O0 roughly halves it
# (tests/test_model.py cold: 88 s -> 32 s) and the tiny test programs barely notice
# the slower code. Every comparison in the suite runs both sides under the same flags,
# and subprocesses started by tests inherit them.
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
# With 8 simulated devices, XLA:CPU's concurrency-optimised scheduler can leave a
# collective waiting until its timeout aborts the whole process (seen in about half the
# runs of a sharded train step, most often when loaded from the compile cache).
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _flags:
    _flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["XLA_FLAGS"] = _flags.strip()
# libtpu is installed for ahead-of-time TPU compiles (`jax.experimental.topologies`
# works without a TPU backend); without this every process started here would probe
# for TPU hardware first (seconds each, and warnings). Subprocesses inherit it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

from vishwam.compile_cache import enable_compile_cache  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# A cache folder outside the clone: repeated runs on one machine skip most compiles; a
# fresh machine simply fills it.
enable_compile_cache()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """XLA:CPU maps every compiled program's code into this process. The whole suite in one
    process compiles thousands of programs and passed the kernel's limit of memory mappings
    (`vm.max_map_count`, 65530 here; 20 K after the test files up to test_hf): the next compile
    or cache read then died with a segmentation fault inside XLA. Dropping JAX's and Equinox's
    caches after each test module frees them (about 1 K mappings stay); the persistent compile
    cache makes the recompiles cheap."""
    yield
    jax.clear_caches()
    eqx.clear_caches()
    gc.collect()


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def getkey():
    """A fresh key per call, deterministic within a test."""
    state = {"k": jax.random.key(1234)}

    def _next():
        state["k"], sub = jax.random.split(state["k"])
        return sub

    return _next

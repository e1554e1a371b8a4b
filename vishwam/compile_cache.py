"""JAX's persistent compilation cache as vishwam's programs use it: one folder outside any
checkout (`$VISHWAM_JAX_CACHE`, default `~/.cache/vishwam-jax`; empty turns it off), every
program cached, and a size limit.

The limit is what makes the cache safe to share: with one, JAX takes a file lock around every
read and write (`jax_compilation_cache_max_size`). Without it JAX writes each entry in place,
so one of the test suite's concurrent processes (or of several runs on one machine) could read
an entry another is still writing.
"""

import os

DEFAULT_DIRECTORY = os.path.expanduser("~/.cache/vishwam-jax")
MAX_BYTES = 8 * 2**30  # least recently used entries are evicted past this


def cache_directory() -> str:
    """`$VISHWAM_JAX_CACHE`, or the default folder; "" when the cache is turned off."""
    return os.environ.get("VISHWAM_JAX_CACHE", DEFAULT_DIRECTORY)


def enable_compile_cache(directory: str | None = None) -> str:
    """Point JAX's persistent cache at `directory` (default `cache_directory()`), caching
    every program, with the locking size limit; returns the folder ("" = left off)."""
    import jax

    directory = cache_directory() if directory is None else directory
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory

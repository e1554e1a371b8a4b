"""JAX's persistent compilation cache as vishwam's programs use it: one folder outside any
checkout (`$VISHWAM_JAX_CACHE`, default `~/.cache/vishwam-jax`; empty turns it off), and every
program cached, however quick its compile (the tests' and the main job's programs are small).
"""

import os

DEFAULT_DIRECTORY = os.path.expanduser("~/.cache/vishwam-jax")


def cache_directory() -> str:
    """`$VISHWAM_JAX_CACHE`, or the default folder; "" when the cache is turned off."""
    return os.environ.get("VISHWAM_JAX_CACHE", DEFAULT_DIRECTORY)


def enable_compile_cache(directory: str | None = None) -> str:
    """Point JAX's persistent cache at `directory` (default `cache_directory()`), caching every
    program; returns the folder ("" = left off)."""
    import jax

    directory = cache_directory() if directory is None else directory
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory

"""XLA's persistent compilation cache, on for every command: a rerun skips the compiles.

The SmolLM2 decode and verification programs take seconds to compile on a 2-core CPU, longer
than generating a short answer; with the cache a second `generate`, a resumed `train`, a sweep
trial or a test's subprocess loads them from disk instead. Nothing is evicted (jax's eviction
needs every writer to keep access times): delete the directory to reclaim its space.
"""
import os

from amd135m import paths


def enable(min_compile_seconds: float = 0.5) -> None:
  """Caches every compile slower than `min_compile_seconds` under $AMD135M_CACHE/jax_cache,
  unless the user set up the cache with JAX_COMPILATION_CACHE_DIR (then jax's own flags rule)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import jax  # noqa: PLC0415 (callers decide when jax is imported)
  jax.config.update("jax_compilation_cache_dir", paths.cache_path("jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)

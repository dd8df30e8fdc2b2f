"""Where things live outside the repository: the artifact cache and what `make` puts there.

Free of jax and of every other module here, so that anything (the kernels' build, configs,
tools) can ask for a path without importing the model.
"""
import os
import pathlib


def cache_path(*parts: str) -> str:
  """A path under the artifact cache ($AMD135M_CACHE, default ~/.cache/amd135m), where `make
  models` and `make corpora` put the SmolLM2 GGUF and the prepared local corpora."""
  root = os.environ.get("AMD135M_CACHE") or str(pathlib.Path.home() / ".cache" / "amd135m")
  return str(pathlib.Path(root, *parts))


SMOLLM2_GGUF = ("models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm2() -> str:
  """The SmolLM2-135M-Instruct GGUF that `make models` fetches."""
  return cache_path(*SMOLLM2_GGUF)

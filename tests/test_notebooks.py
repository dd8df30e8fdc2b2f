"""The notebooks run top to bottom in a fresh kernel, draw their plots inline, and are committed
without outputs."""
import pathlib
import time

import jax
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
# Listed, not globbed: a deleted notebook fails here instead of silently dropping out.
NOTEBOOKS = ["explore_model", "speculative_analysis", "sweep_analysis"]
# Each is sized for 90 s on the 2-core CPU; the limit leaves room for a loaded machine.
TIMEOUT_S = 180


def test_every_notebook_is_listed():
  assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  notebook = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code
  for cell in code:
    assert cell.outputs == [], f"{name}: a cell was saved with outputs: {cell.source[:60]!r}"
    assert cell.execution_count is None, f"{name}: a cell was saved with an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, smollm2_gguf, monkeypatch):
  # The kernel (and the sweep's trainers) inherit the suite's persistent compilation cache, so
  # reruns skip the SmolLM2 compiles; a first run compiles everything, as a user's does.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  cache_dir = jax.config.jax_compilation_cache_dir
  if cache_dir:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache_dir)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                       str(jax.config.jax_persistent_cache_min_compile_time_secs))
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebooks' own %matplotlib inline decides
  notebook = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
  client = NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError, with the traceback, on the first failing cell
  seconds = time.perf_counter() - start
  assert seconds < TIMEOUT_S, f"{name} ran {seconds:.0f} s"

  for cell in notebook.cells:
    if cell.cell_type != "code":
      continue
    kinds = [output.output_type for output in cell.outputs]
    assert "error" not in kinds, f"{name}: {cell.source[:60]!r} raised"
    if "plt.show()" in cell.source:  # every plot reaches the page as an inline image
      images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
      assert images, f"{name}: no inline image from {cell.source[:60]!r}"

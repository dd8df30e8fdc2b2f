"""Shared fixtures: the real SmolLM2 GGUF, and JAX set up once for the whole suite."""
import ctypes
import gc
import os
import pathlib
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

from amd135m import compilation_cache  # noqa: E402

jax.config.update("jax_enable_x64", False)
# Eight fake CPU devices for the sharded-training tests; unsharded code runs on the first one.
jax.config.update("jax_num_cpu_devices", 8)
# The commands' persistent compilation cache, here too: a test compiling what an earlier test or
# a previous run of the suite compiled (SmolLM2's decode, the train step) loads it from disk.
compilation_cache.enable()

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
import fetch_test_models  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: minutes of end-to-end work (training runs, subprocess CLIs, the real "
      "model's speculative loops); `make test-fast` skips them")


SLOW_TESTS = {line.strip() for line in (ROOT / "tests" / "slow_tests.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}


def pytest_collection_modifyitems(config, items):
  """Marks `slow` the test functions that tests/slow_tests.txt lists (measured, over 3 s each;
  tools/list_slow_tests.py regenerates it from a --durations=0 log)."""
  for item in items:
    if item.nodeid.split("[")[0] in SLOW_TESTS:
      item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter):
  """The CPU the suite ran on, last: its time (and a CPU kernel's failure) depends on it."""
  try:
    first_cpu = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0]
  except OSError:
    first_cpu = ""
  fields = {k.strip(): v.strip() for k, _, v in (line.partition(":")
                                                 for line in first_cpu.splitlines())}
  cpu = (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model "
         f"{fields.get('model', '?')})")
  terminalreporter.write_line(f"CPU: {cpu}, {os.cpu_count()} logical cores")


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_module():
  """Gives a test file's compiled programs and freed buffers back to the system when it ends.

  `make test` runs two workers side by side; without this each grew through the whole suite (to
  7-12 GB, 20.5 GB used of CI's 24 GiB at the peak), since jit caches keep every executable and
  glibc keeps freed heap pages. A later file that needs a program again reads it from the
  persistent compilation cache.
  """
  yield
  jax.clear_caches()
  gc.collect()
  libc = ctypes.CDLL(None)
  if hasattr(libc, "malloc_trim"):  # glibc
    libc.malloc_trim(0)


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  path = fetch_test_models.smollm2_path()
  if not path.exists():
    pytest.fail(f"{path} is missing: run `make models` (make test does it)")
  return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
  """(ModelConfig, params on device) of the real SmolLM2, loaded once for the whole suite."""
  from amd135m import checkpoints
  config, params = checkpoints.load_params(smollm2_gguf)
  return config, jax.tree.map(jax.numpy.asarray, params)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
  """transformers' own GGUF loading of the same file (dequantised to f32), the reference."""
  import hf_reference
  return hf_reference.load_transformers_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_slice(smollm2_gguf, tmp_path_factory) -> pathlib.Path:
  """SmolLM2's first 2 layers (its weights, final norm, tied head, tokenizer: `--draft first:2`)
  as a Hugging Face directory: a target with the real vocabulary and text whose programs compile
  in seconds, for tests whose claim does not depend on depth. Exactness on the 30-layer model
  keeps its own tests (test_speculative, test_feature_draft, test_model)."""
  from amd135m import checkpoints, speculative
  from amd135m.tokenizer import load_tokenizer
  config, params = checkpoints.load_params(smollm2_gguf)
  draft, sliced = speculative.load_draft("first:2", config, params)
  path = tmp_path_factory.mktemp("smollm2_first2")
  checkpoints.save_hf(path, draft.config, sliced, load_tokenizer(smollm2_gguf))
  return path

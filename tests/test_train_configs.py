"""Every config's runlocal variant trains; a trained workdir generates and exports; the tiny model
learns real text (Gutenberg) well past a unigram model."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from amd135m import checkpoints, config_lib, model as model_lib
from amd135m.data import builders, splits, spm
from amd135m.tokenizer import load_tokenizer
from amd135m.training import data as data_lib, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ["tiny", "draft", "codellama_7b", "amd_llama_135m", "smollm2_135m"]  # + _code below


@pytest.fixture(scope="module")
def corpora():
  for name in ("gutenberg_shakespeare", "python_stdlib"):
    if not pathlib.Path(config_lib.cache_path("data", name)).is_dir():
      pytest.fail(f"the local corpus {name} is missing: run `make corpora` (make test does it)")


def _initial_params(config) -> dict:
  """The weights the loop starts from in a new workdir: init_from's, else the seed's init."""
  if config.init_from:
    return checkpoints.load_params(pathlib.Path(config.init_from).expanduser())[1]
  init = jax.jit(model_lib.init_params, static_argnums=0)  # compiled once, then from the cache
  return init(config_lib.model_config(config.model), jax.random.key(config.seed))


def _by_name(params) -> dict:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _three_steps(spec, workdir):
  config = config_lib.load(spec)
  config_lib.apply_overrides(config, ["total_steps=3", "eval_batches=1", "devices=1"])
  result = loop.train_and_evaluate(config, workdir, progress=False)
  assert result.step == 3 and np.isfinite(result.last_metrics["loss"])
  assert np.isfinite(result.eval_metrics["eval_loss"])
  # An lr that resolves to 0 or an optimizer that drops its updates leaves weights at init.
  assert result.last_metrics["lr"] > 0, result.last_metrics
  start = _by_name(_initial_params(config))
  trained = _by_name(checkpoints.load_params(workdir)[1])
  assert start.keys() == trained.keys()
  # 1e-7: this init and the loop's may differ by float rounding (~1e-8, seen eager vs jit-ed);
  # Adam moves weights by about lr per step, 1e-5 or more here.
  unchanged = [name for name in start if np.max(np.abs(start[name] - trained[name])) <= 1e-7]
  assert not unchanged, f"weights still at their initial values after 3 steps: {unchanged}"
  return result


@pytest.fixture(scope="module")
def pretrained_135m(corpora, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("amd_llama_135m")
  _three_steps(f"{ROOT}/configs/amd_llama_135m.py:runlocal", workdir)
  return workdir


@pytest.mark.parametrize("name", CONFIGS)
def test_runlocal_variant_trains_three_steps(name, corpora, pretrained_135m, tmp_path):
  if name == "amd_llama_135m":
    assert (pretrained_135m / loop.COMPLETE).exists()  # the fixture ran it
    return
  _three_steps(f"{ROOT}/configs/{name}.py:runlocal", tmp_path)


def test_code_finetune_starts_from_the_pretrained_workdir(pretrained_135m, tmp_path):
  spec = f"{ROOT}/configs/amd_llama_135m_code.py:runlocal,init_from={pretrained_135m}"
  config = config_lib.load(spec)
  config_lib.apply_overrides(config, ["total_steps=1", "eval_batches=1", "lr=0.0", "devices=1"])
  loop.train_and_evaluate(config, tmp_path, progress=False)
  _, start = checkpoints.load_params(pretrained_135m)
  _, after = checkpoints.load_params(tmp_path)
  # lr 0 for one step: the fine-tune's weights are the pretrained ones, bit for bit.
  np.testing.assert_array_equal(after["layers_3"]["mlp"]["up_proj"]["kernel"],
                                start["layers_3"]["mlp"]["up_proj"]["kernel"])


def test_a_trained_workdir_generates_and_exports(pretrained_135m, tmp_path):
  run = subprocess.run([sys.executable, "-m", "amd135m.generate", "--model", str(pretrained_135m),
                        "--prompt", "To be", "--max-new-tokens", "4", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert json.loads(run.stdout.splitlines()[0])["new_tokens"] == 4
  assert "WARNING" not in run.stderr, run.stderr  # orbax's metadata note is silenced
  out = tmp_path / "hf"
  run = subprocess.run([sys.executable, "-m", "amd135m.convert", "--input", str(pretrained_135m),
                        "--output", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  config, exported = checkpoints.load_params(out)
  _, trained = checkpoints.load_params(pretrained_135m)
  np.testing.assert_array_equal(exported["lm_head"]["kernel"], trained["lm_head"]["kernel"])
  assert load_tokenizer(out).vocab_size == load_tokenizer(pretrained_135m).vocab_size


def test_tiny_learns_gutenberg_well_past_the_unigram_model(corpora, tmp_path):
  """A 1024-piece SentencePiece trained on the training documents, then the tiny Llama for 500
  steps of 8 x 128 tokens (about a minute here). Threshold: held-out loss at least 0.75 nats
  under the unigram model's cross-entropy (train-split counts, add-1/2) on the same held-out
  tokens; measured 1.2-1.4 nats under (5.71 -> 4.3-4.5) while writing this test."""
  base = config_lib.load("configs/tiny.py:gutenberg")
  documents = builders.load("local_text", config_lib.cache_path("data", "gutenberg_shakespeare"),
                            patterns="*.txt")
  train_docs, _ = splits.holdout(documents, base.data.eval_fraction, seed=0)
  spm.train_sentencepiece((train_docs[i]["text"].decode() for i in range(len(train_docs))), 1024,
                          tmp_path / "tokenizer")
  config = config_lib.load(f"configs/tiny.py:gutenberg,vocab_size=1024,"
                           f"tokenizer={tmp_path / 'tokenizer'}")
  config_lib.apply_overrides(config, ["total_steps=500", "eval_batches=8", "eval_every=1000",
                                      "checkpoint_every=1000", "log_every=100", "devices=1"])
  tokenizer = load_tokenizer(tmp_path / "tokenizer")
  sources = data_lib.open_sources(config.data, tokenizer, 1024, config.seed)
  counts = np.zeros(1024)
  for i in range(len(sources.train[0])):
    counts += np.bincount(sources.train[0][i], minlength=1024)
  counts[sources.separator_id] += len(sources.train[0])
  unigram = np.log((counts + 0.5) / (counts.sum() + 0.5 * 1024))
  held_out = [b["targets"] for b in data_lib.eval_batches(sources, config.data, config.batch_size,
                                                          config.eval_batches, 0, 1)]
  unigram_loss = -float(np.mean(unigram[np.concatenate(held_out).ravel()]))

  result = loop.train_and_evaluate(config, tmp_path / "workdir", progress=False)
  assert result.eval_metrics["eval_tokens"] == np.concatenate(held_out).size
  assert result.eval_metrics["eval_loss"] < unigram_loss - 0.75, (result.eval_metrics,
                                                                   unigram_loss)

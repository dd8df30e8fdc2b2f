"""Training a feature head (amd135m.draft_head): it learns, resumes bitwise, refuses bad input."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from amd135m import checkpoints, draft_head, feature_draft, sampling, speculative
from amd135m.checkpoints import head_io
from amd135m.errors import UserError
from amd135m.tokenizer import load_tokenizer
from amd135m.training import feature_head
from jaxpr_dots import dot_dtypes

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small enough for seconds on a 2-core CPU: 8 rows of 40 tokens per chunk.
SMALL = feature_head.Settings(seq_len=40, prompt_tokens=24, collect_batch=8, batch=4, unroll=2,
                            vocab=512, eval_rows=4, warmup_steps=2, lr=3e-3)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory, smollm2_gguf):
  """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer, as a Hugging Face directory:
  a target whose collection and training take seconds."""
  import hf_reference as ref
  hf = ref.tiny_hf_model(seed=7, init_std=0.05, vocab_size=49152, hidden_size=64,
                         intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
  path = tmp_path_factory.mktemp("tiny_target")
  checkpoints.save_hf(path, ref.our_config(hf), ref.our_params(hf),
                      load_tokenizer(smollm2_gguf))
  return path


@pytest.fixture(scope="module")
def trained(tiny_target, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("head") / "head"
  summary = feature_head.train_head(str(tiny_target), workdir, steps=30, prompts=24,
                                  settings=SMALL, eval_every=10, progress=False)
  return workdir, summary


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_a_usable_head(trained, tiny_target):
  workdir, summary = trained
  assert summary["complete"] and summary["step"] == 30 and summary["rows"] == 24
  records = _metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, 31))
  first, last = records[0], records[-1]
  assert last["train_loss"] < 0.8 * first["train_loss"]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(evals) == 3 and evals[-1] < evals[0]
  for name in ("draft_head.json", "vocab.npy", "train_settings.json", "COMPLETE"):
    assert (workdir / name).exists(), name
  record = head_io.read_record(workdir)
  assert record.draft_vocab == SMALL.vocab and len(head_io.read_vocab(workdir)) == SMALL.vocab

  # A head workdir is a draft: greedy decode through it equals the target alone.
  config, params = checkpoints.load_params(tiny_target)
  params = jax.tree.map(jax.numpy.asarray, params)
  draft, draft_params = speculative.load_draft(str(workdir), config, params)
  assert isinstance(draft, feature_draft.FeatureDraft)
  prompts = [[10, 20, 30, 40], [5, 6]]
  expected = sampling.generate(params, config, prompts, 20).tokens
  result = speculative.speculative_generate(params, config, draft, draft_params, prompts, 20,
                                            gamma=3)
  assert result.tokens == expected


def test_a_wall_time_budget_without_a_progress_bar_finishes_its_schedule(tiny_target, tmp_path):
  """--minutes sizes the schedule after the first steps (the bar is reset to it); with the bar
  off (the reproduction's and the API's quiet path) that must work too, and end complete, also
  when the steps turn slower after the schedule was sized (a busier machine: a 45-minute head
  stopped 37 steps short of its schedule at the deadline, incomplete; without the re-sizing this
  run stops at ~260 of ~430 steps). A quarter of the 36 seconds collects: with a warm compile
  cache a longer share collected 600+ rows, and reading them, the vocabulary and the checkpoint
  set-up left no time for steps."""
  settings = dataclasses.replace(SMALL, collect_share=0.25)
  workdir = tmp_path / "head"
  summary = feature_head.train_head(str(tiny_target), workdir, minutes=0.6, settings=settings,
                                    eval_every=10, checkpoint_every=10, progress=False,
                                    hooks=feature_head.Hooks(slow_from=4, slow_seconds=0.03))
  assert summary["complete"] and summary["step"] == summary["total_steps"] >= 3
  assert summary["seconds"] < 0.6 * 60 + 10  # the budget, give or take the last step
  sized = json.loads((workdir / feature_head.SCHEDULE_FILE).read_text())
  assert sized["total_steps"] == summary["step"] and sized["seconds_per_step"] >= 0.03

  # Resumed with a budget of its own, it trains on the rows it has (no second collection).
  chunks = sorted((workdir / feature_head.DATA_DIR).iterdir())
  again = feature_head.train_head(str(tiny_target), workdir, minutes=0.2, settings=settings,
                                  eval_every=10, progress=False, resume=True)
  assert sorted((workdir / feature_head.DATA_DIR).iterdir()) == chunks
  assert again["rows"] == summary["rows"] and again["step"] == summary["step"]


def test_the_summary_reports_the_head_when_no_step_ended_on_an_evaluation(tiny_target, tmp_path):
  """A run stopped between evaluations (a deadline, SIGTERM) or resumed with nothing left to do
  still reports its held-out agreement: the summary printed "nan" when the last record had none."""
  workdir = tmp_path / "head"
  first = feature_head.train_head(str(tiny_target), workdir, steps=4, prompts=16,
                                  settings=SMALL, eval_every=100, progress=False)
  again = feature_head.train_head(str(tiny_target), workdir, steps=4, prompts=16,
                                  settings=SMALL, eval_every=100, progress=False, resume=True)
  assert again["step"] == first["step"] == 4
  for summary in (first, again):
    assert 0 <= summary["last"]["eval_agreement_0"] <= 1
    assert "nan" not in draft_head.format_summary(summary)
  # The resumed run evaluated the restored head: the same figure as at the end of the first.
  assert again["last"]["eval_loss"] == pytest.approx(first["last"]["eval_loss"], rel=1e-6)


def test_the_head_refuses_another_target(trained, smollm2):
  workdir, _ = trained
  config, params = smollm2
  with pytest.raises(UserError, match="trained for another target"):
    speculative.load_draft(str(workdir), config, params)


def _train_in_subprocess(target, workdir, *extra_code, steps=6):
  code = (f"from amd135m.training import feature_head\n"
          f"import dataclasses\n"
          f"settings = dataclasses.replace(feature_head.Settings(), **{SMALL.__dict__!r})\n"
          f"hooks = feature_head.Hooks({', '.join(extra_code)})\n"
          f"feature_head.train_head({str(target)!r}, {str(workdir)!r}, steps={steps}, prompts=24,"
          f" settings=settings, resume=True, checkpoint_every=2, progress=False, hooks=hooks)\n")
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_target, tmp_path):
  """Killed right after step 3 (its last checkpoint is step 2), rerun with --resume: the final
  weights and the metrics of every step equal an uninterrupted run's, bitwise. All three runs are
  processes of their own: the test process (8 fake CPU devices) trains the same head different in
  the last bit."""
  whole, broken = tmp_path / "whole", tmp_path / "broken"
  assert _train_in_subprocess(tiny_target, whole).returncode == 0
  killed = _train_in_subprocess(tiny_target, broken, "kill_after_step=3")
  assert killed.returncode == -9
  assert head_io.finished_steps(broken) == [2]
  resumed = _train_in_subprocess(tiny_target, broken)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  _, _, expected = head_io.load_head_params(whole)
  _, _, got = head_io.load_head_params(broken)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  drop = lambda rs: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rs]
  assert drop(_metrics(broken)) == drop(_metrics(whole))


def run_cli(*args):
  proc = subprocess.run([sys.executable, "-m", "amd135m.draft_head", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        timeout=300)
  return proc.returncode, proc.stdout, proc.stderr


def run_main(*args, capsys):
  """run_cli's (exit status, stdout, stderr), from draft_head.main in this process."""
  try:
    code = draft_head.main([str(a) for a in args])
  except SystemExit as e:  # argparse's usage errors
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize("case", ["missing target", "minutes 0", "vocab too large",
                                  "unwritable workdir", "no budget", "existing head",
                                  "compute int8"])
def test_bad_input_is_one_line(case, tiny_target, trained, tmp_path, capsys):
  workdir = tmp_path / "w"
  args = {"missing target": ["--target", tmp_path / "nope.gguf", "--workdir", workdir,
                             "--steps", 1],
          "minutes 0": ["--target", tiny_target, "--workdir", workdir, "--minutes", 0],
          "vocab too large": ["--target", tiny_target, "--workdir", workdir, "--steps", 1,
                              "--vocab", 60000],
          "unwritable workdir": ["--target", tiny_target, "--workdir", "/proc/amd135m/w",
                                 "--steps", 1],
          "no budget": ["--target", tiny_target, "--workdir", workdir],
          "existing head": ["--target", tiny_target, "--workdir", trained[0], "--steps", 1],
          "compute int8": ["--target", tiny_target, "--workdir", workdir, "--steps", 1,
                           "--compute", "int8"],
          }[case]
  # One case through the command's own process; the others call its main here (seconds each).
  code, out, err = (run_cli("train", *args) if case == "missing target"
                    else run_main("train", *args, capsys=capsys))
  assert code == 2, (case, err)
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  expected = {"missing target": "no such file", "minutes 0": "--minutes must be",
              "vocab too large": "larger than the target's vocabulary",
              "unwritable workdir": "--workdir", "no budget": "one of the arguments",
              "existing head": "--resume", "compute int8": "--compute"}[case]
  assert expected in err, err


def _run_module(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_a_head_workdir_is_a_draft_in_generate_bench_and_spec_eval(trained, tiny_target,
                                                                    tmp_path, capsys):
  workdir, _ = trained
  # The plain run in-process (the generate CLI's own process is tested in test_cli), the
  # speculative one through the command.
  from amd135m import generate
  assert generate.main(["--model", str(tiny_target), "--prompt", "def add(a, b):",
                        "--max-new-tokens", "12", "--json"]) == 0
  plain = json.loads(capsys.readouterr().out)
  spec = json.loads(_run_module("amd135m.generate", "--model", tiny_target, "--prompt",
                                "def add(a, b):", "--max-new-tokens", 12, "--draft", workdir,
                                "--gamma", 3, "--json"))
  assert spec["completion"] == plain["completion"] and spec["target_calls"] >= 1

  # gamma 2, 8 tokens, HumanEval prompts: spec_eval below finds these programs in the compile
  # cache.
  bench = json.loads(_run_module("amd135m.bench", "speculative", "--target", tiny_target,
                                 "--draft", workdir, "--prompts", 2, "--new-tokens", 8,
                                 "--gamma", 2, "--repeats", 1, "--no-reference", "--json"))
  assert bench["speculative"]["equals_target_only"] is True
  assert bench["ngram"]["equals_target_only"] is True
  assert bench["draft_round"]["cost_ratio"] > 0

  _run_module("amd135m.spec_eval", "--target", tiny_target, "--draft", workdir, "--out",
              tmp_path / "table", "--prompts", 1, "--gammas", 2, "--max-new-tokens", 8)
  rows = json.loads((tmp_path / "table" / "spec_table.json").read_text())["rows"]
  assert [r["setting"] for r in rows] == ["greedy", "sampling"]
  assert rows[0]["exact"] is True


def test_lookup_first_around_a_head_is_exact_and_refuses_a_lookup_inside(trained, tiny_target):
  """ngram+DIR: prompt lookup where the text repeats, the head elsewhere; greedy output equals
  target-only on a prompt that repeats itself (so both sources propose, the lookup in long
  rounds: the head catches up on their wider features)."""
  workdir, _ = trained
  config, params = checkpoints.load_params(tiny_target)
  draft, draft_params = speculative.load_draft(f"ngram+{workdir}", config, params)
  assert isinstance(draft, speculative.LookupFirstDraft)
  assert isinstance(draft.inner, feature_draft.FeatureDraft)
  prompt = [[5, 17, 300, 5, 17, 300, 5, 17, 42, 9]]
  expected = sampling.generate(params, config, prompt, 24).tokens
  result = speculative.speculative_generate(params, config, draft, draft_params, prompt, 24,
                                            gamma=3)
  assert result.tokens == expected
  assert 0 < result.totals["long_rounds"] < result.totals["target_calls"]
  for bad in ("ngram+ngram", "ngram+ngram+self", "ngram+self", "ngram+int8"):
    with pytest.raises(UserError, match="ngram\\+D takes a"):
      speculative.load_draft(bad, config, params)


def test_corpus_chunks_read_whole_functions_as_they_are(tiny_target, tmp_path):
  """generate_every=2: chunk 0 is the target's continuations of short prompts, chunk 1 a prefill
  of stdlib functions cut to seq_len tokens: its tokens are the text's own, and the top-k at each
  position is the target's distribution after that prefix."""
  from amd135m.data import prompts as prompts_lib
  config, params = checkpoints.load_params(tiny_target)
  params = jax.tree.map(jax.numpy.asarray, params)
  tokenizer = load_tokenizer(tiny_target)
  settings = feature_head.Settings(**{**SMALL.__dict__, "generate_every": 2})
  chunks = feature_head.collect(params, config, tokenizer, tmp_path, (1, 2), settings, 2, None)
  assert chunks == 2
  generated = dict(np.load(tmp_path / "data" / "chunk-00000.npz"))
  corpus = dict(np.load(tmp_path / "data" / "chunk-00001.npz"))
  assert (generated["prompt_lens"] < settings.seq_len).all()
  assert (corpus["prompt_lens"] == settings.seq_len).all()
  code = prompts_lib.stdlib_functions(4, settings.seed)
  first = tokenizer.encode(code[0])[:settings.seq_len]
  assert corpus["tokens"][0].tolist() == first
  # The target's own first choice after the whole window equals a plain forward's.
  from amd135m import model as model_lib
  logits, _ = model_lib.forward(params, config, jax.numpy.asarray([first]))
  assert corpus["top_ids"][0, :, 0].tolist() == np.argmax(logits[0], -1).tolist()
  # generate_every=0: every chunk is read text, the same windows in the same order.
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  settings = feature_head.Settings(**{**SMALL.__dict__, "generate_every": 0})
  assert feature_head.collect(params, config, tokenizer, read_only, (1, 2), settings, 1, None) == 1
  only = dict(np.load(read_only / "data" / "chunk-00000.npz"))
  assert only.keys() == corpus.keys()
  for key in corpus:
    np.testing.assert_array_equal(only[key], corpus[key])


def test_a_deadline_sizes_the_collection_bar(tiny_target, tmp_path, monkeypatch, capsys):
  """With --minutes the collection stops at its deadline: the bar counts the chunks the deadline
  leaves room for at the measured pace (its ETA then holds), not the schedule's maximum."""
  import re
  import time
  tokenizer = load_tokenizer(tiny_target)
  config, params = checkpoints.load_params(tiny_target)

  def slow_rows(params, config, prompts, layers, settings):  # 0.25 s a chunk
    time.sleep(0.25)
    return {"tokens": np.zeros((len(prompts), 4), np.int32)}

  monkeypatch.setattr(feature_head, "collect_rows", slow_rows)
  chunks = feature_head.collect(params, config, tokenizer, tmp_path, (1, 2), SMALL, 400,
                                time.time() + 1.2)
  totals = [int(total) for _, total in re.findall(r"(\d+)/(\d+)", capsys.readouterr().err)]
  assert 1 <= chunks < 50  # about 5; fewer where preparing the first prompts is slow
  assert totals[0] == 400 and chunks <= totals[-1] <= chunks + 1


def test_generate_every_zero_reads_only_and_a_negative_one_is_refused():
  feature_head.Settings(**{**SMALL.__dict__, "generate_every": 0}).check(49152)
  with pytest.raises(UserError, match="--generate-every must be >= 0"):
    feature_head.Settings(**{**SMALL.__dict__, "generate_every": -1}).check(49152)


@pytest.mark.parametrize("vocab", [49152, 1000, 37])
@pytest.mark.parametrize("levels", [None, 5])
def test_top_k_by_chunks_is_the_top_k_with_the_lower_id_first_among_equals(vocab, levels):
  rng = np.random.default_rng(vocab)
  x = rng.standard_normal((16, vocab)).astype(np.float32)
  if levels:  # values on a coarse grid: many equal entries, some across chunk boundaries
    x = np.round(x * levels / 4) / levels
  ids, values = jax.jit(lambda x: feature_head.top_k_by_chunks(x, 8))(x)
  # numpy: order by value (largest first), then by id
  expected = np.stack([np.lexsort((np.arange(vocab), -row))[:8] for row in x])
  np.testing.assert_array_equal(np.asarray(ids), expected)
  np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(x, expected, axis=1))


def test_compute_auto_is_decided_once_and_recorded(trained):
  workdir, _ = trained
  saved = json.loads((workdir / feature_head.SETTINGS_FILE).read_text())
  assert saved["compute"] == feature_head.Settings().compute_dtype()
  assert saved["compute"] in ("float32", "bfloat16")


def test_a_head_from_before_compute_resumes_in_f32(tmp_path):
  old = dataclasses.asdict(SMALL)
  del old["compute"]
  (tmp_path / feature_head.SETTINGS_FILE).write_text(json.dumps(old))
  settled = feature_head._settled(tmp_path, dataclasses.replace(SMALL, compute="bfloat16"))
  assert settled == dataclasses.replace(SMALL, compute="float32")


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_the_head_trains_its_products_in_its_compute_dtype_with_f32_sums(compute, tiny_target):
  config, params = checkpoints.load_params(tiny_target)
  layers = feature_head.resolve_layers("eagle3", config.n_layers)
  vocab = np.arange(64)
  head_config = feature_draft.HeadConfig(config, layers, len(vocab), dtype=compute)
  head = feature_draft.init_params(head_config, params, vocab, jax.random.key(0))
  assert {leaf.dtype for leaf in jax.tree.leaves(head)} == {np.dtype("float32")}
  b, s, k = 2, 12, 8
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 64, (b, s)).astype(np.int32),
           "features": rng.standard_normal((b, s, head_config.feature_dim)).astype(np.float32),
           "top_ids": rng.integers(0, 64, (b, s, k)).astype(np.int32),
           "top_logp": np.log(np.full((b, s, k), 1 / k, np.float32))}
  to_draft = np.full(config.vocab_size, -1, np.int32)
  to_draft[vocab] = np.arange(len(vocab))
  loss = lambda p: feature_head.head_loss(p, head_config, SMALL, batch,
                                          params["embed_tokens"]["embedding"], to_draft)[0]
  dots = list(dot_dtypes(jax.make_jaxpr(jax.value_and_grad(loss))(head).jaxpr))
  narrow = {"float32": "float32", "bfloat16": "bfloat16"}[compute]
  assert len(dots) > 20
  assert all(d == (narrow, narrow, "float32") for d in dots), sorted(set(dots))


def test_agreement_is_the_heads_first_guess_against_the_targets_first_choice(tiny_target):
  """head_loss's agreement_j (a max and a gather) equals counting, by hand, the positions where
  the argmax of the head's unrolled logits is the target's first choice (off the head's ids:
  never), over the positions each unroll step covers; the first choices are the head's own
  guesses at some positions, other ids (some off its vocabulary) elsewhere."""
  config, params = checkpoints.load_params(tiny_target)
  layers = feature_head.resolve_layers("eagle3", config.n_layers)
  vocab = np.arange(0, 128, 2)  # the odd ids are off the head's vocabulary
  head_config = feature_draft.HeadConfig(config, layers, len(vocab))
  head = feature_draft.init_params(head_config, params, vocab, jax.random.key(1))
  b, s, k = 3, 16, 4
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 128, (b, s)).astype(np.int32)
  features = rng.standard_normal((b, s, head_config.feature_dim)).astype(np.float32)
  embedding = params["embed_tokens"]["embedding"]
  logits, _ = feature_draft.unrolled_logits(
      head, head_config, features[:, :-1], np.asarray(embedding)[tokens[:, 1:]], SMALL.unroll)
  guesses = [np.argmax(np.asarray(step_logits), axis=-1) for step_logits in logits]
  top_ids = rng.integers(0, 128, (b, s, k)).astype(np.int32)
  mine = rng.random((b, s - 1)) < 0.5
  top_ids[:, 1:, 0] = np.where(mine, vocab[guesses[0]], top_ids[:, 1:, 0])
  batch = {"tokens": tokens, "features": features, "top_ids": top_ids,
           "top_logp": np.log(np.full((b, s, k), 1 / k, np.float32))}
  to_draft = np.full(config.vocab_size, -1, np.int32)
  to_draft[vocab] = np.arange(len(vocab))
  _, metrics = feature_head.head_loss(head, head_config, SMALL, batch, embedding, to_draft)
  first = to_draft[top_ids[:, 1:, 0]]
  assert (first < 0).any()
  for j, guess in enumerate(guesses):
    agree = (guess == first) & (first >= 0)
    expected = agree[:, j:].sum() / (b * (s - 1 - j))
    assert 0 < expected < 1
    assert float(metrics[f"agreement_{j}"]) == pytest.approx(expected), j

"""AMD's speculative-decoding table: greedy rows exact, self-drafting fully accepted, files written,
the paper setting end to end on a tiny CodeLlama-shaped pair (vocab 32000 draft, 32016 target)."""
import csv
import dataclasses
import inspect
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from amd135m import checkpoints, model as model_lib, sampling, spec_eval, speculative
from amd135m.benchmarks import spec_bench, spec_table
from amd135m.data import spm
from amd135m.tokenizer import load_tokenizer

# Paper prompts (AMD's prefix + HumanEval/0 and /2) of one length bucket, so that the programs
# compiled here serve the paper command's run too: compiles are most of this file's time.
PROMPTS = [spec_table.ONE_SHOT_PREFIX + text for text in spec_bench.humaneval_prompts(3)[::2]]
MAX_NEW = 6
TARGET = model_lib.ModelConfig(vocab_size=32016, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                               ffn_dim=64, max_seq_len=2048)
DRAFT = dataclasses.replace(TARGET, vocab_size=32000)


def random_params(config, seed):
  """Random weights at std 0.2 (init's 0.02 x 10): logits far enough apart that greedy ties,
  which f32 rounding could break either way, do not happen. Jitted: one compile, not one per op."""
  params = jax.jit(model_lib.init_params, static_argnums=0)(config, jax.random.key(seed))
  return jax.tree.map(lambda x: np.asarray(x * 10 if x.ndim > 1 else x), params)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """Tokenizer (Llama-2 style sentencepiece, 400 pieces: fewer than either model's vocabulary,
  as CodeLlama's 32016 covers 16 ids beyond Llama-2's 32000), both models in memory and on disk."""
  root = tmp_path_factory.mktemp("paper_pair")
  texts = [inspect.getsource(speculative), inspect.getsource(sampling)]  # no HumanEval text
  tokenizer = load_tokenizer(spm.train_sentencepiece(texts, 400, root / "tokenizer", num_threads=1))
  target, draft = random_params(TARGET, 0), random_params(DRAFT, 1)
  checkpoints.save_hf(root / "target", TARGET, target, tokenizer)
  checkpoints.save_hf(root / "draft", DRAFT, draft, tokenizer)
  return dict(root=root, tokenizer=tokenizer, target=jax.tree.map(jax.numpy.asarray, target),
              draft=jax.tree.map(jax.numpy.asarray, draft))


LOOP_RUNS = []  # (timed, whether speculative._loop compiled) per speculative run of `table`


class _Clock:
  """spec_table's clock: counts its readings (odd while a timed run is in progress)."""
  def __init__(self):
    self.readings = 0

  def perf_counter(self):
    self.readings += 1
    return time.perf_counter()


@pytest.fixture(scope="module")
def table(pair):
  clock, original = _Clock(), speculative.speculative_generate

  def recorded(*args, **kwargs):
    timed, before = clock.readings % 2 == 1, speculative._loop._cache_size()
    out = original(*args, **kwargs)
    LOOP_RUNS.append((timed, speculative._loop._cache_size() > before))
    return out

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(spec_table, "time", clock)
    patch.setattr(speculative, "speculative_generate", recorded)
    return spec_table.speculative_table(pair["target"], TARGET, speculative.ModelDraft(DRAFT),
                                       pair["draft"], pair["tokenizer"], PROMPTS, gammas=(1, 3),
                                       max_new_tokens=MAX_NEW)


def test_timed_runs_compile_nothing(table):
  """Every speculative loop a timed run needs (greedy and sampled settings compile their own) was
  compiled by an untimed warm-up run before it."""
  assert any(timed for timed, _ in LOOP_RUNS) and any(grew for _, grew in LOOP_RUNS)
  assert not any(grew for timed, grew in LOOP_RUNS if timed)


def test_greedy_rows_are_exact_and_report_acceptance_and_speedup(pair, table):
  assert [(r["setting"], r["gamma"]) for r in table.rows] == [
      ("greedy", 1), ("greedy", 3), ("sampling", 1), ("sampling", 3)]
  for row in table.rows:
    assert set(spec_table.ROW_FIELDS) <= set(row)
    assert 0.0 <= row["acceptance"] <= 1.0 and row["speedup"] > 0
    assert row["speedup"] == pytest.approx(row["speculative_tokens_per_s"]
                                           / row["target_tokens_per_s"])
    assert row["predicted_speedup"] > 0 and row["cost_ratio"] > 0
    assert row["tokens_per_target_call"] >= 1.0
    assert len(row["acceptance_by_position"]) == row["gamma"]
    assert row["target_new_tokens"] == row["speculative_new_tokens"] == MAX_NEW * len(PROMPTS)
  for row in table.rows[:2]:
    assert row["exact"] is True
    assert row["acceptance"] < 0.5  # a random draft: not a table of ones by construction
  assert all(row["exact"] is None for row in table.rows[2:])
  assert table.outputs["greedy/gamma=3"] == table.outputs["greedy/target"]
  assert table.prompt_tokens == [len(pair["tokenizer"].encode(p)) for p in PROMPTS]


def test_greedy_outputs_equal_plain_target_decoding(pair, table):
  encoded = [pair["tokenizer"].encode(p) for p in PROMPTS]
  expected = [sampling.generate(pair["target"], TARGET, [ids], MAX_NEW).tokens[0]
              for ids in encoded]
  assert table.outputs["greedy/target"] == expected
  assert table.outputs["greedy/gamma=1"] == expected


def test_draft_equal_to_target_accepts_every_token(pair):
  table = spec_table.speculative_table(pair["target"], TARGET, speculative.ModelDraft(TARGET),
                                      pair["target"], pair["tokenizer"], PROMPTS, gammas=(3,),
                                      max_new_tokens=MAX_NEW, predicted=False)
  greedy, sampled = table.rows
  assert greedy["acceptance"] == 1.0 and greedy["exact"] is True
  assert greedy["acceptance_by_position"] == [1.0, 1.0, 1.0]
  assert sampled["acceptance"] == 1.0  # p == q: min(1, p/q) = 1 at every proposal
  assert greedy["cost_ratio"] is None and greedy["predicted_speedup"] is None
  # By hand, per prompt: 5 tokens after the prefill's, in 2 rounds (3 drafted + 1 bonus, then 3
  # drafted of which the budget keeps 1). AMD's figure (verified - calls) / draft forwards.
  assert MAX_NEW == 6 and len(PROMPTS) == 2
  assert greedy["tokens_per_target_call"] == 10 / 4
  assert greedy["amd_acceptance"] == (10 - 4) / 12


def test_several_drafts_share_one_target_only_run_per_prompt(pair, monkeypatch):
  """`speculative_tables` (the reproduction's table): per prompt the target alone once, then each
  draft at each of its gammas; every draft's row is over that same baseline, and each is what
  the draft alone would give (a draft's acceptance does not depend on its neighbours)."""
  calls = []
  real_target, real_spec = sampling.generate, speculative.speculative_generate
  monkeypatch.setattr(sampling, "generate", lambda *a, **k: calls.append("target") or
                      real_target(*a, **k))
  monkeypatch.setattr(speculative, "speculative_generate", lambda *a, **k: calls.append(
      ("self" if a[2].config is TARGET else "draft", a[6])) or real_spec(*a, **k))
  greedy = {"greedy": sampling.SamplingParams()}
  tables = spec_table.speculative_tables(
      pair["target"], TARGET, {"draft": (speculative.ModelDraft(DRAFT), pair["draft"], (1, 2)),
                               "self": (speculative.ModelDraft(TARGET), pair["target"], (3,))},
      pair["tokenizer"], PROMPTS, settings=greedy, max_new_tokens=MAX_NEW, predicted=False)
  one_prompt = ["target", ("draft", 1), ("draft", 2), ("self", 3)]
  # The first prompt runs everything twice (an untimed warm-up of each program, then timed).
  warm = [c for call in one_prompt for c in (call, call)]
  assert calls == warm + one_prompt
  (d1, d2), (s3,) = tables["draft"].rows, tables["self"].rows
  assert d1["target_tokens_per_s"] == d2["target_tokens_per_s"] == s3["target_tokens_per_s"]
  assert d1["target_seconds"] == s3["target_seconds"]
  assert s3["acceptance"] == 1.0 and d1["acceptance"] < 0.5
  assert all(r["exact"] for r in (d1, d2, s3))
  alone = spec_table.speculative_table(pair["target"], TARGET, speculative.ModelDraft(DRAFT),
                                       pair["draft"], pair["tokenizer"], PROMPTS, gammas=(1, 2),
                                       settings=greedy, max_new_tokens=MAX_NEW, predicted=False)
  assert [r["acceptance"] for r in alone.rows] == [d1["acceptance"], d2["acceptance"]]
  assert tables["draft"].outputs == alone.outputs


def test_exact_column_fails_when_outputs_differ(pair, monkeypatch):
  real = speculative.speculative_generate

  def off_by_one(*args, **kwargs):
    result = real(*args, **kwargs)
    result.tokens[0][-1] = (result.tokens[0][-1] + 1) % TARGET.vocab_size
    return result

  monkeypatch.setattr(speculative, "speculative_generate", off_by_one)
  table = spec_table.speculative_table(pair["target"], TARGET, speculative.ModelDraft(DRAFT),
                                      pair["draft"], pair["tokenizer"], PROMPTS[:1], gammas=(1,),
                                      max_new_tokens=MAX_NEW, predicted=False,
                                      settings={"greedy": sampling.SamplingParams()})
  assert table.rows[0]["exact"] is False


def test_table_files_and_text(pair, table, tmp_path):
  setup = dict(stop_ids=[])
  paths = spec_table.save_table(table, tmp_path, setup, decode=pair["tokenizer"].decode)
  with open(paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == spec_table.ROW_FIELDS and len(rows) == 4
  assert float(rows[1]["acceptance"]) == pytest.approx(table.rows[1]["acceptance"])
  saved = json.loads(paths["json"].read_text())
  assert saved["rows"] == json.loads(json.dumps(table.rows))
  assert saved["amd_reference"]["rows"] == spec_table.AMD_REFERENCE
  assert saved["provenance"]["command"].startswith("python -m amd135m.spec_eval")
  assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(paths["png"]) > 10_000
  completions = [json.loads(line) for line in paths["completions"].read_text().splitlines()]
  assert len(completions) == 6 * len(PROMPTS)  # (target + 2 gammas) x 2 settings
  text = spec_table.format_table(table.rows)
  assert "AMD's reported table" in text and "3.88x" in text and "0.650" in text
  assert len(text.splitlines()[0]) == len(text.splitlines()[2])  # aligned columns


def test_paper_setting_end_to_end_on_a_32000_32016_pair(pair, tmp_path, capsys):
  root = pair["root"]
  rc = spec_eval.main(["--target", str(root / "target"), "--draft", str(root / "draft"), "--paper",
                       "--prompts", "1", "--gammas", "1", "--max-new-tokens", str(MAX_NEW),
                       "--out", str(tmp_path)])
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert "AMD's reported table" in out and "adaptive" in out
  saved = json.loads((tmp_path / "spec_table.json").read_text())
  setup = saved["setup"]
  assert (setup["target_vocab"], setup["draft_vocab"]) == (32016, 32000)
  assert setup["prompt_template"].startswith(spec_table.ONE_SHOT_PREFIX)
  assert "[PYTHON]" in setup["prompt_template"] and setup["adaptive"] is True
  assert setup["settings"]["sampling"] == dict(temperature=0.1, top_k=10, top_p=0.95)
  assert setup["stop_ids"] == list(pair["tokenizer"].stop_ids)
  texts = spec_bench.humaneval_prompts(1)
  assert saved["prompt_tokens"] == [
      len(pair["tokenizer"].encode(spec_table.ONE_SHOT_PREFIX + t)) for t in texts]
  greedy = [r for r in saved["rows"] if r["setting"] == "greedy"]
  assert greedy[0]["exact"] is True and greedy[0]["gamma"] == 1
  ids = {json.loads(line)["task_id"] for line in open(tmp_path / "completions.jsonl")}
  assert ids == {"HumanEval/0"}


@pytest.fixture(scope="module")
def foreign_draft(pair):
  """A 32000-vocabulary draft whose tokenizer was trained on other text: ids mean other pieces."""
  root = pair["root"]
  other = load_tokenizer(spm.train_sentencepiece(["Shall I compare thee to a summer's day? " * 40,
                                                  "Thou art more lovely and more temperate. " * 40],
                                                 300, root / "other_tokenizer", num_threads=1))
  checkpoints.save_hf(root / "foreign_draft", DRAFT, jax.tree.map(np.asarray, pair["draft"]),
                      other)
  return root / "foreign_draft"


@pytest.mark.parametrize("case, message", [
    ("missing target", "target weights not found"),
    ("missing draft", "no such file or directory"),
    ("swapped pair", "larger than the target's"),
    ("foreign tokenizer", "tokenizers differ at id"),
    ("gamma 0", "gamma must be >= 1"),
    ("no prompts", "--prompts must be 1 to 164"),
    ("no new tokens", "--max-new-tokens must be >= 1"),
    ("first:abc", "must be a whole number of layers"),
    ("out is under a file", "cannot be created"),
])
def test_bad_input_is_one_line_and_exit_2(pair, foreign_draft, tmp_path, capsys, case, message):
  root = pair["root"]
  target, draft, gammas = root / "target", root / "draft", ["2"]
  if case == "missing target":
    target = tmp_path / "no_such_dir"
  elif case == "missing draft":
    draft = tmp_path / "no_such_dir"
  elif case == "swapped pair":
    target, draft = draft, target
  elif case == "foreign tokenizer":
    draft = foreign_draft
  elif case == "gamma 0":
    gammas = ["0", "2"]
  elif case == "first:abc":
    draft = "first:abc"
  prompts, new_tokens = ("0" if case == "no prompts" else "1"), (
      "0" if case == "no new tokens" else "4")
  out_dir = tmp_path / "o"
  if case == "out is under a file":
    (tmp_path / "f").write_text("")
    out_dir = tmp_path / "f" / "o"
  rc = spec_eval.main(["--target", str(target), "--draft", str(draft), "--paper", "--prompts",
                       prompts, "--max-new-tokens", new_tokens, "--gammas", *gammas,
                       "--out", str(out_dir)])
  out, err = capsys.readouterr()
  assert rc == 2 and out == ""
  assert err.count("\n") == 1 and err.startswith("amd135m.spec_eval: error: ") and message in err
  assert not (tmp_path / "o").exists()


def test_paper_script_runs_the_command(tmp_path):
  """experiments/paper_codellama.sh hands its arguments to `python -m amd135m.spec_eval --paper`."""
  script = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "paper_codellama.sh"
  proc = subprocess.run([str(script), str(tmp_path / "no_such_dir"), "self", str(tmp_path / "o"),
                         "--prompts", "1"], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable))
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.strip() == (f"amd135m.spec_eval: error: target weights not found: "
                                 f"{tmp_path / 'no_such_dir'} does not exist (pass a Hugging Face "
                                 "model directory or a .gguf file)")

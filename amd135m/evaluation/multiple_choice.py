"""Zero-shot multiple choice by log-likelihood, with lm-evaluation-harness's conventions.

Rows are the tasks' Hugging Face dataset records, one JSON object per line. Each task follows
one lm-eval task definition (EleutherAI/lm-evaluation-harness, lm_eval/tasks/...):

  sciq           sciq/sciq.yaml: "{{support.lstrip()}}\\nQuestion: {{question}}\\nAnswer:",
                 choices [distractor1, distractor2, distractor3, correct_answer], gold 3.
  piqa           piqa/piqa.yaml: "Question: {{goal}}\\nAnswer:", choices [sol1, sol2], gold label.
  arc_easy,      arc/arc_easy.yaml (arc_challenge.yaml includes it): "Question: {{question}}\\n
  arc_challenge  Answer:", choices choices.text, gold choices.label.index(answerKey).
  hellaswag      hellaswag/hellaswag.yaml + utils.py process_docs: query = preprocess(
                 activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices =
                 preprocess(ending) each, gold int(label); preprocess strips, turns " [title]"
                 into ". ", drops any "[...]" and collapses double spaces.
  winogrande     winogrande/default.yaml + preprocess_winogrande.py (partial scoring): the
                 sentence up to the blank with each option substituted is the context, and the
                 shared continuation " " + (sentence after the blank).strip() is what is scored;
                 gold {"1": 0, "2": 1}[answer]; acc only.
  lambada        lambada/lambada_openai.yaml (output_type loglikelihood): context = all words but
                 the last (split on " "), continuation " " + last word; acc = every continuation
                 token is the greedy argmax, perplexity = exp(-mean log-likelihood).

Requests are (context, " " + choice), lm-eval's target_delimiter. As lm-eval's HF model does
(models/huggingface.py `_encode_pair`), trailing whitespace of a context moves to the
continuation, the continuation's tokens are encode(context + continuation)[len(encode(context)):],
no BOS is added unless asked (lm-eval's add_bos_token=False), and an empty context becomes the
BOS (else EOS) token. acc takes the argmax of the summed log-likelihoods; acc_norm divides each by
len(choice), the choice string's length in characters as lm-eval's api/task.py process_results
computes it (the "byte-length" normalisation of its docs; equal to bytes for ASCII text).
Standard errors are lm-eval's: sample standard deviation / sqrt(n).
"""
import dataclasses
import math
import os
import re
import sys
from typing import Callable, Sequence

import numpy as np
import tqdm

from amd135m.errors import UserError, check_counts, jsonl_records
from amd135m.evaluation import models, scoring

TASKS = ("sciq", "piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "lambada")


@dataclasses.dataclass(frozen=True)
class Doc:
  """One evaluation item: its (context, continuation) requests and how they are scored."""
  requests: list[tuple[str, str]]  # one per choice (one in all for lambada)
  gold: int
  choices: list[str] | None  # lm-eval's doc_to_choice, for acc_norm; None where not reported


class _Row:
  """A JSONL record whose missing or malformed fields raise one UserError naming file:line."""

  def __init__(self, record: dict, where: str, task: str):
    self.record, self.where, self.task = record, where, task

  def error(self, message: str) -> UserError:
    return UserError(f"{self.where}: {message} (task {self.task}; rows must be the task's "
                     "Hugging Face dataset records)")

  def text(self, key: str) -> str:
    if key not in self.record:
      return self._missing(key)
    value = self.record[key]
    if not isinstance(value, str):
      raise self.error(f"field {key!r} must be a string, got {type(value).__name__}")
    return value

  def index(self, key: str, size: int) -> int:
    if key not in self.record:
      return self._missing(key)
    value = self.record[key]
    try:
      index = int(value)
    except (TypeError, ValueError):
      raise self.error(f"field {key!r} must be an integer label, got {value!r}") from None
    if not 0 <= index < size:
      raise self.error(f"field {key!r} = {index} is not in [0, {size})")
    return index

  def texts(self, key: str, container: dict | None = None) -> list[str]:
    source = self.record if container is None else container
    if key not in source:
      return self._missing(key)
    value = source[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
      raise self.error(f"field {key!r} must be a non-empty list of strings")
    return value

  def _missing(self, key: str):
    raise self.error(f"missing field {key!r}")


def _choice_doc(context: str, choices: list[str], gold: int) -> Doc:
  return Doc([(context, " " + choice) for choice in choices], gold, choices)


def _sciq(row: _Row) -> Doc:
  choices = [row.text(k) for k in ("distractor1", "distractor2", "distractor3", "correct_answer")]
  context = f"{row.text('support').lstrip()}\nQuestion: {row.text('question')}\nAnswer:"
  return _choice_doc(context, choices, 3)


def _piqa(row: _Row) -> Doc:
  choices = [row.text("sol1"), row.text("sol2")]
  return _choice_doc(f"Question: {row.text('goal')}\nAnswer:", choices, row.index("label", 2))


def _arc(row: _Row) -> Doc:
  question = row.text("question")
  block = row.record.get("choices")
  if not isinstance(block, dict):
    raise row.error("field 'choices' must be an object with 'text' and 'label' lists")
  texts, labels = row.texts("text", block), row.texts("label", block)
  answer = row.text("answerKey")
  if len(texts) != len(labels) or answer not in labels:
    raise row.error(f"answerKey {answer!r} is not one of choices.label {labels}")
  return _choice_doc(f"Question: {question}\nAnswer:", texts, labels.index(answer))


def hellaswag_preprocess(text: str) -> str:
  """lm-eval's hellaswag/utils.py preprocess."""
  text = text.strip()
  text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def _hellaswag(row: _Row) -> Doc:
  context = row.text("ctx_a") + " " + row.text("ctx_b").capitalize()
  query = hellaswag_preprocess(row.text("activity_label") + ": " + context)
  choices = [hellaswag_preprocess(ending) for ending in row.texts("endings")]
  return _choice_doc(query, choices, row.index("label", len(choices)))


def _winogrande(row: _Row) -> Doc:
  sentence = row.text("sentence")
  if "_" not in sentence:
    raise row.error("field 'sentence' has no blank '_'")
  blank = sentence.index("_")
  options = [row.text("option1"), row.text("option2")]
  if "answer" not in row.record:
    row._missing("answer")
  answer = str(row.record["answer"])
  if answer not in ("1", "2"):
    raise row.error(f"field 'answer' must be \"1\" or \"2\", got {row.record['answer']!r}")
  target = " " + sentence[blank + 1:].strip()
  return Doc([(sentence[:blank] + option, target) for option in options], int(answer) - 1, None)


def _lambada(row: _Row) -> Doc:
  words = row.text("text").split(" ")
  if len(words) < 2:
    raise row.error("field 'text' needs at least two words")
  return Doc([(" ".join(words[:-1]), " " + words[-1])], 0, None)


_BUILDERS = {"sciq": _sciq, "piqa": _piqa, "arc_easy": _arc, "arc_challenge": _arc,
             "hellaswag": _hellaswag, "winogrande": _winogrande, "lambada": _lambada}


def check_task(task: str) -> None:
  if task not in _BUILDERS:
    raise UserError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


def build_doc(task: str, record: dict, where: str = "row") -> Doc:
  """The Doc of one dataset record of `task`."""
  check_task(task)
  if not isinstance(record, dict):
    raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
  return _BUILDERS[task](_Row(record, where, task))


def read_docs(task: str, path: str | os.PathLike, limit: int | None = None) -> list[Doc]:
  """The Docs of a JSONL file of `task` records (blank lines skipped), the first `limit`."""
  check_task(task)
  docs = []
  records = jsonl_records(path, "--data") if limit is None or limit > 0 else ()
  for where, record in records:
    docs.append(build_doc(task, record, where))
    if limit is not None and len(docs) >= limit:
      break  # the lines after it are not read
  if not docs:
    raise UserError(f"{path} holds no rows: give a JSONL file with one record per line")
  return docs


def encode_request(tokenizer, context: str, continuation: str,
                   add_bos: bool = False) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-eval's HF model splits a request."""
  if not context:
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return [prefix], tokenizer.encode(continuation, add_bos=False)
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = tokenizer.encode(context + continuation, add_bos=add_bos)
  context_ids = tokenizer.encode(context, add_bos=add_bos)
  return context_ids, whole[len(context_ids):]


def _mean_stderr(values: Sequence[float]) -> float | None:
  return (float(np.std(values, ddof=1) / math.sqrt(len(values)))
          if len(values) > 1 else None)


def score_docs(task: str, docs: Sequence[Doc],
               results: Sequence[Sequence[tuple[float, bool]]]) -> dict:
  """Metrics from each doc's (log-likelihood, is-greedy) per request, as lm-eval aggregates them."""
  per_doc, acc, acc_norm, lls = [], [], [], []
  for doc, result in zip(docs, results, strict=True):
    doc_lls = np.array([ll for ll, _ in result], np.float64)
    if task == "lambada":
      acc.append(float(result[0][1]))
      lls.append(float(doc_lls[0]))
      per_doc.append(dict(loglikelihood=lls[-1], greedy=bool(result[0][1])))
      continue
    pred = int(np.argmax(doc_lls))
    acc.append(float(pred == doc.gold))
    entry = dict(gold=doc.gold, pred=pred, loglikelihoods=doc_lls.tolist())
    if doc.choices is not None:
      lengths = np.array([float(len(choice)) for choice in doc.choices])
      entry["pred_norm"] = int(np.argmax(doc_lls / lengths))
      acc_norm.append(float(entry["pred_norm"] == doc.gold))
    per_doc.append(entry)
  metrics = dict(task=task, docs=len(docs), acc=float(np.mean(acc)), acc_stderr=_mean_stderr(acc))
  if acc_norm:
    metrics.update(acc_norm=float(np.mean(acc_norm)), acc_norm_stderr=_mean_stderr(acc_norm))
  if task == "lambada":
    metrics["perplexity"] = math.exp(-float(np.mean(lls)))
  metrics["per_doc"] = per_doc
  return metrics


def evaluate_docs(task: str, docs: Sequence[Doc],
                  loglikelihood: Callable[[list[tuple[str, str]]], list[tuple[float, bool]]]
                  ) -> dict:
  """score_docs over the results of `loglikelihood` (text requests in, one result each out)."""
  flat = [request for doc in docs for request in doc.requests]
  results = loglikelihood(flat)
  grouped, position = [], 0
  for doc in docs:
    grouped.append(results[position:position + len(doc.requests)])
    position += len(doc.requests)
  return score_docs(task, docs, grouped)


def model_loglikelihood(model: models.Model, batch_size: int = 8, add_bos: bool = False,
                        progress: bool = True):
  """A text-request scorer over `model`, for evaluate_docs."""

  def loglikelihood(requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    encoded = []
    for number, (context, continuation) in enumerate(requests):
      context_ids, continuation_ids = encode_request(model.tokenizer, context, continuation,
                                                     add_bos)
      if not continuation_ids:
        raise UserError(f"request {number} ({continuation!r} after {context[-40:]!r}) "
                        "encodes to no continuation tokens")
      encoded.append((context_ids, continuation_ids))
    bar = tqdm.tqdm(total=len(encoded), desc="scoring", unit="request", file=sys.stderr,
                    disable=not progress)
    results = scoring.loglikelihoods(model.params, model.config, encoded, batch_size, bar.update)
    bar.close()
    return results

  return loglikelihood


def evaluate(model: models.Model, task: str, data: str | os.PathLike, limit: int | None = None,
             batch_size: int = 8, add_bos: bool = False, progress: bool = True) -> dict:
  """Zero-shot metrics of `model` on a JSONL file of `task` records."""
  docs = read_docs(task, data, limit)
  result = evaluate_docs(task, docs, model_loglikelihood(model, batch_size, add_bos, progress))
  result.update(data=str(data), add_bos=add_bos)
  return result


def run(model_path: str | os.PathLike, task: str, data: str | os.PathLike, weights: str = "f32",
        **kwargs) -> dict:
  """`evaluate` on the model at model_path (what `python -m amd135m.evaluate multiple-choice` runs).

  The task, the data file and the numbers are checked before the model is loaded.
  """
  check_counts(limit=kwargs.get("limit"), batch_size=kwargs.get("batch_size"))
  read_docs(task, data, limit=kwargs.get("limit"))
  result = evaluate(models.load_model(model_path, weights), task, data, **kwargs)
  result.update(model=str(model_path), weights=weights)
  return result


def table(result: dict) -> str:
  """The metrics as a Markdown table (stderr in parentheses)."""
  def cell(key):
    if result.get(key) is None:
      return "-"
    err = result.get(f"{key}_stderr")
    return f"{result[key]:.4f}" + (f" ({err:.4f})" if err is not None else "")
  ppl = f"{result['perplexity']:.3f}" if "perplexity" in result else "-"
  return ("| task | docs | acc | acc_norm | perplexity |\n|---|---|---|---|---|\n"
          f"| {result['task']} | {result['docs']} | {cell('acc')} | {cell('acc_norm')} | {ppl} |")

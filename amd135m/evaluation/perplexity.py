"""Perplexity of a model on a prepared dataset, over the training loop's own held-out documents.

Documents are tokenised without BOS/EOS and packed as training packs them (data/packing.py):
`sep, doc_0, sep, doc_1, ...` cut into disjoint windows of seq_len + 1 tokens, the separator from
`tokenized.separator_id`; each window scores its seq_len next-token predictions and the final
partial window is dropped. The result is the token-weighted mean NLL (nats) over all scored
tokens and its exponential. The held-out split is `splits.holdout(source, eval_fraction)`, the
documents the training loop keeps out of training: for a training workdir its own recorded
eval_fraction, for any other model --eval-fraction (default the configs' default). The seed is
holdout's one fixed seed, as in training: another would score documents the model trained on.
"""
import math
import os
import pathlib
import sys
import time

import jax.numpy as jnp
import numpy as np
import tqdm

from amd135m.data import builders, packing, splits, tokenized
from amd135m.errors import UserError, check_counts
from amd135m.evaluation import models, scoring

SPLITS = ("heldout", "all")


def parse_dataset(spec: str) -> tuple[str, pathlib.Path, list[str] | None]:
  """'BUILDER@DATA_DIR[:PATTERN[,PATTERN...]]' -> (builder, data dir, patterns or None)."""
  builder, at, rest = spec.partition("@")
  if not at or not builder or not rest:
    raise UserError(f"--dataset {spec!r} is not BUILDER@DATA_DIR[:PATTERN], e.g. "
                    "local_text@~/.cache/amd135m/data/gutenberg_shakespeare:*.txt")
  data_dir, colon, patterns = rest.rpartition(":")
  if not colon or "/" in patterns:  # no pattern given (or the colon belongs to the path)
    data_dir, patterns = rest, ""
  if builder not in builders.BUILDERS:
    raise UserError(f"unknown dataset builder {builder!r}: choose one of "
                    f"{sorted(builders.BUILDERS)}")
  data_dir = pathlib.Path(data_dir).expanduser()
  if not data_dir.is_dir():
    raise UserError(f"data dir {data_dir} does not exist: prepare the dataset with "
                    "`python -m amd135m.data prepare` first")
  return builder, data_dir, [p for p in patterns.split(",") if p] or None


def load_text_documents(spec: str, split: str = "heldout",
                        eval_fraction: float = splits.DEFAULT_EVAL_FRACTION):
  """The text records ({'text': ...}) of `spec` in `split`: all of them, or the held-out ones."""
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}: choose one of {list(SPLITS)}")
  builder, data_dir, patterns = parse_dataset(spec)
  source = builders.load(builder, data_dir, patterns=patterns)
  if split == "all":
    return source
  return splits.holdout(source, eval_fraction)[1]


def evaluate(model: models.Model, documents, seq_len: int | None = None,
             max_tokens: int | None = None, batch_size: int = 1, separator: int | None = None,
             progress: bool = True) -> dict:
  """Token-weighted mean NLL and perplexity of `documents` ({'text': ...} records).

  seq_len defaults to 2048 (AMD-135M's training length) or the model's context if shorter.
  max_tokens stops after the first ceil(max_tokens / seq_len) windows. Windows run in batches of
  batch_size (the last one padded with an unscored copy).
  """
  if seq_len is None:
    seq_len = min(2048, model.config.max_seq_len)
  packing.check_seq_len(seq_len)
  if seq_len > model.config.max_seq_len:
    raise UserError(f"--seq-len {seq_len} exceeds the model's context of "
                    f"{model.config.max_seq_len}: lower it")
  if max_tokens is not None and max_tokens < 1:
    raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
  if batch_size < 1:
    raise UserError(f"--batch-size must be >= 1, got {batch_size}")
  separator_id = tokenized.separator_id(model.tokenizer, separator)
  packer = packing.WindowPacker(tokenized.TokenizedSource(documents, model.tokenizer), seq_len,
                                separator_id)
  max_windows = None if max_tokens is None else math.ceil(max_tokens / seq_len)
  positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len))
  total_nll, total_tokens, windows, exhausted = 0.0, 0, 0, False
  bar = tqdm.tqdm(total=max_windows, desc="perplexity", unit="window", file=sys.stderr,
                  disable=not progress)
  start = time.perf_counter()
  while not exhausted and (max_windows is None or windows < max_windows):
    batch = []
    while len(batch) < (batch_size if max_windows is None
                        else min(batch_size, max_windows - windows)):
      try:
        batch.append(next(packer))
      except StopIteration:
        exhausted = True
        break
    if not batch:
      break
    rows = np.stack(batch + [batch[-1]] * (batch_size - len(batch)))  # [B, seq_len + 1]
    scoring.check_ids(model.config, np.unique(rows).tolist(), "the dataset")
    logprobs, _ = scoring.score_positions(model.params, model.config, jnp.asarray(rows[:, :-1]),
                                          positions, jnp.asarray(rows[:, 1:]))
    total_nll -= float(np.asarray(logprobs[:len(batch)], np.float64).sum())
    total_tokens += len(batch) * seq_len
    windows += len(batch)
    bar.update(len(batch))
  bar.close()
  if not total_tokens:
    raise UserError(f"the documents hold fewer than seq_len + 1 = {seq_len + 1} tokens: lower "
                    "--seq-len or evaluate more documents")
  nll = total_nll / total_tokens
  return dict(documents=len(documents), windows=windows, tokens=total_tokens, seq_len=seq_len,
              separator_id=separator_id, nll=nll, perplexity=math.exp(nll),
              dropped_tokens=packer.dropped_tokens if exhausted else None,
              seconds=time.perf_counter() - start)


def heldout_fraction(model_path: str | os.PathLike, eval_fraction: float | None) -> float:
  """The fraction training held out: a training workdir's own, which a different --eval-fraction
  contradicts (the documents beyond its held-out part were trained on); else the one given."""
  if eval_fraction is not None and not 0 < eval_fraction < 1:
    raise UserError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
  recorded = splits.training_eval_fraction(model_path)
  if recorded is None:
    return splits.DEFAULT_EVAL_FRACTION if eval_fraction is None else eval_fraction
  if eval_fraction is not None and eval_fraction != recorded:
    raise UserError(f"--eval-fraction {eval_fraction} contradicts the training workdir "
                    f"{model_path}, which held out data.eval_fraction={recorded}: drop "
                    "--eval-fraction (the workdir's is used), or pass --split all")
  return recorded


def run(model_path: str | os.PathLike, dataset: str, split: str = "heldout",
        eval_fraction: float | None = None, weights: str = "f32", **kwargs) -> dict:
  """`evaluate` on the model at model_path over a dataset spec (what the CLI runs).
  eval_fraction None: the training workdir's, or the default for any other model."""
  check_counts(max_tokens=kwargs.get("max_tokens"), batch_size=kwargs.get("batch_size"))
  if split == "heldout":
    eval_fraction = heldout_fraction(model_path, eval_fraction)
  documents = load_text_documents(dataset, split, eval_fraction)  # checked before the model
  model = models.load_model(model_path, weights)
  result = evaluate(model, documents, **kwargs)
  result.update(model=str(model_path), weights=weights, dataset=dataset, split=split,
                eval_fraction=eval_fraction if split == "heldout" else None)
  return result


def table(result: dict) -> str:
  """The result as a two-column Markdown table."""
  rows = [("model", result.get("model", "-")), ("dataset", result.get("dataset", "-")),
          ("split", result.get("split", "-")), ("documents", result["documents"]),
          ("windows x seq_len", f"{result['windows']} x {result['seq_len']}"),
          ("tokens scored", result["tokens"]), ("mean NLL (nats/token)", f"{result['nll']:.4f}"),
          ("perplexity", f"{result['perplexity']:.3f}"), ("seconds", f"{result['seconds']:.1f}")]
  return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)

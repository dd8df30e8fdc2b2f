"""A held-out split of a prepared source, by documents, the same for training and evaluation."""
import json
import pathlib
from typing import Any

import numpy as np

from amd135m.errors import UserError

# config.data.eval_fraction's default, and evaluate's for a model that is not a training workdir.
DEFAULT_EVAL_FRACTION = 0.02


class Subset:
  """Documents `indices` of `source`, random access like the source itself."""

  def __init__(self, source: Any, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    if getattr(source, "lengths", None) is not None:  # the loader skips rows without reading
      self.lengths = np.asarray(source.lengths)[self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Any:
    return self.source[int(self.indices[index])]


def holdout(source: Any, eval_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
  """(train, eval) views: a seeded choice of round(eval_fraction * n) documents (at least one)
  goes to eval. Depends only on (len(source), eval_fraction, seed), so the training loop and
  `python -m amd135m.evaluate` agree on which documents were never trained on."""
  n = len(source)
  if not 0 < eval_fraction < 1:
    raise UserError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  n_eval = max(1, round(eval_fraction * n))
  if n_eval >= n:
    raise UserError(f"a source of {n} documents cannot hold out {n_eval}: lower eval_fraction "
                    "or add documents")
  order = np.random.default_rng([seed, 0x686F6C64]).permutation(n)
  return Subset(source, np.sort(order[n_eval:])), Subset(source, np.sort(order[:n_eval]))


def training_eval_fraction(path) -> float | None:
  """The data.eval_fraction a training workdir held out with (its config.json, which the loop
  writes at every start), or None when `path` is not a training workdir. The seed is always
  holdout's default, so this fraction alone says which documents training never saw."""
  config = pathlib.Path(path) / "config.json"
  if not (pathlib.Path(path) / "model_config.json").is_file() or not config.is_file():
    return None
  try:
    return float(json.loads(config.read_text())["data"]["eval_fraction"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{config}: cannot read data.eval_fraction ({type(e).__name__}: {e}); "
                    "this training workdir's config.json is damaged") from None

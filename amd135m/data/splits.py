"""A held-out split of a prepared source, by documents, the same for training and evaluation."""
from typing import Any

import numpy as np

from amd135m.errors import UserError


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

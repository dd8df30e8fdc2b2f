"""Training and evaluation batches from a config's `data` section.

Sources are 'synthetic' (seeded documents with learnable structure, no files or tokenizer: tests,
dry runs, benchmarks) or BUILDER@DATA_DIR[:PATTERN] (a dataset `python -m amd135m.data prepare`
wrote). Each source is split by documents into train and held-out parts with
`data.splits.holdout`, the split `python -m amd135m.evaluate perplexity` uses too.
"""
import dataclasses
import math
import pathlib

import numpy as np

from amd135m.data import splits
from amd135m.data.loader import DataLoader
from amd135m.data.tokenized import separator_id as default_separator
from amd135m.errors import UserError

SYNTHETIC_DOCUMENTS = 20_000


class SyntheticSource:
  """Document i: a seeded arithmetic run of tokens (start + k * stride) mod vocab, 16-512 long.
  Predictable after two tokens, so a model's loss falls fast: enough to see training work."""

  def __init__(self, vocab_size: int, seed: int = 0, size: int = SYNTHETIC_DOCUMENTS):
    self.vocab_size, self.seed, self.size = vocab_size, seed, size

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, 0x73796E, int(index)])
    length = int(rng.integers(16, 513))
    start, stride = rng.integers(0, self.vocab_size), rng.integers(1, 17)
    return ((start + stride * np.arange(length)) % self.vocab_size).astype(np.int32)


@dataclasses.dataclass
class Sources:
  names: list[str]
  train: list
  eval: list
  weights: list[float]
  separator_id: int


def parse_sources(spec: str) -> list[tuple[str, str | None, str | None]]:
  """'synthetic,local_text@DIR:*.txt' ->
  [('synthetic', None, None), ('local_text', DIR, '*.txt')]."""
  parsed = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    if item == "synthetic":
      parsed.append(("synthetic", None, None))
      continue
    builder, at, rest = item.partition("@")
    if not at or not rest:
      raise UserError(f"data source {item!r}: write 'synthetic' or BUILDER@DATA_DIR[:PATTERN]")
    data_dir, _, pattern = rest.partition(":")
    parsed.append((builder, str(pathlib.Path(data_dir).expanduser()), pattern or None))
  if not parsed:
    raise UserError("--config.data.sources is empty: give 'synthetic' or "
                    "BUILDER@DATA_DIR[:PATTERN]")
  return parsed


def open_sources(data_config, tokenizer, vocab_size: int, seed: int) -> Sources:
  parsed = parse_sources(data_config.sources)
  try:
    weights = [float(w) for w in data_config.weights.split(",")] if data_config.weights else [
        1.0] * len(parsed)
  except ValueError:
    raise UserError(f"--config.data.weights={data_config.weights}: expected comma-separated "
                    "numbers, one per source") from None
  if len(weights) != len(parsed):
    raise UserError(f"--config.data.weights has {len(weights)} entries for {len(parsed)} sources")
  if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
    raise UserError(f"--config.data.weights={data_config.weights}: the weights must be "
                    "non-negative numbers with a positive sum")
  needs_tokenizer = any(name != "synthetic" for name, _, _ in parsed)
  if needs_tokenizer and tokenizer is None:
    raise UserError("text sources need a tokenizer: set --config.tokenizer (a model dir or "
                    ".gguf) or --config.init_from")
  if tokenizer is not None and tokenizer.vocab_size > vocab_size:
    raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                    f"--config.model.vocab_size is {vocab_size}: raise --config.model.vocab_size "
                    "or pick the model's tokenizer")
  if tokenizer is not None:
    separator = default_separator(tokenizer, None if data_config.separator_id < 0
                                  else data_config.separator_id)
  else:
    separator = data_config.separator_id if data_config.separator_id >= 0 else 0
  names, train, held_out = [], [], []
  for k, (builder, data_dir, pattern) in enumerate(parsed):
    if builder == "synthetic":
      documents, name = SyntheticSource(vocab_size, seed + k), "synthetic"
    else:
      # The token store `prepare --tokenizer` wrote, else tokenised as read (tfds imported here).
      from amd135m.data import builders  # noqa: PLC0415
      documents = builders.load_token_documents(builder, data_dir, tokenizer, patterns=pattern)
      name = f"{builder}@{pathlib.Path(data_dir).name}"
    train_part, eval_part = splits.holdout(documents, data_config.eval_fraction)
    names.append(name)
    train.append(train_part)
    held_out.append(eval_part)
  return Sources(names, train, held_out, weights, separator)


def train_loader(sources: Sources, data_config, batch_size: int, seed: int,
                 process_index: int, process_count: int) -> DataLoader:
  return DataLoader(sources.train, seq_len=data_config.seq_len, global_batch_size=batch_size,
                    separator_id=sources.separator_id, weights=sources.weights, seed=seed,
                    shuffle=data_config.shuffle, num_epochs=data_config.num_epochs or None,
                    process_index=process_index, process_count=process_count,
                    worker_count=data_config.worker_count)


def eval_batches(sources: Sources, data_config, batch_size: int, count: int,
                 process_index: int, process_count: int) -> list[dict]:
  """The same `count` held-out batches at every evaluation: one pass over the held-out documents
  (fewer batches if it ends first); a held-out part shorter than one batch is cycled instead, so
  small sources (a few distillation documents) still get a fixed evaluation set."""
  for num_epochs in (1, None):
    loader = DataLoader(sources.eval, seq_len=data_config.seq_len, global_batch_size=batch_size,
                        separator_id=sources.separator_id, weights=sources.weights, seed=0,
                        shuffle=False, num_epochs=num_epochs, process_index=process_index,
                        process_count=process_count)
    batches = []
    for batch in loader:
      batches.append({"inputs": batch["inputs"], "targets": batch["targets"]})
      if len(batches) == count:
        break
    if batches:
      return batches
  return []

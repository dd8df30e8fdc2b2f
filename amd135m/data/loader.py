"""Deterministic, resumable, per-process loader of packed windows over a mixture of sources.

Design (plain Python/numpy; no grain workers yet):
- Each source is random access (`len`, `source[i]` -> 1-D ints). Its documents are read in a
  seeded permutation that is redrawn every epoch, and packed on their own by a `WindowPacker`
  (a window never mixes sources).
- Global window j of batch b comes from source `choice(seed, b)[j]`, drawn with the mixture
  weights from an rng keyed on (seed, b): deterministic and independent of process count.
- Every process walks the same global stream of windows, so global batches are identical for
  any process count. Process i of n materialises only rows [i*B/n, (i+1)*B/n) of each batch
  and skips the others. Trade-off: skipping still reads every document (to learn its length)
  but copies no tokens of other rows; a per-source length index would remove those reads.
- Remainder rule: with `num_epochs=None` the stream is endless. With `num_epochs=k` it ends
  when any source runs out after k epochs; that source's partial window and the windows of the
  unfinished global batch are dropped and counted (`dropped_tokens`, `dropped_windows`). All
  processes stop at the same batch, so every process gets the same number of batches.
- `get_state()` is a JSON-able dict, identical on all processes (it describes the global
  stream), so it may be restored with another process count.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from amd135m.data.packing import WindowPacker, check_seq_len
from amd135m.errors import UserError

_STATE_VERSION = 1


class _EpochShuffled:
  """Document i of an endless or k-epoch pass over `source`, reshuffled every epoch."""

  def __init__(self, source: Any, source_index: int, seed: int, shuffle: bool):
    self._source = source
    self._size = len(source)
    self._key = (seed, source_index)
    self._shuffle = shuffle
    self._epoch = -1
    self._order = np.arange(0)

  def __getitem__(self, index: int) -> Any:
    epoch, position = divmod(index, self._size)
    if not self._shuffle:
      return self._source[position]
    if epoch != self._epoch:
      # O(len(source)) memory per source; an index shuffle (e.g. Feistel) would make it O(1).
      self._order = np.random.default_rng([*self._key, epoch]).permutation(self._size)
      self._epoch = epoch
    return self._source[int(self._order[position])]


class DataLoader:
  """Yields this process's rows of each global batch: {'inputs', 'targets': [b, T] int32}.

  `b = global_batch_size // process_count`, `T = seq_len`; 'source': [b] int32 says which
  source each row came from.
  """

  def __init__(self, sources: Sequence[Any], *, seq_len: int, global_batch_size: int,
               separator_id: int, weights: Sequence[float] | None = None, seed: int = 0,
               shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
               process_count: int = 1):
    check_seq_len(seq_len)
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or not sources:
      raise UserError('sources must be a non-empty list of random-access document sources.')
    for k, source in enumerate(sources):
      if not (hasattr(source, '__len__') and hasattr(source, '__getitem__')):
        raise UserError(f'source {k} has no __len__/__getitem__; pass a list or a data source.')
      if len(source) == 0:
        raise UserError(f'source {k} has no documents; remove it or point it at data.')
    if process_count < 1 or not 0 <= process_index < process_count:
      raise UserError(f'process_index {process_index} is not in [0, {process_count}); pass '
                      'jax.process_index() and jax.process_count().')
    if global_batch_size < 1 or global_batch_size % process_count:
      raise UserError(f'global_batch_size {global_batch_size} does not divide by process_count '
                      f'{process_count}; use a positive multiple of {process_count}.')
    if weights is None:
      weights = [1.0] * len(sources)
    weights = np.asarray(weights, np.float64)
    if weights.shape != (len(sources),) or not np.all(np.isfinite(weights)) or np.any(
        weights < 0) or weights.sum() <= 0:
      raise UserError(f'weights {weights.tolist()} must be {len(sources)} non-negative numbers '
                      'with a positive sum, one per source.')
    if num_epochs is not None and num_epochs < 1:
      raise UserError(f'num_epochs must be None (endless) or >= 1, got {num_epochs}.')
    self.seq_len = int(seq_len)
    self.global_batch_size = int(global_batch_size)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.weights = weights / weights.sum()
    self.seed = int(seed)
    self._config = {'seq_len': self.seq_len, 'global_batch_size': self.global_batch_size,
                    'separator_id': int(separator_id), 'weights': self.weights.tolist(),
                    'seed': self.seed, 'shuffle': bool(shuffle), 'num_epochs': num_epochs,
                    'source_sizes': [len(s) for s in sources]}
    self._packers = [
        WindowPacker(_EpochShuffled(s, k, self.seed, shuffle), self.seq_len, separator_id,
                     num_documents=None if num_epochs is None else num_epochs * len(s))
        for k, s in enumerate(sources)]
    self._batch_index = 0
    self._windows_seen = [0] * len(sources)
    self._done = False
    self.dropped_tokens = 0
    self.dropped_windows = 0

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  @property
  def tokens_seen(self) -> list[int]:
    """Tokens per source in all global batches so far (all processes; seq_len + 1 per window)."""
    return [w * (self.seq_len + 1) for w in self._windows_seen]

  def _row_sources(self, batch_index: int) -> np.ndarray:  # [global_batch_size] int
    rng = np.random.default_rng([self.seed, 0x6d6978, batch_index])
    return rng.choice(len(self.weights), size=self.global_batch_size, p=self.weights)

  def __iter__(self) -> DataLoader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done:
      raise StopIteration
    before = self.get_state()
    row_sources = self._row_sources(self._batch_index)
    first = self.process_index * self.local_batch_size
    last = first + self.local_batch_size
    rows = []
    try:
      for row, source in enumerate(row_sources):
        packer = self._packers[source]
        if first <= row < last:
          rows.append(next(packer))
        else:
          packer.skip()
    except StopIteration:
      # Remainder rule: drop the unfinished global batch and the exhausted source's tail.
      tail = self._packers[source].dropped_tokens
      self.set_state(before)
      self._done = True
      self.dropped_windows = row
      self.dropped_tokens = row * (self.seq_len + 1) + tail
      raise
    for source in row_sources:
      self._windows_seen[source] += 1
    self._batch_index += 1
    windows = np.stack(rows)  # [b, seq_len + 1]
    return {'inputs': windows[:, :-1], 'targets': windows[:, 1:],
            'source': row_sources[first:last].astype(np.int32)}

  def get_state(self) -> dict[str, Any]:
    """JSON-able state of the global stream; `set_state` continues with the next batch."""
    return {'version': _STATE_VERSION, 'batch_index': self._batch_index,
            'packers': [p.get_state() for p in self._packers],
            'tokens_seen': self.tokens_seen, 'config': dict(self._config)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a state from `get_state` (of any process, any process count)."""
    if not isinstance(state, dict) or state.get('version') != _STATE_VERSION:
      raise UserError('loader state is not from DataLoader.get_state(); pass the saved dict.')
    config = dict(self._config)
    saved = state.get('config')
    if saved != config:
      raise UserError(f'loader state was saved with config {saved}, but this loader has '
                      f'{config}; build the loader with the same settings to resume.')
    for packer, packer_state in zip(self._packers, state['packers'], strict=True):
      packer.set_state(packer_state)
    self._batch_index = int(state['batch_index'])
    self._windows_seen = [int(t) // (self.seq_len + 1) for t in state['tokens_seen']]
    self._done = False
    self.dropped_tokens = self.dropped_windows = 0

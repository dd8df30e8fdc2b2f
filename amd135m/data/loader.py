"""Deterministic, resumable, per-process loader of packed windows over a mixture of sources.

Design (numpy packing in the calling process; documents read there or by grain workers):
- Each source is random access (`len`, `source[i]` -> 1-D ints). Its documents are read in a
  seeded permutation that is redrawn every epoch, and packed on their own by a `WindowPacker`
  (a window never mixes sources).
- Global window j of batch b comes from source `choice(seed, b)[j]`, drawn with the mixture
  weights from an rng keyed on (seed, b): deterministic and independent of process count.
- Every process walks the same global stream of windows, so global batches are identical for
  any process count. Process i of n materialises only rows [i*B/n, (i+1)*B/n) of each batch
  and skips the others. Skipping copies no tokens; it reads the documents (to learn their
  lengths) unless the source has `lengths` (per-document token counts: a `TokenStore` from
  `builders.load_token_documents` has them), so then a process reads only its own rows.
- Remainder rule: with `num_epochs=None` the stream is endless. With `num_epochs=k` it ends
  when any source runs out after k epochs; that source's partial window and the windows of the
  unfinished global batch are dropped and counted (`dropped_tokens`, `dropped_windows`). All
  processes stop at the same batch, so every process gets the same number of batches.
- `get_state()` is a JSON-able dict, identical on all processes (it describes the global
  stream), so it may be restored with another process count or worker count.
- Workers: with `worker_count=N > 0`, each source's documents are read (and tokenised, for a
  `TokenizedSource`) by N grain worker processes (`mp_prefetch`) in the source's shuffled order;
  grain interleaves the workers' slices back into that exact order, so batches do not depend on
  N. Packing stays in the calling process, whose position is the state; on `set_state` the
  pipelines restart at the saved document, so a resume reads again only the one document per
  source that the state cut through. Workers are spawned processes: a script that builds a
  loader with workers needs the `if __name__ == "__main__":` guard, and `close()` (or `with`)
  stops them. With workers, skipped rows (other processes' rows) are read by the workers too.
  Workers pay off for sources that tokenise on read; a `TokenStore` read is a memory slice.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from amd135m.data.packing import WindowPacker, check_seq_len
from amd135m.errors import UserError

_STATE_VERSION = 1
_WORKER_BUFFER_DOCUMENTS = 4  # documents each worker reads ahead


class _EpochShuffled:
  """Document i of an endless or k-epoch pass over `source`, reshuffled every epoch."""

  def __init__(self, source: Any, source_index: int, seed: int, shuffle: bool):
    self._source = source
    self._size = len(source)
    self._key = (seed, source_index)
    self._shuffle = shuffle
    self._epoch = -1
    self._order = np.arange(0)

  def _source_index(self, index: int) -> int:
    epoch, position = divmod(index, self._size)
    if not self._shuffle:
      return position
    if epoch != self._epoch:
      # O(len(source)) memory per source; an index shuffle (e.g. Feistel) would make it O(1).
      self._order = np.random.default_rng([*self._key, epoch]).permutation(self._size)
      self._epoch = epoch
    return int(self._order[position])

  def __getitem__(self, index: int) -> Any:
    return self._source[self._source_index(index)]

  def length(self, index: int) -> int:
    """Token count of document `index`, from the source's length index."""
    return int(self._source.lengths[self._source_index(index)])

  def __getstate__(self) -> dict[str, Any]:
    # Workers redraw the epoch's permutation themselves rather than unpickle a copy.
    return {**self.__dict__, '_epoch': -1, '_order': np.arange(0)}


class _ReadDocument:
  """The map a grain worker runs: document i of the shuffled pass, as int32 token ids."""

  def __init__(self, documents: _EpochShuffled):
    self.documents = documents

  def __call__(self, index: int) -> np.ndarray:  # [len] int32
    return np.asarray(self.documents[index], np.int32).reshape(-1)


class _WorkerPipeline:
  """Documents start, start + 1, ... of a shuffled pass, read ahead by grain worker processes.

  Random access in name only: the packer asks for consecutive indices; any other index
  restarts the pipeline there (what `set_state` causes)."""

  def __init__(self, documents: _EpochShuffled, num_documents: int | None, worker_count: int):
    self._documents = documents
    self._stop = sys.maxsize if num_documents is None else num_documents
    self._worker_count = worker_count
    self._iterator = None
    self._next = -1

  def _start(self, index: int) -> None:
    import grain  # noqa: PLC0415 (only a loader with workers needs grain)
    from absl import flags  # noqa: PLC0415
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a library has none to parse
      flags.FLAGS.mark_as_parsed()
    self.close()
    options = grain.multiprocessing.MultiprocessingOptions(
        num_workers=self._worker_count, per_worker_buffer_size=_WORKER_BUFFER_DOCUMENTS)
    dataset = grain.MapDataset.range(index, self._stop).map(_ReadDocument(self._documents))
    # No reader threads: grain's default reads 500 documents ahead in each worker.
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    self._iterator = iter(dataset.to_iter_dataset(read_options).mp_prefetch(options))
    self._next = index

  def __getitem__(self, index: int) -> np.ndarray:  # [len] int32
    if self._iterator is None or index != self._next:
      self._start(index)
    shared = next(self._iterator)
    self._next = index + 1
    return np.array(shared, np.int32)  # a copy, so the worker's shared memory is freed now

  def close(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


class DataLoader:
  """Yields this process's rows of each global batch: {'inputs', 'targets': [b, T] int32}.

  `b = global_batch_size // process_count`, `T = seq_len`; 'source': [b] int32 says which
  source each row came from. `worker_count` grain worker processes per source read documents
  (0: read in this process); the batches are the same for any worker count.
  """

  def __init__(self, sources: Sequence[Any], *, seq_len: int, global_batch_size: int,
               separator_id: int, weights: Sequence[float] | None = None, seed: int = 0,
               shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
               process_count: int = 1, worker_count: int = 0):
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
    if isinstance(worker_count, bool) or not isinstance(worker_count, int) or worker_count < 0:
      raise UserError(f'worker_count must be an integer >= 0 (0 reads in this process), got '
                      f'{worker_count!r}.')
    self.seq_len = int(seq_len)
    self.global_batch_size = int(global_batch_size)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.weights = weights / weights.sum()
    self.seed = int(seed)
    self._config = {'seq_len': self.seq_len, 'global_batch_size': self.global_batch_size,
                    'separator_id': int(separator_id), 'weights': self.weights.tolist(),
                    'seed': self.seed, 'shuffle': bool(shuffle), 'num_epochs': num_epochs,
                    'source_sizes': [len(s) for s in sources]}
    self.worker_count = worker_count
    self._pipelines = []
    self._packers = []
    for k, source in enumerate(sources):
      documents = _EpochShuffled(source, k, self.seed, shuffle)
      num_documents = None if num_epochs is None else num_epochs * len(source)
      # Workers read every document in order anyway, so lengths would save nothing there.
      length = (documents.length if getattr(source, 'lengths', None) is not None
                and not worker_count else None)
      if worker_count:
        documents = _WorkerPipeline(documents, num_documents, worker_count)
        self._pipelines.append(documents)
      self._packers.append(WindowPacker(documents, self.seq_len, separator_id,
                                        num_documents=num_documents, length=length))
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

  def close(self) -> None:
    """Stops the worker processes (none without workers); the loader restarts them if used."""
    for pipeline in self._pipelines:
      pipeline.close()

  def __enter__(self) -> DataLoader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

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

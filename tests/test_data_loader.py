"""Packing and the deterministic per-process loader, on synthetic token-id documents."""

import collections
import hashlib
import json
import os

import numpy as np
import pytest

from amd135m.data.loader import DataLoader
from amd135m.data.packing import WindowPacker, pack_documents
from amd135m.errors import UserError

SEP = 1
VOCAB = 1000


def make_docs(seed, count, max_len):
  """Documents of random lengths (0 included) with ids in [2, VOCAB): never the separator."""
  rng = np.random.default_rng(seed)
  return [rng.integers(2, VOCAB, size=rng.integers(0, max_len), dtype=np.int32)
          for _ in range(count)]


def split_stream(stream):
  """Pieces between separators; the stream starts with one, so piece 0 is dropped."""
  cuts = np.flatnonzero(stream == SEP)
  assert cuts.size and cuts[0] == 0
  return [stream[a + 1:b] for a, b in zip(cuts, list(cuts[1:]) + [len(stream)])]


def batch_hash(batch):
  return hashlib.sha256(batch['inputs'].tobytes() + batch['targets'].tobytes()).hexdigest()


def make_loader(sources, **kwargs):
  args = dict(seq_len=32, global_batch_size=8, separator_id=SEP, weights=[0.7, 0.3], seed=3)
  args.update(kwargs)
  return DataLoader(sources, **args)


@pytest.fixture(scope='module')
def sources():
  return [make_docs(10, 200, 120), make_docs(11, 150, 300)]


def test_pack_documents_keeps_every_token_once():
  docs = make_docs(0, 300, 200)
  seq_len = 63
  packed = pack_documents(docs, seq_len, SEP)
  total = sum(len(d) + 1 for d in docs)
  assert packed.windows.shape == (total // (seq_len + 1), seq_len + 1)
  assert packed.windows.dtype == np.int32
  assert packed.dropped_tokens == total % (seq_len + 1)
  pieces = split_stream(packed.windows.reshape(-1))
  # All documents but the one cut by the dropped tail come back whole and in order.
  for doc, piece in zip(docs, pieces[:-1]):
    np.testing.assert_array_equal(doc, piece)
  last = len(pieces) - 1
  np.testing.assert_array_equal(docs[last][:len(pieces[-1])], pieces[-1])


def test_window_packer_matches_pack_documents_and_resumes_mid_document():
  docs = make_docs(1, 100, 300)
  packed = pack_documents(docs, 31, SEP)
  packer = WindowPacker(docs, 31, SEP)
  head = [next(packer) for _ in range(17)]
  state = json.loads(json.dumps(packer.get_state()))
  assert state['offset'] > 0, 'pick a step that stops inside a document'
  tail = list(packer)
  assert packer.dropped_tokens == packed.dropped_tokens
  np.testing.assert_array_equal(np.stack(head + tail), packed.windows)
  resumed = WindowPacker(docs, 31, SEP)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(list(resumed)), np.stack(tail))


def test_global_batches_are_the_same_for_1_2_4_processes(sources):
  num_batches = 12
  reference = None
  for count in (1, 2, 4):
    loaders = [make_loader(sources, process_index=i, process_count=count) for i in range(count)]
    batches = []
    for _ in range(num_batches):
      parts = [next(loader) for loader in loaders]
      assert all(p['inputs'].shape == (8 // count, 32) for p in parts)
      # Process slices are disjoint row ranges whose concatenation is the global batch.
      batches.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    hashes = [batch_hash(b) for b in batches]
    if reference is None:
      reference, global_batches = hashes, batches
    assert hashes == reference, f'{count} processes assemble different global batches'
    states = [json.dumps(loader.get_state(), sort_keys=True) for loader in loaders]
    assert len(set(states)) == 1
  # Per source, the windows in global order are its shuffled documents, each token once.
  for k, source in enumerate(sources):
    windows = [np.concatenate([b['inputs'][r], b['targets'][r, -1:]])
               for b in global_batches for r in np.flatnonzero(b['source'] == k)]
    pieces = split_stream(np.concatenate(windows))[:-1]
    keys = [p.tobytes() for p in pieces]
    by_content = {d.tobytes() for d in source}
    # Contents are distinct (the one empty document per source included), so a repeated key is
    # a re-emitted document; fewer pieces than documents means no epoch boundary was crossed.
    assert len(by_content) == len(source), 'pick seeds whose documents are all distinct'
    assert all(key in by_content for key in keys)
    assert len(pieces) < len(source) and len(set(keys)) == len(keys)
  assert loaders[0].tokens_seen == [
      33 * sum(int((b['source'] == k).sum()) for b in global_batches) for k in range(2)]
  assert loaders[0].tokens_seen[0] > loaders[0].tokens_seen[1] > 0


@pytest.mark.parametrize('process_count', [1, 2])
def test_resume_mid_document_matches_uninterrupted(sources, process_count):
  total, cut = 40, 13
  for index in range(process_count):
    straight = make_loader(sources, process_index=index, process_count=process_count)
    expected = [batch_hash(next(straight)) for _ in range(total)]
    first = make_loader(sources, process_index=index, process_count=process_count)
    got = [batch_hash(next(first)) for _ in range(cut)]
    state = json.loads(json.dumps(first.get_state()))
    assert any(p['offset'] > 0 for p in state['packers']), 'state should be mid-document'
    resumed = make_loader(sources, process_index=index, process_count=process_count)
    resumed.set_state(state)
    assert resumed.tokens_seen == state['tokens_seen']
    got += [batch_hash(next(resumed)) for _ in range(total - cut)]
    assert got == expected
  # The state is global: one saved by a 2-process run resumes a 1-process run.
  two = [make_loader(sources, process_index=i, process_count=2) for i in range(2)]
  for _ in range(cut):
    for loader in two:
      next(loader)
  single = make_loader(sources)
  single.set_state(two[1].get_state())
  halves = [next(loader) for loader in two]
  whole = next(single)
  np.testing.assert_array_equal(whole['inputs'], np.concatenate([h['inputs'] for h in halves]))


def test_epochs_reshuffle_and_finite_stream_ends_together():
  docs = make_docs(5, 40, 60)
  one = [make_loader([docs], weights=None, num_epochs=2, process_index=i, process_count=2)
         for i in range(2)]
  counts = [sum(1 for _ in loader) for loader in one]
  assert counts[0] == counts[1] > 0
  stream_tokens = 2 * sum(len(d) + 1 for d in docs)
  seen = one[0].tokens_seen[0]
  assert seen + one[0].dropped_tokens <= stream_tokens
  assert one[0].dropped_windows < 8
  assert stream_tokens - seen - one[0].dropped_tokens < 33  # only the unread tail is left
  # Epoch 2 is another permutation of the same documents.
  packed = make_loader([docs], weights=None, global_batch_size=1, num_epochs=2)
  stream = np.concatenate([np.concatenate([b['inputs'][0], b['targets'][0, -1:]])
                           for b in packed])
  pieces = split_stream(stream)
  epoch1, epoch2 = pieces[:len(docs)], pieces[len(docs):]
  assert sorted(p.tobytes() for p in epoch1) == sorted(d.tobytes() for d in docs)
  assert [p.tobytes() for p in epoch1] != [d.tobytes() for d in docs]
  assert [p.tobytes() for p in epoch2[:10]] != [p.tobytes() for p in epoch1[:10]]


def test_bad_input_raises_user_error(sources):
  with pytest.raises(UserError, match='process_count'):
    make_loader(sources, global_batch_size=6, process_count=4)
  with pytest.raises(UserError, match='no documents'):
    make_loader([sources[0], []])
  with pytest.raises(UserError, match='seq_len'):
    make_loader(sources, seq_len=0)
  with pytest.raises(UserError, match='seq_len'):
    pack_documents(sources[0], 0, SEP)
  with pytest.raises(UserError, match='weights'):
    make_loader(sources, weights=[1.0])
  with pytest.raises(UserError, match='process_index'):
    make_loader(sources, process_index=2, process_count=2)
  state = make_loader(sources).get_state()
  with pytest.raises(UserError, match='same settings'):
    make_loader(sources, seed=4).set_state(state)


class LoggedSource:
  """Documents that log each read ('index' per line) to a file, from any process: grain
  workers read in their own processes, so a counter in memory would not see their reads."""

  def __init__(self, documents, log_path):
    self.documents, self.log_path = documents, str(log_path)

  def __len__(self):
    return len(self.documents)

  def __getitem__(self, index):
    fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
      os.write(fd, f'{index}\n'.encode())  # one append per line: atomic across processes
    finally:
      os.close(fd)
    return self.documents[index]


def read_log(path):
  return collections.Counter(int(line) for line in path.read_text().split()) if path.exists() \
      else collections.Counter()


def test_resume_with_workers_matches_uninterrupted_and_rereads_one_document_per_source(
    sources, tmp_path):
  """Shuffle on, a two-source mixture, grain workers per source, a state taken mid-document:
  the resumed loader yields exactly the uninterrupted batches and reads again only the document
  the state cut through in each source (at most one batch of records)."""
  total, cut = 30, 13
  args = dict(process_index=1, process_count=2)
  straight = make_loader(sources, **args)
  expected = [batch_hash(next(straight)) for _ in range(total)]

  def logged(run):
    return [LoggedSource(s, tmp_path / f'{run}-{k}.log') for k, s in enumerate(sources)]

  # In-process reads are exactly the documents consumed up to the cut (no read-ahead).
  consumed = make_loader(logged('consumed'), **args)
  assert [batch_hash(next(consumed)) for _ in range(cut)] == expected[:cut]
  # One worker per source before the cut, two after: the state holds no worker count.
  with make_loader(logged('first'), worker_count=1, **args) as first:
    assert [batch_hash(next(first)) for _ in range(cut)] == expected[:cut]
    state = json.loads(json.dumps(first.get_state()))
  assert state == consumed.get_state(), 'the state must not depend on the worker count'
  assert all(p['offset'] > 0 for p in state['packers']), 'state should be mid-document'
  with make_loader(logged('resumed'), worker_count=2, **args) as resumed:
    resumed.set_state(state)
    assert [batch_hash(next(resumed)) for _ in range(total - cut)] == expected[cut:]
  assert resumed.tokens_seen == straight.tokens_seen
  reread = 0
  for k in range(len(sources)):
    before = read_log(tmp_path / f'consumed-{k}.log')
    after = read_log(tmp_path / f'resumed-{k}.log')
    assert max(after.values()) == 1, 'each document is read once per pass'
    again = set(before) & set(after)
    assert len(again) == 1, f'source {k} read again {sorted(again)}'
    reread += len(again)
    assert read_log(tmp_path / f'first-{k}.log').keys() >= before.keys()  # workers did read
  assert reread <= 8 // 2  # at most one (local) batch of records


class IndexedSource(LoggedSource):
  """A logged source with a length index, as `builders.load_token_documents` gives."""

  def __init__(self, documents, log_path, lengths=None):
    super().__init__(documents, log_path)
    self.lengths = np.array([len(d) for d in documents]) if lengths is None else lengths


def test_length_index_lets_a_process_read_only_documents_of_its_rows(tmp_path):
  """With `lengths`, a process reads exactly the documents whose tokens land in its rows."""
  rng = np.random.default_rng(7)
  # Every token names its document (source k, document i -> 2 + 1000 k + i): rows say who is in.
  docs = [[np.full(rng.integers(1, 90), 2 + 1000 * k + i, np.int32) for i in range(150)]
          for k in range(2)]
  args = dict(process_index=1, process_count=4)
  plain = make_loader([LoggedSource(d, tmp_path / f'plain-{k}.log')
                       for k, d in enumerate(docs)], **args)
  indexed = make_loader([IndexedSource(d, tmp_path / f'indexed-{k}.log')
                         for k, d in enumerate(docs)], **args)
  in_rows = set()
  for _ in range(25):
    batch = next(indexed)
    assert batch_hash(batch) == batch_hash(next(plain))
    in_rows |= set(np.unique(np.concatenate([batch['inputs'], batch['targets']], 1)).tolist())
  assert indexed.get_state() == plain.get_state()
  for k in range(2):
    own = read_log(tmp_path / f'indexed-{k}.log')
    assert max(own.values()) == 1
    assert set(own) == {t - 2 - 1000 * k for t in in_rows if 1000 * k + 2 <= t < 1000 * k + 1002}
    assert sum(read_log(tmp_path / f'plain-{k}.log').values()) > 2 * len(own)  # all rows' docs
  # An index that disagrees with the documents is an error, not a silently shifted stream.
  wrong = IndexedSource(docs[0], tmp_path / 'wrong.log',
                        lengths=np.array([len(d) + 1 for d in docs[0]]))
  loader = make_loader([wrong, docs[1]], **args)
  with pytest.raises(UserError, match='length index'):
    for _ in range(25):
      next(loader)

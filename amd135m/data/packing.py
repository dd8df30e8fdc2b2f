"""Packing token-id documents into disjoint windows of seq_len + 1 tokens (AMD-135M style).

The packed stream is `sep, doc_0, sep, doc_1, sep, doc_2, ...`: the separator (Llama-2's BOS,
or an end-of-text id for tokenizers without BOS) precedes every document, so every document
boundary carries exactly one separator. The stream is cut into consecutive, non-overlapping
windows of `seq_len + 1` tokens; a model trains on `inputs = window[:-1]`,
`targets = window[1:]`. Every stream token lands in exactly one window, except the final
partial window, which is dropped and counted in `dropped_tokens`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from amd135m.errors import UserError

Document = Sequence[int] | np.ndarray


def check_seq_len(seq_len: int) -> None:
  """Raises UserError unless seq_len is a positive int."""
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise UserError(f'seq_len must be an integer >= 1, got {seq_len!r}; pass e.g. seq_len=2048.')


@dataclasses.dataclass(frozen=True)
class PackedDocuments:
  """Result of `pack_documents`."""
  windows: np.ndarray  # [N, seq_len + 1] int32
  dropped_tokens: int  # stream tokens of the final partial window


def pack_documents(documents: Iterable[Document], seq_len: int,
                   separator_id: int) -> PackedDocuments:
  """Packs finite documents into [N, seq_len + 1] windows; the partial tail is dropped."""
  check_seq_len(seq_len)
  pieces = []
  separator = np.array([separator_id], np.int32)
  for doc in documents:
    pieces.append(separator)
    pieces.append(np.asarray(doc, np.int32).reshape(-1))
  stream = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)
  width = seq_len + 1
  num_windows = len(stream) // width
  windows = stream[:num_windows * width].reshape(num_windows, width)
  return PackedDocuments(windows, int(len(stream) - num_windows * width))


class WindowPacker(Iterator[np.ndarray]):
  """Streams [seq_len + 1] int32 windows from random-access documents, resumable mid-document.

  `documents[i]` returns document i (1-D ints); `num_documents` bounds the stream (default
  `len(documents)`; None with no `__len__` means endless). The state is the position in the
  separator-prefixed stream, `(document_index, offset)`, where offset 0 is the separator and
  offset k > 0 is token k - 1 of the document, so restoring reads only the current document.
  `length(i)`, when given, is document i's token count: `skip` then reads no documents.
  """

  def __init__(self, documents: Any, seq_len: int, separator_id: int,
               num_documents: int | None = None, length: Callable[[int], int] | None = None):
    check_seq_len(seq_len)
    if num_documents is None and hasattr(documents, '__len__'):
      num_documents = len(documents)
    self._documents = documents
    self._get: Callable[[int], Document] = documents.__getitem__
    self._length = length
    self.seq_len = int(seq_len)
    self.separator_id = int(separator_id)
    self.num_documents = num_documents
    self._document_index = 0
    self._offset = 0
    self.windows = 0  # windows emitted or skipped
    self.dropped_tokens = 0  # tokens of the final partial window, once the stream ends
    self._cached_index = -1
    self._cached_doc = np.zeros([0], np.int32)

  def _doc(self, index: int) -> np.ndarray:
    # A long document spans many windows: read it once.
    if index != self._cached_index:
      self._cached_doc = np.asarray(self._get(index), np.int32).reshape(-1)
      self._cached_index = index
      if self._length is not None and self._length(index) != len(self._cached_doc):
        raise UserError(f'document {index} has {len(self._cached_doc)} tokens but the length '
                        f'index says {self._length(index)}: the index is from another '
                        'preparation or tokenizer; prepare again')
    return self._cached_doc

  def _advance(self, materialise: bool) -> np.ndarray | None:
    """Moves one window forward; returns it when materialise, raises StopIteration at the end."""
    width = self.seq_len + 1
    out = np.empty([width], np.int32) if materialise else None
    index, offset, filled = self._document_index, self._offset, 0
    while filled < width:
      if self.num_documents is not None and index >= self.num_documents:
        if self.dropped_tokens == 0:
          self.dropped_tokens = filled
        raise StopIteration
      if materialise or self._length is None:
        doc = self._doc(index)
        doc_len = len(doc)
      else:
        doc_len = self._length(index)  # skipping: the length is all it needs
      if offset == 0:
        if materialise:
          out[filled] = self.separator_id
        filled += 1
        offset = 1
      take = min(width - filled, doc_len - (offset - 1))
      if take > 0:
        if materialise:
          out[filled:filled + take] = doc[offset - 1:offset - 1 + take]
        filled += take
        offset += take
      if offset - 1 >= doc_len:
        index, offset = index + 1, 0
    self._document_index, self._offset = index, offset
    self.windows += 1
    return out

  def __next__(self) -> np.ndarray:  # [seq_len + 1] int32
    return self._advance(materialise=True)

  def skip(self) -> None:
    """Moves past one window without copying its tokens; reads documents only without `length`."""
    self._advance(materialise=False)

  def get_state(self) -> dict[str, int]:
    """JSON-able position: restoring it continues with the next window."""
    return {'document_index': self._document_index, 'offset': self._offset,
            'windows': self.windows}

  def set_state(self, state: dict[str, int]) -> None:
    """Restores a position from `get_state`."""
    try:
      index, offset, windows = (int(state['document_index']), int(state['offset']),
                                int(state['windows']))
    except (KeyError, TypeError, ValueError) as e:
      raise UserError(f'packer state {state!r} is not from WindowPacker.get_state(); '
                      'pass the dict it returned.') from e
    if index < 0 or offset < 0 or windows < 0:
      raise UserError(f'packer state {state!r} has negative fields; pass a saved state.')
    self._document_index, self._offset, self.windows = index, offset, windows
    self.dropped_tokens = 0

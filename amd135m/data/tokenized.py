"""Token ids from text documents: the glue between the builders and the loader.

Two random-access sources of token-id documents: `TokenizedSource` tokenises text records on
each access; `TokenStore` reads the ids that `prepare --tokenizer` (or `stats --tokenizer`)
wrote once, beside the records: `amd135m_tokens-<fingerprint>.bin` (every document's ids, in
record order, uint16 when the vocabulary fits, else uint32) and `amd135m_lengths-<fingerprint>.npy`
(int32 per document; written last, so its presence means the store is complete).
"""
import hashlib
import os
import pathlib
import weakref

import numpy as np

from amd135m.errors import UserError

# Text whose ids tell apart tokenizers that share a vocabulary but split differently.
_PROBE = ("The 2049-token window: naïve café, 東京, emoji 🙂, tabs\tand  spaces.\n"
          "def f(x):\n    return x ** 10_000  # comment\n")
_fingerprints = weakref.WeakKeyDictionary()
LENGTHS_FILE = "amd135m_lengths-{fingerprint}.npy"
TOKENS_FILE = "amd135m_tokens-{fingerprint}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def fingerprint(tokenizer) -> str:
  """A short hash of what decides token lengths: the vocabulary, the special ids and BOS rule,
  and the ids of a probe text. Names the length index a tokenizer's counts are valid for."""
  if tokenizer in _fingerprints:
    return _fingerprints[tokenizer]
  digest = hashlib.sha1()
  for token_id in range(tokenizer.vocab_size):
    digest.update(f"{tokenizer.token(token_id)}\x00".encode("utf-8", "surrogatepass"))
  digest.update(repr((tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos,
                      tokenizer.encode(_PROBE, add_bos=False))).encode())
  _fingerprints[tokenizer] = digest.hexdigest()[:12]
  return _fingerprints[tokenizer]


class TokenizedSource:
  """A random-access source of token-id documents over a source of {'text': ...} records.

  Tokenises lazily, one document per access, without BOS or EOS: the packer puts the separator
  between documents. len() and [] are what the loader needs; `lengths` ([len] int32 token
  counts), when given, lets the loader skip documents without reading them."""

  def __init__(self, records, tokenizer, lengths=None):
    self.records, self.tokenizer = records, tokenizer
    if lengths is not None:
      lengths = np.asarray(lengths, np.int32)
      if lengths.shape != (len(records),):
        raise UserError(f"the length index has {lengths.shape} entries for {len(records)} "
                        "records: it belongs to another preparation; prepare again")
    self.lengths = lengths

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> np.ndarray:  # [T] int32
    text = self.records[index]["text"]
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    return np.asarray(self.tokenizer.encode(text, add_bos=False), np.int32)


class TokenWriter:
  """Writes a `TokenStore` into `directory`: `add(text)` per record, in record order, then
  `close()`; `abort()` leaves nothing behind."""

  def __init__(self, directory, tokenizer):
    self.tokenizer, self.fingerprint = tokenizer, fingerprint(tokenizer)
    self.dtype = token_dtype(tokenizer.vocab_size)
    self._directory = pathlib.Path(directory)
    self._tokens_path = self._directory / TOKENS_FILE.format(fingerprint=self.fingerprint)
    self._file = open(self._tokens_path.with_name(self._tokens_path.name + ".partial"), "wb")
    self.lengths: list[int] = []
    self.tokens = 0

  def add(self, text: str) -> int:
    """Tokenises one record (no BOS/EOS) and appends its ids; returns its token count."""
    ids = np.asarray(self.tokenizer.encode(text, add_bos=False), self.dtype)
    self._file.write(ids.tobytes())
    self.lengths.append(len(ids))
    self.tokens += len(ids)
    return len(ids)

  def close(self) -> dict:
    """Finishes the store; returns the stats fields it adds (tokens, tokenizer fingerprint)."""
    self._file.close()
    os.replace(self._file.name, self._tokens_path)
    lengths = self._directory / LENGTHS_FILE.format(fingerprint=self.fingerprint)
    np.save(lengths.with_name(lengths.name + ".partial.npy"), np.asarray(self.lengths, np.int32))
    os.replace(lengths.with_name(lengths.name + ".partial.npy"), lengths)
    return {"tokens": self.tokens, "tokenizer": self.fingerprint}

  def abort(self) -> None:
    self._file.close()
    pathlib.Path(self._file.name).unlink(missing_ok=True)


class TokenStore:
  """Token-id documents read from a written store (memory-mapped): document i is a slice, so
  reading it costs its bytes, and `lengths` lets the loader skip without reading."""

  def __init__(self, directory, tokenizer):
    directory = pathlib.Path(directory)
    self.fingerprint = fingerprint(tokenizer)
    self.lengths = np.load(directory / LENGTHS_FILE.format(fingerprint=self.fingerprint))
    self._ends = np.cumsum(self.lengths, dtype=np.int64)
    self._path = directory / TOKENS_FILE.format(fingerprint=self.fingerprint)
    self._dtype = token_dtype(tokenizer.vocab_size)
    size = self._path.stat().st_size if self._path.exists() else -1
    if size != (int(self._ends[-1]) if len(self._ends) else 0) * self._dtype.itemsize:
      raise UserError(f"{self._path} does not hold the {int(self._ends[-1])} tokens its length "
                      "index lists: prepare (or run `stats --tokenizer`) again")
    self._tokens = None

  @staticmethod
  def exists(directory, tokenizer) -> bool:
    names = (LENGTHS_FILE, TOKENS_FILE)
    return all((pathlib.Path(directory) / name.format(fingerprint=fingerprint(tokenizer))).exists()
               for name in names)

  def __len__(self) -> int:
    return len(self.lengths)

  def __getitem__(self, index: int) -> np.ndarray:  # [T] int32
    if self._tokens is None:  # opened on first read, in whichever process reads
      self._tokens = np.memmap(self._path, self._dtype, "r") if self._ends[-1] else np.zeros(
          [0], self._dtype)
    start = int(self._ends[index - 1]) if index else 0
    return self._tokens[start:int(self._ends[index])].astype(np.int32)

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_tokens": None}  # a memmap is reopened, not pickled


def separator_id(tokenizer, override: int | None = None) -> int:
  """The id between packed documents: `override` if given; else BOS for tokenizers that add it
  (Llama-2, as AMD-135M packs); else the end-of-sequence id from the metadata."""
  if override is not None:
    if not 0 <= override < tokenizer.vocab_size:
      raise UserError(f"separator id {override} is outside the vocabulary "
                      f"[0, {tokenizer.vocab_size})")
    return override
  if tokenizer.add_bos and tokenizer.bos_id is not None:
    return tokenizer.bos_id
  if tokenizer.eos_id is not None:
    return tokenizer.eos_id
  raise UserError("the tokenizer names neither BOS nor EOS: pass a separator id explicitly")

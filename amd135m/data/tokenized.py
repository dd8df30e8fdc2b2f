"""Token ids from text documents: the glue between the builders and the loader."""
import hashlib
import weakref

import numpy as np

from amd135m.errors import UserError

# Text whose ids tell apart tokenizers that share a vocabulary but split differently.
_PROBE = ("The 2049-token window: naïve café, 東京, emoji 🙂, tabs\tand  spaces.\n"
          "def f(x):\n    return x ** 10_000  # comment\n")
_fingerprints = weakref.WeakKeyDictionary()


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
  counts, e.g. from `builders.load_lengths`), when given, lets the loader skip documents
  without reading them."""

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


def load_documents(name: str, data_dir, tokenizer, *, patterns=None) -> TokenizedSource:
  """The token-id documents of a prepared dataset, with its length index if one was written."""
  from amd135m.data import builders  # noqa: PLC0415 (builders imports this module)
  records = builders.load(name, data_dir, patterns=patterns)
  return TokenizedSource(records, tokenizer,
                         builders.load_lengths(name, data_dir, tokenizer, patterns=patterns))


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

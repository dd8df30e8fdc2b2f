"""Token ids from text documents: the glue between the builders and the loader."""
import numpy as np

from amd135m.errors import UserError


class TokenizedSource:
  """A random-access source of token-id documents over a source of {'text': ...} records.

  Tokenises lazily, one document per access, without BOS or EOS: the packer puts the separator
  between documents. len() and [] are what the loader needs."""

  def __init__(self, records, tokenizer):
    self.records, self.tokenizer = records, tokenizer

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> np.ndarray:  # [T] int32
    text = self.records[index]["text"]
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    return np.asarray(self.tokenizer.encode(text, add_bos=False), np.int32)


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

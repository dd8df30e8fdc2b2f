"""SentencePiece tokenizer training for from-scratch runs, with Llama-2's trainer settings.

The result is a Hugging Face style directory (tokenizer.model + tokenizer_config.json) that
`amd135m.tokenizer.load_tokenizer` reads and that exports with a model through
`checkpoints.save_hf(..., tokenizer=...)`.
"""
import json
import os
import pathlib
import tempfile
from typing import Iterable

import sentencepiece

from amd135m.errors import UserError

# Llama-2's trainer settings: BPE with byte fallback, digits split, whitespace kept as written.
LLAMA2_TRAINER = dict(model_type="bpe", byte_fallback=True, split_digits=True,
                      allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                      normalization_rule_name="identity", add_dummy_prefix=True,
                      character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
LLAMA2_TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                           "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                           "unk_token": "<unk>", "pad_token": None, "legacy": False,
                           "clean_up_tokenization_spaces": False}


def train_sentencepiece(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike,
                        max_sentence_length: int = 1 << 16, num_threads: int | None = None
                        ) -> pathlib.Path:
  """Trains on `texts` (documents; each is split into lines) and writes output_dir."""
  if vocab_size < 260:  # 256 byte pieces + unk, bos, eos and at least one merge
    raise UserError(f"vocab_size {vocab_size} is too small for byte fallback: use >= 260")
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    corpus = pathlib.Path(tmp) / "corpus.txt"
    lines = 0
    with open(corpus, "w", encoding="utf-8") as f:
      for text in texts:
        for line in text.splitlines():
          if line.strip():
            f.write(line + "\n")
            lines += 1
    if lines == 0:
      raise UserError("no text to train a tokenizer on: the documents are empty")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(pathlib.Path(tmp) / "tokenizer"),
        vocab_size=vocab_size, max_sentence_length=max_sentence_length,
        num_threads=num_threads or os.cpu_count(), minloglevel=2, **LLAMA2_TRAINER)
    (output_dir / "tokenizer.model").write_bytes((pathlib.Path(tmp) / "tokenizer.model")
                                                 .read_bytes())
  (output_dir / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG, indent=1))
  return output_dir

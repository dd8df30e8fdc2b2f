"""SentencePiece training for from-scratch runs, and export with a model to Hugging Face format."""
import inspect
import json as json_module

import jax
import numpy as np
import pytest
import torch
import transformers

from amd135m import checkpoints, model as model_lib
from amd135m.data import spm
from amd135m.errors import UserError
from amd135m.tokenizer import load_tokenizer

TEXTS = ["Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
         inspect.getsource(json_module.decoder), "Café, naïve, 東京, 1234567 😀"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  return spm.train_sentencepiece(TEXTS * 3, vocab_size=400,
                                 output_dir=tmp_path_factory.mktemp("spm"), num_threads=1)


def test_trained_tokenizer_follows_llama2_conventions(trained):
  tok = load_tokenizer(trained)
  assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 400)
  ids = tok.encode("Thou art 東京 42")
  assert ids[0] == 1 and tok.decode(ids[1:]) == "Thou art 東京 42"  # byte fallback round trip
  digits = [tok.token(i) for i in tok.encode("1234567", add_bos=False)]
  assert all(sum(c.isdigit() for c in piece) <= 1 for piece in digits)  # split_digits


def test_exports_with_a_model_to_hugging_face(trained, tmp_path):
  """A model of the tokenizer's vocabulary exports beside it; transformers loads both and
  encodes like ours."""
  tok = load_tokenizer(trained)
  config = model_lib.ModelConfig(vocab_size=400, dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                                 ffn_dim=64, max_seq_len=64)
  params = jax.tree.map(np.asarray, model_lib.init_params(config, jax.random.key(0)))
  checkpoints.save_hf(tmp_path / "export", config, params, tok)
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
  for text in ["Thou art more lovely", "def decode(self, s):\n    return 12"]:
    assert hf_tok(text)["input_ids"] == tok.encode(text)
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export",
                                                        torch_dtype=torch.float32)
  assert model.config.vocab_size == 400


def test_bad_input(tmp_path):
  with pytest.raises(UserError, match="too small"):
    spm.train_sentencepiece(TEXTS, vocab_size=100, output_dir=tmp_path)
  with pytest.raises(UserError, match="no text"):
    spm.train_sentencepiece(["", "  "], vocab_size=400, output_dir=tmp_path)

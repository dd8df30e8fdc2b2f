"""Builders for Hugging Face reference models (torch, CPU) and their weights in our layout."""
import functools
import pathlib

import gguf
import numpy as np
import pytest
import torch
import transformers

from amd135m import model as model_lib
from amd135m.checkpoints import layout


def tiny_hf_model(seed: int = 0, init_std: float = 0.02, **overrides):
  """A random LlamaForCausalLM; a larger init_std gives clear top-2 logit margins."""
  kwargs = dict(vocab_size=211, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                max_position_embeddings=256, tie_word_embeddings=False,
                initializer_range=init_std, attn_implementation="eager")
  kwargs.update(overrides)
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()


def our_config(hf_model) -> model_lib.ModelConfig:
  c = hf_model.config
  return model_lib.ModelConfig(
      vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
      n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
      ffn_dim=c.intermediate_size, rope_theta=float(c.rope_parameters["rope_theta"]),
      norm_eps=c.rms_norm_eps, max_seq_len=c.max_position_embeddings,
      tie_embeddings=c.tie_word_embeddings)


def our_params(hf_model) -> dict:
  tensors = {name: t.detach().float().numpy() for name, t in hf_model.state_dict().items()}
  if hf_model.config.tie_word_embeddings:
    tensors.pop("lm_head.weight", None)
  return layout.params_from_tensors(tensors.items())


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf_model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


def first_small_margin(logits: np.ndarray, threshold: float = 1e-3) -> int | None:
  """The first position whose top-2 logit margin is below `threshold` (where ties may flip)."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  small = np.nonzero(top2[..., 1] - top2[..., 0] < threshold)[0]
  return int(small[0]) if len(small) else None


@functools.cache
def _transformers_gguf_speedups():
  """Memoise two pure gguf functions transformers calls repeatedly (about 20 s -> 10 s)."""
  return functools.cache(gguf.GGUFReader), functools.cache(gguf.get_tensor_name_map)


def load_transformers_gguf(path: pathlib.Path):
  """transformers' own GGUF loading (dequantised to float32): the reference for a GGUF."""
  reader, name_map = _transformers_gguf_speedups()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(gguf, "GGUFReader", reader)
    patch.setattr(gguf, "get_tensor_name_map", name_map)
    model = transformers.LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
  return model.eval()

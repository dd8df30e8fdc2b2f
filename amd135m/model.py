"""The Llama decoder as Flax linen modules, applied purely.

Parameter names and layouts mirror Hugging Face's LlamaForCausalLM (`weight` is [out, in]), so a
checkpoint conversion is a rename: `model.layers.3.self_attn.q_proj.weight` is
params['layers_3']['self_attn']['q_proj']['weight'].
"""
import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  dtype: str = "float32"        # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of the weights

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

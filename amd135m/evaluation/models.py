"""The one place evaluation turns a --model path into weights and a tokenizer."""
import dataclasses
import os

import jax
import jax.numpy as jnp

from amd135m import checkpoints, model as model_lib, quantize, tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Model:
  """What every evaluation needs: architecture, weights on device, tokenizer."""
  config: model_lib.ModelConfig
  params: dict
  tokenizer: tokenizer_lib.Tokenizer


def load_model(path: str | os.PathLike, weights: str = "f32") -> Model:
  """Whatever `checkpoints.load_params` accepts (HF directory, .gguf, ...), with its tokenizer,
  the weights at the precision `weights` (quantize.WEIGHTS: f32, bf16, int8)."""
  config, params = checkpoints.load_params(path)
  tokenizer = tokenizer_lib.load_tokenizer(path)
  params = quantize.cast_weights(jax.tree.map(jnp.asarray, params), config, weights)
  return Model(config, params, tokenizer)

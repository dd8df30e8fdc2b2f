"""The one place evaluation turns a --model path into weights and a tokenizer."""
import dataclasses
import os

import jax
import jax.numpy as jnp

from amd135m import checkpoints, model as model_lib, tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Model:
  """What every evaluation needs: architecture, weights on device, tokenizer."""
  config: model_lib.ModelConfig
  params: dict
  tokenizer: tokenizer_lib.Tokenizer


def load_model(path: str | os.PathLike) -> Model:
  """Whatever `checkpoints.load_params` accepts (HF directory, .gguf, ...), with its tokenizer."""
  config, params = checkpoints.load_params(path)
  tokenizer = tokenizer_lib.load_tokenizer(path)
  return Model(config, jax.tree.map(jnp.asarray, params), tokenizer)

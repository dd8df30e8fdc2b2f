"""Checkpoints in, checkpoints out: Hugging Face Llama directories and llama GGUF files.

Everything lands in one params pytree whose names mirror Hugging Face's LlamaForCausalLM
(see layout.py). Only numpy, ml_dtypes and gguf are used, and tensors stream one at a time, so
converting a 7B model needs about one tensor's worth of memory beyond the interpreter.
"""
import dataclasses
import os
from typing import Any

from amd135m.checkpoints import orbax_io
from amd135m.checkpoints.export import (
  ConvertSummary,
  SavedCheckpoint,
  convert_checkpoint,
  open_checkpoint,
  save_hf,
)
from amd135m.checkpoints.gguf_io import read_gguf_config, unpermute_rotary
from amd135m.checkpoints.hf import read_hf_config
from amd135m.checkpoints.layout import (
  DTYPES,
  CheckpointTensors,
  TensorSpec,
  as_dtype,
  flatten_params,
  hf_name_to_path,
  hf_shapes,
  params_from_tensors,
  path_to_hf_name,
)
from amd135m.checkpoints.safetensors_io import SafetensorsWriter, read_header, write_safetensors
from amd135m.model_config import ModelConfig


def iter_hf_tensors(path: str | os.PathLike, dtype: Any = None) -> CheckpointTensors:
  """(hf_name, array) pairs from an HF directory or .gguf, read lazily in canonical order.

  The result also carries `.config` (a ModelConfig whose dtypes follow the weights) and `.specs`
  (every shape and dtype, known before any data is read). dtype=None keeps the stored dtype;
  quantised GGUF tensors come out float32.
  """
  return open_checkpoint(path).cast(as_dtype(dtype))


def load_params(path: str | os.PathLike, dtype: Any = None) -> tuple[ModelConfig, dict]:
  """(config, params) from an HF directory, a .gguf or a training workdir (its latest
  checkpoint); params is a nested dict of numpy arrays."""
  if orbax_io.is_workdir(path):
    config, params = orbax_io.load_workdir_params(path)
    if dtype is not None:
      dtype = as_dtype(dtype)
      params = _map_leaves(lambda x: x.astype(dtype), params)
      config = dataclasses.replace(config, param_dtype=dtype.name)
    return config, params
  tensors = iter_hf_tensors(path, dtype)
  return tensors.config, params_from_tensors(tensors)


def _map_leaves(fn, tree):
  return {k: _map_leaves(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


__all__ = [
    "CheckpointTensors", "ConvertSummary", "DTYPES", "SafetensorsWriter", "SavedCheckpoint",
    "TensorSpec", "convert_checkpoint", "flatten_params", "hf_name_to_path", "hf_shapes",
    "iter_hf_tensors", "open_checkpoint", "load_params", "params_from_tensors", "path_to_hf_name",
    "read_gguf_config", "read_header", "read_hf_config", "save_hf", "unpermute_rotary",
    "write_safetensors",
]

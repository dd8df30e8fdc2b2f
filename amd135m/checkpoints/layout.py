"""The one naming of Llama weights: Hugging Face names, params paths, shapes, dtypes, streams.

A params pytree keeps LlamaForCausalLM's module names (`model.` dropped, `layers.N` spelled
`layers_N`) with Flax's leaves: a linear `weight` [out, in] becomes a `kernel` [in, out] (its
transpose: the layout XLA's CPU matrix-vector product reads fastest), `embed_tokens.weight` the
`embedding` [V, D], a norm's `weight` its `scale`. Every format is a rename plus that transpose.
"""
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from amd135m.errors import UserError
from amd135m.model_config import ModelConfig

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}

_LAYER_WEIGHTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
)
_HF_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight|model\.(embed_tokens|norm)\.weight|"
                      r"(lm_head)\.weight")


def as_dtype(dtype: Any) -> np.dtype | None:
  """A weight dtype from a name ('bfloat16') or numpy-like dtype; None stays None."""
  if dtype is None:
    return None
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise UserError(f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
  resolved = np.dtype(dtype)
  if resolved not in DTYPES.values():
    raise UserError(f"unsupported dtype {resolved}: choose one of {', '.join(DTYPES)}")
  return resolved


def dtype_name(dtype: np.dtype) -> str:
  """'float32' | 'bfloat16' | 'float16', the spelling config.json and ModelConfig use."""
  for name, known in DTYPES.items():
    if np.dtype(dtype) == known:
      return name
  raise UserError(f"unsupported weight dtype {dtype}: expected one of {', '.join(DTYPES)}")


def _leaf(module: str) -> str:
  """The Flax leaf that holds a module's HF `weight`."""
  if module == "embed_tokens":
    return "embedding"
  return "scale" if module.endswith("norm") else "kernel"


def hf_name_to_path(name: str) -> tuple[str, ...]:
  """'model.layers.3.mlp.up_proj.weight' -> ('layers_3', 'mlp', 'up_proj', 'kernel')."""
  match = _HF_NAME.fullmatch(name)
  if match is None or (match[2] is not None and match[2] not in _LAYER_WEIGHTS):
    raise ValueError(f"not a Llama weight name: {name!r}")
  if match[1] is not None:
    modules = match[2].split(".")
    return (f"layers_{int(match[1])}", *modules, _leaf(modules[-1]))
  module = match[3] or match[4]
  return (module, _leaf(module))


def path_to_hf_name(path: tuple[str, ...]) -> str:
  """The inverse of hf_name_to_path: ('norm', 'scale') -> 'model.norm.weight'."""
  modules = ".".join(path[:-1])
  if path and path[0] == "lm_head":
    name = modules + ".weight"
  elif path and path[0].startswith("layers_"):
    name = "model.layers." + path[0][len("layers_"):] + modules[len(path[0]):] + ".weight"
  else:
    name = "model." + modules + ".weight"
  try:
    valid = hf_name_to_path(name) == tuple(path)  # rejects 'layers_03' and unknown leaves
  except ValueError:
    valid = False
  if not valid:
    raise ValueError(f"not a Llama params path: {path!r}")
  return name


def to_params_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  """An HF tensor as the params leaf at `path` wants it (kernels transposed, as a view)."""
  return array.T if path[-1] == "kernel" else array


to_hf_layout = to_params_layout  # a transpose is its own inverse


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor a checkpoint of `config` holds, in the canonical order, with HF shapes."""
  d, f, v = config.dim, config.ffn_dim, config.vocab_size
  q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
  layer = {
      "self_attn.q_proj": (q_rows, d), "self_attn.k_proj": (kv_rows, d),
      "self_attn.v_proj": (kv_rows, d), "self_attn.o_proj": (d, q_rows),
      "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
      "input_layernorm": (d,), "post_attention_layernorm": (d,),
  }
  shapes = {"model.embed_tokens.weight": (v, d)}
  for i in range(config.n_layers):
    for short in _LAYER_WEIGHTS:
      shapes[f"model.layers.{i}.{short}.weight"] = layer[short]
  shapes["model.norm.weight"] = (d,)
  if not config.tie_embeddings:
    shapes["lm_head.weight"] = (v, d)
  return shapes


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def check_specs(config: ModelConfig, specs: dict[str, TensorSpec], source: str) -> None:
  """Every expected tensor present with the config's shape and a float dtype; nothing else."""
  expected = hf_shapes(config)
  missing = [name for name in expected if name not in specs]
  if missing:
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise UserError(f"{source}: missing tensor {', '.join(missing[:3])}{more}")
  extra = [name for name in specs if name not in expected]
  if extra:
    raise UserError(f"{source}: unexpected tensor {extra[0]!r}: not part of a plain Llama "
                    f"with this config")
  for name, spec in specs.items():
    if tuple(spec.shape) != expected[name]:
      raise UserError(f"{source}: tensor {name} has shape {list(spec.shape)} but the config "
                      f"implies {list(expected[name])}")
    if spec.dtype not in DTYPES.values():
      raise UserError(f"{source}: tensor {name} is {spec.dtype}; only "
                      f"{', '.join(DTYPES)} weights are supported")


class CheckpointTensors:
  """A checkpoint's tensors under HF names, in canonical order, read one at a time when iterated.

  `specs` (shape and dtype of each tensor, known before any data is read) lets a writer lay out its
  files first and then stream, so only about one tensor is ever in memory.
  """

  def __init__(self, config: ModelConfig, specs: dict[str, TensorSpec],
               read: Callable[[str], np.ndarray], source: str):
    self.config = config
    self.specs = specs
    self.source = source  # what a person would call the input: a path and its format
    self._read = read

  def read(self, name: str) -> np.ndarray:
    spec = self.specs[name]
    array = self._read(name)
    if array.shape != spec.shape:
      raise UserError(f"{self.source}: tensor {name} read with shape {list(array.shape)}, "
                      f"expected {list(spec.shape)}")
    return array.astype(spec.dtype, copy=False)

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    for name in self.specs:
      yield name, self.read(name)

  def __len__(self) -> int:
    return len(self.specs)

  @property
  def n_params(self) -> int:
    return sum(int(np.prod(spec.shape, dtype=np.int64)) for spec in self.specs.values())

  def cast(self, dtype: np.dtype | None) -> "CheckpointTensors":
    """The same stream cast to `dtype` tensor by tensor; param_dtype follows the weights, and the
    compute dtype is float32 (what CPUs want; choose bfloat16 for GPUs with dataclasses.replace)."""
    specs = self.specs
    if dtype is not None:
      specs = {name: TensorSpec(spec.shape, dtype) for name, spec in specs.items()}
    # The embedding's dtype names the checkpoint: GGUF norms stay float32 beside float16 matrices.
    weight_dtype = dtype_name(specs["model.embed_tokens.weight"].dtype)
    config = dataclasses.replace(self.config, dtype="float32", param_dtype=weight_dtype)
    return CheckpointTensors(config, specs, self._read, self.source)


def params_from_tensors(tensors) -> dict:
  """Nested params dict from (hf_name, array) pairs."""
  params: dict = {}
  for name, array in tensors:
    path = hf_name_to_path(name)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = to_params_layout(path, array)
  return params


def flatten_params(params: dict) -> dict[str, Any]:
  """{hf_name: array in HF layout} from a nested params dict, in insertion order."""
  flat = {}

  def visit(node, path):
    if isinstance(node, Mapping):  # flax FrozenDict too
      for key, child in node.items():
        visit(child, (*path, key))
    else:
      flat[path_to_hf_name(path)] = to_hf_layout(path, node)

  visit(params, ())
  return flat

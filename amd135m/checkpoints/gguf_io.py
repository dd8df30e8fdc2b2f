"""GGUF files of llama architecture: metadata -> ModelConfig, and tensors dequantised to HF layout.

The header comes from amd135m.gguf_file; each tensor is read with seek+read and
`gguf.quants.dequantize` turns quantised blocks into float32.
"""
import os
import pathlib
import re

import ml_dtypes
import numpy as np

from amd135m.checkpoints.layout import CheckpointTensors, TensorSpec, check_specs, hf_shapes
from amd135m.errors import UserError
from amd135m.gguf_file import GGUFHeader, GGUFTensorInfo, read_gguf_header  # noqa: F401
from amd135m.model_config import ModelConfig

# ggml types we read without dequantising, as numpy dtypes.
_PLAIN = {0: np.dtype("<f4"), 1: np.dtype("<f2"), 30: np.dtype(ml_dtypes.bfloat16)}

_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TO_HF = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _config_from_header(header: GGUFHeader) -> ModelConfig:
  meta, path = header.metadata, header.path
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (only llama)")

  def get(key: str, default=None):
    value = meta.get(f"llama.{key}", default)
    if value is None:
      raise UserError(f"{path}: missing GGUF metadata llama.{key}")
    if isinstance(value, (np.ndarray, list)):
      raise UserError(f"{path}: llama.{key} varies per layer, which is not supported")
    return value

  if get("expert_count", 0):
    raise UserError(f"{path}: mixture-of-experts llama GGUFs are not supported")
  scaling = meta.get("llama.rope.scaling.type", "none")
  if scaling != "none" or "rope_freqs.weight" in header.tensors:
    kind = scaling if scaling != "none" else "llama3 (rope_freqs)"
    raise UserError(f"{path}: RoPE scaling {kind} is not supported (only plain RoPE)")
  if len(header.tensors.get("token_embd.weight", GGUFTensorInfo("", 0, (), 0, 0)).shape) != 2:
    raise UserError(f"{path}: missing or malformed tensor token_embd.weight")
  vocab_size, dim = header.tensors["token_embd.weight"].shape
  n_heads = int(get("attention.head_count"))
  config = ModelConfig(
      vocab_size=vocab_size,
      dim=int(get("embedding_length")),
      n_layers=int(get("block_count")),
      n_heads=n_heads,
      n_kv_heads=int(get("attention.head_count_kv", n_heads)),
      ffn_dim=int(get("feed_forward_length")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      max_seq_len=int(get("context_length", 2048)),
      # llama.cpp ties the output projection to the embedding exactly when output.weight is absent.
      tie_embeddings="output.weight" not in header.tensors,
  )
  config.validate(source=str(path))
  for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
    if int(get(key, config.head_dim)) != config.head_dim:
      raise UserError(f"{path}: llama.{key}={get(key)} differs from embedding_length / "
                      f"head_count = {config.head_dim}, which is not supported")
  return config


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
  """ModelConfig from a llama GGUF's metadata (param_dtype float32 once dequantised)."""
  return _config_from_header(read_gguf_header(path))


def _hf_name(gguf_name: str, path: pathlib.Path) -> str:
  if gguf_name in _GLOBAL_TO_HF:
    return _GLOBAL_TO_HF[gguf_name]
  match = _BLOCK.fullmatch(gguf_name)
  if match is None or match[2] not in _GGUF_TO_HF:
    raise UserError(f"{path}: unexpected tensor {gguf_name!r}: not part of a plain Llama")
  return f"model.layers.{int(match[1])}.{_GGUF_TO_HF[match[2]]}.weight"


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's reordering of Q/K rows: [h, 2, half, in] -> HF's [h, half, 2, in] halves.

  llama.cpp's convert did w.reshape(h, 2, half, in).swapaxes(1, 2): HF rotates the two halves of
  each head, ggml rotates adjacent pairs. weight: [h * head_dim, in].
  """
  rows = weight.shape[0]
  return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _read_tensor(info: GGUFTensorInfo, path: pathlib.Path) -> np.ndarray:
  """One tensor in numpy order: plain types as stored, quantised ones dequantised to float32."""
  raw = np.empty(info.nbytes, np.uint8)
  with open(path, "rb", buffering=0) as f:
    f.seek(info.offset)
    if f.readinto(memoryview(raw)) != info.nbytes:
      raise UserError(f"{path}: truncated: tensor {info.name} ends past the end of the file")
  if info.ggml_type in _PLAIN:
    return raw.view(_PLAIN[info.ggml_type]).reshape(info.shape)
  from gguf import quants  # only quantised files pay for the import
  n_rows = int(np.prod(info.shape[:-1], dtype=np.int64))  # quant blocks never straddle rows
  blocks = raw.reshape(n_rows, -1)
  out = np.empty((n_rows, info.shape[-1]), np.float32)
  # dequantize holds a float32 temporary as large as its input: a few MB of rows at a time.
  step = max(1, (8 << 20) // (4 * out.shape[1]))
  try:
    for start in range(0, out.shape[0], step):
      out[start:start + step] = quants.dequantize(blocks[start:start + step], info.ggml_type)
  except NotImplementedError as e:
    raise UserError(f"{path}: tensor {info.name}: {e} in the gguf package") from None
  return out.reshape(info.shape)


def open_gguf(path: str | os.PathLike) -> CheckpointTensors:
  """Stream a llama GGUF's tensors under HF names and layouts (rotary permutation undone)."""
  header = read_gguf_header(path)
  path = header.path
  config = _config_from_header(header)
  gguf_name = {_hf_name(name, path): name for name in header.tensors}
  specs = {}
  for hf_name, name in gguf_name.items():
    info = header.tensors[name]
    specs[hf_name] = TensorSpec(info.shape, _PLAIN.get(info.ggml_type, np.dtype(np.float32)))
  source = f"{path} (GGUF)"
  check_specs(config, specs, source)
  specs = {name: specs[name] for name in hf_shapes(config)}  # canonical order

  def read(hf_name: str) -> np.ndarray:
    weight = _read_tensor(header.tensors[gguf_name[hf_name]], path)
    if hf_name.endswith("self_attn.q_proj.weight"):
      return unpermute_rotary(weight, config.n_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
      return unpermute_rotary(weight, config.n_kv_heads)
    return weight

  return CheckpointTensors(config, specs, read, source)


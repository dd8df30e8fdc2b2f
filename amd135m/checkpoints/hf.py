"""Hugging Face Llama directories: config.json <-> ModelConfig, and streaming their safetensors."""
import dataclasses
import json
import os
import pathlib

from amd135m.checkpoints import safetensors_io
from amd135m.checkpoints.layout import DTYPES, CheckpointTensors, check_specs, hf_shapes
from amd135m.errors import UserError
from amd135m.model_config import ModelConfig

# Tensors some older exports carry that the model recomputes; skipping them loses nothing.
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


def _load_json(path: pathlib.Path) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: no such file") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise UserError(f"{path}: expected a JSON object")
  return value


def _rope_theta(raw: dict, path: pathlib.Path) -> float:
  """rope_theta from transformers 5's `rope_parameters` or the older top-level field."""
  theta = raw.get("rope_theta")
  for key in ("rope_parameters", "rope_scaling"):
    rope = raw.get(key)
    if rope is None:
      continue
    if not isinstance(rope, dict):
      raise UserError(f"{path}: {key} must be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
      raise UserError(f"{path}: {key} of type {kind!r} is not supported (only plain RoPE)")
    theta = rope.get("rope_theta", theta)
  return float(theta if theta is not None else 10000.0)


def read_hf_config(directory: str | os.PathLike) -> ModelConfig:
  """ModelConfig from a Hugging Face LlamaForCausalLM directory's config.json."""
  path = pathlib.Path(directory) / "config.json"
  if not path.parent.is_dir():
    raise UserError(f"{directory}: not a directory (expected a Hugging Face model directory "
                    f"or a .gguf file)")
  raw = _load_json(path)
  architectures = raw.get("architectures") or ["LlamaForCausalLM"]
  if raw.get("model_type") != "llama" or architectures != ["LlamaForCausalLM"]:
    raise UserError(f"{path}: model_type {raw.get('model_type')!r} / architectures "
                    f"{architectures} is not supported: only llama / LlamaForCausalLM")
  for flag in ("attention_bias", "mlp_bias"):
    if raw.get(flag):
      raise UserError(f"{path}: {flag}=true is not supported (our Llama has no biases)")
  if raw.get("hidden_act", "silu") != "silu":
    raise UserError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
  if raw.get("quantization_config"):
    method = raw["quantization_config"].get("quant_method", "unknown")
    raise UserError(f"{path}: quantized checkpoints ({method}) are not supported")
  try:
    dim, n_heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    config = ModelConfig(
        vocab_size=int(raw["vocab_size"]),
        dim=dim,
        n_layers=int(raw["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        ffn_dim=int(raw["intermediate_size"]),
        rope_theta=_rope_theta(raw, path),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),  # LlamaConfig's default
        max_seq_len=int(raw.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
  except KeyError as e:
    raise UserError(f"{path}: missing field {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise UserError(f"{path}: bad field value ({e})") from None
  head_dim = raw.get("head_dim")
  if head_dim is not None and dim % n_heads == 0 and int(head_dim) != dim // n_heads:
    raise UserError(f"{path}: head_dim {head_dim} differs from hidden_size / num_attention_heads "
                    f"= {dim // n_heads}, which is not supported")
  dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
  if dtype not in DTYPES:
    raise UserError(f"{path}: dtype {dtype!r} is not supported (choose from {', '.join(DTYPES)})")
  config.validate(source=str(path))
  return dataclasses.replace(config, dtype="float32", param_dtype=dtype)


def _shard_files(directory: pathlib.Path) -> list[pathlib.Path]:
  index = directory / "model.safetensors.index.json"
  if index.exists():
    weight_map = _load_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise UserError(f"{index}: no weight_map")
    return [directory / file for file in dict.fromkeys(weight_map.values())]
  single = directory / "model.safetensors"
  if single.exists():
    return [single]
  if any(directory.glob("*.bin")) or any(directory.glob("*.pth")):
    raise UserError(f"{directory}: only PyTorch pickle weights found; re-save them as safetensors "
                    f"(model.save_pretrained(dir) in transformers does)")
  raise UserError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def open_hf_dir(directory: str | os.PathLike) -> CheckpointTensors:
  """Stream a Hugging Face Llama directory's tensors, checked against its config.json."""
  directory = pathlib.Path(directory)
  config = read_hf_config(directory)
  entries: dict[str, safetensors_io.SafetensorsEntry] = {}
  for file in _shard_files(directory):
    for name, entry in safetensors_io.read_header(file).items():
      if not name.endswith(_DERIVED_SUFFIXES):
        entries[name] = entry
  if config.tie_embeddings:
    entries.pop("lm_head.weight", None)  # some exports save the tied copy too
  specs = {name: entry.spec for name, entry in entries.items()}
  source = f"{directory} (Hugging Face)"
  check_specs(config, specs, source)
  # Canonical order, so output files do not depend on how the input was sharded.
  specs = {name: specs[name] for name in hf_shapes(config)}
  return CheckpointTensors(config, specs, lambda name: entries[name].read(), source)


def config_json(config: ModelConfig, dtype: str, bos_id: int | None = None,
                eos_id: int | None = None) -> dict:
  """config.json for transformers' LlamaForCausalLM, readable by 4.x and 5.x alike."""
  out = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.dim,
      "intermediate_size": config.ffn_dim,
      "num_hidden_layers": config.n_layers,
      "num_attention_heads": config.n_heads,
      "num_key_value_heads": config.n_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_seq_len,
      "rms_norm_eps": config.norm_eps,
      # 5.x reads rope_parameters; 4.x reads rope_theta and ignores the other.
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "tie_word_embeddings": config.tie_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "initializer_range": 0.02,
      "pretraining_tp": 1,
      "use_cache": True,
      "dtype": dtype,
      "torch_dtype": dtype,  # the 4.x spelling
  }
  if bos_id is not None:
    out["bos_token_id"] = bos_id
  if eos_id is not None:
    out["eos_token_id"] = eos_id
  return out


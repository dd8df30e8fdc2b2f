"""amd135m.checkpoints against references we did not write: transformers and the gguf package.

GGUF: every tensor of the real SmolLM2 file, and of a synthetic file holding one layer per ggml
type, equals what transformers' GGUF loader produces (rotary permutation undone, dequantised).
Both loaders dequantise with `gguf.quants.dequantize`, so that comparison checks our offsets,
chunked reads and row un-permutation, not the block maths; Q4_0/Q4_1/Q8_0 blocks are also
decoded here by hand with numpy.
HF: tiny random LlamaForCausalLMs survive transformers -> ours -> ours -> transformers bit for bit.
"""
import dataclasses
import json
import pathlib
import subprocess
import sys

import gguf
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

import hf_reference
from amd135m import checkpoints
from amd135m.checkpoints import (
  flatten_params,
  hf_name_to_path,
  hf_shapes,
  iter_hf_tensors,
  load_params,
  path_to_hf_name,
  read_gguf_config,
  read_header,
  read_hf_config,
  save_hf,
  write_safetensors,
)
from amd135m.errors import UserError
from amd135m.model import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)
_GGUF_OF_HF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def gguf_name(hf_name: str) -> str:
  """llama.cpp's name for an HF tensor name (written here, independently of the loader)."""
  glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
          "output_norm.weight", "lm_head.weight": "output.weight"}
  if hf_name in glob:
    return glob[hf_name]
  _, _, layer, *rest = hf_name.split(".")
  return f"blk.{layer}.{_GGUF_OF_HF['.'.join(rest[:-1])]}.weight"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """convert_hf_to_gguf.py's reordering of Q/K rows, which a loader must undo."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_rows_from_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama_cpp_permute by index bookkeeping, not by the loader's reshape."""
  return w[np.argsort(llama_cpp_permute(np.arange(w.shape[0]), n_heads))]


def transformers_gguf_state_dict(path: pathlib.Path) -> tuple[dict[str, np.ndarray], object]:
  """transformers' float32 state dict of a GGUF: the reference for our GGUF loader."""
  model = hf_reference.load_transformers_gguf(path)
  return {name: tensor.numpy() for name, tensor in model.state_dict().items()}, model.config


# ---------------------------------------------------------------------------------------------
# Names


def test_hf_names_round_trip_through_params_paths():
  config = ModelConfig(vocab_size=8, dim=4, n_layers=12, n_heads=2, n_kv_heads=1, ffn_dim=8)
  for name in hf_shapes(config):
    path = hf_name_to_path(name)
    assert path_to_hf_name(path) == name
  assert hf_name_to_path("model.layers.11.self_attn.k_proj.weight") == (
      "layers_11", "self_attn", "k_proj", "kernel")
  assert hf_name_to_path("lm_head.weight") == ("lm_head", "kernel")
  assert hf_name_to_path("model.norm.weight") == ("norm", "scale")
  assert hf_name_to_path("model.embed_tokens.weight") == ("embed_tokens", "embedding")
  assert hf_name_to_path("model.layers.2.input_layernorm.weight") == (
      "layers_2", "input_layernorm", "scale")
  for bad in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.rotary.weight", "norm"):
    with pytest.raises(ValueError):
      hf_name_to_path(bad)
  with pytest.raises(ValueError):
    path_to_hf_name(("layers_03", "mlp", "up_proj", "kernel"))
  with pytest.raises(ValueError):
    path_to_hf_name(("layers_3", "mlp", "up_proj", "weight"))


def test_checkpoints_import_no_torch_transformers_or_jax_of_their_own():
  # jax may arrive through amd135m.model (ModelConfig's home); checkpoints must add none itself.
  code = ("import sys, json; import amd135m.model; before = set(sys.modules); "
          "import amd135m.checkpoints; heavy = {'torch', 'transformers', 'jax', 'flax'}; "
          "print(json.dumps(sorted(m for m in set(sys.modules) - before "
          "if m.split('.')[0] in heavy) + sorted(m for m in ('torch', 'transformers') "
          "if m in sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  assert json.loads(out.stdout) == []


# ---------------------------------------------------------------------------------------------
# safetensors, against the reference implementation


def test_safetensors_reader_and_writer_match_the_reference(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"a": rng.normal(size=(3, 5)).astype(np.float32),
            "b": rng.normal(size=(7,)).astype(np.float16), "c": np.zeros((0, 4), np.float32),
            "d": rng.integers(-9, 9, size=(2, 2), dtype=np.int64)}
  write_safetensors(tmp_path / "ours.safetensors", arrays)
  theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
  assert theirs.keys() == arrays.keys()
  for name in arrays:
    np.testing.assert_array_equal(theirs[name], arrays[name])

  safetensors.numpy.save_file(arrays, tmp_path / "theirs.safetensors")
  entries = read_header(tmp_path / "theirs.safetensors")
  ours = {name: entry.read() for name, entry in entries.items()}
  for name in arrays:
    assert ours[name].dtype == arrays[name].dtype
    np.testing.assert_array_equal(ours[name], arrays[name])

  bf16 = torch.randn(4, 6, dtype=torch.bfloat16)
  safetensors.torch.save_file({"x": bf16}, tmp_path / "bf16.safetensors")
  ours_bf16 = read_header(tmp_path / "bf16.safetensors")["x"].read()
  assert ours_bf16.dtype == BF16
  np.testing.assert_array_equal(ours_bf16.astype(np.float32), bf16.float().numpy())
  write_safetensors(tmp_path / "ours_bf16.safetensors", {"x": ours_bf16})
  assert torch.equal(safetensors.torch.load_file(tmp_path / "ours_bf16.safetensors")["x"], bf16)


def test_truncated_or_garbage_safetensors_is_a_user_error(tmp_path):
  write_safetensors(tmp_path / "ok.safetensors", {"w": np.ones((64, 64), np.float32)})
  data = (tmp_path / "ok.safetensors").read_bytes()
  (tmp_path / "short.safetensors").write_bytes(data[:-100])
  with pytest.raises(UserError, match="truncated"):
    read_header(tmp_path / "short.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(UserError, match="bad header length"):
    read_header(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------
# Hugging Face directories: transformers -> ours -> ours -> transformers

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=5000.0)


def tiny_hf_model(tied: bool, dtype: torch.dtype, seed: int = 0) -> transformers.LlamaForCausalLM:
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tied))
  with torch.no_grad():
    for param in model.parameters():  # norms too: ones would hide a swapped norm
      param.normal_(0.0, 0.3)
  return model.to(dtype).eval()


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_round_trip_is_exact(tmp_path, tied, dtype, sharded):
  model = tiny_hf_model(tied, dtype)
  source, exported = tmp_path / "source", tmp_path / "exported"
  model.save_pretrained(source, max_shard_size="20KB" if sharded else "1GB")
  assert (source / "model.safetensors.index.json").exists() == sharded

  config, params = load_params(source)
  dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
  assert config == ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               ffn_dim=160, rope_theta=5000.0, norm_eps=1e-5, max_seq_len=128,
                               tie_embeddings=tied, dtype="float32", param_dtype=dtype_name)
  reference = model.state_dict()
  flat = flatten_params(params)
  assert set(flat) == set(reference) - ({"lm_head.weight"} if tied else set())
  for name, array in flat.items():
    assert isinstance(array, np.ndarray) and array.dtype == checkpoints.DTYPES[dtype_name]
    np.testing.assert_array_equal(array.astype(np.float32), reference[name].float().numpy())

  saved = save_hf(exported, config, params, max_shard_bytes=30_000 if sharded else 10**9)
  assert (saved.n_shards > 1) == sharded
  reloaded = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
  assert reloaded.dtype == dtype
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings",
              "tie_word_embeddings", "rope_parameters", "head_dim", "hidden_act"):
    assert getattr(reloaded.config, key) == getattr(model.config, key), key
  reloaded_state = reloaded.state_dict()
  assert reloaded_state.keys() == reference.keys()
  for name in reference:
    assert torch.equal(reloaded_state[name], reference[name]), name
  # Against the source as transformers loads it: `.to(bf16)` in memory also casts rotary buffers.
  original = transformers.LlamaForCausalLM.from_pretrained(source).eval()
  tokens = torch.tensor([[1, 5, 9, 33, 2, 70, 95, 0]])
  with torch.no_grad():
    assert torch.equal(reloaded(tokens).logits, original(tokens).logits)


class FakeTokenizer:
  """The slice of amd135m.tokenizer.Tokenizer that save_hf uses."""
  bos_id, eos_id, stop_ids = 1, 2, (2, 7)

  def save_hf(self, directory):
    (pathlib.Path(directory) / "tokenizer_was_saved").write_text("yes")


def test_save_hf_casts_streams_and_writes_generation_config(tmp_path):
  model = tiny_hf_model(tied=False, dtype=torch.float32, seed=1)
  model.save_pretrained(tmp_path / "source")
  stream = iter_hf_tensors(tmp_path / "source", dtype="bfloat16")
  assert stream.config.param_dtype == "bfloat16"
  assert all(spec.dtype == BF16 for spec in stream.specs.values())
  save_hf(tmp_path / "out", stream.config, stream, tokenizer=FakeTokenizer())

  assert (tmp_path / "out" / "tokenizer_was_saved").exists()
  generation = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
  assert generation.bos_token_id == 1 and generation.eos_token_id == [2, 7]
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
  assert reloaded.dtype == torch.bfloat16
  assert (reloaded.config.bos_token_id, reloaded.config.eos_token_id) == (1, 2)
  for name, tensor in model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name


def write_hf_dir(directory: pathlib.Path, config: ModelConfig, **overrides) -> pathlib.Path:
  """A small random checkpoint written by us, with config.json fields overridden."""
  rng = np.random.default_rng(0)
  tensors = {name: rng.normal(size=shape).astype(np.float32)
             for name, shape in hf_shapes(config).items()}
  save_hf(directory, config, tensors)
  raw = json.loads((directory / "config.json").read_text())
  raw.update(overrides)
  (directory / "config.json").write_text(json.dumps(raw))
  return directory


SMALL = ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24,
                    rope_theta=500.0, norm_eps=1e-6, max_seq_len=64)


def test_hf_config_reads_transformers_4_and_5_spellings(tmp_path):
  five = write_hf_dir(tmp_path / "five", SMALL, rope_theta=None, torch_dtype=None)
  assert read_hf_config(five).rope_theta == 500.0
  four = write_hf_dir(tmp_path / "four", SMALL, rope_parameters=None, dtype=None,
                      torch_dtype="float32", rope_theta=123.0, rope_scaling=None)
  assert read_hf_config(four) == dataclasses.replace(SMALL, rope_theta=123.0)


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "mistral"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn"),
    ({"head_dim": 8}, "head_dim"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"num_attention_heads": 3}, "n_heads 3 does not divide dim"),
    ({"dtype": "float8_e4m3fn", "torch_dtype": None}, "float8"),
    ({"quantization_config": {"quant_method": "gptq"}}, "gptq"),
])
def test_unsupported_hf_configs_are_named(tmp_path, overrides, message):
  directory = write_hf_dir(tmp_path / "m", SMALL, **overrides)
  with pytest.raises(UserError, match=message):
    load_params(directory)


def test_missing_config_or_tensor_is_a_user_error(tmp_path):
  directory = write_hf_dir(tmp_path / "m", SMALL)
  entries = {name: entry.read()
             for name, entry in read_header(directory / "model.safetensors").items()}
  del entries["model.layers.1.mlp.down_proj.weight"]
  write_safetensors(directory / "model.safetensors", entries)
  with pytest.raises(UserError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight"):
    load_params(directory)
  (directory / "config.json").unlink()
  with pytest.raises(UserError, match="config.json: no such file"):
    load_params(directory)
  with pytest.raises(UserError, match="no such file or directory"):
    load_params(tmp_path / "absent")


def test_wrong_shape_is_a_user_error(tmp_path):
  directory = write_hf_dir(tmp_path / "m", SMALL, intermediate_size=20)
  with pytest.raises(UserError, match=r"mlp.gate_proj.weight has shape \[24, 16\] but the config"):
    load_params(directory)


# ---------------------------------------------------------------------------------------------
# GGUF: the real SmolLM2 file against transformers' GGUF loader


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_hf):
  """transformers' float32 state dict of the GGUF: the reference for our GGUF loader."""
  state = {name: tensor.numpy() for name, tensor in smollm2_hf.state_dict().items()}
  return state, smollm2_hf.config


def test_smollm2_gguf_equals_transformers(smollm2_gguf, smollm2_reference):
  reference, hf_config = smollm2_reference
  tensors = iter_hf_tensors(smollm2_gguf)
  config = tensors.config
  assert config == read_gguf_config(smollm2_gguf)
  assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads,
          config.ffn_dim, config.max_seq_len, config.tie_embeddings) == (
      hf_config.vocab_size, hf_config.hidden_size, hf_config.num_hidden_layers,
      hf_config.num_attention_heads, hf_config.num_key_value_heads, hf_config.intermediate_size,
      hf_config.max_position_embeddings, hf_config.tie_word_embeddings)
  assert config.rope_theta == hf_config.rope_parameters["rope_theta"] == 100000.0
  assert config.norm_eps == pytest.approx(hf_config.rms_norm_eps)
  assert set(tensors.specs) == set(reference) - {"lm_head.weight"}  # tied: transformers aliases
  for name, array in tensors:
    assert array.dtype == np.float32, name  # Q4_1/Q8_0 dequantised, norms stored as F32
    np.testing.assert_allclose(array, reference[name], rtol=0, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# GGUF: every ggml type, in a synthetic file with one layer per type
#
# With gguf 0.19.0 `gguf.quants.quantize` implements F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
# TQ1_0, TQ2_0, MXFP4. It only dequantises Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ2_XXS, IQ2_XS, IQ3_XXS,
# IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, IQ1_M, NVFP4: for those we store random block bytes with
# every byte below 0x3C, so each float16/float32 scale inside a block is finite (its high byte is
# below the exponent-all-ones range), and the expected weights are still `dequantize` of the
# stored bytes. Q8_1, Q8_K, Q1_0, I8-I64 and F64 it does neither; they never hold llama weights
# in files llama.cpp writes (Q8_1/Q8_K are dot-product intermediates).
# The lists are computed below, so a newer gguf package widens the test by itself;
# test_ggml_types_of_real_checkpoints_are_tested fails if one drops a type files use.


def _supports(operation: str, qtype: Q) -> bool:
  try:  # 256 values: a whole number of blocks for every type
    if operation == "quantize":
      quants.quantize(np.zeros((1, 256), np.float32), qtype)
    else:
      quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    return True
  except NotImplementedError:
    return False


QUANTIZABLE = [qtype for qtype in Q
               if _supports("quantize", qtype) and _supports("dequantize", qtype)]
DEQUANT_ONLY = [qtype for qtype in Q if _supports("dequantize", qtype) and qtype not in QUANTIZABLE]
LAYER_TYPES = QUANTIZABLE + DEQUANT_ONLY  # layer i stores its seven matrices as LAYER_TYPES[i]
_PLAIN_DTYPES = {Q.F32: np.dtype(np.float32), Q.F16: np.dtype(np.float16), Q.BF16: BF16}
QUANT_CONFIG = ModelConfig(vocab_size=256, dim=256, n_layers=len(LAYER_TYPES), n_heads=4,
                           n_kv_heads=2, ffn_dim=256, rope_theta=50000.0, norm_eps=1e-5,
                           max_seq_len=512)  # 256: the k-quant and IQ block length


def _stored(weight: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
  """What the file holds for `weight` (GGUF row order) as `qtype`."""
  if qtype == Q.F32:
    return weight.astype(np.float32)
  if qtype == Q.F16:
    return weight.astype(np.float16)
  if qtype in QUANTIZABLE:
    return quants.quantize(weight, qtype)
  block, block_bytes = GGML_QUANT_SIZES[qtype]
  shape = (*weight.shape[:-1], weight.shape[-1] // block * block_bytes)
  return rng.integers(0, 0x3C, size=shape, dtype=np.uint8)


def write_llama_gguf(path: pathlib.Path, config: ModelConfig, qtype_of, seed: int = 0):
  """A llama GGUF as llama.cpp would write it: (original weights, expected HF tensors)."""
  rng = np.random.default_rng(seed)
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(config.n_layers)
  writer.add_context_length(config.max_seq_len)
  writer.add_embedding_length(config.dim)
  writer.add_feed_forward_length(config.ffn_dim)
  writer.add_head_count(config.n_heads)
  writer.add_head_count_kv(config.n_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.norm_eps)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_vocab_size(config.vocab_size)
  originals, expected = {}, {}
  for name, shape in hf_shapes(config).items():
    weight = rng.normal(size=shape).astype(np.float32)
    heads = {"self_attn.q_proj": config.n_heads, "self_attn.k_proj": config.n_kv_heads}.get(
        ".".join(name.split(".")[3:5]))
    gguf_rows = llama_cpp_permute(weight, heads) if heads else weight
    qtype = qtype_of(name)
    stored = _stored(gguf_rows, qtype, rng)
    if stored.dtype == np.uint8:
      writer.add_tensor(gguf_name(name), stored, raw_dtype=qtype)
    else:
      writer.add_tensor(gguf_name(name), stored)
    dequantised = quants.dequantize(stored, qtype).reshape(shape)
    originals[name] = weight
    expected[name] = hf_rows_from_gguf(dequantised, heads) if heads else dequantised
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return originals, expected


def _quant_type_of(name: str) -> Q:
  if name.endswith("norm.weight"):
    return Q.F32  # 1-D and short: llama.cpp keeps norms F32 too
  if name.startswith("model.layers."):
    return LAYER_TYPES[int(name.split(".")[2])]
  return {"model.embed_tokens.weight": Q.F16, "lm_head.weight": Q.Q8_0}[name]


@pytest.fixture(scope="module")
def quant_gguf(tmp_path_factory):
  path = tmp_path_factory.mktemp("quant") / "every-type.gguf"
  originals, expected = write_llama_gguf(path, QUANT_CONFIG, _quant_type_of)
  ours = dict(iter_hf_tensors(path))
  reference, _ = transformers_gguf_state_dict(path)
  return originals, expected, ours, reference


def test_quant_gguf_config_and_names(quant_gguf, tmp_path):
  *_, ours, reference = quant_gguf
  assert set(ours) == set(reference)  # untied: output.weight present, so lm_head is its own
  assert ours["model.embed_tokens.weight"].dtype == np.float16  # F16 kept as stored
  assert ours["lm_head.weight"].dtype == np.float32  # Q8_0 dequantised


@pytest.mark.parametrize("qtype", LAYER_TYPES, ids=lambda qtype: qtype.name)
def test_every_ggml_type_dequantises_like_gguf_and_transformers(quant_gguf, qtype):
  originals, expected, ours, reference = quant_gguf
  layer = LAYER_TYPES.index(qtype)
  for short in _MATRICES:
    name = f"model.layers.{layer}.{short}.weight"
    assert ours[name].dtype == _PLAIN_DTYPES.get(qtype, np.float32), name
    np.testing.assert_array_equal(ours[name].astype(np.float32), expected[name], err_msg=name)
    np.testing.assert_allclose(ours[name].astype(np.float32), reference[name], rtol=0, atol=1e-6,
                               err_msg=name)
    if qtype in QUANTIZABLE:  # near what was quantised, so rows are back in HF order
      # Ternary TQ1_0/TQ2_0 keep ~0.7 correlation with Gaussian weights; misordered rows give ~0.
      correlation = np.corrcoef(ours[name].astype(np.float32).ravel(), originals[name].ravel())
      assert correlation[0, 1] > 0.6, (name, correlation[0, 1])


def test_ggml_types_of_real_checkpoints_are_tested():
  # The lists above come from what gguf implements: an upgrade must not shrink them silently.
  used = {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K}
  assert used <= set(LAYER_TYPES), sorted(q.name for q in used - set(LAYER_TYPES))
  assert {Q.Q4_0, Q.Q4_1, Q.Q8_0} <= set(QUANTIZABLE)  # real weights, not random block bytes


def _decode_blocks_by_hand(raw: np.ndarray, qtype: Q) -> np.ndarray:
  """[rows, row_bytes] uint8 -> [rows, cols] float32, from ggml's block layouts (32 weights a
  block): Q8_0 = f16 d, int8 q[32]: d*q; Q4_0 = f16 d, 16 bytes of nibbles: d*(q - 8);
  Q4_1 = f16 d, f16 m, 16 bytes: d*q + m. Low nibbles are weights 0-15, high ones 16-31."""
  block_bytes = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
  blocks = raw.reshape(-1, block_bytes)
  scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
  if qtype == Q.Q8_0:
    values = scale * blocks[:, 2:].copy().view(np.int8).astype(np.float32)
  else:
    nibbles = blocks[:, block_bytes - 16:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)  # [n, 32]
    if qtype == Q.Q4_0:
      values = scale * (q - 8)
    else:
      values = scale * q + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
  return values.reshape(raw.shape[0], -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda qtype: qtype.name)
def test_simple_quants_equal_a_decoding_written_here(qtype, tmp_path):
  path = tmp_path / "one-type.gguf"
  config = dataclasses.replace(QUANT_CONFIG, n_layers=1)
  write_llama_gguf(path, config, lambda name: Q.F32 if "norm" in name else qtype)
  raw = {tensor.name: np.array(tensor.data) for tensor in gguf.GGUFReader(path).tensors}
  loaded = dict(iter_hf_tensors(path))
  for short in _MATRICES:
    name = f"model.layers.0.{short}.weight"
    assert raw[gguf_name(name)].dtype == np.uint8, name
    by_hand = _decode_blocks_by_hand(raw[gguf_name(name)], qtype)
    heads = {"self_attn.q_proj": config.n_heads, "self_attn.k_proj": config.n_kv_heads}.get(short)
    if heads:
      by_hand = hf_rows_from_gguf(by_hand, heads)
    np.testing.assert_array_equal(loaded[name], by_hand, err_msg=name)


def _rewrite_gguf(source: pathlib.Path, target: pathlib.Path, arch: str = "llama",
                  extra_tensor: str | None = None, drop_tensor: str | None = None) -> None:
  """A copy of a small GGUF with its architecture or tensor list edited."""
  reader = gguf.GGUFReader(source)
  writer = gguf.GGUFWriter(str(target), arch)
  for key, field in reader.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
      continue
    value = field.contents()
    writer.add_key_value(key.replace("llama.", f"{arch}."), value, field.types[0],
                         field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
  for tensor in reader.tensors:
    if tensor.name != drop_tensor:
      writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
  if extra_tensor:
    writer.add_tensor(extra_tensor, np.zeros(16, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> pathlib.Path:
  config = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
  path = tmp_path_factory.mktemp("small") / "small.gguf"
  write_llama_gguf(path, config, lambda name: Q.F32 if "norm" in name else Q.Q8_0)
  return path


def test_broken_gguf_files_are_user_errors(small_gguf, tmp_path):
  data = small_gguf.read_bytes()
  (tmp_path / "magic.gguf").write_bytes(b"GGUX" + data[4:])
  with pytest.raises(UserError, match="bad magic"):
    load_params(tmp_path / "magic.gguf")
  (tmp_path / "short.gguf").write_bytes(data[: len(data) - 1000])
  with pytest.raises(UserError, match="truncated"):
    load_params(tmp_path / "short.gguf")
  (tmp_path / "header.gguf").write_bytes(data[:200])
  with pytest.raises(UserError, match="truncated"):
    load_params(tmp_path / "header.gguf")

  _rewrite_gguf(small_gguf, tmp_path / "gpt2.gguf", arch="gpt2")
  with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
    read_gguf_config(tmp_path / "gpt2.gguf")
  _rewrite_gguf(small_gguf, tmp_path / "bias.gguf", extra_tensor="blk.0.attn_q.bias")
  with pytest.raises(UserError, match="unexpected tensor 'blk.0.attn_q.bias'"):
    load_params(tmp_path / "bias.gguf")
  _rewrite_gguf(small_gguf, tmp_path / "rope.gguf", extra_tensor="rope_freqs.weight")
  with pytest.raises(UserError, match="RoPE scaling llama3"):
    load_params(tmp_path / "rope.gguf")
  _rewrite_gguf(small_gguf, tmp_path / "missing.gguf", drop_tensor="blk.1.ffn_up.weight")
  with pytest.raises(UserError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
    load_params(tmp_path / "missing.gguf")


def test_gguf_to_hf_export_loads_in_transformers(small_gguf, tmp_path):
  config, params = load_params(small_gguf, dtype="float32")
  assert config.param_dtype == "float32" and not config.tie_embeddings
  save_hf(tmp_path / "hf", config, params)
  reference, _ = transformers_gguf_state_dict(small_gguf)
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
  for name, tensor in reloaded.items():
    np.testing.assert_array_equal(tensor.numpy(), reference[name], err_msg=name)

"""Low-precision inference weights: bf16, or int8 with one f32 scale per output channel.

Decode reads every weight once per token, so its time is the bytes it streams: SmolLM2's f32
weights are 541 MB, bf16 half of that, int8 a quarter.

bf16 (`to_bfloat16`): each matrix rounded to nearest even, kept in the model's layout; the CPU
kernels widen it to f32 in registers, so a bf16 product is exactly the f32 product of the
rounded weights (cpu_kernels.matmul). Relative error per weight at most 2^-8.

int8 (`quantize_params`): symmetric per output channel, w ~ values * scale with scale = max |w|
/ 127 over the channel's inputs, so each weight is off by at most scale / 2. Each product
quantizes its input rows to int8 per block of 32 and takes integer dot products
(cpu_kernels.matmul_int8, llama.cpp's Q8_0 arithmetic).

Either way norms, attention, the KV cache, the residual stream and the accumulation stay f32.
Used as the target's own low-precision copy drafting for it (speculative.load_draft('int8' or
'bf16')): the same model in fewer bytes, that nearly always predicts what the f32 one does.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np

from amd135m.model_config import ModelConfig


@flax.struct.dataclass
class Int8Weight:
  """A weight as int8 `values` [out, in] (a Linear kernel transposed; the embedding [V, D] as it
  is) times `scale` [out], one f32 per output channel: a token's vector for the lookup, a
  vocabulary entry's logit for the tied head. Rows are contiguous inputs, as the kernel's integer
  dot products read them."""
  values: jax.Array  # int8 [out, in]
  scale: jax.Array   # f32 [out]

  def dequantize(self) -> jax.Array:
    """The f32 weight it stands for, [out, in]."""
    return self.values.astype(jnp.float32) * self.scale[:, None]


def quantize(w) -> Int8Weight:
  """Symmetric int8 of a 2-D f32 weight [out, in], one scale per output row: max |w| / 127 over
  the row (1 for an all-zero row), values rounded to nearest."""
  w = np.asarray(w, np.float32)
  top = np.max(np.abs(w), axis=1)
  scale = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
  values = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
  return Int8Weight(jnp.asarray(values), jnp.asarray(scale))


def quantize_params(params: dict, config: ModelConfig) -> dict:
  """The model's params with every Linear kernel (transposed to [out, in]) and the embedding as
  Int8Weight; norms stay f32. Each layer's q, k, v projections become one `qkv_proj` and gate
  and up one `gate_up_proj` (rows stacked; one scale per row as before, so the numbers are those
  of the separate weights): a decode step makes 4 kernel calls a layer instead of 7. The result
  goes wherever params go (model.forward, sampling, speculative)."""
  del config  # the layout is the same for every config: kernels [in, out], embedding [V, D]
  params = {**params}
  for name, layer in params.items():
    if name.startswith("layers_"):
      attention, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
      attention["qkv_proj"] = _stacked([attention.pop(p) for p in ("q_proj", "k_proj", "v_proj")])
      mlp["gate_up_proj"] = _stacked([mlp.pop(p) for p in ("gate_proj", "up_proj")])
      params[name] = {**layer, "self_attn": attention, "mlp": mlp}

  def convert(path, leaf):
    if isinstance(leaf, Int8Weight):  # a fused projection, quantized above
      return leaf
    name = path[-1].key
    if name == "kernel":
      return quantize(np.asarray(leaf).T)
    if name == "embedding":
      return quantize(leaf)
    return jnp.asarray(leaf)

  return jax.tree_util.tree_map_with_path(convert, params,
                                          is_leaf=lambda x: isinstance(x, Int8Weight))


def _stacked(linears: list[dict]) -> Int8Weight:
  """Several Linear kernels [in, out_i] as one int8 weight [sum out_i, in]."""
  return quantize(np.concatenate([np.asarray(p["kernel"]).T for p in linears], axis=0))


def dequantize_params(params: dict, config: ModelConfig) -> dict:
  """The f32 params that quantize_params' output stands for (kernels back to [in, out], the
  fused projections split again)."""
  q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
  params = {**params}
  for name, layer in params.items():
    if name.startswith("layers_") and "qkv_proj" in layer["self_attn"]:
      attention, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
      qkv, gate_up = attention.pop("qkv_proj"), mlp.pop("gate_up_proj")
      cuts = {"q_proj": (0, q_size), "k_proj": (q_size, q_size + kv_size),
              "v_proj": (q_size + kv_size, q_size + 2 * kv_size)}
      for proj, (start, stop) in cuts.items():
        attention[proj] = {"kernel": Int8Weight(qkv.values[start:stop], qkv.scale[start:stop])}
      for proj, (start, stop) in {"gate_proj": (0, config.ffn_dim),
                                  "up_proj": (config.ffn_dim, 2 * config.ffn_dim)}.items():
        mlp[proj] = {"kernel": Int8Weight(gate_up.values[start:stop], gate_up.scale[start:stop])}
      params[name] = {**layer, "self_attn": attention, "mlp": mlp}

  def convert(path, leaf):
    if not isinstance(leaf, Int8Weight):
      return leaf
    weight = leaf.dequantize()
    return weight.T if path[-1].key == "kernel" else weight

  return jax.tree_util.tree_map_with_path(convert, params,
                                          is_leaf=lambda x: isinstance(x, Int8Weight))


WEIGHTS = ("f32", "bf16", "int8")


def to_bfloat16(params: dict) -> dict:
  """The model's params with every Linear kernel and the embedding in bf16 (rounded to nearest
  even, same layout); norms stay f32."""
  def convert(path, leaf):
    if path[-1].key in ("kernel", "embedding"):
      return jnp.asarray(leaf, jnp.float32).astype(jnp.bfloat16)
    return jnp.asarray(leaf)
  return jax.tree_util.tree_map_with_path(convert, params)


def cast_weights(params: dict, config: ModelConfig, weights: str) -> dict:
  """f32 params at the precision `weights` (one of WEIGHTS) that decode reads them in."""
  if weights not in WEIGHTS:
    raise ValueError(f"weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
  if precision(params) != "f32":
    raise ValueError(f"the params are {precision(params)} already; cast from f32 weights")
  if weights == "int8":
    return quantize_params(params, config)
  if weights == "bf16":
    return to_bfloat16(params)
  return params


def precision(params: dict) -> str:
  """Which of WEIGHTS the params' matrices are stored in."""
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
  if any(isinstance(leaf, Int8Weight) for leaf in leaves):
    return "int8"
  if any(getattr(leaf, "dtype", None) == jnp.bfloat16 for leaf in leaves):
    return "bf16"
  return "f32"

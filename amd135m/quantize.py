"""Weight-only int8: the model's matrices as int8 with one f32 scale per output channel.

Decode reads every weight once per token, so its time is the bytes it streams: SmolLM2's f32
weights are 541 MB, int8 a quarter. Symmetric per output channel: w ~ values * scale with scale
= max |w| / 127 over the channel's inputs, so each weight is off by at most scale / 2. Each
product quantizes its input rows to int8 per block of 32 and takes integer dot products
(cpu_kernels.matmul_int8, llama.cpp's Q8_0 arithmetic); norms, attention, the residual stream
and the accumulation across blocks stay f32.

Used as the target's own low-precision copy drafting for it (speculative.load_draft('int8')):
the same model a quarter of the bytes, that nearly always predicts what the f32 one does.
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

  @property
  def shape(self):
    return self.values.shape

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
  Int8Weight; norms stay f32. The result goes wherever params go (model.forward, sampling,
  speculative)."""
  del config  # the layout is the same for every config: kernels [in, out], embedding [V, D]

  def convert(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return quantize(np.asarray(leaf).T)
    if name == "embedding":
      return quantize(leaf)
    return jnp.asarray(leaf)

  return jax.tree_util.tree_map_with_path(convert, params)


def dequantize_params(params: dict) -> dict:
  """The f32 params that quantize_params' output stands for (kernels back to [in, out])."""
  def convert(path, leaf):
    if not isinstance(leaf, Int8Weight):
      return leaf
    weight = leaf.dequantize()
    return weight.T if path[-1].key == "kernel" else weight

  return jax.tree_util.tree_map_with_path(convert, params,
                                          is_leaf=lambda x: isinstance(x, Int8Weight))


def is_quantized(params: dict) -> bool:
  return any(isinstance(leaf, Int8Weight) for leaf in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, Int8Weight)))

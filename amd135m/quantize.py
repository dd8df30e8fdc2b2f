"""Weight-only int8: the model's matrices as int8 with one f32 scale per output channel.

Decode reads every weight once per token, so its time is the bytes it streams: SmolLM2's f32
weights are 541 MB, int8 a quarter. Activations, norms and accumulation stay f32; each product
widens the int8 weight in registers (cpu_kernels.matmul_int8) and scales its output column.
Symmetric per output channel: w ~ values * scale with scale = max |w| / 127 over the channel's
inputs, so each weight is off by at most scale / 2.

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
  """A weight stored as int8 `values` (the f32 weight's shape and layout) times `scale`, one f32
  per output channel: per column of a Linear kernel [in, out], per row of the embedding [V, D]
  (a token's vector for the lookup, a vocabulary entry's logit for the tied head)."""
  values: jax.Array  # int8
  scale: jax.Array   # f32 [out]
  inputs_axis: int = flax.struct.field(pytree_node=False, default=0)  # the axis each scale spans

  @property
  def shape(self):
    return self.values.shape

  def dequantize(self) -> jax.Array:
    return self.values.astype(jnp.float32) * jnp.expand_dims(self.scale, self.inputs_axis)


def quantize(w, inputs_axis: int) -> Int8Weight:
  """Symmetric int8 of a 2-D f32 weight, one scale per slice along `inputs_axis` reduced (0 for
  a Linear kernel [in, out], 1 for an embedding [V, D]). An all-zero channel gets scale 1."""
  w = np.asarray(w, np.float32)
  top = np.max(np.abs(w), axis=inputs_axis)
  scale = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
  values = np.clip(np.rint(w / np.expand_dims(scale, inputs_axis)), -127, 127).astype(np.int8)
  return Int8Weight(jnp.asarray(values), jnp.asarray(scale), inputs_axis)


def quantize_params(params: dict, config: ModelConfig) -> dict:
  """The model's params with every Linear kernel and the embedding as Int8Weight; norms stay
  f32. The result goes wherever params go (model.forward, sampling, speculative)."""
  del config  # the layout is the same for every config: kernels [in, out], embedding [V, D]

  def convert(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return quantize(leaf, 0)
    if name == "embedding":
      return quantize(leaf, 1)
    return jnp.asarray(leaf)

  return jax.tree_util.tree_map_with_path(convert, params)


def is_quantized(params: dict) -> bool:
  return any(isinstance(leaf, Int8Weight) for leaf in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, Int8Weight)))

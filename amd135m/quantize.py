"""Low-precision inference weights: bf16, int8 with one f32 scale per output channel, or 4-bit.

Decode reads every weight once per token, so its time is the bytes it streams: SmolLM2's f32
weights are 541 MB, bf16 half of that, int8 a quarter, int4 under a fifth.

bf16 (`to_bfloat16`): each matrix rounded to nearest even, the Linear kernels stored as panels
of 64 output columns (Bf16Weight: a decode step reads each thread's share in a few streams), the
embedding as it is (cast_weights adds the tied head as panels: with_bf16_output_kernel); the CPU
kernels widen the weights to f32 in registers, so a bf16 product is exactly the f32 product of
the rounded weights (cpu_kernels.matmul_panels). Relative error per weight at most 2^-8.

int8 (`quantize`): symmetric per output channel, w ~ values * scale with scale = max |w| / 127
over the channel's inputs, so each weight is off by at most scale / 2. Each product quantizes
its input rows to int8 per block of 32 and takes integer dot products (cpu_kernels.matmul_int8,
llama.cpp's Q8_0 arithmetic).

int4 (`quantize_int4`): GGUF's Q4_1 arithmetic, w ~ scale * u + minimum with u in 0..15 and a
scale and minimum per output channel and block of 32 inputs (scale = (max - min) / 15 over the
block), so each weight is off by at most scale / 2; 0.75 bytes a weight with f32 scales.
SmolLM2's GGUF ships as Q4_1, so its f32 weights are such blocks already and their int4 copy
gives them back (up to f32 rounding of the scale). Products as for int8 (cpu_kernels.matmul_int4).
The embedding (and tied head) stays int8 (quantize_params says why).

f32 (`decode_layout`): the same numbers, each Linear kernel stored as panels of 32 output columns
(F32Panels) and the tied head as a transposed copy, in panels too: what f32 decode reads
(`cast_weights(..., "f32")`); every product is the row-major kernel's sum.

Either way norms, attention, the KV cache, the residual stream and the accumulation stay f32.
Used as the target's own low-precision copy drafting for it (speculative.load_draft('int8',
'int4' or 'bf16')): the same model in fewer bytes, that nearly always predicts what the f32 one
does.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np

from amd135m import cpu_kernels
from amd135m.model_config import ModelConfig


@flax.struct.dataclass
class Int8Weight:
  """A weight as int8 values [out, in] (a Linear kernel transposed; the embedding [V, D] as it
  is) times `scale` [out], one f32 per output channel: a token's vector for the lookup, a
  vocabulary entry's logit for the tied head. The values are stored in row groups
  (cpu_kernels.to_row_groups: four output rows interleaved by block of 32 inputs), the order in
  which the kernel's integer dot products read them."""
  groups: jax.Array  # int8 [ceil(out / 4), ceil(in / 32), 4, 32]
  scale: jax.Array   # f32 [out]
  inputs: int = flax.struct.field(pytree_node=False)  # in, before the padding

  @property
  def values(self) -> jax.Array:
    """The int8 values as [out, in]."""
    return cpu_kernels.from_row_groups(self.groups, self.scale.shape[0], self.inputs)

  def dequantize(self) -> jax.Array:
    """The f32 weight it stands for, [out, in]."""
    return self.values.astype(jnp.float32) * self.scale[:, None]

  def matmul(self, rows: jax.Array) -> jax.Array:
    """rows [M, in] -> [M, out] f32 (cpu_kernels.matmul_int8)."""
    return cpu_kernels.matmul_int8(rows, self.groups, self.scale)

  def lookup(self, tokens: jax.Array) -> jax.Array:
    """The rows of `tokens` (an embedding's vectors) as f32 [..., in]."""
    group, member = tokens // cpu_kernels.ROW_GROUP, tokens % cpu_kernels.ROW_GROUP
    blocks = jnp.take(self.groups, group, axis=0)                      # [..., B, 4, 32]
    rows = jnp.take_along_axis(blocks, member[..., None, None, None], axis=-2)[..., 0, :]
    rows = rows.reshape(*tokens.shape, -1)[..., :self.inputs].astype(jnp.float32)
    return rows * jnp.take(self.scale, tokens, axis=0)[..., None]

  def rows(self, start: int, stop: int) -> "Int8Weight":
    """Output rows start:stop (one of several stacked projections)."""
    return Int8Weight(cpu_kernels.to_row_groups(self.values[start:stop]),
                      self.scale[start:stop], self.inputs)


@flax.struct.dataclass
class Int4Weight:
  """A weight [out, in] in 4-bit blocks of 32 inputs (GGUF's Q4_1 arithmetic): w[n, 32b + i] =
  scale[n, b] * u + minimum[n, b], u in 0..15, 16 bytes a block (byte i holds input i in its low
  nibble and 16 + i in its high one; a partial last block is padded), stored in row groups as
  Int8Weight's values are (cpu_kernels.to_row_groups: one 64-byte line per block of four rows).
  Same orientation as Int8Weight: a Linear kernel transposed, the embedding as it is."""
  nibbles: jax.Array  # uint8 [ceil(out / 4), B, 4, 16]
  scale: jax.Array    # f32 [out, B]
  minimum: jax.Array  # f32 [out, B]
  inputs: int = flax.struct.field(pytree_node=False)  # in, before the padding

  @property
  def row_nibbles(self) -> jax.Array:
    """The nibbles as rows [out, B * 16]."""
    n, blocks = self.scale.shape
    return cpu_kernels.from_row_groups(self.nibbles, n, blocks * 16)

  def dequantize(self) -> jax.Array:
    """The f32 weight it stands for, [out, in]."""
    n, blocks = self.scale.shape
    u = cpu_kernels.unpack_nibbles(self.row_nibbles.reshape(n, blocks, 16)).astype(jnp.float32)
    weight = u * self.scale[..., None] + self.minimum[..., None]
    return weight.reshape(n, -1)[:, :self.inputs]

  def matmul(self, rows: jax.Array) -> jax.Array:
    """rows [M, in] -> [M, out] f32 (cpu_kernels.matmul_int4)."""
    return cpu_kernels.matmul_int4(rows, self.nibbles, self.scale, self.minimum)

  def rows(self, start: int, stop: int) -> "Int4Weight":
    """Output rows start:stop (one of several stacked projections)."""
    rows = self.row_nibbles[start:stop]
    return Int4Weight(cpu_kernels.to_row_groups(rows, 16), self.scale[start:stop],
                      self.minimum[start:stop], self.inputs)


@flax.struct.dataclass
class Bf16Weight:
  """A Linear kernel [in, out] in bf16, stored as panels of cpu_kernels.PANEL output columns,
  each contiguous over the inputs: a decode step's kernel reads a thread's share as one stream
  (the row-major layout streamed 1.2-1.6x slower; docs/RESULTS.md)."""
  panels: jax.Array  # bf16 [ceil(out / PANEL), in, PANEL]
  outputs: int = flax.struct.field(pytree_node=False)

  def dequantize(self) -> jax.Array:
    """The weight as f32 [out, in] (the orientation of Int8Weight's)."""
    return cpu_kernels.from_panels(self.panels, self.outputs).astype(jnp.float32).T

  def matmul(self, rows: jax.Array) -> jax.Array:
    """rows [M, in] -> [M, out] f32 (cpu_kernels.matmul_panels)."""
    return cpu_kernels.matmul_panels(rows.astype(jnp.float32), self.panels, self.outputs)


@flax.struct.dataclass
class F32Panels:
  """A Linear kernel [in, out] in f32, stored as panels of cpu_kernels.F32_PANEL output columns,
  each contiguous over the inputs: the decode layout of f32 params (decode_layout). The numbers are
  the weight's own, and every product the row-major one's sums: only the order in memory differs,
  which lets a verification's 12 rows stream the weights at nearly one row's pace
  (docs/RESULTS.md)."""
  panels: jax.Array  # f32 [ceil(out / F32_PANEL), in, F32_PANEL]
  outputs: int = flax.struct.field(pytree_node=False)

  def dequantize(self) -> jax.Array:
    """The weight as f32 [out, in] (the orientation of Int8Weight's)."""
    return cpu_kernels.from_panels(self.panels, self.outputs).T

  def matmul(self, rows: jax.Array) -> jax.Array:
    """rows [M, in] -> [M, out] f32 (cpu_kernels.matmul_panels: any number of rows through the
    kernel)."""
    return cpu_kernels.matmul_panels(rows, self.panels, self.outputs)


QUANTIZED = (Int8Weight, Int4Weight, Bf16Weight, F32Panels)  # what model.py multiplies via .matmul


def quantize(w) -> Int8Weight:
  """Symmetric int8 of a 2-D f32 weight [out, in], one scale per output row: max |w| / 127 over
  the row (1 for an all-zero row), values rounded to nearest."""
  w = np.asarray(w, np.float32)
  top = np.max(np.abs(w), axis=1)
  scale = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
  values = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
  return Int8Weight(cpu_kernels.to_row_groups(jnp.asarray(values)), jnp.asarray(scale),
                    w.shape[1])


def quantize_int4(w) -> Int4Weight:
  """4-bit blocks (Q4_1 arithmetic) of a 2-D f32 weight [out, in]: per row and block of 32
  inputs, minimum = min w, scale = (max w - min w) / 15 (0 for a constant block), u = (w -
  minimum) / scale rounded to nearest and clipped to 0..15. A partial last block is padded with
  its row's last weight (which changes neither its minimum nor its maximum)."""
  w = np.asarray(w, np.float32)
  out, inputs = w.shape
  blocks = -(-inputs // cpu_kernels.INT8_BLOCK)
  padded = np.pad(w, ((0, 0), (0, blocks * cpu_kernels.INT8_BLOCK - inputs)), mode="edge")
  padded = padded.reshape(out, blocks, cpu_kernels.INT8_BLOCK)
  low, high = padded.min(axis=-1), padded.max(axis=-1)
  scale = ((high - low) / 15.0).astype(np.float32)
  safe = np.where(scale > 0, scale, 1.0)[..., None]
  u = np.where(scale[..., None] > 0, np.clip(np.rint((padded - low[..., None]) / safe), 0, 15), 0)
  u = u.astype(np.uint8)
  nibbles = (u[..., :16] | (u[..., 16:] << 4)).reshape(out, blocks * 16)
  return Int4Weight(cpu_kernels.to_row_groups(jnp.asarray(nibbles), 16), jnp.asarray(scale),
                    jnp.asarray(low), inputs)


QUANTIZERS = {"int8": quantize, "int4": quantize_int4}


def quantize_params(params: dict, config: ModelConfig, weights: str = "int8") -> dict:
  """The model's params with every Linear kernel (transposed to [out, in]) as Int8Weight (weights
  'int8') or Int4Weight ('int4'), the embedding as Int8Weight either way, norms f32. (The tied
  head decides every token: in 4 bits it changed SmolLM2's greedy choice at ~10% of positions of
  a stdlib file, in int8 with 4-bit layers at ~2%; SmolLM2's GGUF keeps its embedding at 8 bits
  too.) Each layer's q, k, v projections become one `qkv_proj` and gate
  and up one `gate_up_proj` (rows stacked; one scale per row as before, so the numbers are those
  of the separate weights): a decode step makes 4 kernel calls a layer instead of 7. The result
  goes wherever params go (model.forward, sampling, speculative)."""
  del config  # the layout is the same for every config: kernels [in, out], embedding [V, D]
  quantizer = QUANTIZERS[weights]
  stacked = lambda linears: quantizer(  # Linear kernels [in, out_i] as one [sum out_i, in]
      np.concatenate([np.asarray(p["kernel"]).T for p in linears], axis=0))
  params = {**params}
  for name, layer in params.items():
    if name.startswith("layers_"):
      attention, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
      attention["qkv_proj"] = stacked([attention.pop(p) for p in ("q_proj", "k_proj", "v_proj")])
      mlp["gate_up_proj"] = stacked([mlp.pop(p) for p in ("gate_proj", "up_proj")])
      params[name] = {**layer, "self_attn": attention, "mlp": mlp}

  def convert(path, leaf):
    if isinstance(leaf, QUANTIZED):  # a fused projection, quantized above
      return leaf
    name = path[-1].key
    if name == "kernel":
      return quantizer(np.asarray(leaf).T)
    if name == "embedding":  # int8 for int4 too (below)
      return quantize(leaf)
    return jnp.asarray(leaf)

  return jax.tree_util.tree_map_with_path(convert, params, is_leaf=_is_quantized)


def _is_quantized(x) -> bool:
  return isinstance(x, QUANTIZED)


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
        attention[proj] = {"kernel": qkv.rows(start, stop)}
      for proj, (start, stop) in {"gate_proj": (0, config.ffn_dim),
                                  "up_proj": (config.ffn_dim, 2 * config.ffn_dim)}.items():
        mlp[proj] = {"kernel": gate_up.rows(start, stop)}
      params[name] = {**layer, "self_attn": attention, "mlp": mlp}

  def convert(path, leaf):
    if not isinstance(leaf, QUANTIZED):
      return leaf
    weight = leaf.dequantize()
    return weight.T if path[-1].key == "kernel" else weight

  return jax.tree_util.tree_map_with_path(convert, params, is_leaf=_is_quantized)


WEIGHTS = ("f32", "bf16", "int8", "int4")


def to_bfloat16(params: dict) -> dict:
  """The model's params with every Linear kernel (as a Bf16Weight: panels) and the embedding
  (as it is: the tied head reads its rows, contiguous already) in bf16, rounded to nearest even;
  norms stay f32."""
  def convert(path, leaf):
    if path[-1].key in ("kernel", "embedding"):
      rounded = jnp.asarray(leaf, jnp.float32).astype(jnp.bfloat16)
      if path[-1].key == "kernel":
        return Bf16Weight(cpu_kernels.to_panels(rounded), rounded.shape[1])
      return rounded
    return jnp.asarray(leaf)
  return jax.tree_util.tree_map_with_path(convert, params)


OUTPUT_KERNEL = "output_kernel"  # params["embed_tokens"][OUTPUT_KERNEL]: see with_output_kernel


def with_output_kernel(params: dict, config: ModelConfig) -> dict:
  """f32 params plus a copy of the tied embedding transposed, [D, V], as
  embed_tokens/output_kernel, which the output head then multiplies by (model.Embedding.attend):
  the CPU kernels stream it as a row-major product, where the table [V, D] is a dot product per
  row. SmolLM2's head, one row 3.9-4.0 -> 3.2-3.3 ms, eight rows (a speculative verification)
  6.1-6.3 -> 3.6-3.7 ms, for a second copy of the table (113 MB). Only where the CPU kernels run
  and the head is tied; a decode-time copy (training never sees it, fingerprints skip it)."""
  embed = params.get("embed_tokens", {})
  if (not config.tie_embeddings or OUTPUT_KERNEL in embed or
      getattr(embed.get("embedding"), "dtype", None) != jnp.float32 or
      not cpu_kernels.available()):
    return params
  transposed = jnp.asarray(embed["embedding"]).T.copy()
  return {**params, "embed_tokens": {**embed, OUTPUT_KERNEL: transposed}}


def without_output_kernel(params: dict) -> dict:
  """params without with_output_kernel's copy."""
  embed = params.get("embed_tokens", {})
  if OUTPUT_KERNEL not in embed:
    return params
  return {**params, "embed_tokens": {k: v for k, v in embed.items() if k != OUTPUT_KERNEL}}


def with_bf16_output_kernel(params: dict, config: ModelConfig) -> dict:
  """bf16 params (to_bfloat16) plus the tied head as Bf16Weight panels of the table transposed,
  embed_tokens/output_kernel, as with_output_kernel does for f32: the head then streams as panels
  (several streams a thread), where the table's rows as they lie are a dot product per row at
  one stream a thread. SmolLM2's head on the Intel Xeon of 2026-12-08: 4.1 -> 1.9-2.3 ms a step
  (the table ran at 13.8 GB/s), for a second copy of the table (57 MB)."""
  embed = params.get("embed_tokens", {})
  table = embed.get("embedding")
  if (not config.tie_embeddings or OUTPUT_KERNEL in embed or
      getattr(table, "dtype", None) != jnp.bfloat16 or not cpu_kernels.available()):
    return params
  kernel = Bf16Weight(cpu_kernels.to_panels(table.T), table.shape[0])
  return {**params, "embed_tokens": {**embed, OUTPUT_KERNEL: kernel}}


FUSED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}  # as quantize_params stacks them


def _f32_panels(kernel) -> "F32Panels":
  return F32Panels(cpu_kernels.to_panels(jnp.asarray(kernel), cpu_kernels.F32_PANEL),
                   kernel.shape[1])


def decode_layout(params: dict, config: ModelConfig) -> dict:
  """f32 params as CPU decode reads them, where the CPU kernels run: every Linear kernel as
  F32Panels, each layer's q, k, v as one `qkv_proj` and gate, up as one `gate_up_proj` (their
  columns side by side, as quantize_params stacks them: 4 products a layer instead of 7, a step's
  layers 18.8 -> 18.3 ms on the Intel Xeon of 2026-12-08), and the tied head's transposed copy
  (with_output_kernel) as F32Panels too. The same numbers and the same sums as the row-major
  layout: each output is summed over its inputs in order either way (a decode-time layout:
  training never sees it; plain_layout undoes it)."""
  params = with_output_kernel(params, config)
  if not cpu_kernels.available() or precision(params) != "f32":
    return params
  params = {**params}
  for name, layer in params.items():
    if not name.startswith("layers_"):
      continue
    layer = {**layer}
    for block, (fused, parts) in FUSED.items():
      if block in layer and all(part in layer[block] for part in parts):
        kernels = [layer[block][part]["kernel"] for part in parts]
        if all(getattr(k, "ndim", 0) == 2 and k.dtype == jnp.float32 for k in kernels):
          rest = {k: v for k, v in layer[block].items() if k not in parts}
          layer[block] = {**rest, fused: _f32_panels(jnp.concatenate(kernels, axis=1))}
    params[name] = layer

  def convert(path, leaf):
    if (path[-1].key in ("kernel", OUTPUT_KERNEL) and not isinstance(leaf, QUANTIZED)
        and leaf.ndim == 2 and leaf.dtype == jnp.float32):
      return _f32_panels(leaf)
    return leaf
  return jax.tree_util.tree_map_with_path(convert, params, is_leaf=_is_quantized)


def plain_layout(params: dict) -> dict:
  """decode_layout undone: Linear kernels as [in, out] arrays (the fused projections split again:
  q's width is o_proj's input, k and v halve the rest; gate and up halve theirs), no copy of the
  head."""
  params = {**without_output_kernel(params)}
  for name, layer in params.items():
    if not name.startswith("layers_"):
      continue
    layer = {**layer}
    for block, (fused, parts) in FUSED.items():
      weight = layer.get(block, {}).get(fused)
      if not isinstance(weight, F32Panels):
        continue
      columns = weight.dequantize().T                                             # [in, out]
      if fused == "qkv_proj":
        o_proj = layer[block]["o_proj"]["kernel"]
        q = o_proj.panels.shape[1] if isinstance(o_proj, F32Panels) else o_proj.shape[0]
        kv = (columns.shape[1] - q) // 2
        cuts = [0, q, q + kv, q + 2 * kv]
      else:
        cuts = [0, columns.shape[1] // 2, columns.shape[1]]
      rest = {k: v for k, v in layer[block].items() if k != fused}
      layer[block] = {**rest, **{part: {"kernel": columns[:, a:b]}
                                 for part, a, b in zip(parts, cuts, cuts[1:])}}
    params[name] = layer
  return jax.tree.map(lambda leaf: leaf.dequantize().T if isinstance(leaf, F32Panels) else leaf,
                      params, is_leaf=_is_quantized)


def cast_weights(params: dict, config: ModelConfig, weights: str) -> dict:
  """f32 params at the precision `weights` (one of WEIGHTS), in the layout decode reads them in
  (f32: decode_layout; bf16: with_bf16_output_kernel)."""
  if weights not in WEIGHTS:
    raise ValueError(f"weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
  params = plain_layout(params)
  if precision(params) != "f32":
    raise ValueError(f"the params are {precision(params)} already; cast from f32 weights")
  if weights in QUANTIZERS:
    return quantize_params(params, config, weights)
  if weights == "bf16":
    return with_bf16_output_kernel(to_bfloat16(params), config)
  return decode_layout(params, config)


def precision(params: dict) -> str:
  """Which of WEIGHTS the params' matrices are stored in."""
  leaves = jax.tree.leaves(params, is_leaf=_is_quantized)
  if any(isinstance(leaf, Int4Weight) for leaf in leaves):  # (its embedding is int8)
    return "int4"
  if any(isinstance(leaf, Int8Weight) for leaf in leaves):
    return "int8"
  if any(isinstance(leaf, Bf16Weight) or getattr(leaf, "dtype", None) == jnp.bfloat16
         for leaf in leaves):
    return "bf16"
  return "f32"

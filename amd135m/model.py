"""The Llama decoder as Flax linen modules, applied purely.

Module names mirror Hugging Face's LlamaForCausalLM and leaves follow Flax's conventions, so a
checkpoint conversion is a rename plus a transpose of linear weights:
`model.layers.3.self_attn.q_proj.weight` [out, in] is
params['layers_3']['self_attn']['q_proj']['kernel'] [in, out]; `embed_tokens.weight` is
['embed_tokens']['embedding'] [V, D]; norms' `weight` is `scale`. Kernels are [in, out] because
XLA's CPU matrix-vector product streams that layout about 1.4-2x faster (measured on this
project's 2-core machine), and decode is bound by reading the weights. quantize.py's int8 copy
stores them [out, in] instead (its integer dot products read contiguous inputs).
"""
import contextlib
import contextvars
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from amd135m import cpu_kernels
from amd135m.model_config import ModelConfig  # noqa: F401 (re-exported: model.ModelConfig)
from amd135m.quantize import Int8Weight

# ---------------------------------------------------------------------------------------------
# KV cache: an explicit pytree, passed in and returned; rollback is moving `length` back.

@flax.struct.dataclass
class Cache:
  k: tuple[jax.Array, ...]  # per layer [B, S, K, H]
  v: tuple[jax.Array, ...]  # per layer [B, S, K, H]
  length: jax.Array         # [B] int32: positions filled per row; new tokens go at length[b]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` positions, in the compute dtype."""
  shape = (batch, max_len, config.n_kv_heads, config.head_dim)
  zeros = lambda: tuple(jnp.zeros(shape, config.dtype) for _ in range(config.n_layers))
  return Cache(k=zeros(), v=zeros(), length=jnp.zeros((batch,), jnp.int32))


_SHARDING = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def logical_sharding(mesh, rules: dict):
  """While tracing inside it, `constrain` maps logical names to `mesh` axes by `rules` (name ->
  mesh axis, axes or None). Training enters it; inference never does."""
  token = _SHARDING.set((mesh, rules))
  try:
    yield
  finally:
    _SHARDING.reset(token)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Names an activation's (or a weight in use's) axes. A no-op outside `logical_sharding`;
  inside, it pins how XLA shards the value, e.g. keeps the residual stream split by batch
  rather than by the FSDP-sharded embedding dim."""
  context = _SHARDING.get()
  if context is None:
    return x
  mesh, rules = context
  spec = jax.sharding.PartitionSpec(*(None if a is None else rules.get(a) for a in axes))
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------------
# Modules. Weights keep Hugging Face's [out, in] layout and names; every one has logical axes.

def _weight(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
            init=nn.initializers.normal(0.02)) -> jax.Array:
  param_dtype = jnp.dtype(module.config.param_dtype)
  weight = module.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)
  # Where it is used, a weight is whole along FSDP's axis ('use_embed' maps to no mesh axis):
  # XLA gathers it for the matmul and reduce-scatters its gradient, as ZeRO-3 does, instead of
  # resharding the activations to match a split weight.
  return constrain(weight, tuple(f"use_{a}" for a in axes))


def _product(rows: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
  """rows [N, in] @ w [in, out], or @ w.T for w [out, in] when transposed, in the rows' dtype. A
  decode step or a speculative verification (1-8 f32 rows, unsharded) goes to cpu_kernels'
  streaming kernel on CPUs, which reads the weight once for all rows where XLA's GEMM packs it on
  every call; a bf16 weight (quantize.to_bfloat16) is widened there in registers, never copied."""
  if _SHARDING.get() is None:  # cpu_kernels.matmul passes other shapes and dtypes to XLA
    return cpu_kernels.matmul(rows, w, transposed)
  return jnp.einsum("NI,OI->NO" if transposed else "NI,IO->NO", rows, w.astype(rows.dtype))


class Linear(nn.Module):
  """y = x W with the kernel W stored [in, out]."""
  config: ModelConfig
  features: int
  axes: tuple[str, str]  # logical names of (in, out)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, in] -> [B, T, out]
    dtype = jnp.dtype(self.config.dtype)
    # A 2-D product over B*T rows: XLA's CPU backend lays out the weight gradient of the 3-D
    # einsum with transposing copies (an MLP's forward+backward ran 1.3x slower).
    rows = x.reshape(-1, x.shape[-1]).astype(dtype)                               # [B*T, in]
    if self.has_variable("params", "kernel") and isinstance(
        quantized := self.get_variable("params", "kernel"), Int8Weight):
      # quantize.quantize_params: int8 [out, in] (flax's shape check would expect [in, out])
      out = cpu_kernels.matmul_int8(rows, quantized.values, quantized.scale).astype(dtype)
    else:
      w = _weight(self, "kernel", (x.shape[-1], self.features), self.axes)
      out = _product(rows, w, transposed=False)
    return out.reshape(*x.shape[:-1], self.features)


def _fused_int8(weight: Int8Weight, x: jax.Array, dtype) -> jax.Array:
  """x [..., in] through an int8 weight holding several projections' rows (q, k, v or gate, up
  stacked as [out1 + out2 + ..., in]): one kernel call where there were two or three."""
  rows = x.reshape(-1, x.shape[-1])
  out = cpu_kernels.matmul_int8(rows, weight.values, weight.scale).astype(dtype)
  return out.reshape(*x.shape[:-1], -1)


class Embedding(nn.Module):
  config: ModelConfig

  def setup(self):
    self.embedding = _weight(self, "embedding", (self.config.vocab_size, self.config.dim),
                             ("vocab", "embed"))

  def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] int -> [B, T, D]
    # Gathered whole for the lookup (as FSDP gathers every weight): with the table split by its
    # embed dim, XLA would replicate the batch to scatter the lookup's gradient.
    if isinstance(self.embedding, Int8Weight):
      rows = jnp.take(self.embedding.values, tokens, axis=0).astype(jnp.float32)
      scale = jnp.take(self.embedding.scale, tokens, axis=0)[..., None]
      return (rows * scale).astype(self.config.dtype)
    table = constrain(self.embedding, (None, None))
    return jnp.take(table, tokens, axis=0).astype(self.config.dtype)

  def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V]: the tied output head
    dtype = jnp.dtype(self.config.dtype)
    rows = x.reshape(-1, x.shape[-1]).astype(dtype)                               # [B*T, D]
    if isinstance(self.embedding, Int8Weight):
      logits = cpu_kernels.matmul_int8(rows, self.embedding.values, self.embedding.scale)
    else:
      logits = _product(rows, self.embedding, transposed=True)
    return logits.reshape(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
    w = _weight(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones)
    x32 = x.astype(jnp.float32)  # the statistics in f32, as the reference does
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
    return w.astype(self.config.dtype) * normed.astype(self.config.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in Llama's half-split layout. x: [B, T, N, H], positions: [B, T]."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]     # [B, T, 1, H]
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x.astype(jnp.float32) * jnp.cos(angles) + rotated.astype(jnp.float32) * jnp.sin(angles)
  return out.astype(x.dtype)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_kv, cache_length, return_attention):
    """x: [B, T, D]; positions: [B, T]; mask: [B, T, S] bool; cache_kv: ([B,S,K,H],)*2 or None."""
    c = self.config
    b, t, _ = x.shape
    q_size, kv_size = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    if self.has_variable("params", "qkv_proj"):  # quantize.quantize_params fuses the three
      qkv = _fused_int8(self.get_variable("params", "qkv_proj"), x, c.dtype)
      q, k, v = jnp.split(qkv, [q_size, q_size + kv_size], axis=-1)
    else:
      q = Linear(c, q_size, ("embed", "heads"), name="q_proj")(x)
      k = Linear(c, kv_size, ("embed", "kv_heads"), name="k_proj")(x)
      v = Linear(c, kv_size, ("embed", "kv_heads"), name="v_proj")(x)
    q = rotary(q.reshape(b, t, c.n_heads, c.head_dim), positions, c.rope_theta)
    k = rotary(k.reshape(b, t, c.n_kv_heads, c.head_dim), positions, c.rope_theta)
    v = v.reshape(b, t, c.n_kv_heads, c.head_dim)
    q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
    k = constrain(k, ("act_batch", "act_seq", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))

    if cache_kv is not None:
      if return_attention:
        out, k, v, probs = _cached_attention(q, k, v, *cache_kv, cache_length, c.dtype,
                                             return_probs=True)
        self.sow("intermediates", "attention", probs)                             # [B, N, T, S]
      else:
        out, k, v = attend_cached(q, k, v, *cache_kv, cache_length, c.dtype)
      out = out.reshape(b, t, c.n_heads * c.head_dim)
      return Linear(c, c.dim, ("heads", "embed"), name="o_proj")(out), (k, v)
    new_kv = (k, v)  # this forward's own keys and values (a prefill keeps them as its cache)

    if not return_attention and c.attention != "einsum":
      # Without a cache the mask is plain causal: a fused kernel never materialises the [T, S]
      # scores (cuDNN flash attention: bf16/fp16 on NVIDIA GPUs, and it skips the masked half).
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                         implementation=_attention_impl(c.attention))
      out = out.reshape(b, t, c.n_heads * c.head_dim)
      return Linear(c, c.dim, ("heads", "embed"), name="o_proj")(out), new_kv

    if return_attention:
      out, probs = _grouped_attention(q, k, v, mask, c.dtype)                    # [B, T, N*H]
      # [B, K, G*T, S] -> [B, N, T, S]
      self.sow("intermediates", "attention", probs.reshape(b, c.n_heads, t, -1))
      return Linear(c, c.dim, ("heads", "embed"), name="o_proj")(out), new_kv
    out = _causal_attention(q, k, v, mask, c.dtype)                              # [B, T, N*H]
    return Linear(c, c.dim, ("heads", "embed"), name="o_proj")(out), new_kv


def attend_cached(q, k, v, k_cache, v_cache, length, dtype):
  """Attention of T new tokens per row to a cache that they are written into (see
  `_cached_attention`): on CPUs, for f32 and 1-8 tokens, one kernel call per layer that writes the
  cache in place and attends each query only to the slots up to its own position; else XLA's
  form, which is also the kernel's reference and gradient. Returns (out, k_cache, v_cache)."""
  if _SHARDING.get() is None and cpu_kernels.attention_applies(q, k_cache, dtype):
    return cpu_kernels.cached_attention(functools.partial(_cached_attention, dtype=dtype),
                                        q, k, v, k_cache, v_cache, length)
  return _cached_attention(q, k, v, k_cache, v_cache, length, dtype)


def _cached_attention(q, k, v, k_cache, v_cache, length, dtype, return_probs=False):
  """Writes the T new keys/values of row b at cache slots length[b] + [0, T) and attends each
  query at position length[b] + t to the slots up to it. q: [B, T, N, H]; k, v: [B, T, K, H];
  caches [B, S, K, H]. Returns (out [B, T, N, H], k_cache, v_cache[, probs [B, N, T, S]])."""
  b, t, n_heads, head_dim = q.shape
  n_kv = k_cache.shape[2]
  # A select over the whole cache rather than a per-row dynamic_update_slice: XLA lowers the
  # batched one to a scatter that it does not update in place inside the decode loop. The rows
  # are placed by a one-hot product (exact: each slot sums one value times 1), which XLA runs far
  # faster than a gather.
  slot = jnp.arange(k_cache.shape[1])[None, :] - length[:, None]                   # [B, S]
  place = (slot[:, :, None] == jnp.arange(t)[None, None, :]).astype(k_cache.dtype)
  written = ((slot >= 0) & (slot < t))[:, :, None, None]
  k_cache = jnp.where(written, jnp.einsum("BST,BTKH->BSKH", place, k.astype(place.dtype)),
                      k_cache)
  v_cache = jnp.where(written, jnp.einsum("BST,BTKH->BSKH", place, v.astype(place.dtype)),
                      v_cache)
  positions = length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]          # [B, T]
  mask = jnp.arange(k_cache.shape[1])[None, None, :] <= positions[:, :, None]     # [B, T, S]
  # Query head n = kv_head * n_groups + group, as in the reference's repeat_kv.
  q = q.reshape(b, t, n_kv, n_heads // n_kv, head_dim)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_cache.astype(q.dtype)).astype(jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(dtype), v_cache.astype(dtype))
  out = out.reshape(b, t, n_heads, head_dim)
  if return_probs:
    return out, k_cache, v_cache, probs.reshape(b, n_heads, t, -1)
  return out, k_cache, v_cache


def _grouped_attention(q, k, v, mask, dtype) -> tuple[jax.Array, jax.Array]:
  """Softmax attention without a cache, each KV head's query groups stacked as rows: plain
  batched matmuls over (B, K), whose backward XLA's CPU backend runs ~1.6x faster than the
  5-axis einsums of the cached path. q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S].
  Returns (out [B, T, N*H], probs [B, K, G*T, S] f32), row g*T + t being query head k*G + g."""
  b, t, n_heads, head_dim = q.shape
  n_kv = k.shape[2]
  groups = n_heads // n_kv
  q = jnp.transpose(q.reshape(b, t, n_kv, groups, head_dim), (0, 2, 3, 1, 4))
  q = q.reshape(b, n_kv, groups * t, head_dim)                                   # [B, K, M, H]
  k = jnp.transpose(k, (0, 2, 1, 3)).astype(q.dtype)                             # [B, K, S, H]
  v = jnp.transpose(v, (0, 2, 1, 3)).astype(dtype)                               # [B, K, S, H]
  scores = jnp.einsum("BKMH,BKSH->BKMS", q, k).astype(jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  rows_mask = jnp.tile(mask, (1, groups, 1))[:, None]                            # [B, 1, M, S]
  scores = jnp.where(rows_mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("BKMS,BKSH->BKMH", probs.astype(dtype), v)                    # [B, K, M, H]
  out = jnp.transpose(out.reshape(b, n_kv, groups, t, head_dim), (0, 3, 1, 2, 4))
  return out.reshape(b, t, n_heads * head_dim), probs


def _causal_attention(q, k, v, mask, dtype) -> jax.Array:
  """_grouped_attention by blocks of queries, for the causal mask of a forward without a cache:
  block i attends only to the keys up to its own end, so the scores above the diagonal blocks are
  never computed (fwd+bwd of one 135M layer at T=512 ran 1.6x faster here, the tiny config's 2x).
  Equal to the dense form: the skipped scores are masked there, their softmax weights exactly 0."""
  t = q.shape[1]
  blocks = next((n for n in (8, 4, 2) if t % n == 0 and t // n >= 64), 1)
  size = t // blocks
  outs = [_grouped_attention(q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size],
                             v[:, :(i + 1) * size],
                             mask[:, i * size:(i + 1) * size, :(i + 1) * size], dtype)[0]
          for i in range(blocks)]
  return outs[0] if blocks == 1 else jnp.concatenate(outs, axis=1)


ATTENTION_IMPLS = ("einsum", "cudnn")


def _attention_impl(name: str) -> str:
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention {name!r}: choose one of {list(ATTENTION_IMPLS)}")
  return name


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
    c = self.config
    if self.has_variable("params", "gate_up_proj"):  # quantize.quantize_params fuses the two
      gate, up = jnp.split(_fused_int8(self.get_variable("params", "gate_up_proj"), x, c.dtype),
                           2, axis=-1)
    else:
      gate = Linear(c, c.ffn_dim, ("embed", "mlp"), name="gate_proj")(x)
      up = Linear(c, c.ffn_dim, ("embed", "mlp"), name="up_proj")(x)
    hidden = constrain(nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
    return Linear(c, c.dim, ("mlp", "embed"), name="down_proj")(hidden)


class DecoderLayer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_kv, cache_length, return_attention):
    attn_out, new_kv = Attention(self.config, name="self_attn")(
        RMSNorm(self.config, name="input_layernorm")(x),
        positions, mask, cache_kv, cache_length, return_attention)
    x = x + attn_out
    x = x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="post_attention_layernorm")(x))
    return x, new_kv


class Llama(nn.Module):
  """Tokens in, logits out. With a cache, the T new tokens of row b sit at positions
  cache.length[b] + [0, T) and attend to everything before them; the returned cache has
  length + T (move it back to roll back). Without a cache, a plain causal forward."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, cache: Cache | None = None,
               return_attention: bool = False,
               logit_positions: jax.Array | None = None,
               cache_len: int | None = None,
               hidden_layers: tuple[int, ...] = ()):
    """logit_positions: [B, K] indices into T; when given, logits are [B, K, V] at those positions
    only (a prefill needs one position per row, and the head is a fifth of a 135M model's FLOPs).
    cache_len (without a cache): also return a cache of cache_len positions holding these T
    tokens' keys and values, as a prefill from position 0 would leave it.
    hidden_layers: also return the residual stream at these depths, concatenated in this order
    as [B, T, len(hidden_layers) * D] (Hugging Face's `hidden_states` numbering: 0 is the
    embeddings, i the output of layer i, n_layers the last layer's, before the final norm)."""
    c = self.config
    b, t = tokens.shape
    embed = Embedding(c, name="embed_tokens")
    x = constrain(embed(tokens), ("act_batch", "act_seq", "act_embed"))          # [B, T, D]

    offsets = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
    positions = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]       # [B, T]
    key_positions = jnp.arange(t if cache is None else cache.max_len, dtype=jnp.int32)
    mask = key_positions[None, None, :] <= positions[:, :, None]                 # [B, T, S]

    new_k, new_v = [], []
    hidden = {0: x}
    layer = _remat(DecoderLayer, c.remat) if cache is None else DecoderLayer
    for i in range(c.n_layers):  # unrolled: slicing stacked weights would copy them every step
      cache_kv = None if cache is None else (cache.k[i], cache.v[i])
      x, kv = layer(c, name=f"layers_{i}")(
          x, positions, mask, cache_kv, offsets, return_attention)
      x = constrain(x, ("act_batch", "act_seq", "act_embed"))
      hidden[i + 1] = x
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    bad = [i for i in hidden_layers if i not in hidden]
    if bad:
      raise ValueError(f"hidden_layers {bad}: depths run from 0 (the embeddings) to {c.n_layers}")
    if logit_positions is not None:
      x = jnp.take_along_axis(x, logit_positions[:, :, None], axis=1)                # [B, K, D]
    x = RMSNorm(c, name="norm")(x)

    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Linear(c, c.vocab_size, ("embed", "vocab"), name="lm_head")(x)
    logits = constrain(logits.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))
    if cache is not None:
      new_cache = Cache(tuple(new_k), tuple(new_v), cache.length + t)
    elif cache_len is not None:
      pad = lambda x: jnp.pad(x.astype(c.dtype), ((0, 0), (0, cache_len - t), (0, 0), (0, 0)))
      new_cache = Cache(tuple(map(pad, new_k)), tuple(map(pad, new_v)),
                        jnp.full((b,), t, jnp.int32))
    else:
      new_cache = None
    if hidden_layers:
      features = jnp.concatenate([hidden[i].astype(jnp.float32) for i in hidden_layers], -1)
      return logits, new_cache, features                                # [B, T, len * D]
    return logits, new_cache


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def _remat(layer_cls, kind: str):
  """The layer recomputed in the backward pass (training memory for FLOPs), or as is."""
  if kind == "none":
    return layer_cls
  if kind not in REMAT_POLICIES:
    raise ValueError(f"remat {kind!r}: choose 'none' or one of {sorted(REMAT_POLICIES)}")
  # return_attention (argument 6, counting self) is a Python bool that selects code paths.
  return nn.remat(layer_cls, policy=REMAT_POLICIES[kind], static_argnums=(6,))


# ---------------------------------------------------------------------------------------------
# Pure entry points.

def init_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Random parameters (normal 0.02, norms at one), as plain arrays."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return nn.meta.unbox(Llama(config).init(rng, tokens)["params"])


def logical_axes(config: ModelConfig) -> dict:
  """The logical axis names of every parameter, as a pytree of PartitionSpecs."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), tokens))["params"]
  return nn.get_partition_spec(boxed)


def forward(params: dict, config: ModelConfig, tokens: jax.Array, cache: Cache | None = None,
            logit_positions: jax.Array | None = None):
  """(logits [B, T, V] f32, new cache). See `Llama` for the cache and logit_positions."""
  return Llama(config).apply({"params": params}, tokens, cache, False, logit_positions)


def forward_with_hidden(params: dict, config: ModelConfig, tokens: jax.Array,
                        cache: Cache | None, hidden_layers: tuple[int, ...],
                        logit_positions: jax.Array | None = None):
  """As `forward`, plus the residual stream at `hidden_layers` (see `Llama`): (logits, new
  cache, hidden [B, T, len(hidden_layers) * D] f32). What a feature draft reads of its target."""
  return Llama(config).apply({"params": params}, tokens, cache, False, logit_positions,
                             hidden_layers=tuple(hidden_layers))


def prefill(params: dict, config: ModelConfig, tokens: jax.Array, cache_len: int,
            logit_positions: jax.Array | None = None, hidden_layers: tuple[int, ...] = ()):
  """A forward from position 0 without a cache that returns one: (logits, a cache of cache_len
  positions whose first T hold these tokens' keys and values, length T per row), and with
  hidden_layers the residual stream there as a third output (see `Llama`). The causal forward
  skips what a cached forward of T new tokens computes over the empty slots and masks (a
  512-token SmolLM2 prefill ran 1.2x faster here)."""
  if cache_len < tokens.shape[1]:
    raise ValueError(f"cache_len {cache_len} < {tokens.shape[1]} tokens")
  return Llama(config).apply({"params": params}, tokens, None, False, logit_positions, cache_len,
                             tuple(hidden_layers))


def forward_with_attention(params: dict, config: ModelConfig, tokens: jax.Array,
                           cache: Cache | None = None):
  """As `forward`, plus the attention probabilities of every layer: a list of [B, N, T, S]."""
  (logits, new_cache), state = Llama(config).apply(
      {"params": params}, tokens, cache, True, mutable=["intermediates"])
  inter = state["intermediates"]
  probs = [inter[f"layers_{i}"]["self_attn"]["attention"][0] for i in range(config.n_layers)]
  return logits, new_cache, probs

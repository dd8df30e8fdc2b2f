"""The Llama decoder as Flax linen modules, applied purely.

Module names mirror Hugging Face's LlamaForCausalLM and leaves follow Flax's conventions, so a
checkpoint conversion is a rename plus a transpose of linear weights:
`model.layers.3.self_attn.q_proj.weight` [out, in] is
params['layers_3']['self_attn']['q_proj']['kernel'] [in, out]; `embed_tokens.weight` is
['embed_tokens']['embedding'] [V, D]; norms' `weight` is `scale`. Kernels are [in, out] because
XLA's CPU matrix-vector product streams that layout about 1.4-2x faster (measured on this
project's 2-core machine), and decode is bound by reading the weights. quantize.py's int8 copy
stores them [out, in] instead (its integer dot products read contiguous inputs), and its f32
decode layout adds ['embed_tokens']['output_kernel'], the tied table transposed [D, V], which the
output head then reads (the same reason: a row-major product streams faster). Attention
proper, and which implementation computes it, is attention.py's.
"""
import contextlib
import contextvars
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from amd135m import attention as attention_lib, cpu_kernels, precision
from amd135m.model_config import ModelConfig  # noqa: F401 (re-exported: model.ModelConfig)
from amd135m.quantize import OUTPUT_KERNEL, QUANTIZED

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
  mesh axis, axes or None). Training enters it, and passes allow_cpu_kernels=False on a mesh of
  several devices (see `Llama`); inference never does."""
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


def _product(rows: jax.Array, w: jax.Array, *, transposed: bool, allow_cpu_kernels: bool,
             tokens_per_sequence: int | None = None) -> jax.Array:
  """rows [N, in] @ w [in, out], or @ w.T for w [out, in] when transposed, in the rows' dtype. A
  decode step or a speculative verification (1-8 f32 rows, unsharded; up to 16 where each of a
  batch's sequences has 8 or fewer new tokens) goes to cpu_kernels' streaming kernel on CPUs,
  which reads the weight once for all rows where XLA's GEMM packs it on every call; a bf16
  weight (quantize.to_bfloat16) is widened there in registers, never copied.
  allow_cpu_kernels: False where the arrays are sharded (the kernel takes whole ones).
  tokens_per_sequence: the T of the [B, T, in] the rows were flattened from."""
  if allow_cpu_kernels:  # cpu_kernels.matmul passes other shapes and dtypes to XLA
    wide = tokens_per_sequence is not None and tokens_per_sequence <= cpu_kernels.MAX_ROWS
    return cpu_kernels.matmul(rows, w, transposed, wide=wide)
  return precision.einsum("NI,OI->NO" if transposed else "NI,IO->NO", rows, w.astype(rows.dtype))


class Linear(nn.Module):
  """y = x W with the kernel W stored [in, out]."""
  config: ModelConfig
  features: int
  axes: tuple[str, str]  # logical names of (in, out)
  allow_cpu_kernels: bool = True  # see _product

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, in] -> [B, T, out]
    dtype = jnp.dtype(self.config.dtype)
    # A 2-D product over B*T rows: XLA's CPU backend lays out the weight gradient of the 3-D
    # einsum with transposing copies (an MLP's forward+backward ran 1.3x slower).
    rows = x.reshape(-1, x.shape[-1]).astype(dtype)                               # [B*T, in]
    if self.has_variable("params", "kernel") and isinstance(
        quantized := self.get_variable("params", "kernel"), QUANTIZED):
      # quantize.quantize_params: int8 or int4 [out, in] (flax's check would expect [in, out]);
      # or quantize.decode_layout's f32 panels
      out = quantized.matmul(rows).astype(dtype)
    else:
      w = _weight(self, "kernel", (x.shape[-1], self.features), self.axes)
      out = _product(rows, w, transposed=False, allow_cpu_kernels=self.allow_cpu_kernels,
                     tokens_per_sequence=x.shape[-2])
    return out.reshape(*x.shape[:-1], self.features)


def _fused_quantized(weight, x: jax.Array, dtype) -> jax.Array:
  """x [..., in] through a quantized weight holding several projections' rows (q, k, v or gate,
  up stacked as [out1 + out2 + ..., in]): one kernel call where there were two or three."""
  rows = x.reshape(-1, x.shape[-1])
  out = weight.matmul(rows).astype(dtype)
  return out.reshape(*x.shape[:-1], -1)


class Embedding(nn.Module):
  config: ModelConfig
  allow_cpu_kernels: bool = True  # for the tied head; see _product

  def setup(self):
    if self.has_variable("params", "embedding") and isinstance(
        quantized := self.get_variable("params", "embedding"), QUANTIZED):
      self.embedding = quantized  # quantize.quantize_params: no f32 shape to check it against
    else:
      self.embedding = _weight(self, "embedding", (self.config.vocab_size, self.config.dim),
                               ("vocab", "embed"))

  def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] int -> [B, T, D]
    # Gathered whole for the lookup (as FSDP gathers every weight): with the table split by its
    # embed dim, XLA would replicate the batch to scatter the lookup's gradient.
    if isinstance(self.embedding, QUANTIZED):
      return self.embedding.lookup(tokens).astype(self.config.dtype)
    table = constrain(self.embedding, (None, None))
    return jnp.take(table, tokens, axis=0).astype(self.config.dtype)

  def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V]: the tied output head
    dtype = jnp.dtype(self.config.dtype)
    rows = x.reshape(-1, x.shape[-1]).astype(dtype)                               # [B*T, D]
    if isinstance(self.embedding, QUANTIZED):
      logits = self.embedding.matmul(rows)
    elif self.has_variable("params", OUTPUT_KERNEL):  # quantize.with_output_kernel: [D, V]
      kernel = self.get_variable("params", OUTPUT_KERNEL)
      if isinstance(kernel, QUANTIZED):  # as panels (quantize.decode_layout)
        logits = kernel.matmul(rows)
      else:
        logits = _product(rows, kernel, transposed=False, allow_cpu_kernels=self.allow_cpu_kernels,
                          tokens_per_sequence=x.shape[-2])
    else:
      logits = _product(rows, self.embedding, transposed=True,
                        allow_cpu_kernels=self.allow_cpu_kernels, tokens_per_sequence=x.shape[-2])
    return logits.reshape(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
    w = _weight(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones)
    x32 = x.astype(jnp.float32)  # the statistics in f32, as the reference does
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
    return w.astype(self.config.dtype) * normed.astype(self.config.dtype)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float
                  ) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotary angles, [B, T, 1, H] each, for positions [B, T]: computed once per
  forward and shared by every layer (computed inside each layer, XLA evaluated them per query
  and key element: 3 ms a layer's rotation of a 135M train step's queries)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]     # [B, T, 1, H]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotary embedding in Llama's half-split layout. x: [B, T, N, H]; tables: rotary_tables."""
  cos, sin = tables
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return out.astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """apply_rotary at positions [B, T]. x: [B, T, N, H]."""
  return apply_rotary(x, rotary_tables(positions, x.shape[-1], theta))


class Attention(nn.Module):
  config: ModelConfig
  return_attention: bool = False  # sow the probabilities [B, N, T, S] as 'intermediates'
  allow_cpu_kernels: bool = True  # see _product and attention.attend

  @nn.compact
  def __call__(self, x, rope, mask, cache_kv, cache_length):
    """x: [B, T, D]; rope: rotary_tables at the tokens' positions; mask: [B, T, S] bool;
    cache_kv: ([B,S,K,H],)*2 or None; cache_length: [B] int32, the positions filled. Returns
    (out [B, T, D], the new (k, v))."""
    c = self.config
    b, t, _ = x.shape
    q_size, kv_size = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    linear = functools.partial(Linear, c, allow_cpu_kernels=self.allow_cpu_kernels)
    if self.has_variable("params", "qkv_proj"):  # quantize.quantize_params fuses the three
      qkv = _fused_quantized(self.get_variable("params", "qkv_proj"), x, c.dtype)
      q, k, v = jnp.split(qkv, [q_size, q_size + kv_size], axis=-1)
    else:
      q = linear(q_size, ("embed", "heads"), name="q_proj")(x)
      k = linear(kv_size, ("embed", "kv_heads"), name="k_proj")(x)
      v = linear(kv_size, ("embed", "kv_heads"), name="v_proj")(x)
    q = apply_rotary(q.reshape(b, t, c.n_heads, c.head_dim), rope)
    k = apply_rotary(k.reshape(b, t, c.n_kv_heads, c.head_dim), rope)
    v = v.reshape(b, t, c.n_kv_heads, c.head_dim)
    q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
    k = constrain(k, ("act_batch", "act_seq", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))
    out, new_kv, probs = attention_lib.attend(
        q, k, v, mask, dtype=c.dtype, cache_kv=cache_kv, cache_length=cache_length,
        impl=c.attention, return_probs=self.return_attention,
        allow_cpu_kernels=self.allow_cpu_kernels)                                 # [B, T, N*H]
    if self.return_attention:
      self.sow("intermediates", "attention", probs)                               # [B, N, T, S]
    return linear(c.dim, ("heads", "embed"), name="o_proj")(out), new_kv


class MLP(nn.Module):
  config: ModelConfig
  allow_cpu_kernels: bool = True  # see _product

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
    c = self.config
    linear = functools.partial(Linear, c, allow_cpu_kernels=self.allow_cpu_kernels)
    if self.has_variable("params", "gate_up_proj"):  # quantize.quantize_params fuses the two
      gate_up = _fused_quantized(self.get_variable("params", "gate_up_proj"), x, c.dtype)
      gate, up = jnp.split(gate_up, 2, axis=-1)
    else:
      gate = linear(c.ffn_dim, ("embed", "mlp"), name="gate_proj")(x)
      up = linear(c.ffn_dim, ("embed", "mlp"), name="up_proj")(x)
    hidden = constrain(nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
    return linear(c.dim, ("mlp", "embed"), name="down_proj")(hidden)


class DecoderLayer(nn.Module):
  config: ModelConfig
  return_attention: bool = False  # see Attention
  allow_cpu_kernels: bool = True  # see _product and attention.attend

  @nn.compact
  def __call__(self, x, rope, mask, cache_kv, cache_length):
    c = self.config
    attention = Attention(c, return_attention=self.return_attention,
                          allow_cpu_kernels=self.allow_cpu_kernels, name="self_attn")
    attn_out, new_kv = attention(RMSNorm(c, name="input_layernorm")(x), rope, mask,
                                 cache_kv, cache_length)
    x = x + attn_out
    mlp = MLP(c, allow_cpu_kernels=self.allow_cpu_kernels, name="mlp")
    x = x + mlp(RMSNorm(c, name="post_attention_layernorm")(x))
    return x, new_kv


class Llama(nn.Module):
  """Tokens in, logits out. With a cache, the T new tokens of row b sit at positions
  cache.length[b] + [0, T) and attend to everything before them; the returned cache has
  length + T (move it back to roll back). Without a cache, a plain causal forward.

  allow_cpu_kernels: the small products of a decode step or a verification, cached attention
  and f32 causal attention without a cache may go to cpu_kernels (on CPUs, for the shapes and
  dtypes they take). True for
  unsharded inference and a one-device train step; a train step on several devices
  (training.step.compile_step) passes False."""
  config: ModelConfig
  allow_cpu_kernels: bool = True

  @nn.compact
  def __call__(self, tokens: jax.Array, cache: Cache | None = None, *,
               return_attention: bool = False,
               logit_positions: jax.Array | None = None,
               cache_size: int | None = None,
               hidden_layers: tuple[int, ...] = ()):
    """return_attention: sow every layer's attention probabilities (see forward_with_attention).
    logit_positions: [B, K] indices into T; when given, logits are [B, K, V] at those positions
    only (a prefill needs one position per row, and the head is a fifth of a 135M model's FLOPs).
    cache_size (without a cache): also return a cache allocated for cache_size positions whose
    first T hold these tokens' keys and values, as a prefill from position 0 would leave it.
    hidden_layers: also return the residual stream at these depths, concatenated in this order
    as [B, T, len(hidden_layers) * D] (Hugging Face's `hidden_states` numbering: 0 is the
    embeddings, i the output of layer i, n_layers the last layer's, before the final norm)."""
    c = self.config
    b, t = tokens.shape
    embed = Embedding(c, allow_cpu_kernels=self.allow_cpu_kernels, name="embed_tokens")
    x = constrain(embed(tokens), ("act_batch", "act_seq", "act_embed"))          # [B, T, D]

    offsets = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
    positions = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]       # [B, T]
    key_positions = jnp.arange(t if cache is None else cache.max_len, dtype=jnp.int32)
    mask = key_positions[None, None, :] <= positions[:, :, None]                 # [B, T, S]
    rope = rotary_tables(positions, c.head_dim, c.rope_theta)                    # [B, T, 1, H]

    new_k, new_v = [], []
    hidden = {0: x}
    layer = _remat(DecoderLayer, c.remat) if cache is None else DecoderLayer
    # Unrolled (slicing stacked weights would copy them every step), but traced once: each layer
    # after the first reuses the first's trace (see _apply_layer). Init and the attention
    # probabilities (sown into a collection) go through the modules themselves.
    traced_once = not (self.is_initializing() or return_attention)
    for i in range(c.n_layers):
      cache_kv = None if cache is None else (cache.k[i], cache.v[i])
      if traced_once:
        x, kv = _apply_layer(self.variables["params"][f"layers_{i}"], x, rope, mask,
                             cache_kv, offsets, config=c,
                             allow_cpu_kernels=self.allow_cpu_kernels,
                             sharding=_hashable(_SHARDING.get()))
      else:
        x, kv = layer(c, return_attention=return_attention,
                      allow_cpu_kernels=self.allow_cpu_kernels, name=f"layers_{i}")(
            x, rope, mask, cache_kv, offsets)
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
      logits = Linear(c, c.vocab_size, ("embed", "vocab"),
                      allow_cpu_kernels=self.allow_cpu_kernels, name="lm_head")(x)
    logits = constrain(logits.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))
    if cache is not None:
      new_cache = Cache(tuple(new_k), tuple(new_v), cache.length + t)
    elif cache_size is not None:
      pad = lambda x: jnp.pad(x.astype(c.dtype), ((0, 0), (0, cache_size - t), (0, 0), (0, 0)))
      new_cache = Cache(tuple(map(pad, new_k)), tuple(map(pad, new_v)),
                        jnp.full((b,), t, jnp.int32))
    else:
      new_cache = None
    if hidden_layers:
      features = jnp.concatenate([hidden[i].astype(jnp.float32) for i in hidden_layers], -1)
      return logits, new_cache, features                                # [B, T, len * D]
    return logits, new_cache


@functools.partial(jax.jit, static_argnames=("config", "allow_cpu_kernels", "sharding"))
def _apply_layer(params, x, rope, mask, cache_kv, cache_length, *, config: ModelConfig,
                 allow_cpu_kernels: bool, sharding):
  """One DecoderLayer (remat-ed without a cache, as configured) as a jitted function: the 30
  layers of a 135M model are traced once instead of 30 times, and grad, remat and lowering reuse
  that trace too (a 135M train step's trace ran 15x faster). XLA inlines the calls before it
  optimizes, so the compiled program is the unrolled one (same instructions, bitwise-equal
  outputs). `sharding`: the logical_sharding context it was called in, as `_hashable` made it
  (part of the cache key, since `constrain` reads it while tracing)."""
  token = _SHARDING.set(None if sharding is None else (sharding[0], dict(sharding[1])))
  try:
    layer = _remat(DecoderLayer, config.remat) if cache_kv is None else DecoderLayer
    return layer(config, allow_cpu_kernels=allow_cpu_kernels).apply(
        {"params": params}, x, rope, mask, cache_kv, cache_length)
  finally:
    _SHARDING.reset(token)


def _hashable(context):
  """A logical_sharding context (mesh, rules dict) as a static argument: (mesh, sorted items)."""
  return None if context is None else (context[0], tuple(sorted(context[1].items())))


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
  return nn.remat(layer_cls, policy=REMAT_POLICIES[kind])


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
            logit_positions: jax.Array | None = None, *, allow_cpu_kernels: bool = True):
  """(logits [B, T, V] f32, new cache). See `Llama` for the cache, logit_positions and
  allow_cpu_kernels (False when tracing sharded, as the train step does)."""
  return Llama(config, allow_cpu_kernels=allow_cpu_kernels).apply(
      {"params": params}, tokens, cache, logit_positions=logit_positions)


def forward_with_hidden(params: dict, config: ModelConfig, tokens: jax.Array,
                        cache: Cache | None, hidden_layers: tuple[int, ...],
                        logit_positions: jax.Array | None = None):
  """As `forward`, plus the residual stream at `hidden_layers` (see `Llama`): (logits, new
  cache, hidden [B, T, len(hidden_layers) * D] f32). What a feature draft reads of its target."""
  return Llama(config).apply({"params": params}, tokens, cache, logit_positions=logit_positions,
                             hidden_layers=tuple(hidden_layers))


def prefill(params: dict, config: ModelConfig, tokens: jax.Array, cache_size: int,
            logit_positions: jax.Array | None = None, hidden_layers: tuple[int, ...] = ()):
  """A forward from position 0 without a cache that returns one: (logits, a cache allocated for
  cache_size positions whose first T hold these tokens' keys and values, length T per row), and
  with hidden_layers the residual stream there as a third output (see `Llama`). The causal forward
  skips what a cached forward of T new tokens computes over the empty slots and masks (a
  512-token SmolLM2 prefill ran 1.2x faster here)."""
  if cache_size < tokens.shape[1]:
    raise ValueError(f"cache_size {cache_size} < {tokens.shape[1]} tokens")
  return Llama(config).apply({"params": params}, tokens, logit_positions=logit_positions,
                             cache_size=cache_size, hidden_layers=tuple(hidden_layers))


def forward_with_attention(params: dict, config: ModelConfig, tokens: jax.Array,
                           cache: Cache | None = None):
  """As `forward`, plus the attention probabilities of every layer: a list of [B, N, T, S]."""
  (logits, new_cache), state = Llama(config).apply(
      {"params": params}, tokens, cache, return_attention=True, mutable=["intermediates"])
  inter = state["intermediates"]
  probs = [inter[f"layers_{i}"]["self_attn"]["attention"][0] for i in range(config.n_layers)]
  return logits, new_cache, probs

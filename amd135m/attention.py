"""Softmax attention after rotary, and the choice of how to compute it: one entry, `attend`.

Without a cache the mask is plain causal: a fused kernel (cuDNN) where the config asks for one,
cpu_kernels' blocked kernel (f32 on CPUs, unsharded), else the queries in blocks that skip the
scores above the diagonal. With a cache the new keys and values are written into it first:
cpu_kernels' kernel where the caller allows it and it applies, else XLA's form. Returning the
probabilities takes the dense forms, which hold them.
"""
import functools

import jax
import jax.numpy as jnp

from amd135m import cpu_kernels, precision

ATTENTION_IMPLS = ("einsum", "cudnn")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, dtype,
           cache_kv: tuple[jax.Array, jax.Array] | None = None,
           cache_length: jax.Array | None = None, impl: str = "einsum",
           return_probs: bool = False, allow_cpu_kernels: bool = False):
  """Attention of T new queries per row. q: [B, T, N, H]; k, v: [B, T, K, H], these tokens'.

  Without a cache, mask [B, T, S=T] is causal. With cache_kv ([B, S, K, H],)*2, the new keys and
  values go at slots cache_length[b] + [0, T) (cache_length: [B] int32, the filled positions) and
  each query attends to the slots up to its own position (mask is not read). impl ('einsum' or
  'cudnn', ATTENTION_IMPLS) picks the cacheless form; allow_cpu_kernels lets either form go to
  cpu_kernels where it applies (f32; unsharded arrays only). Returns (out [B, T, N*H], kv,
  probs): kv the written cache or, without one, (k, v) themselves (a prefill keeps them as its
  cache); probs [B, N, T, S] f32 when return_probs, else None."""
  b, t, n_heads, head_dim = q.shape
  if cache_kv is not None:
    if return_probs:
      out, k, v, probs = _cached_attention(q, k, v, *cache_kv, cache_length, dtype,
                                           return_probs=True)                  # [B, N, T, S]
    else:
      out, k, v = attend_cached(q, k, v, *cache_kv, cache_length, dtype,
                                allow_cpu_kernels=allow_cpu_kernels)
      probs = None
    return out.reshape(b, t, n_heads * head_dim), (k, v), probs

  if not return_probs and impl != "einsum":
    # Without a cache the mask is plain causal: a fused kernel never materialises the [T, S]
    # scores (cuDNN flash attention: bf16/fp16 on NVIDIA GPUs, and it skips the masked half).
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       implementation=_attention_impl(impl))
    return out.reshape(b, t, n_heads * head_dim), (k, v), None

  if (not return_probs and allow_cpu_kernels
      and cpu_kernels.causal_attention_applies(q, k, dtype)):
    # One kernel call, forward and backward (blocks in local buffers, FlashAttention's way):
    # XLA's blocked form below transposed and copied the keys for every query block, 1.6x the
    # kernel's time for a 135M layer's forward and backward (docs/RESULTS.md).
    out = cpu_kernels.causal_attention(q, k, v)                                   # [B, T, N, H]
    return out.reshape(b, t, n_heads * head_dim), (k, v), None
  if return_probs:
    out, probs = grouped_attention(q, k, v, mask, dtype)                        # [B, T, N*H]
    # [B, K, G*T, S] -> [B, N, T, S]
    return out, (k, v), probs.reshape(b, n_heads, t, -1)
  return _causal_attention(q, k, v, mask, dtype), (k, v), None                    # [B, T, N*H]


def attend_cached(q, k, v, k_cache, v_cache, length, dtype, *, allow_cpu_kernels: bool):
  """Attention of T new tokens per row to a cache that they are written into (see
  `_cached_attention`): on CPUs, for f32 and 1-8 tokens, one kernel call per layer that writes the
  cache in place and attends each query only to the slots up to its own position; else XLA's
  form, which is also the kernel's reference and gradient. allow_cpu_kernels: False where the
  arrays are sharded (the kernel takes whole ones). Returns (out, k_cache, v_cache)."""
  if allow_cpu_kernels and cpu_kernels.attention_applies(q, k_cache, dtype):
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
  scores = precision.einsum("BTKGH,BSKH->BKGTS", q, k_cache.astype(q.dtype)).astype(jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = precision.einsum("BKGTS,BSKH->BTKGH", probs.astype(dtype), v_cache.astype(dtype))
  out = out.reshape(b, t, n_heads, head_dim)
  if return_probs:
    return out, k_cache, v_cache, probs.reshape(b, n_heads, t, -1)
  return out, k_cache, v_cache


def grouped_attention(q, k, v, mask, dtype) -> tuple[jax.Array, jax.Array]:
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
  scores = precision.einsum("BKMH,BKSH->BKMS", q, k).astype(jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  rows_mask = jnp.tile(mask, (1, groups, 1))[:, None]                            # [B, 1, M, S]
  scores = jnp.where(rows_mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = precision.einsum("BKMS,BKSH->BKMH", probs.astype(dtype), v)               # [B, K, M, H]
  out = jnp.transpose(out.reshape(b, n_kv, groups, t, head_dim), (0, 3, 1, 2, 4))
  return out.reshape(b, t, n_heads * head_dim), probs


def _causal_attention(q, k, v, mask, dtype) -> jax.Array:
  """grouped_attention by blocks of queries, for the causal mask of a forward without a cache:
  block i attends only to the keys up to its own end, so the scores above the diagonal blocks are
  never computed (fwd+bwd of one 135M layer at T=512 ran 1.6x faster here, the tiny config's 2x).
  Equal to the dense form: the skipped scores are masked there, their softmax weights exactly 0."""
  t = q.shape[1]
  blocks = next((n for n in (8, 4, 2) if t % n == 0 and t // n >= 64), 1)
  size = t // blocks
  if blocks > 1:
    # Each block reads a prefix of the keys and values, so their gradient is a sum of the
    # blocks' parts: taken in f32 (widened here, rounded back per block, exactly), that sum
    # rounds to bf16 once instead of at each of its adds, which XLA's CPU backend also ran as
    # chains of slow converts (~0.5 s of a 2.4 s bf16 135M step on a 2-core Intel Xeon).
    wide = jnp.promote_types(k.dtype, jnp.float32)
    k, v = k.astype(wide), v.astype(wide)
  outs = [grouped_attention(q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size],
                             v[:, :(i + 1) * size],
                             mask[:, i * size:(i + 1) * size, :(i + 1) * size], dtype)[0]
          for i in range(blocks)]
  return outs[0] if blocks == 1 else jnp.concatenate(outs, axis=1)


def _attention_impl(name: str) -> str:
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention {name!r}: choose one of {list(ATTENTION_IMPLS)}")
  return name

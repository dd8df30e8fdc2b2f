"""A draft reading its target's hidden states (EAGLE, EAGLE-3) over a pruned vocabulary (FR-Spec).

Per position i the draft sees the target's residual stream at a few depths (`feature_layers`,
fused by one projection into g_i) and the embedding of the next token t_{i+1} (the target's own
table, frozen); one Llama decoder layer with its own KV cache turns them into h_i, and the
target's final norm and an output head over the K most frequent target tokens turn h_i into a
guess at t_{i+2}. Drafting further, the draft feeds its own h in place of the target's features
(it has none for tokens the target has not seen): g_{i+1} = h_i.

    g_i = fuse(concat(target hidden states at feature_layers))          [B, T, D]
    h_i = layer(in_proj(concat(norm(embed(t_{i+1})), norm(g_i))))        one decoder layer
    logits_i = head(norm(h_i))                                           [B, T, K] -> ids `vocab`

Li et al., EAGLE (2024): one layer on the last hidden state; EAGLE-3 (2025): low, middle and high
layers fused, trained on its own predictions ("training-time test"); Zhao et al., FR-Spec (2025):
the output head over frequent tokens only. The draft's distribution has zero mass off its K ids,
which the rejection rule handles exactly (it accepts x ~ q with probability min(1, p(x)/q(x)) and
resamples from max(0, p - q), which holds every target token outside the K).

Bookkeeping in the speculative loop (see speculative.py): the draft's cache holds positions whose
target features are known, 0 .. true_len - 1. Each round it first catches up on the positions
the last verification scored (their features arrive from the loop), then drafts on its own.
"""
import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amd135m import attention as attention_lib, model as model_lib, quantize, sampling
from amd135m.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """A feature draft's shape: the target's layer shape, which depths it reads, its vocabulary."""
  target: ModelConfig               # the target's architecture (the draft layer takes its shape)
  feature_layers: tuple[int, ...]   # depths of the target's residual stream (0 = embeddings)
  draft_vocab: int                  # K: the output head's size
  dtype: str = "float32"            # the products' inputs: float32, or bfloat16 when training
                                    # on a CPU with bf16 dots (f32 weights and sums either way)

  @property
  def layer_config(self) -> ModelConfig:
    """One decoder layer shaped like the target's, with f32 weights, computing in `dtype`."""
    return dataclasses.replace(self.target, n_layers=1, dtype=self.dtype, param_dtype="float32",
                               remat="none", attention="einsum")

  @property
  def feature_dim(self) -> int:
    return len(self.feature_layers) * self.target.dim


def eagle3_layers(n_layers: int) -> tuple[int, int, int]:
  """EAGLE-3's low, middle and high depths: after layer 2, the middle one, and n - 3."""
  return (min(2, n_layers), n_layers // 2, max(n_layers - 3, 0))


# ---------------------------------------------------------------------------------------------
# The network. `core(q, k, v) -> (out [B, T, N, H], extra)` is the attention proper, supplied by
# the caller: against a KV cache (drafting), causal (training), or the training-time test's mask.

Core = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, object]]


class _Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, core: Core):  # x [B, T, D]
    c = self.config
    b, t, _ = x.shape
    q = model_lib.Linear(c, c.n_heads * c.head_dim, ("embed", "heads"), name="q_proj")(x)
    k = model_lib.Linear(c, c.n_kv_heads * c.head_dim, ("embed", "kv_heads"), name="k_proj")(x)
    v = model_lib.Linear(c, c.n_kv_heads * c.head_dim, ("embed", "kv_heads"), name="v_proj")(x)
    q = model_lib.rotary(q.reshape(b, t, c.n_heads, c.head_dim), positions, c.rope_theta)
    k = model_lib.rotary(k.reshape(b, t, c.n_kv_heads, c.head_dim), positions, c.rope_theta)
    v = v.reshape(b, t, c.n_kv_heads, c.head_dim)
    out, extra = core(q, k, v)
    out = out.reshape(b, t, c.n_heads * c.head_dim)
    return model_lib.Linear(c, c.dim, ("heads", "embed"), name="o_proj")(out), extra


class _Layer(nn.Module):
  """A Llama decoder layer (the target's parameter names) around a supplied attention core."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, core: Core):
    c = self.config
    attn, extra = _Attention(c, name="self_attn")(
        model_lib.RMSNorm(c, name="input_layernorm")(x), positions, core)
    x = x + attn
    x = x + model_lib.MLP(c, name="mlp")(model_lib.RMSNorm(c, name="post_attention_layernorm")(x))
    return x, extra


class FeatureHead(nn.Module):
  config: HeadConfig

  def setup(self):
    c = self.config.layer_config
    self.fuse = model_lib.Linear(c, c.dim, ("features", "embed"))
    self.embed_norm = model_lib.RMSNorm(c)
    self.feature_norm = model_lib.RMSNorm(c)
    self.in_proj = model_lib.Linear(c, c.dim, ("embed2", "embed"))
    self.layer = _Layer(c)
    self.norm = model_lib.RMSNorm(c)
    self.head = self.param("head", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), (self.config.draft_vocab, c.dim))

  def __call__(self, features, embeddings, positions, core: Core = None):
    """Initialisation touches every weight: fused features through one causal step."""
    g = self.fuse_features(features)
    h, _ = self.step(g, embeddings, positions, core or _causal_core)
    return self.logits(h)

  def fuse_features(self, features: jax.Array) -> jax.Array:  # [B, T, F] -> g [B, T, D]
    return self.fuse(features)

  def step(self, g: jax.Array, embeddings: jax.Array, positions: jax.Array, core: Core):
    """g [B, T, D] (fused target features or the draft's own h), embeddings of the next tokens
    [B, T, D], positions [B, T] -> (h [B, T, D], what the core returned)."""
    x = jnp.concatenate([self.embed_norm(embeddings), self.feature_norm(g)], axis=-1)
    return self.layer(self.in_proj(x), positions, core)

  def logits(self, h: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, K] f32
    rows = self.norm(h).reshape(-1, h.shape[-1])
    out = model_lib._product(rows, self.head, transposed=True, allow_cpu_kernels=True)
    return out.reshape(*h.shape[:-1], -1).astype(jnp.float32)


def _causal_core(q, k, v):
  t = q.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))[None]
  out, _ = attention_lib.grouped_attention(q, k, v, jnp.broadcast_to(mask, (q.shape[0], t, t)),
                                        q.dtype)
  return out.reshape(q.shape), (k, v)


def _cache_core(k_cache, v_cache, length):
  """Attention to a one-layer cache that the new keys and values are written into."""
  def core(q, k, v):
    out, k_cache_new, v_cache_new = attention_lib.attend_cached(
        q, k, v, k_cache, v_cache, length, jnp.float32, allow_cpu_kernels=True)
    return out, (k_cache_new, v_cache_new)
  return core


def ttt_mask(t: int, step: int) -> np.ndarray:
  """The training-time test's attention mask for unroll step `step` over sequences of t: a
  query at position i stands for the draft's `step`-th own guess after the target's features
  ended at position p = i - step. It sees step 0's keys up to p (the positions drafting starts
  from) and, of each later step s, the key at p + s (its own chain). [t, (step + 1) * t] bool."""
  i = np.arange(t)[:, None]
  s = np.arange(t)[None, :]
  blocks = [s <= i - step] + [s == i - step + k for k in range(1, step + 1)]
  return np.concatenate(blocks, axis=1)


def _ttt_core(previous: list, mask: np.ndarray):
  """Step `len(previous)` of the training-time test: keys and values of all earlier steps."""
  def core(q, k, v):
    keys = jnp.concatenate([kv[0] for kv in previous] + [k], axis=1)
    values = jnp.concatenate([kv[1] for kv in previous] + [v], axis=1)
    full = jnp.broadcast_to(jnp.asarray(mask)[None], (q.shape[0], *mask.shape))
    out, _ = attention_lib.grouped_attention(q, keys, values, full, q.dtype)
    return out.reshape(q.shape), (k, v)
  return core


# ---------------------------------------------------------------------------------------------
# Parameters.

def init_params(config: HeadConfig, target_params: dict, vocab, rng: jax.Array) -> dict:
  """Random draft weights, except the output side, which starts as the target's own: the final
  norm's scale and, as head rows, the target's output embeddings of the K draft ids."""
  d, f = config.target.dim, config.feature_dim
  params = nn.meta.unbox(FeatureHead(config).init(
      rng, jnp.zeros((1, 1, f)), jnp.zeros((1, 1, d)), jnp.zeros((1, 1), jnp.int32))["params"])
  params = dict(params)
  params["norm"] = {"scale": jnp.asarray(target_params["norm"]["scale"], jnp.float32)}
  params["head"] = jnp.take(output_embeddings(target_params, config.target),
                            jnp.asarray(vocab, jnp.int32), axis=0).astype(jnp.float32)
  return params


def output_embeddings(target_params: dict, config: ModelConfig) -> jax.Array:
  """The target's output head as rows per token: [V, D]."""
  if config.tie_embeddings:
    return target_params["embed_tokens"]["embedding"]
  return target_params["lm_head"]["kernel"].T


def decoding_params(params: dict) -> dict:
  """The head's weights as the speculative loop reads them: every matrix in bf16 (the Linear
  kernels as quantize.Bf16Weight panels, the output head's rows as they lie), norms f32. A draft
  step streams the head's ~30 MB of f32 weights from memory (the target's stream evicts them
  between rounds), so half the bytes are faster rounds: lookup + head 1.91x -> 1.98x at the
  same acceptance (docs/RESULTS.md). The rounding moves the draft's proposals, never the
  output's exactness, which rests on the rejection rule alone."""
  rest = quantize.to_bfloat16({k: v for k, v in params.items() if k != "head"})
  return {**rest, "head": jnp.asarray(params["head"], jnp.float32).astype(jnp.bfloat16)}


def apply(params: dict, config: HeadConfig, method: str, *args):
  return FeatureHead(config).apply({"params": params}, *args, method=method)


# ---------------------------------------------------------------------------------------------
# Training forward: every position at once, unrolled on the draft's own h (training-time test).

def unrolled_logits(params: dict, config: HeadConfig, features: jax.Array, next_embeddings:
                    jax.Array, steps: int) -> tuple[list[jax.Array], list[jax.Array]]:
  """features [B, T, F] at positions 0..T-1 and the embeddings of the tokens after them [B, T, D].

  Step 0 reads the target's features everywhere: its logits at i guess t_{i+2}. Step s reads at
  position i the draft's own h of step s - 1 at i - 1, as drafting does s tokens after the
  target's features end (positions i < s have no such chain and carry garbage to be masked).
  Returns (logits [B, T, K] per step, h [B, T, D] per step)."""
  b, t, _ = features.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  g = apply(params, config, "fuse_features", features)
  previous, all_logits, all_h = [], [], []
  for step in range(steps):
    core = _ttt_core(previous, ttt_mask(t, step))
    h, kv = apply(params, config, "step", g, next_embeddings, positions, core)
    previous.append(kv)
    all_logits.append(apply(params, config, "logits", h))
    all_h.append(h)
    g = jnp.pad(h[:, :-1], ((0, 0), (1, 0), (0, 0)))  # g at i is h at i - 1
  return all_logits, all_h


# ---------------------------------------------------------------------------------------------
# The draft in the speculative loop.

@dataclasses.dataclass(frozen=True)
class FeatureDraft:
  """The feature head as a draft of speculative.speculative_generate.

  params: {"head": the head's weights, "vocab": [K] int32 target ids of the head's rows,
  "embedding": the target's input embedding table [V, D] (the target's own array, not a copy)}.
  Its state is a one-layer Cache whose length is the number of positions it holds from the
  target's features (drafted positions past it are overwritten the next round)."""
  config: HeadConfig
  forwards_per_token: int = 1  # one draft forward per drafted token

  @property
  def feature_layers(self) -> tuple[int, ...]:
    return self.config.feature_layers

  def check(self, target_config: ModelConfig) -> None:
    from amd135m.errors import UserError  # noqa: PLC0415 (keeps this module free of faces)
    mine = dataclasses.replace(self.config.target, dtype=target_config.dtype,
                               param_dtype=target_config.param_dtype, remat=target_config.remat,
                               attention=target_config.attention)
    if mine != target_config:
      raise UserError("the feature head was trained for a target of another architecture "
                      f"({self.config.target}), not this one ({target_config}): train a head for "
                      "this target (python -m amd135m.draft_head train --target ...)")

  def start(self, params, tokens, prompt_lens, cache_size: int, *, features, **target):
    """The cache after the prompts: positions 0 .. P-2 of each row, fed (the target's features at
    i, the embedding of token i + 1). Position P-1 waits for the first generated token."""
    return _start(self, params, tokens, prompt_lens, features, cache_size)

  def propose(self, params, state: model_lib.Cache, seq, seq_len, gamma, max_gamma: int, keys,
              knobs, target_vocab: int, features):
    """features [B, G+1, F]: the target's hidden states at positions state.length + j, of which
    the first seq_len - 1 - state.length are this round's news (the last verification's accepted
    positions). Returns tokens [B, G] (target ids), q [B, G, V_target], the new state."""
    config, head, vocab = self.config, params["head"], params["vocab"]
    table = params["embedding"]
    embed = lambda ids: jnp.take(table, ids, axis=0).astype(jnp.float32)
    batch, width = features.shape[0], features.shape[1]
    true_len = state.length
    # Catch up: every position with news, at once (the rest of the width is overwritten later).
    offsets = jnp.arange(width, dtype=jnp.int32)[None]
    next_ids = jnp.take_along_axis(seq, jnp.minimum(true_len[:, None] + 1 + offsets,
                                                    seq.shape[1] - 1), axis=1)
    g = apply(head, config, "fuse_features", features)
    h, (k, v) = apply(head, config, "step", g, embed(next_ids), true_len[:, None] + offsets,
                      _cache_core(state.k[0], state.v[0], true_len))
    news = seq_len - 1 - true_len                                                  # [B] >= 1
    h = jnp.take_along_axis(h, (news - 1)[:, None, None], axis=1)                  # [B, 1, D]
    cache = model_lib.Cache((k,), (v,), seq_len - 1)

    def draw(h, i):  # h [B, 1, D] -> target ids [B], q [B, V_target]
      logits = apply(head, config, "logits", h)[:, 0]                            # [B, K]
      step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
      index, q_draft = sampling.draw_with_probabilities(logits, step_keys, knobs)
      q = jnp.zeros((batch, target_vocab), jnp.float32).at[:, vocab].set(q_draft)
      return vocab[index], q

    first, q_first = draw(h, 0)

    def step(carry, i):
      cache, h, token = carry
      def run(cache):
        h_new, (k, v) = apply(head, config, "step", h, embed(token[:, None]),
                              cache.length[:, None], _cache_core(cache.k[0], cache.v[0],
                                                                 cache.length))
        return draw(h_new, i), (model_lib.Cache((k,), (v,), cache.length + 1), h_new)
      def skip(cache):  # past the current (adaptive) gamma: never looked at
        return (token, jnp.zeros((batch, target_vocab), jnp.float32)), (cache, h)
      (next_token, q), (cache, h) = jax.lax.cond(i < gamma, run, skip, cache)
      return (cache, h, next_token), (next_token, q)

    (cache, _, _), (rest, q_rest) = jax.lax.scan(step, (cache, h, first),
                                                 jnp.arange(1, max_gamma))
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    q = jnp.concatenate([q_first[:, None], jnp.swapaxes(q_rest, 0, 1)], axis=1)
    return tokens, q, cache.replace(length=seq_len - 1)


@functools.partial(jax.jit, static_argnames=("draft", "cache_size"))
def _start(draft: FeatureDraft, params, tokens, prompt_lens, features, cache_size: int):
  config = draft.config
  batch, width = tokens.shape
  next_ids = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  embeddings = jnp.take(params["embedding"], next_ids, axis=0).astype(jnp.float32)
  c = config.layer_config
  shape = (batch, cache_size, c.n_kv_heads, c.head_dim)
  empty = model_lib.Cache((jnp.zeros(shape, jnp.float32),), (jnp.zeros(shape, jnp.float32),),
                          jnp.zeros((batch,), jnp.int32))
  positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None], (batch, width))
  g = apply(params["head"], config, "fuse_features", features)
  _, (k, v) = apply(params["head"], config, "step", g, embeddings, positions,
                    _cache_core(empty.k[0], empty.v[0], empty.length))
  return model_lib.Cache((k,), (v,), prompt_lens - 1)

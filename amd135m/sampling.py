"""Generation: a jitted prefill, then a `lax.while_loop` decode over the KV cache.

Temperature, top-k, top-p and the seeds are traced values, so changing them never recompiles;
shapes are bucketed (prompt length, new-token budget) so that nearby requests share one program.
Each row has its own seed and its own stop ids, so a row's output does not depend on its batch.
"""
import dataclasses
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amd135m import model as model_lib
from amd135m.errors import UserError

PAD_ID = -1  # fills the output buffer after a row stops; never a real token id


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters.

  A pytree: the jitted loops (`decode`, speculative decoding's) take it with device scalars in
  its fields (`traced`), so a new temperature runs the same compiled program."""
  temperature: float | jax.Array = 0.0
  top_k: int | jax.Array = 0
  top_p: float | jax.Array = 1.0

  def traced(self) -> "SamplingParams":
    """The same knobs as f32 / int32 device scalars: what the jitted loops take."""
    return SamplingParams(jnp.float32(self.temperature), jnp.int32(self.top_k),
                          jnp.float32(self.top_p))

  def validate(self) -> None:
    if not 0 <= self.temperature < float("inf"):
      raise UserError(f"temperature must be a finite number >= 0 (0 means greedy), "
                      f"got {self.temperature}")
    if self.top_k < 0:
      raise UserError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")


jax.tree_util.register_dataclass(SamplingParams, data_fields=["temperature", "top_k", "top_p"],
                                 meta_fields=[])


# ---------------------------------------------------------------------------------------------
# Token choice, shared with speculative decoding so that both shape distributions the same way.

def _order_keys(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (sign-flipped bits), so thresholds can be bisected."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)  # -0.0 ties +0.0
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _smallest_key(keys: jax.Array, holds) -> jax.Array:
  """The smallest uint32 k with holds(k) for each row ([..., 1]), holds monotone in k and true
  at the row's largest key. 32 halvings of the key range, each one pass over the vocabulary:
  cheaper on CPU than sorting 49k logits (docs/RESULTS.md)."""
  lo = jnp.min(keys, axis=-1, keepdims=True)
  hi = jnp.max(keys, axis=-1, keepdims=True)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = holds(mid)
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  lo, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return hi


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """Temperature, then top-k, then top-p (the reference's order), as masked logits.

  logits: [..., V] f32; temperature > 0, top_k, top_p: traced scalars. Filtered entries are -inf.
  Top-k keeps logits >= the k-th largest; top-p keeps the tokens whose strictly larger
  neighbours hold less than top_p of the mass, i.e. the smallest prefix of the sorted
  distribution that reaches top_p (the first token always). With 0 < top_k <= FAST_TOP_K (AMD's
  settings: 10) both are decided among the row's FAST_TOP_K largest logits; otherwise, and where
  more than FAST_TOP_K logits tie at the k-th, thresholds are found by bisection.
  """
  logits = logits / temperature
  keys = _order_keys(logits)
  if logits.shape[-1] < FAST_TOP_K * _CHUNK:  # a small vocabulary: bisection is cheap
    return _filter_by_bisection(logits, keys, top_k, top_p)
  return jax.lax.cond((top_k > 0) & (top_k <= FAST_TOP_K), _filter_among_largest,
                      _filter_by_bisection, logits, keys, top_k, top_p)


# Top-k up to this many logits is decided among each row's FAST_TOP_K largest: 64 bisection passes
# over a verification's 4 x 49152 logits took 3-4 ms of a ~20 ms round on the Intel Xeon.
FAST_TOP_K = 64
_CHUNK = 64


def _filter_among_largest(logits, keys, top_k, top_p):
  """filter_logits for 0 < top_k <= FAST_TOP_K: the largest logits of each row (exact, by chunks),
  the k-th among them, and top-p over the survivors, which are among them unless more than
  FAST_TOP_K logits tie at the k-th (then bisection)."""
  values = _largest(logits, FAST_TOP_K)                                      # [..., F] descending
  largest = _order_keys(values)
  kth = jnp.take_along_axis(largest, jnp.broadcast_to(top_k - 1, largest.shape[:-1] + (1,)),
                            axis=-1)
  fits = jnp.all(jnp.sum(keys >= kth, axis=-1) <= FAST_TOP_K)

  def among_largest(logits, keys, top_k, top_p):
    valid = largest >= kth                                      # the top-k survivors, a prefix
    probs = jax.nn.softmax(jnp.where(valid, values, -jnp.inf), axis=-1)
    # each survivor's mass of strictly larger keys (ties hold the same mass above them)
    above = jnp.sum(jnp.where(largest[..., None, :] > largest[..., :, None], probs[..., None, :],
                              0.0), axis=-1)
    keep = valid & ((above < top_p) | (top_p >= 1.0))
    threshold = jnp.min(jnp.where(keep, largest, jnp.uint32(0xFFFFFFFF)), axis=-1, keepdims=True)
    return jnp.where(keys >= threshold, logits, -jnp.inf)

  return jax.lax.cond(fits, among_largest, _filter_by_bisection, logits, keys, top_k, top_p)


def _largest(x: jax.Array, k: int, chunk: int = _CHUNK) -> jax.Array:
  """The k largest of x [..., V] per row, descending: the k chunks of `chunk` whose maxima lead
  hold them (any other entry is <= k chunk maxima), so one pass over the row and XLA's TopK over
  k * chunk candidates (its f32 kernel; over uint32 keys it sorts, 30 ms for 4 x 49152)."""
  *lead, v = x.shape
  chunks = -(-v // chunk)
  flat = jnp.pad(x.reshape(-1, v), ((0, 0), (0, chunks * chunk - v)), constant_values=-jnp.inf)
  blocks = flat.reshape(-1, chunks, chunk)
  _, best = jax.lax.top_k(jnp.max(blocks, axis=-1), k)
  candidates = jnp.take_along_axis(blocks, best[..., None], axis=1).reshape(-1, k * chunk)
  return jax.lax.top_k(candidates, k)[0].reshape(*lead, k)


def _filter_by_bisection(logits, keys, top_k, top_p):
  """filter_logits for any top_k and top_p: thresholds found by bisection over the keys."""
  def top_k_threshold(keys):  # the k-th largest key: fewer than k keys lie above it
    return _smallest_key(keys, lambda k: jnp.sum(keys > k, -1, keepdims=True) < top_k)

  lowest = jnp.min(keys, axis=-1, keepdims=True)
  kth = jax.lax.cond(top_k > 0, top_k_threshold, lambda keys: lowest, keys)
  logits = jnp.where(keys >= kth, logits, -jnp.inf)
  keys = jnp.where(keys >= kth, keys, 0)

  def top_p_threshold(keys):  # the smallest key whose strictly larger keys hold < top_p
    probs = jax.nn.softmax(logits, axis=-1)
    return _smallest_key(keys, lambda k: jnp.sum(jnp.where(keys > k, probs, 0.0), -1,
                                                 keepdims=True) < top_p)

  threshold = jax.lax.cond(top_p < 1.0, top_p_threshold, lambda keys: kth, keys)
  return jnp.where(keys >= threshold, logits, -jnp.inf)


def argmax(x: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first index of the max) as a max, then the first index
  equal to it: XLA's CPU argmax, a reduce over (value, index) pairs, ran about 4x slower over a
  speculative round's 5 x 49152 logits. A row holding NaN, where jnp.argmax
  returns the NaN's index, gets the last id instead. [...] int32."""
  top = jnp.max(x, axis=-1, keepdims=True)
  ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.minimum(jnp.min(jnp.where(x == top, ids, x.shape[-1]), axis=-1), x.shape[-1] - 1)


def _shaped(logits: jax.Array, knobs: SamplingParams) -> jax.Array:
  """softmax of the filtered logits: the distribution a sampled token is drawn from. [..., V]."""
  return jax.nn.softmax(filter_logits(logits, knobs.temperature, knobs.top_k, knobs.top_p),
                        axis=-1)


def probabilities(logits: jax.Array, knobs: SamplingParams) -> jax.Array:
  """The distribution tokens are drawn from: one-hot argmax when temperature is 0. [..., V]."""
  def greedy(logits):
    return jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=jnp.float32)

  def sampled(logits):
    return _shaped(logits, knobs)

  return jax.lax.cond(knobs.temperature > 0, sampled, greedy, logits)  # greedy: no filters


def monotone_cdf(probs: jax.Array) -> jax.Array:
  """cumsum(probs) made safe for inverse-CDF sampling: XLA computes long cumsums blockwise, so
  rounding can make the sum dip or give a zero-probability token a sliver of width. Zeroing those
  entries and taking a running max gives a zero-probability token exactly its left neighbour's
  value, so `searchsorted(..., side="right")` can never land on it. [..., V]."""
  cdf = jnp.where(probs > 0, jnp.cumsum(probs, axis=-1), 0.0)
  return jax.lax.cummax(cdf, axis=cdf.ndim - 1)


def draw(probs: jax.Array, keys: jax.Array) -> jax.Array:
  """One token per row from probs [B, V] by the inverse CDF: one uniform per row rather than
  jax.random.categorical's Gumbel noise over the whole vocabulary (a draw per id).
  A zero-probability token is never drawn. Returns [B] int32."""
  cdf = monotone_cdf(probs)
  u = jax.vmap(lambda key: jax.random.uniform(key, ()))(keys) * cdf[:, -1]
  token = jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(cdf, u)
  return jnp.minimum(token, probs.shape[-1] - 1).astype(jnp.int32)


def pick(probs: jax.Array, keys: jax.Array, temperature) -> jax.Array:
  """`draw`, or the argmax when temperature is 0 (probs from `probabilities` are one-hot then, so
  both give the same token): greedy speculative rounds skip the cumsum and binary search over the
  vocabulary, which took a tenth of a first:6 speculative decode's time. Returns [B] int32."""
  return jax.lax.cond(temperature > 0, lambda p: draw(p, keys), argmax, probs)


def draw_with_probabilities(logits: jax.Array, keys: jax.Array, knobs: SamplingParams
                            ) -> tuple[jax.Array, jax.Array]:
  """A speculative draft step's token and the distribution q it came from: `probabilities`, then
  `pick`, but a greedy step takes the argmax of the logits once and makes q its one-hot.
  logits [B, V]; returns tokens [B] int32 and q [B, V] f32."""
  def sampled(logits):
    q = _shaped(logits, knobs)
    return draw(q, keys), q

  def greedy(logits):
    token = argmax(logits)
    return token, jax.nn.one_hot(token, logits.shape[-1], dtype=jnp.float32)

  return jax.lax.cond(knobs.temperature > 0, sampled, greedy, logits)


def choose_tokens(logits: jax.Array, keys: jax.Array, knobs: SamplingParams) -> jax.Array:
  """One token per row. logits: [B, V] f32; keys: [B] PRNG keys. Returns [B] int32."""
  def sample(logits):
    return draw(_shaped(logits, knobs), keys)

  def greedy(logits):
    return argmax(logits)

  # A traced branch: greedy runs skip the filters and the random numbers entirely.
  return jax.lax.cond(knobs.temperature > 0, sample, greedy, logits)


# ---------------------------------------------------------------------------------------------
# Jitted programs.

@functools.partial(jax.jit, static_argnames=("config", "cache_size"))
def prefill(params, config: model_lib.ModelConfig, tokens: jax.Array, prompt_lens: jax.Array,
            cache_size: int):
  """Runs the padded prompts through the model into a fresh cache.

  tokens: [B, P] int32 (right-padded); prompt_lens: [B] int32.
  Returns the logits at each row's last prompt token [B, V] and the cache with length = prompt_lens;
  the padded slots beyond are never attended and get overwritten by decode.
  """
  logits, cache = model_lib.prefill(params, config, tokens, cache_size,
                                    logit_positions=(prompt_lens - 1)[:, None])
  return logits[:, 0], cache.replace(length=prompt_lens)


@dataclasses.dataclass(frozen=True)
class _LoopState:
  step: jax.Array        # scalar int32: tokens produced so far (same for every row)
  tokens: jax.Array      # [B, N] int32 output buffer, PAD_ID after a row stops
  num_tokens: jax.Array  # [B] int32 tokens produced per row, its stop token included
  done: jax.Array        # [B] bool
  last: jax.Array        # [B] int32 the newest token of each row
  cache: model_lib.Cache


jax.tree_util.register_dataclass(
    _LoopState, data_fields=["step", "tokens", "num_tokens", "done", "last", "cache"],
    meta_fields=[])


@functools.partial(jax.jit, static_argnames=("config", "buffer_len"))
def decode(params, config: model_lib.ModelConfig, first_logits: jax.Array, cache: model_lib.Cache,
           max_new_tokens: jax.Array, seeds: jax.Array, stop_ids: jax.Array,
           knobs: SamplingParams, buffer_len: int):
  """The decode loop. first_logits: [B, V]; seeds: [B] uint32; stop_ids: [B, K] int32 (-1 pads);
  knobs: SamplingParams of device scalars (`traced`).

  Token i of row b is drawn with key fold_in(key(seeds[b]), i). Returns (tokens [B, buffer_len],
  num_tokens [B]). One forward per token after the first, which comes from the prefill logits.
  """
  keys = jax.vmap(jax.random.key)(seeds)

  def pick(logits, step, done):
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    token = choose_tokens(logits, step_keys, knobs)
    return jnp.where(done, PAD_ID, token)

  def record(state_tokens, num_tokens, done, token, step):
    state_tokens = jax.lax.dynamic_update_slice(state_tokens, token[:, None], (0, step))
    num_tokens = num_tokens + (~done).astype(jnp.int32)
    is_stop = jnp.any(token[:, None] == stop_ids, axis=-1)
    done = done | is_stop | (step + 1 >= max_new_tokens)
    return state_tokens, num_tokens, done

  batch = first_logits.shape[0]
  not_done = jnp.zeros((batch,), bool)
  first = pick(first_logits, 0, not_done)
  buffer = jnp.full((batch, buffer_len), PAD_ID, jnp.int32)
  buffer, num_tokens, done = record(buffer, jnp.zeros((batch,), jnp.int32), not_done, first, 0)
  state = _LoopState(jnp.int32(1), buffer, num_tokens, done, first, cache)

  def cond(s: _LoopState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: _LoopState):
    # Finished rows keep stepping with a harmless token; their output stays PAD_ID.
    feed = jnp.where(s.done, 0, s.last)[:, None]
    logits, cache = model_lib.forward(params, config, feed, s.cache)
    token = pick(logits[:, -1], s.step, s.done)
    buffer, num_tokens, done = record(s.tokens, s.num_tokens, s.done, token, s.step)
    return _LoopState(s.step + 1, buffer, num_tokens, done, jnp.where(s.done, s.last, token), cache)

  final = jax.lax.while_loop(cond, body, state)
  return final.tokens, final.num_tokens


# ---------------------------------------------------------------------------------------------
# Host-side entry point.

def bucket(n: int, minimum: int = 16) -> int:
  """The next power of two at or above n (and `minimum`): the shapes we compile for."""
  return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # new tokens per row, a stop token included when one ended the row
  stopped: list[bool]      # whether the row ended on a stop id (else it ran out of budget)
  first_token_at: float | None = None  # time.perf_counter() when the first tokens' logits were in


@dataclasses.dataclass
class Request:
  """A validated batch, padded to bucketed shapes, with per-row seeds and stop ids."""
  tokens: np.ndarray          # [B, P] int32, right-padded, P = bucket(longest prompt)
  lens: list[int]             # prompt length per row
  seeds: np.ndarray           # [B] uint32
  stops: np.ndarray           # [B, K] int32, -1 pads
  row_stops: list[list[int]]  # the same, unpadded


def prepare_request(config: model_lib.ModelConfig, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, seed: int | Sequence[int] = 0,
                    stop_ids: Sequence[int] | Sequence[Sequence[int]] = ()) -> Request:
  """Checks a request against the model (one clear UserError each) and pads it."""
  batch = len(prompts)
  if batch == 0:
    raise UserError("no prompts given")
  lens = [len(p) for p in prompts]
  if min(lens) == 0:
    raise UserError("a prompt encodes to no tokens: give non-empty text (or a tokenizer with BOS)")
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if max(lens) + max_new_tokens > config.max_seq_len:
    raise UserError(f"prompt ({max(lens)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                    f"the model's context of {config.max_seq_len}: shorten one of them")
  for row, prompt in enumerate(prompts):
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
      raise UserError(f"prompt {row} has token id {bad[0]} outside the vocabulary "
                      f"[0, {config.vocab_size}): it was encoded for another model")
  tokens = np.zeros((batch, bucket(max(lens))), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  seeds = [seed + row for row in range(batch)] if isinstance(seed, int) else list(seed)
  if len(seeds) != batch:
    raise UserError(f"{len(seeds)} seeds for {batch} prompts: give one seed or one per prompt")
  if not all(0 <= s < 2**32 for s in seeds):  # the rng takes uint32 seeds; row i uses seed + i
    raise UserError(f"seed {next(s for s in seeds if not 0 <= s < 2**32)} is out of range: "
                    f"seeds are 0 to 2**32 - 1 (row i of a batch uses seed + i)")
  stop_ids = list(stop_ids)
  row_stops = ([list(s) for s in stop_ids] if stop_ids and not isinstance(stop_ids[0], int)
               else [stop_ids] * batch)
  stops = np.full((batch, max(1, max(len(s) for s in row_stops))), -1, np.int32)
  for row, ids in enumerate(row_stops):
    stops[row, :len(ids)] = ids
  return Request(tokens, lens, np.asarray(seeds, np.uint32), stops, row_stops)


def generate(params, config: model_lib.ModelConfig, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
             seed: int | Sequence[int] = 0,
             stop_ids: Sequence[int] | Sequence[Sequence[int]] = ()) -> Generation:
  """Generates for a batch of token-id prompts of any lengths.

  seed: one int (row b uses seed + b) or one per row. stop_ids: shared, or one list per row.
  """
  sampling.validate()
  request = prepare_request(config, prompts, max_new_tokens, seed, stop_ids)
  prompt_len = request.tokens.shape[1]
  buffer_len = bucket(max_new_tokens)
  first_logits, cache = prefill(params, config, jnp.asarray(request.tokens),
                                jnp.asarray(request.lens, jnp.int32),
                                cache_size=prompt_len + buffer_len)
  jax.block_until_ready(first_logits)
  first_token_at = time.perf_counter()
  out, counts = decode(params, config, first_logits, cache, jnp.int32(max_new_tokens),
                       jnp.asarray(request.seeds), jnp.asarray(request.stops),
                       sampling.traced(), buffer_len=buffer_len)
  out, counts = np.asarray(out), np.asarray(counts)
  rows = [out[row, :counts[row]].tolist() for row in range(len(request.lens))]
  stopped = [bool(r) and r[-1] in set(request.row_stops[i]) for i, r in enumerate(rows)]
  return Generation(tokens=rows, stopped=stopped, first_token_at=first_token_at)

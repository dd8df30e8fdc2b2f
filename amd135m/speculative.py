"""Speculative decoding: one jitted `lax.while_loop` over a draft and a target.

Each iteration the draft proposes gamma tokens, the target scores all gamma + 1 positions in one
forward, and every row accepts its own prefix by the modified rejection sampling of Leviathan et
al. (2023) / Chen et al. (2023): accept x ~ q with probability min(1, p(x) / q(x)); at the first
rejection draw from normalize(max(0, p - q)); when all gamma pass, draw a bonus token from p.
With temperature 0, p and q are one-hot argmaxes and the same rule is exactly greedy verification.

Bookkeeping. Each row holds its committed sequence (prompt + accepted tokens) in `seq`, length L.
The target's cache holds seq[:L-1]; the newest token is fed at the next verification. The draft's
cache is rolled back to L-2 and fed seq[L-2:L], so a token it never saw (the last of an all-
accepted run) is filled in for the cost of one wider forward. Rollback is moving `length`.
"""
import dataclasses
import functools
import pathlib
import time
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amd135m import model as model_lib, sampling
from amd135m.errors import UserError

# ---------------------------------------------------------------------------------------------
# Drafts: `start` before the loop (on the host), `propose` inside it.


class Draft(Protocol):
  """What speculative_generate asks of a draft (ModelDraft, NgramDraft, feature_draft.FeatureDraft).

  A draft is a frozen, hashable dataclass (it is a static argument of the jitted loop); its
  weights and other arrays travel separately as `params`. Its state is any pytree."""
  forwards_per_token: int         # draft forwards per drafted token (0 for no model)
  feature_layers: tuple[int, ...]  # the target's hidden-state depths it reads (() for none)

  def check(self, target_config: model_lib.ModelConfig) -> None:
    """A UserError (one line) if this draft cannot draft for that target."""

  def start(self, params, tokens: jax.Array, prompt_lens: jax.Array, cache_size: int, *,
            target_config: model_lib.ModelConfig, target_params, target_cache: model_lib.Cache,
            features: jax.Array | None):
    """The draft's state after the prompts (tokens [B, P], right-padded). The target's prefill
    is done: its cache, and with feature_layers its hidden states [B, P, F] at every position."""

  def propose(self, params, state, seq: jax.Array, seq_len: jax.Array, gamma: jax.Array,
              max_gamma: int, keys: jax.Array, knobs: sampling.SamplingParams,
              target_vocab: int, features: jax.Array):
    """Inside the loop: gamma (traced, <= max_gamma) proposals per row after the committed
    seq[:, :seq_len], the distributions they came from, and the new state.

    features [B, max_gamma + 1, F]: the target's hidden states at positions seq_len_prev - 1 + j
    from the last verification (at the first round, slot 0 is the last prompt position's).
    Returns tokens [B, max_gamma] int32, q [B, max_gamma, target_vocab] f32 (positions >= gamma
    unused), and the state.

    A draft may also have long rounds (LookupFirstDraft): `long_gamma`, and `long_rounds(seq,
    seq_len)` -> [B] bool, the rows whose proposals past gamma, up to max_gamma, are worth
    verifying this round."""


@dataclasses.dataclass(frozen=True)
class ModelDraft:
  """A (small) Llama with its own KV cache. Its vocabulary must be an id-prefix of the target's."""
  config: model_lib.ModelConfig
  forwards_per_token: int = 1  # one draft forward per drafted token
  feature_layers: tuple[int, ...] = ()
  # The target's own weights at low precision (load_draft('int8')): the target's prompt cache is
  # the draft's too, so no second prefill.
  prompt_cache_from_target: bool = False

  def check(self, target_config: model_lib.ModelConfig) -> None:
    check_vocabularies(self.config.vocab_size, target_config.vocab_size)

  def start(self, params, tokens, prompt_lens, cache_size: int, *, target_config=None,
            target_params=None, target_cache=None, features=None):
    """The draft cache after the prompts. A draft that is the target's own first layers takes
    theirs from the target's prefill (see shares_target_layers); any other runs its own."""
    if target_cache is not None and (self.prompt_cache_from_target or shares_target_layers(
        self.config, params, target_config, target_params)):
      n_layers = self.config.n_layers
      return target_cache.replace(k=target_cache.k[:n_layers], v=target_cache.v[:n_layers])
    return _draft_init(self, params, tokens, prompt_lens, cache_size)

  def init(self, params, tokens: jax.Array, prompt_lens: jax.Array, cache_size: int):
    """The draft's own prefill. tokens: [B, P] (ids past the draft's vocabulary -> 0)."""
    tokens = jnp.where(tokens < self.config.vocab_size, tokens, 0)
    _, cache = model_lib.prefill(params, self.config, tokens, cache_size,
                                 logit_positions=(prompt_lens - 1)[:, None])
    return cache.replace(length=prompt_lens)

  def propose(self, params, cache, seq, seq_len, gamma, max_gamma: int, keys, knobs,
              target_vocab: int, features=None):
    """gamma (traced, <= max_gamma) proposals per row and the draft distributions they came from.

    Returns tokens [B, G] int32, q [B, G, V_target] f32 (zero mass past the draft's vocabulary;
    positions >= gamma are unused), and the new cache.
    """
    vocab = self.config.vocab_size
    in_vocab = lambda t: jnp.where(t < vocab, t, 0)
    last_two = jnp.take_along_axis(seq, seq_len[:, None] - 2 + jnp.arange(2)[None], axis=1)
    cache = cache.replace(length=seq_len - 2)
    logits, cache = model_lib.forward(params, self.config, in_vocab(last_two), cache,
                                      logit_positions=jnp.ones((seq.shape[0], 1), jnp.int32))

    def draw(logits, i):  # [B, V_draft] -> token [B], q [B, V_target]
      step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
      token, q = sampling.draw_with_probabilities(logits, step_keys, knobs)
      return token, jnp.pad(q, ((0, 0), (0, target_vocab - vocab)))

    first, q_first = draw(logits[:, 0], 0)

    def step(carry, i):
      cache, token = carry
      # Past the current gamma (adaptive), skip the forward: its proposal is never looked at.
      def run(cache):
        logits, cache = model_lib.forward(params, self.config, token[:, None], cache)
        return draw(logits[:, 0], i), cache
      def skip(cache):
        return (token, jnp.zeros((token.shape[0], target_vocab), jnp.float32)), cache
      (next_token, q), cache = jax.lax.cond(i < gamma, run, skip, cache)
      return (cache, next_token), (next_token, q)

    (cache, _), (rest, q_rest) = jax.lax.scan(step, (cache, first), jnp.arange(1, max_gamma))
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    q = jnp.concatenate([q_first[:, None], jnp.swapaxes(q_rest, 0, 1)], axis=1)
    return tokens, q, cache


@dataclasses.dataclass(frozen=True)
class NgramDraft:
  """Prompt lookup: no model. Find the latest earlier occurrence of the sequence's last n tokens
  (n = max_ngram down to 1: the longest match wins) and propose the tokens that followed it; q is
  one-hot on them. max_ngram 6 rather than 2: a longer match is right more often (HumanEval
  prompts, SmolLM2, gamma 3 behind a feature head: 2.52 -> 2.67 tokens per target call;
  docs/RESULTS.md)."""
  max_ngram: int = 6
  forwards_per_token: int = 0  # no model
  feature_layers: tuple[int, ...] = ()

  def check(self, target_config: model_lib.ModelConfig) -> None:
    pass  # any target: it proposes the sequence's own tokens

  def start(self, params, tokens, prompt_lens, cache_size: int, **target):
    return ()

  def propose(self, params, state, seq, seq_len, gamma, max_gamma: int, keys, knobs,
              target_vocab: int, features=None):
    tokens, _ = self.lookup(seq, seq_len, max_gamma)
    return tokens, jax.nn.one_hot(tokens, target_vocab, dtype=jnp.float32), state

  def lookup(self, seq, seq_len, max_gamma: int, min_ngram: int = 1):
    """(tokens [B, max_gamma], found [B]): the continuation of the latest match of the last n
    tokens, n = max_ngram down to min_ngram; without one (found False), the last token again."""
    batch, width = seq.shape
    positions = jnp.arange(width)
    # For each n, the start j of the latest match seq[j:j+n] == seq[L-n:L] with j + n < L.
    best = jnp.full((batch,), -1, jnp.int32)
    for n in range(min_ngram, self.max_ngram + 1):  # longer n found later wins: more specific
      tail = jnp.take_along_axis(seq, seq_len[:, None] - n + jnp.arange(n)[None], axis=1)
      match = jnp.ones((batch, width), bool)
      for k in range(n):
        shifted = jnp.roll(seq, -k, axis=1)
        match &= shifted == tail[:, k:k + 1]
      match &= (positions[None] + n < seq_len[:, None]) & (seq_len[:, None] >= n + 1)
      latest = jnp.max(jnp.where(match, positions[None], -1), axis=1)
      best = jnp.where(latest >= 0, latest + n, best)  # where the continuation starts
    # Without any match, propose the last token again (rejected, unless the text repeats).
    start = jnp.where(best >= 0, best, seq_len - 1)
    offsets = start[:, None] + jnp.arange(max_gamma)[None]
    # A continuation may run into the newest tokens; past L it repeats the last one.
    offsets = jnp.minimum(offsets, seq_len[:, None] - 1)
    return jnp.take_along_axis(seq, offsets, axis=1), best >= 0


@dataclasses.dataclass(frozen=True)
class LookupFirstDraft:
  """Prompt lookup where the text repeats itself, another draft (`inner`) elsewhere: per row and
  round, the n-gram continuation when the last `min_ngram`..6 tokens occurred before (the longest
  match), else the inner draft's proposals (code repeats names and lines a model-drafted token
  rarely guesses; a feature head guesses what lookup cannot find). The choice depends on the
  committed text only, so q (one-hot, or the inner draft's distribution) is the distribution each
  proposal was drawn from and the rejection rule stays exact. The inner draft runs every round (a
  feature head must catch up on the verification's features), but drafts a single token when every
  row has a lookup. A feature head catches up on every committed position from those features, so
  accepted lookups leave its state right; a ModelDraft re-reads only the last two committed tokens,
  so its cache would keep its own proposals where lookups were accepted (still exact, but it would
  draft from a wrong context): load_draft builds ngram+D around feature heads only."""
  inner: Draft
  min_ngram: int = 2
  lookup: NgramDraft = NgramDraft()
  # Proposals a row's round takes where it has a lookup (other rows take gamma): a lookup's
  # continuation often runs on for many tokens, and 8 rows are the CPU kernels' widest cheap
  # product (HumanEval prompts, SmolLM2, behind a feature head at gamma 3: 2.60 -> 3.04 tokens
  # per target call; docs/RESULTS.md). Used when it exceeds gamma (speculative_generate's
  # long_rounds).
  long_gamma: int = 7

  @property
  def forwards_per_token(self) -> int:
    return self.inner.forwards_per_token

  @property
  def feature_layers(self) -> tuple[int, ...]:
    return self.inner.feature_layers

  def check(self, target_config: model_lib.ModelConfig) -> None:
    self.inner.check(target_config)

  def start(self, params, tokens, prompt_lens, cache_size: int, **target):
    return self.inner.start(params, tokens, prompt_lens, cache_size, **target)

  def propose(self, params, state, seq, seq_len, gamma, max_gamma: int, keys, knobs,
              target_vocab: int, features=None):
    found_tokens, found = self.lookup.lookup(seq, seq_len, max_gamma, self.min_ngram)
    # Where every row has a lookup, the inner draft's further tokens would all be replaced.
    inner_gamma = jnp.where(jnp.all(found), jnp.ones_like(gamma), gamma)
    tokens, q, state = self.inner.propose(params, state, seq, seq_len, inner_gamma, max_gamma,
                                          keys, knobs, target_vocab, features)
    one_hot = jax.nn.one_hot(found_tokens, target_vocab, dtype=jnp.float32)
    return (jnp.where(found[:, None], found_tokens, tokens),
            jnp.where(found[:, None, None], one_hot, q), state)

  def long_rounds(self, seq, seq_len):
    """[B] bool: the rows whose proposals this round are a lookup's (see long_gamma). The same
    match as propose's; XLA merges the two (a compiled lookup of 585 instructions, 586 with this
    beside it)."""
    return self.lookup.lookup(seq, seq_len, 1, self.min_ngram)[1]


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass(frozen=True)
class _Rows:
  """What each row asked for: constant through the loop."""
  seeds: jax.Array           # [B] uint32; row b's draws use keys from key(seeds[b])
  max_new_tokens: jax.Array  # scalar int32, each row's budget (its stop token included)
  stop_ids: jax.Array        # [B, K] int32, -1 pads


@dataclasses.dataclass(frozen=True)
class _State:
  """The loop's carry. Row b has committed seq[b, :seq_len[b]]; the target's cache holds one
  position less (the newest token is fed at the next verification)."""
  iteration: jax.Array     # scalar int32, rounds so far (a key for each round's draws)
  seq: jax.Array           # [B, W] prompt + committed tokens
  seq_len: jax.Array       # [B] committed length L
  new_tokens: jax.Array    # [B] tokens generated so far (a stop token included)
  done: jax.Array          # [B] bool
  gamma: jax.Array         # scalar int32, the current draft length
  target_cache: model_lib.Cache
  draft_state: object
  features: jax.Array      # [B, G+1, F] the target's hidden states from the last forward
  # Statistics per row: target forwards, drafted and accepted tokens, by draft position too.
  target_calls: jax.Array  # [B]
  drafted: jax.Array       # [B]
  accepted: jax.Array      # [B]
  accepted_at: jax.Array   # [B, G]
  drafted_at: jax.Array    # [B, G]


for _cls in (_Rows, _State):
  jax.tree_util.register_dataclass(
      _cls, data_fields=[f.name for f in dataclasses.fields(_cls)], meta_fields=[])

_fold_rows = jax.vmap(jax.random.fold_in, in_axes=(0, None))  # a key per row, then per index


def _residual(p: jax.Array, q: jax.Array) -> jax.Array:
  """normalize(max(0, p - q)); where that has no mass (p == q up to rounding), p itself."""
  r = jnp.maximum(p - q, 0.0)
  total = r.sum(-1, keepdims=True)
  return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), p)


def _first_state(first_logits, target_cache, draft_state, features, seq, prompt_lens,
                 rows: _Rows, keys, knobs: sampling.SamplingParams, gamma,
                 max_gamma: int) -> _State:
  """Before the first round: the first token from the target's prefill logits (step key 0, as
  in sampling.decode), written after each prompt."""
  batch, width = seq.shape
  first = sampling.choose_tokens(first_logits, _fold_rows(keys, 0), knobs)
  seq = jnp.where(jnp.arange(width)[None] == prompt_lens[:, None], first[:, None], seq)
  done = jnp.any(first[:, None] == rows.stop_ids, axis=-1) | (rows.max_new_tokens <= 1)
  zeros = jnp.zeros((batch,), jnp.int32)
  zeros_at = jnp.zeros((batch, max_gamma), jnp.int32)
  return _State(jnp.int32(0), seq, prompt_lens + 1, zeros + 1, done, gamma, target_cache,
                draft_state, features, zeros, zeros, zeros, zeros_at, zeros_at)


def _verify(target_params, target_config, draft, s: _State, proposals):
  """The target's one forward over the newest committed token and the proposals, at each row's
  own offset: its logits [B, G+1, V], its cache, and (for a feature draft) the hidden states it
  computed anyway."""
  newest = jnp.take_along_axis(s.seq, s.seq_len[:, None] - 1, axis=1)
  verify = jnp.concatenate([newest, proposals], axis=1)                          # [B, G+1]
  cache = s.target_cache.replace(length=s.seq_len - 1)
  if draft.feature_layers:
    logits, cache, features = model_lib.forward_with_hidden(
        target_params, target_config, verify, cache, draft.feature_layers)
  else:
    logits, cache = model_lib.forward(target_params, target_config, verify, cache)
    features = s.features
  return logits, cache, features


def _accept_greedy(target, proposals, gamma, max_gamma: int):
  """_accept when the target decodes greedily (p one-hot on its argmax, target [B, G+1]): a
  proposal is accepted while it is the target's argmax, and the token after the accepted prefix
  is the argmax there (the residual of a one-hot p and any q that put its mass on a rejected
  proposal is p again). The same tokens as _accept, without its vocabulary-sized distributions."""
  in_gamma = jnp.arange(max_gamma)[None] < jnp.reshape(gamma, (-1, 1))  # gamma: scalar or [B]
  ok = (proposals == target[:, :-1]) & in_gamma
  n_accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)       # [B]
  return n_accepted, jnp.take_along_axis(target, n_accepted[:, None], axis=1)[:, 0]


def _accept(p, q, proposals, gamma, max_gamma: int, accept_keys, residual_keys, temperature):
  """Each row's accepted prefix length n [B] and the token after it: accept x ~ q with
  probability min(1, p(x)/q(x)), i.e. u * q(x) < p(x) with u ~ U[0, 1); then draw from the
  residual at a rejection, or a bonus token from p after all gamma."""
  p_x = jnp.take_along_axis(p[:, :-1], proposals[..., None], axis=-1)[..., 0]    # [B, G]
  q_x = jnp.take_along_axis(q, proposals[..., None], axis=-1)[..., 0]
  u = jax.vmap(lambda k: jax.random.uniform(k, (max_gamma,)))(accept_keys)
  in_gamma = jnp.arange(max_gamma)[None] < jnp.reshape(gamma, (-1, 1))  # gamma: scalar or [B]
  ok = (u * q_x < p_x) & in_gamma
  n_accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)       # [B]
  p_n = jnp.take_along_axis(p, n_accepted[:, None, None], axis=1)[:, 0]
  q_n = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), n_accepted[:, None, None],
                            axis=1)[:, 0]
  all_passed = (n_accepted == gamma)[:, None]
  final_dist = jnp.where(all_passed, p_n, _residual(p_n, q_n))
  return n_accepted, sampling.pick(final_dist, residual_keys, temperature)


def _commit(s: _State, rows: _Rows, proposals, n_accepted, final, cache, draft_state, features,
            round_gamma, max_gamma: int, adaptive: bool) -> _State:
  """The round's new tokens (proposals[:n], then `final`), cut at a stop id and at the budget,
  written after each row's committed ones; the caches rolled back to what was accepted; the
  statistics (round_gamma [B]: each row's proposals this round); and (adaptive) the next gamma."""
  active = ~s.done
  slot = jnp.arange(max_gamma + 1)[None]
  candidates = jnp.where(slot < n_accepted[:, None],
                         jnp.pad(proposals, ((0, 0), (0, 1))), final[:, None])    # [B, G+1]
  is_stop = jnp.any(candidates[..., None] == rows.stop_ids[:, None, :], axis=-1) & (
      slot <= n_accepted[:, None])
  first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1), max_gamma + 1)
  produced = jnp.minimum(n_accepted + 1, first_stop + 1)
  produced = jnp.minimum(produced, rows.max_new_tokens - s.new_tokens)
  produced = jnp.where(active, produced, 0)

  index = jnp.arange(s.seq.shape[1])[None] - s.seq_len[:, None]
  write = (index >= 0) & (index < produced[:, None])
  seq = jnp.where(write, jnp.take_along_axis(candidates, jnp.clip(index, 0, max_gamma), axis=1),
                  s.seq)
  new_tokens = s.new_tokens + produced
  done = s.done | (active & ((first_stop <= n_accepted) | (new_tokens >= rows.max_new_tokens)))

  count = active.astype(jnp.int32)
  in_gamma = jnp.arange(max_gamma)[None] < round_gamma[:, None]
  accepted_at = s.accepted_at + (count[:, None] * (slot[:, :-1] < n_accepted[:, None]))
  drafted_at = s.drafted_at + count[:, None] * in_gamma
  if adaptive:  # HF's heuristic, per batch: +2 after an all-accepted round, else -1
    all_ok = jnp.all(jnp.where(active, n_accepted == s.gamma, True))
    gamma = jnp.clip(jnp.where(all_ok, s.gamma + 2, s.gamma - 1), 1, max_gamma)
  else:
    gamma = s.gamma
  return _State(s.iteration + 1, seq, s.seq_len + produced, new_tokens, done, gamma,
                cache.replace(length=s.seq_len + n_accepted), draft_state, features,
                s.target_calls + count, s.drafted + count * round_gamma,
                s.accepted + count * n_accepted, accepted_at, drafted_at)


@functools.partial(jax.jit, static_argnames=("target_config", "draft", "max_gamma", "adaptive",
                                             "greedy", "short_gamma"))
def _loop(target_params, draft_params, first_logits, target_cache, draft_state, features, seq,
          prompt_lens, rows: _Rows, knobs: sampling.SamplingParams, gamma, *, target_config,
          draft, max_gamma: int, adaptive: bool, greedy: bool, short_gamma: int | None = None):
  """Rounds of propose, verify, accept and commit until every row is done; knobs are device
  scalars (SamplingParams.traced). greedy (temperature 0) compiles a loop that compares argmaxes:
  the drafts' q and the target's p are then unused, and XLA drops them (4 x 49152-wide one-hots,
  residuals and pads a round).

  short_gamma (static; the draft then has `long_rounds`): each row's round takes max_gamma
  proposals where its draft says so (a lookup), else short_gamma (= gamma). The target's forward
  is as wide as the longest: two compiled forwards, of which each round runs one."""
  keys = jax.vmap(jax.random.key)(rows.seeds)
  state = _first_state(first_logits, target_cache, draft_state, features, seq, prompt_lens,
                       rows, keys, knobs, gamma, max_gamma)

  def round_(s: _State) -> _State:
    round_keys = _fold_rows(_fold_rows(keys, 1), s.iteration)  # per row, per round
    draft_keys, accept_keys, residual_keys = (_fold_rows(round_keys, i) for i in range(3))
    proposals, q, draft_state = draft.propose(draft_params, s.draft_state, s.seq, s.seq_len,
                                              s.gamma, max_gamma, draft_keys, knobs,
                                              target_config.vocab_size, s.features)

    def verified(proposals):  # [B, G'] -> argmaxes [B, G+1] or p [B, G+1, V], cache, features
      logits, cache, features = _verify(target_params, target_config, draft, s, proposals)
      scores = sampling.argmax(logits) if greedy else sampling.probabilities(logits, knobs)
      pad = max_gamma - proposals.shape[1]  # positions past this round's gamma: never read
      scores = jnp.pad(scores, [(0, 0), (0, pad)] + [(0, 0)] * (scores.ndim - 2))
      if draft.feature_layers:
        features = jnp.pad(features, ((0, 0), (0, pad), (0, 0)))
      return scores, cache, features

    if short_gamma is None:
      round_gamma = jnp.broadcast_to(s.gamma, s.seq_len.shape)
      scores, cache, features = verified(proposals)
    else:
      long = draft.long_rounds(s.seq, s.seq_len) & ~s.done                         # [B]
      round_gamma = jnp.where(long, max_gamma, s.gamma)
      scores, cache, features = jax.lax.cond(
          jnp.any(long), verified, lambda proposals: verified(proposals[:, :short_gamma]),
          proposals)
    if greedy:
      n_accepted, final = _accept_greedy(scores, proposals, round_gamma, max_gamma)
    else:
      n_accepted, final = _accept(scores, q, proposals, round_gamma, max_gamma, accept_keys,
                                  residual_keys, knobs.temperature)
    return _commit(s, rows, proposals, n_accepted, final, cache, draft_state, features,
                   round_gamma, max_gamma, adaptive)

  final = jax.lax.while_loop(lambda s: ~jnp.all(s.done), round_, state)
  return dict(seq=final.seq, new_tokens=final.new_tokens, target_calls=final.target_calls,
              drafted=final.drafted, accepted=final.accepted, accepted_at=final.accepted_at,
              drafted_at=final.drafted_at, iterations=final.iteration,
              draft_state=final.draft_state)


# ---------------------------------------------------------------------------------------------
# Host-side entry point.


@dataclasses.dataclass
class SpeculativeResult:
  tokens: list[list[int]]  # new tokens per row, a stop token included when one ended it
  stopped: list[bool]
  rows: list[dict]         # statistics per row (see `statistics`)
  totals: dict             # the same over the batch; target_calls there are batched forwards
  first_token_at: float | None = None  # time.perf_counter() when the first logits were in


def statistics(drafted, accepted, target_calls, verified_tokens, accepted_at, drafted_at,
               draft_forwards_per_token: int) -> dict:
  """acceptance_rate = accepted draft tokens / drafted tokens (ours). amd_acceptance is AMD's
  script's figure, (accepted tokens - target calls) / draft calls, where its accepted tokens are
  all tokens the verification rounds produced (`verified_tokens`: every new token but the first,
  which comes from the prefill) and a draft call is one draft forward; with a model draft and a
  fixed gamma it equals ours except for the last round's cut at the budget or a stop."""
  draft_calls = int(drafted) * draft_forwards_per_token
  return dict(
      acceptance_rate=float(accepted / drafted) if drafted else 0.0,
      amd_acceptance=float((verified_tokens - target_calls) / draft_calls) if draft_calls else None,
      tokens_per_target_call=float(verified_tokens / target_calls) if target_calls else 0.0,
      target_calls=int(target_calls), draft_forwards=draft_calls, drafted=int(drafted),
      accepted=int(accepted),
      acceptance_by_position=[float(a / d) if d else 0.0 for a, d in zip(accepted_at, drafted_at)])


def predicted_speedup(acceptance: float, gamma: int, cost_ratio: float,
                      verify_ratio: float = 1.0) -> float:
  """Leviathan et al.'s expected speedup: tokens per round, (1 - a^(gamma+1)) / (1 - a), over the
  round's cost in target steps, gamma c + v (c: a draft step's cost, v: a verification's). The
  usual prediction takes v = 1; on a CPU a forward of gamma + 1 tokens costs more than one step."""
  tokens = (1 - acceptance ** (gamma + 1)) / (1 - acceptance) if acceptance < 1 else gamma + 1
  return tokens / (gamma * cost_ratio + verify_ratio)


DRAFT_SPECS = ("ngram | self | int8 | int4 | bf16 | first:N | PATH (a model, or a feature-head "
               "workdir) | ngram+HEAD (prompt lookup where the text repeats, the feature head HEAD "
               "elsewhere)")


NAMED_DRAFTS = ("ngram", "self", "int8", "int4", "bf16")
COPY_DRAFTS = ("int8", "int4", "bf16")  # the target's own weights at that precision
LOOKUP_FIRST = "ngram+"  # ngram+D: LookupFirstDraft around draft D


def check_draft_spec(spec: str) -> None:
  """The cheap part of load_draft's checks, for callers that check every flag before loading a
  model: a named draft, first:N, or a path that exists."""
  if spec in NAMED_DRAFTS or spec.startswith("first:"):
    return
  if spec.startswith(LOOKUP_FIRST):
    return check_draft_spec(spec[len(LOOKUP_FIRST):])
  if not pathlib.Path(spec).expanduser().exists():
    raise UserError(f"--draft {spec}: no such file or directory; give {DRAFT_SPECS}")


def load_draft(spec: str, target_config: model_lib.ModelConfig, target_params,
               target_tokenizer=None, dtype=None) -> tuple[Draft, object]:
  """(draft, its params) for a --draft value: what the CLI, bench, spec_eval, notebooks and the
  reproduction all call.

  ngram: prompt lookup (no model). self: the target drafting for itself (the upper bound).
  int8, int4, bf16: the target's own weights at that precision (quantize.py), a quarter, under
  a fifth or half of the bytes per step.
  first:N: the target's first N layers with its final norm and head (a draft made without
  training). ngram+D: prompt lookup where the text repeats (a 2- to 6-gram match), the feature
  head D elsewhere.
  PATH: a feature-head workdir (amd135m.draft_head), checked against the target it was trained
  for (its weights in bf16: feature_draft.decoding_params); or a model (Hugging Face directory,
  GGUF, training workdir) whose vocabulary is an id-prefix of the target's (with both tokenizers
  at hand, compared id by id), its weights cast to `dtype` if given."""
  from amd135m import checkpoints, feature_draft, quantize  # noqa: PLC0415 (orbax)
  from amd135m.checkpoints import head_io  # noqa: PLC0415
  if spec == "ngram":
    return NgramDraft(), None
  if spec.startswith(LOOKUP_FIRST):
    inner = spec[len(LOOKUP_FIRST):]
    if inner == "ngram" or inner.startswith(LOOKUP_FIRST):
      raise UserError(f"--draft {spec}: ngram+D takes a feature-head workdir D, not another lookup")
    draft, params = load_draft(inner, target_config, target_params, target_tokenizer, dtype)
    if not isinstance(draft, feature_draft.FeatureDraft):
      raise UserError(f"--draft {spec}: ngram+D takes a feature-head workdir D (a model draft "
                      "would keep its own proposals where lookups were accepted)")
    return LookupFirstDraft(draft), params
  if spec == "self":
    return ModelDraft(target_config), target_params
  if spec in COPY_DRAFTS:
    if (stored := quantize.precision(target_params)) != "f32":
      raise UserError(f"--draft {spec}: the target's weights are {stored} already; draft for "
                      "an f32 target")
    return (ModelDraft(target_config, prompt_cache_from_target=True),
            quantize.cast_weights(target_params, target_config, spec))
  if spec.startswith("first:"):
    try:
      n_layers = int(spec.split(":", 1)[1])
    except ValueError:
      raise UserError(f"--draft {spec}: N in first:N must be a whole number of layers, "
                      "e.g. first:6") from None
    if not 0 < n_layers <= target_config.n_layers:
      raise UserError(f"--draft first:N needs 1 <= N <= {target_config.n_layers}")
    params = {k: v for k, v in target_params.items()
              if not k.startswith("layers_") or int(k.split("_")[1]) < n_layers}
    return ModelDraft(dataclasses.replace(target_config, n_layers=n_layers)), params
  check_draft_spec(spec)
  path = pathlib.Path(spec).expanduser()
  if head_io.is_head_workdir(path):
    record, vocab, head = head_io.load_head_params(path)
    target_print = head_io.fingerprint(target_config, quantize.plain_layout(target_params))
    if record.target_fingerprint != target_print:
      raise UserError(
          f"--draft {spec} is a feature head trained for another target ({record.target_path}, "
          f"fingerprint {record.target_fingerprint}; this target's is {target_print}): train one "
          f"for this target with python -m amd135m.draft_head train --target ...")
    config = feature_draft.HeadConfig(record.model_config(), record.feature_layers,
                                      record.draft_vocab)
    draft = feature_draft.FeatureDraft(config)
    draft.check(target_config)
    embedding = target_params["embed_tokens"]["embedding"]
    return draft, {"head": feature_draft.decoding_params(head), "vocab": jnp.asarray(vocab),
                   "embedding": embedding}
  config, params = checkpoints.load_params(path, dtype)
  draft_tokenizer = None
  if target_tokenizer is not None:
    from amd135m.tokenizer import load_tokenizer  # noqa: PLC0415
    draft_tokenizer = load_tokenizer(path)
  check_vocabularies(config.vocab_size, target_config.vocab_size, draft_tokenizer,
                     target_tokenizer)
  # An f32 draft in the decode layout (its weights as panels, its tied head a transposed copy).
  return ModelDraft(config), quantize.decode_layout(jax.tree.map(jnp.asarray, params), config)


def check_vocabularies(draft_vocab: int, target_vocab: int, draft_tokenizer=None,
                       target_tokenizer=None) -> None:
  """The draft's ids must mean the target's: its vocabulary an id-prefix of the target's (AMD's
  32000 inside CodeLlama's 32016). With both tokenizers, every draft id's token is compared."""
  if draft_vocab > target_vocab:
    raise UserError(f"the draft's vocabulary ({draft_vocab}) is larger than the target's "
                    f"({target_vocab}): the draft must use an id-prefix of the target's vocabulary")
  if draft_tokenizer is not None and target_tokenizer is not None:
    for token_id in range(min(draft_vocab, draft_tokenizer.vocab_size)):
      if draft_tokenizer.token(token_id) != target_tokenizer.token(token_id):
        raise UserError(
            f"draft and target tokenizers differ at id {token_id} "
            f"({draft_tokenizer.token(token_id)!r} vs {target_tokenizer.token(token_id)!r}): "
            "the draft must use an id-prefix of the target's vocabulary")


def speculative_generate(target_params, target_config: model_lib.ModelConfig, draft,
                         draft_params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         gamma: int = 4, sampling_params: sampling.SamplingParams =
                         sampling.SamplingParams(), seed: int | Sequence[int] = 0,
                         stop_ids: Sequence[int] | Sequence[Sequence[int]] = (),
                         adaptive: bool = False, max_gamma: int | None = None,
                         long_rounds: bool | None = None) -> SpeculativeResult:
  """Speculative decoding of a batch of token-id prompts; the same arguments as
  sampling.generate, plus the draft (ModelDraft or NgramDraft) and gamma.

  adaptive: start at `gamma` and adapt per batch up to max_gamma (default 2 * gamma). gamma is then
  one value for the whole batch, so a row's tokens and statistics (not their distribution) depend
  on its batch; with a fixed gamma each row equals its single run.

  long_rounds: with a draft that has them (ngram+HEAD: where a row's text repeats, its lookup
  proposes `long_gamma` tokens; see LookupFirstDraft), a row's round verifies that many there and
  gamma elsewhere; a round's forward is as wide as its longest row. None: at batch 1 only, where a
  forward of 8 tokens costs little more than one of 4 on a CPU (a batch of 4 x 8 rows costs about
  twice 4 x 4). Either way each row's tokens depend on its own text only."""
  sampling_params.validate()
  if gamma < 1:
    raise UserError(f"gamma must be >= 1, got {gamma}")
  draft.check(target_config)
  request = sampling.prepare_request(target_config, prompts, max_new_tokens, seed, stop_ids)
  if long_rounds is None:
    long_rounds = len(prompts) == 1
  long_gamma = getattr(draft, "long_gamma", 0) if long_rounds and not adaptive else 0
  max_gamma = max_gamma or (2 * gamma if adaptive else max(gamma, long_gamma))
  if max_gamma < gamma:
    raise UserError(f"max_gamma ({max_gamma}) must be at least gamma ({gamma})")
  short_gamma = gamma if long_gamma and max_gamma > gamma else None
  draft_context = getattr(getattr(draft, "config", None), "max_seq_len", None)
  if draft_context is not None and max(request.lens) + max_new_tokens > draft_context:
    raise UserError(f"prompt plus max_new_tokens exceeds the draft's context of "
                    f"{draft_context}: shorten one of them")

  batch, prompt_len = request.tokens.shape
  # Room for the budget plus one round's overshoot: a round may write gamma + 1 tokens past it.
  seq_width = prompt_len + sampling.bucket(max_new_tokens) + max_gamma + 1
  tokens = jnp.asarray(request.tokens)
  lens = jnp.asarray(request.lens, jnp.int32)
  first_logits, target_cache, hidden = _prefill(target_params, target_config, tokens, lens,
                                                seq_width, draft.feature_layers)
  jax.block_until_ready(first_logits)
  first_token_at = time.perf_counter()
  draft_state = draft.start(draft_params, tokens, lens, seq_width, target_config=target_config,
                            target_params=target_params, target_cache=target_cache,
                            features=hidden)
  # The first round's news for a feature draft: the last prompt position's hidden state.
  features = jnp.zeros((batch, max_gamma + 1, hidden.shape[-1]), jnp.float32)
  features = features.at[:, 0].set(hidden[jnp.arange(batch), lens - 1])
  seq = jnp.pad(tokens, ((0, 0), (0, seq_width - prompt_len)))
  rows = _Rows(seeds=jnp.asarray(request.seeds), max_new_tokens=jnp.int32(max_new_tokens),
               stop_ids=jnp.asarray(request.stops))
  out = _loop(target_params, draft_params, first_logits, target_cache, draft_state, features, seq,
              lens, rows, sampling_params.traced(), jnp.int32(gamma), target_config=target_config,
              draft=draft, max_gamma=max_gamma, adaptive=adaptive,
              greedy=bool(sampling_params.temperature == 0), short_gamma=short_gamma)
  out.pop("draft_state")
  out = jax.tree.map(np.asarray, out)
  per_token = draft.forwards_per_token
  rows_tokens, rows_stats = [], []
  for b in range(batch):
    n = int(out["new_tokens"][b])
    rows_tokens.append(out["seq"][b, request.lens[b]:request.lens[b] + n].tolist())
    rows_stats.append(statistics(out["drafted"][b], out["accepted"][b], out["target_calls"][b],
                                 n - 1, out["accepted_at"][b], out["drafted_at"][b], per_token))
  # A row's long rounds are those that drafted past gamma.
  long_counts = out["drafted_at"][:, gamma] if short_gamma else np.zeros(batch, np.int32)
  for b in range(batch):
    rows_stats[b]["long_rounds"] = int(long_counts[b])
  stopped = [bool(r) and r[-1] in set(request.row_stops[b]) for b, r in enumerate(rows_tokens)]
  # Over the batch, rates count each row's own rounds; target_calls is the batched forwards
  # (the busiest row's count), which is what the batch's wall time pays for.
  totals = statistics(out["drafted"].sum(), out["accepted"].sum(), out["target_calls"].sum(),
                      out["new_tokens"].sum() - batch, out["accepted_at"].sum(0),
                      out["drafted_at"].sum(0), per_token)
  totals.update(target_calls=int(out["iterations"]),
                row_target_calls=int(out["target_calls"].sum()),
                new_tokens=int(out["new_tokens"].sum()), long_rounds=int(long_counts.sum()),
                long_gamma=max_gamma if short_gamma else None)
  return SpeculativeResult(rows_tokens, stopped, rows_stats, totals, first_token_at)


def shares_target_layers(draft_config: model_lib.ModelConfig, draft_params,
                         target_config: model_lib.ModelConfig, target_params) -> bool:
  """Whether a model draft is the target's own first layers (bench's `first:N` and `self`, the
  self-speculative drafts of LayerSkip and Draft & Verify): the target's config but for n_layers,
  and every draft weight the very array the target holds under the same name. Its prompt cache
  is then the target's first layers' cache after the target's prefill."""
  if (draft_config.n_layers > target_config.n_layers
      or dataclasses.replace(draft_config, n_layers=target_config.n_layers) != target_config):
    return False
  target_leaves = dict(jax.tree_util.tree_leaves_with_path(target_params))
  return all(target_leaves.get(path) is leaf
             for path, leaf in jax.tree_util.tree_leaves_with_path(draft_params))


@functools.partial(jax.jit, static_argnames=("draft", "cache_size"))
def _draft_init(draft, draft_params, tokens, lens, cache_size):
  return draft.init(draft_params, tokens, lens, cache_size)


@functools.partial(jax.jit, static_argnames=("config", "cache_size", "hidden_layers"))
def _prefill(params, config, tokens, prompt_lens, cache_size: int, hidden_layers: tuple[int, ...]):
  """sampling.prefill, plus the hidden states at every prompt position that a feature draft
  reads ([B, P, F]; F = 0 for other drafts)."""
  if not hidden_layers:
    logits, cache = sampling.prefill(params, config, tokens, prompt_lens, cache_size=cache_size)
    return logits, cache, jnp.zeros((*tokens.shape, 0), jnp.float32)
  logits, cache, hidden = model_lib.prefill(params, config, tokens, cache_size,
                                            logit_positions=(prompt_lens - 1)[:, None],
                                            hidden_layers=hidden_layers)
  return logits[:, 0], cache.replace(length=prompt_lens), hidden

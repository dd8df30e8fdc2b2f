"""Token choice and the jitted generation loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_reference as ref
from amd135m import sampling
from amd135m.errors import UserError


@pytest.fixture(scope="module")
def tiny():
  hf = ref.tiny_hf_model(seed=3, init_std=0.2, vocab_size=64)
  return ref.our_config(hf), ref.our_params(hf)


@pytest.mark.parametrize("vocab,temperature,top_k,top_p", [
    (300, 1.0, 0, 1.0), (300, 0.7, 5, 1.0), (300, 1.3, 0, 0.9), (300, 0.5, 20, 0.6),
    (300, 1.0, 1, 1.0), (300, 2.0, 0, 0.05),
    # SmolLM2's vocabulary size, where top-k up to FAST_TOP_K is decided among each row's largest
    # logits (k 65 and top-p alone: bisection)
    (49152, 0.1, 10, 0.95), (49152, 1.0, 64, 0.5), (49152, 0.7, 3, 1.0), (49152, 1.0, 65, 0.9),
    (49152, 1.5, 0, 0.8)])
def test_filter_matches_transformers_warpers(vocab, temperature, top_k, top_p):
  logits = np.random.RandomState(0).randn(4, vocab).astype(np.float32) * 3
  warped = torch.as_tensor(logits)
  for warper in [transformers.TemperatureLogitsWarper(temperature),
                 top_k and transformers.TopKLogitsWarper(top_k),
                 top_p < 1.0 and transformers.TopPLogitsWarper(top_p)]:
    if warper:
      warped = warper(None, warped)
  ours = jax.jit(sampling.filter_logits)(jnp.asarray(logits), temperature, top_k, top_p)
  expected = warped.numpy()
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
  kept = np.isfinite(expected)
  np.testing.assert_allclose(np.asarray(ours)[kept], expected[kept], rtol=1e-6)


@pytest.mark.parametrize("levels", [None, 2])
def test_the_largest_logits_path_equals_bisection(levels):
  """Rows of 49152 logits, on a coarse grid for many ties (across chunks and at the k-th), and
  one row where 101 logits tie at the top, past FAST_TOP_K: the same masks as bisection."""
  x = np.random.RandomState(2).randn(6, 49152).astype(np.float32) * 3
  if levels:
    x = np.round(x * levels) / levels
  x[5, ::491] = 20.0  # 101 equal largest logits

  def both(x, t, k, p):
    logits = x / t
    return (sampling.filter_logits(x, t, k, p),
            sampling._filter_by_bisection(logits, sampling._order_keys(logits), k, p))

  both = jax.jit(both)
  for knobs in [(0.1, 10, 0.95), (1.0, 64, 0.3), (1.0, 1, 1.0), (0.7, 40, 0.9), (2.0, 7, 0.99)]:
    fast, bisection = both(x, *knobs)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(bisection), err_msg=str(knobs))
    assert np.isfinite(np.asarray(fast)[5]).sum() >= 101  # the tied row kept every tie


def test_sampled_tokens_follow_the_distribution():
  """20000 draws from a 6-token distribution pass a chi-square test at the 0.1% level."""
  logits = jnp.log(jnp.asarray([0.4, 0.25, 0.15, 0.1, 0.07, 0.03]))
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = jax.jit(jax.vmap(lambda k: sampling.choose_tokens(logits[None], k[None],
                                                              sampling.SamplingParams(1.0))))(
      keys)[:, 0]
  counts = np.bincount(np.asarray(draws), minlength=6)
  expected = 20000 * np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 20.5, (counts, chi2)  # chi-square 0.999 quantile with 5 degrees of freedom


def test_no_recompilation_for_new_knobs(tiny):
  """Temperature, top-k, top-p, seed and max_new_tokens within a bucket reuse one program."""
  config, params = tiny
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  sampling.generate(params, config, prompts, 10, sampling.SamplingParams(0.0), seed=0)
  sizes = (sampling.prefill._cache_size(), sampling.decode._cache_size())
  for knobs, seed, n in [((0.8, 5, 0.9), 1, 12), ((1.5, 0, 1.0), 7, 16), ((0.0, 3, 0.5), 2, 9)]:
    sampling.generate(params, config, prompts, n, sampling.SamplingParams(*knobs), seed=seed)
  assert (sampling.prefill._cache_size(), sampling.decode._cache_size()) == sizes


@pytest.mark.parametrize("knobs", [(0.0, 0, 1.0), (0.9, 8, 0.95)])
def test_ragged_batch_equals_single_rows(tiny, knobs):
  config, params = tiny
  prompts = [[5, 9, 2], [7, 1, 1, 3, 8, 2, 6, 4, 4], [11]]
  params_sampling = sampling.SamplingParams(*knobs)
  batch = sampling.generate(params, config, prompts, 20, params_sampling, seed=[3, 4, 5]).tokens
  for row, prompt in enumerate(prompts):
    alone = sampling.generate(params, config, [prompt], 20, params_sampling, seed=[3 + row])
    assert batch[row] == alone.tokens[0]


def test_top_k_one_is_greedy(tiny):
  config, params = tiny
  greedy = sampling.generate(params, config, [[3, 4]], 16).tokens
  top1 = sampling.generate(params, config, [[3, 4]], 16, sampling.SamplingParams(1.0, 1), seed=9)
  assert top1.tokens == greedy


def test_per_row_stop_ids(tiny):
  """Each row stops on its own ids, its stop token last; others run to the budget."""
  config, params = tiny
  prompts = [[5, 9, 2], [7, 1, 1]]
  free = sampling.generate(params, config, prompts, 24).tokens
  stop_row0 = free[0][6]
  stopped = sampling.generate(params, config, prompts, 24, stop_ids=[[stop_row0], [-5]])
  assert stopped.tokens[0] == free[0][:free[0].index(stop_row0) + 1]
  assert stopped.stopped == [True, False]
  assert stopped.tokens[1] == free[1] and len(free[1]) == 24


def test_budget_is_exact(tiny):
  config, params = tiny
  for n in [1, 2, 16, 17]:
    assert len(sampling.generate(params, config, [[1, 2]], n).tokens[0]) == n


@pytest.mark.parametrize("bad,message", [
    (dict(prompts=[[1, 2]], max_new_tokens=10_000), "exceeds the model's context"),
    (dict(prompts=[[]], max_new_tokens=4), "no tokens"),
    (dict(prompts=[[1, 64]], max_new_tokens=4), "outside the vocabulary"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1]], max_new_tokens=4, sampling=sampling.SamplingParams(top_p=0.0)), "top_p"),
    (dict(prompts=[[1]], max_new_tokens=4, sampling=sampling.SamplingParams(-1.0)), "temperature"),
])
def test_bad_requests_are_user_errors(tiny, bad, message):
  config, params = tiny
  with pytest.raises(UserError, match=message):
    sampling.generate(params, config, **bad)


def test_zero_probability_tokens_are_never_drawn():
  """On a full-size vocabulary, XLA's blockwise cumsum gives filtered tokens a sliver of CDF
  width (about 7e-6 of draws, found in review); the sampling CDF must give each of them exactly
  its left neighbour's value, so the inverse-CDF draw cannot land on one."""
  logits = jax.random.normal(jax.random.key(0), (4, 49152)) * 2
  # probs is an argument, not a closed-over constant: one compile for the three settings, and
  # XLA does not fold the CDF of a 4 x 49152 constant at compile time (most of a minute).
  many_draws = jax.jit(jax.vmap(lambda k, probs: sampling.draw(probs, jax.random.split(k, 4)),
                                in_axes=(0, None)))
  for knobs in [(1.0, 0, 0.9), (1.0, 1000, 1.0), (0.7, 40, 0.95)]:
    probs = jax.nn.softmax(sampling.filter_logits(logits, *knobs), axis=-1)
    cdf = np.asarray(jax.jit(sampling.monotone_cdf)(probs))
    zero = np.asarray(probs) == 0
    assert zero.any() and np.all(np.diff(cdf, axis=-1) >= 0)
    previous = np.concatenate([np.zeros((4, 1)), cdf[:, :-1]], axis=1)
    np.testing.assert_array_equal(cdf[zero], previous[zero])
    draws = many_draws(jax.random.split(jax.random.key(1), 2000), probs)
    assert not zero[np.arange(4)[None, :], np.asarray(draws)].any()


def test_signed_zeros_tie():
  logits = jnp.asarray([[1.0, 0.0, -0.0, -1.0]])
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, 1.0, 2, 1.0)))
  np.testing.assert_array_equal(kept, [[True, True, True, False]])  # ties at the k-th are kept


def test_argmax_is_jnp_argmax_ties_included():
  """sampling.argmax (max, then the first index equal to it) picks what jnp.argmax picks: the
  first of tied maxima, on random logits and on rows built with ties."""
  x = jax.random.normal(jax.random.key(3), (4, 7, 1000))
  x = x.at[0, :, 17].set(9.0).at[0, :, 400].set(9.0)          # a tie: the first index wins
  x = x.at[1, 0].set(0.0)                                     # all equal: index 0
  np.testing.assert_array_equal(jax.jit(sampling.argmax)(x), jnp.argmax(x, axis=-1))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.7, 20, 0.9)])
def test_draw_with_probabilities_is_probabilities_then_pick(temperature, top_k, top_p):
  """A speculative draft step's shortcut (greedy: one argmax of the logits) gives the token and
  the distribution that `probabilities` followed by `pick` give."""
  logits = 3 * jax.random.normal(jax.random.key(5), (6, 300))
  logits = logits.at[2, 11].set(20.0).at[2, 250].set(20.0)    # a tie: the first index wins
  keys = jax.random.split(jax.random.key(6), 6)
  knobs = sampling.SamplingParams(temperature, top_k, top_p)
  token, q = jax.jit(sampling.draw_with_probabilities)(logits, keys, knobs)
  want_q = sampling.probabilities(logits, knobs)
  np.testing.assert_array_equal(token, sampling.pick(want_q, keys, temperature))
  np.testing.assert_allclose(q, want_q, rtol=1e-6, atol=1e-7)
  if temperature == 0:
    assert token[2] == 11

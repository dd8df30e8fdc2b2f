"""The Flax Llama against transformers' LlamaForCausalLM (pinned), on random tiny configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference as ref
from amd135m import model as model_lib, sampling
from jaxpr_dots import dot_dtypes

# MHA and GQA (and MQA), tied and untied heads, odd head counts and widths.
CONFIGS = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_tied": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                     num_hidden_layers=3, tie_word_embeddings=True, rope_theta=1e5),
    "mqa_untied": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                       intermediate_size=100, vocab_size=97),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
  hf = ref.tiny_hf_model(seed=len(request.param), **CONFIGS[request.param])
  return hf, ref.our_config(hf), ref.our_params(hf)


@pytest.mark.parametrize("length", [1, 13, 31])
def test_logits_match_transformers(pair, length):
  hf, config, params = pair
  tokens = np.random.RandomState(length).randint(0, config.vocab_size, (2, length))
  ours, cache = model_lib.forward(params, config, jnp.asarray(tokens))
  assert cache is None
  np.testing.assert_allclose(np.asarray(ours), ref.hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_cached_decode_matches_full_forward(pair):
  """Prefill 5 tokens, then feed one token at a time: every position equals the full forward."""
  hf, config, params = pair
  tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 17))
  full = ref.hf_logits(hf, tokens)
  step = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c))
  cache = model_lib.init_cache(config, batch=2, max_len=24)
  logits, cache = step(params, jnp.asarray(tokens[:, :5]), cache)
  pieces = [np.asarray(logits)]
  for t in range(5, 17):
    logits, cache = step(params, jnp.asarray(tokens[:, t:t + 1]), cache)
    pieces.append(np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(cache.length), [17, 17])
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-4, rtol=0)


def test_prefill_leaves_the_cache_a_cached_forward_writes(pair):
  """model.prefill (a causal forward without a cache) returns the logits, keys and values that a
  cached forward from an empty cache computes, zeros in the slots beyond, and length T."""
  hf, config, params = pair
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, config.vocab_size, (2, 11)))
  logits, cache = model_lib.prefill(params, config, tokens, cache_size=16)
  expected_logits, expected = model_lib.forward(params, config, tokens,
                                                model_lib.init_cache(config, 2, 16))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected_logits), atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache.length), [11, 11])
  for ours, theirs in zip(cache.k + cache.v, expected.k + expected.v):
    assert ours.shape == theirs.shape == (2, 16, config.n_kv_heads, config.head_dim)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5, rtol=0)
    assert not np.asarray(ours[:, 11:]).any()


def test_multi_token_forward_at_per_row_offsets(pair):
  """Rows at different cache lengths each take 4 new tokens in one forward (speculative
  verification): each row's logits equal the reference on that row's own sequence."""
  hf, config, params = pair
  rng = np.random.RandomState(2)
  lens = [3, 9]
  prompts = rng.randint(0, config.vocab_size, (2, 9))
  new = rng.randint(0, config.vocab_size, (2, 4))
  _, cache = sampling.prefill(params, config, jnp.asarray(prompts), jnp.asarray(lens, jnp.int32),
                              cache_size=16)
  logits, cache = model_lib.forward(params, config, jnp.asarray(new), cache)
  np.testing.assert_array_equal(np.asarray(cache.length), [7, 13])
  for row, n in enumerate(lens):
    sequence = np.concatenate([prompts[row, :n], new[row]])[None]
    expected = ref.hf_logits(hf, sequence)[0, n:]
    np.testing.assert_allclose(np.asarray(logits[row]), expected, atol=1e-4, rtol=0)


def test_rollback_is_moving_the_length(pair):
  """Write 3 tokens, roll back by 2, write others: as if the rejected ones were never there."""
  hf, config, params = pair
  tokens = np.random.RandomState(3).randint(0, config.vocab_size, (1, 10))
  cache = model_lib.init_cache(config, 1, 16)
  _, cache = model_lib.forward(params, config, jnp.asarray(tokens[:, :6]), cache)
  _, cache = model_lib.forward(params, config, jnp.asarray([[5, 6, 7]]), cache)
  cache = cache.replace(length=cache.length - 2)
  logits, cache = model_lib.forward(params, config, jnp.asarray(tokens[:, 7:10]), cache)
  sequence = np.concatenate([tokens[:, :6], [[5]], tokens[:, 7:10]], axis=1)
  np.testing.assert_allclose(np.asarray(logits[0]), ref.hf_logits(hf, sequence)[0, 7:],
                             atol=1e-4, rtol=0)


def test_attention_probabilities_match_transformers(pair):
  hf, config, params = pair
  tokens = np.random.RandomState(4).randint(0, config.vocab_size, (2, 11))
  _, _, probs = model_lib.forward_with_attention(params, config, jnp.asarray(tokens))
  with torch.no_grad():
    expected = hf(torch.as_tensor(tokens), output_attentions=True).attentions
  assert len(probs) == config.n_layers
  for ours, theirs in zip(probs, expected):
    assert ours.shape == (2, config.n_heads, 11, 11)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5, rtol=0)


def test_every_parameter_has_logical_axes(pair):
  _, config, params = pair
  axes = model_lib.logical_axes(config)
  known = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers"}
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_axes = dict(jax.tree_util.tree_flatten_with_path(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
  assert len(flat_axes) == len(flat_params)
  for path, value in flat_params:
    spec = flat_axes[path]
    assert len(spec) == value.ndim and set(spec) <= known, (path, spec)


def test_param_and_compute_dtypes_are_separate():
  """f32 master weights with bf16 compute: cache and activations bf16, logits f32, and the
  logits stay close to the f32 model's."""
  hf = ref.tiny_hf_model()
  config = ref.our_config(hf)
  params = ref.our_params(hf)
  bf16 = model_lib.ModelConfig(**{**config.__dict__, "dtype": "bfloat16"})
  tokens = jnp.asarray(np.random.RandomState(5).randint(0, config.vocab_size, (1, 9)))
  cache = model_lib.init_cache(bf16, 1, 16)
  assert cache.k[0].dtype == jnp.bfloat16
  logits16, _ = model_lib.forward(params, bf16, tokens, cache)
  logits32, _ = model_lib.forward(params, config, tokens)
  assert logits16.dtype == jnp.float32 and params["norm"]["scale"].dtype == jnp.float32
  # Every matmul runs on bf16 operands (cached and uncached), none on f32 ones.
  for cfg, c in [(bf16, cache), (bf16, None), (config, None)]:
    jaxpr = jax.make_jaxpr(lambda p, t: model_lib.forward(p, cfg, t, c))(params, tokens)
    operands = set(_dot_operand_dtypes(jaxpr.jaxpr))
    assert operands == {(cfg.dtype, cfg.dtype)}, (cfg.dtype, operands)
  # And the gradient's products too, all asking for f32 sums (precision.einsum: XLA's CPU backend
  # runs bf16 GEMMs with a bf16 output no faster than f32 ones, and f32 cotangents by bf16
  # weights as f32 GEMMs).
  loss = lambda p: model_lib.forward(p, bf16, tokens)[0].sum()
  grad = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  assert set(_dot_operand_dtypes(grad)) == {("bfloat16", "bfloat16")}
  assert {d[2] for d in dot_dtypes(grad)} == {"float32"}
  # bf16 rounding shows (a forward that ignored dtype would differ by exactly 0) but stays small:
  # 0.0035 measured here on logits of std 0.15; the bound leaves room for other CPUs' bf16 dots.
  error = np.abs(np.asarray(logits16) - np.asarray(logits32)).max()
  assert 0 < error < 0.01, error
  init = model_lib.init_params(model_lib.ModelConfig(**{**config.__dict__,
                                                        "param_dtype": "bfloat16"}),
                               jax.random.key(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(init))


def _dot_operand_dtypes(jaxpr):
  """(lhs, rhs) dtype names of every dot_general in a jaxpr, nested calls included."""
  return [d[:2] for d in dot_dtypes(jaxpr)]


def test_greedy_generation_matches_transformers():
  """32 greedy tokens from our while_loop equal transformers' generate, up to the first step
  whose reference top-2 margin is under 1e-3 (none, with this seed and init)."""
  hf = ref.tiny_hf_model(seed=7, init_std=0.2, vocab_size=151)
  config, params = ref.our_config(hf), ref.our_params(hf)
  prompt = np.random.RandomState(6).randint(0, config.vocab_size, (1, 7))
  hf.generation_config.eos_token_id = None  # random weights: no token means "stop"
  with torch.no_grad():
    out = hf.generate(torch.as_tensor(prompt), max_new_tokens=32, do_sample=False, pad_token_id=0)
  assert out.shape[1] == 7 + 32
  expected = out[0, 7:].tolist()
  full = ref.hf_logits(hf, np.concatenate([prompt[0], expected])[None])[0, 6:-1]
  cut = ref.first_small_margin(full)
  assert cut is None, f"reference margin under 1e-3 at step {cut}: pick another seed"
  ours = sampling.generate(params, config, [prompt[0].tolist()], 32).tokens[0]
  assert ours == expected


def test_logits_at_chosen_positions(pair):
  """logit_positions picks rows' positions before the head: equal to slicing the full logits."""
  _, config, params = pair
  tokens = jnp.asarray(np.random.RandomState(8).randint(0, config.vocab_size, (2, 9)))
  full, _ = model_lib.forward(params, config, tokens)
  positions = jnp.asarray([[8, 0], [3, 5]])
  picked, _ = model_lib.forward(params, config, tokens, logit_positions=positions)
  expected = jnp.take_along_axis(full, positions[:, :, None], axis=1)
  np.testing.assert_allclose(np.asarray(picked), np.asarray(expected), atol=1e-5, rtol=0)

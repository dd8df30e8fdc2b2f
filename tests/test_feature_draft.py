"""Feature drafts (EAGLE-style heads on the target's hidden states): exactness, features and
batching."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference as ref
from amd135m import feature_draft, model as model_lib, quantize, sampling, speculative
from amd135m.checkpoints import head_io
from amd135m.errors import UserError
from test_speculative import (
  PROMPTS,
  assert_ragged_rows_equal_single_runs,
  chi_square_passes,
  exact_token_distributions,
  small_model,
)


@pytest.fixture(scope="module")
def target():
  hf = ref.tiny_hf_model(seed=3, init_std=0.2, vocab_size=64)
  return ref.our_config(hf), ref.our_params(hf), hf


def random_head(config, params, layers, vocab_ids, seed=0):
  """A FeatureDraft with random weights over `vocab_ids` and its loop params."""
  head_config = feature_draft.HeadConfig(config, tuple(layers), len(vocab_ids))
  head = feature_draft.init_params(head_config, params, np.asarray(vocab_ids),
                                   jax.random.key(seed))
  draft_params = {"head": jax.tree.map(jnp.asarray, head),
                  "vocab": jnp.asarray(vocab_ids, jnp.int32),
                  "embedding": jnp.asarray(params["embed_tokens"]["embedding"])}
  return feature_draft.FeatureDraft(head_config), draft_params


def test_hidden_states_equal_transformers(target):
  """forward_with_hidden returns the residual stream at the asked depths, numbered as
  transformers' hidden_states (0 the embeddings, n the last layer's output before the norm)."""
  config, params, hf = target
  tokens = np.asarray([[5, 9, 2, 7, 3, 11]])
  with torch.no_grad():
    expected = hf(torch.as_tensor(tokens), output_hidden_states=True).hidden_states
  logits, _, hidden = model_lib.forward_with_hidden(params, config, jnp.asarray(tokens), None,
                                                    (0, 2, 1))
  d = config.dim
  for slot, depth in enumerate((0, 2, 1)):
    # transformers applies the final norm to its last entry; ours is the stream before it.
    if depth == config.n_layers:
      continue
    np.testing.assert_allclose(np.asarray(hidden[..., slot * d:(slot + 1) * d]),
                               expected[depth].numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, ref.hf_logits(hf, tokens), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="depths run from 0"):
    model_lib.forward_with_hidden(params, config, jnp.asarray(tokens), None, (3,))


@dataclasses.dataclass(frozen=True)
class RecordingDraft:
  """Proposes as prompt lookup does, and writes every feature the loop hands it into a buffer at
  the position it stands for: what the draft saw, to compare with a full forward."""
  feature_layers: tuple[int, ...] = (1, 2)
  forwards_per_token: int = 0

  def check(self, target_config):
    pass

  def start(self, params, tokens, prompt_lens, cache_size, *, features, **target):
    buffer = jnp.zeros((tokens.shape[0], cache_size + 16, features.shape[-1]))
    buffer = buffer.at[:, :features.shape[1]].set(features)
    # Positions past each prompt are not features of it: zero them, the rounds fill them in.
    keep = jnp.arange(buffer.shape[1])[None, :, None] < (prompt_lens - 1)[:, None, None]
    return jnp.where(keep, buffer, 0.0), prompt_lens - 1

  def propose(self, params, state, seq, seq_len, gamma, max_gamma, keys, knobs, target_vocab,
              features):
    buffer, known = state
    for j in range(features.shape[1]):  # news: positions known .. seq_len - 2
      position = known + j
      fresh = (position <= seq_len - 2)[:, None]
      row = jnp.where(fresh, features[:, j], buffer[jnp.arange(buffer.shape[0]), position])
      buffer = buffer.at[jnp.arange(buffer.shape[0]), position].set(row)
    tokens, q, _ = speculative.NgramDraft().propose(None, (), seq, seq_len, gamma, max_gamma,
                                                    keys, knobs, target_vocab)
    return tokens, q, (buffer, seq_len - 1)


@pytest.mark.parametrize("adaptive", [False, True])
def test_features_handed_to_the_draft_equal_a_full_forward(target, monkeypatch, adaptive):
  """Every hidden state the loop passes (the prompt's from the prefill, then each
  verification's accepted positions) equals the target's full forward over the final sequence;
  prompt lookup makes rounds accept several tokens, so news come several positions at a time.
  With an adaptive gamma too (rounds of 1-6 proposals), and the output is the target's own."""
  config, params, _ = target
  captured = {}
  loop = speculative._loop

  def capture(*args, **kwargs):
    out = loop(*args, **kwargs)
    captured.update(out)
    return out

  monkeypatch.setattr(speculative, "_loop", capture)
  prompts = [[5, 9, 2, 5, 9, 2, 5, 9], [7, 1, 1, 3], [11, 4, 11, 4, 11]]
  result = speculative.speculative_generate(params, config, RecordingDraft(), None, prompts, 24,
                                            gamma=3, adaptive=adaptive)
  assert result.totals["accepted"] > 0  # some rounds brought several positions
  assert result.tokens == sampling.generate(params, config, prompts, 24).tokens
  buffer, known = captured["draft_state"]
  for row, prompt in enumerate(prompts):
    sequence = prompt + result.tokens[row]
    _, _, hidden = model_lib.forward_with_hidden(params, config, jnp.asarray([sequence]), None,
                                                 (1, 2))
    n = int(known[row])
    assert n >= len(prompt) + 10
    np.testing.assert_allclose(np.asarray(buffer[row, :n]), np.asarray(hidden[0, :n]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layers,vocab_ids", [((2,), range(64)), ((0, 1, 2), range(0, 64, 3))],
                         ids=["eagle-last-full-vocab", "eagle3-pruned-vocab"])
def test_greedy_equals_target_only_and_ragged_rows_equal_single_runs(target, layers, vocab_ids):
  config, params, _ = target
  draft, draft_params = random_head(config, params, layers, list(vocab_ids))
  expected = sampling.generate(params, config, PROMPTS, 30).tokens
  # gamma 4, as the ragged batch below: the loop is compiled once for both.
  result = speculative.speculative_generate(params, config, draft, draft_params, PROMPTS, 30,
                                            gamma=4)
  assert result.tokens == expected
  # Ragged rows with their own stops, sampled: each row equals its run alone.
  stops = [[expected[0][10]], [-1], [expected[2][4]]]
  assert_ragged_rows_equal_single_runs(params, config, draft, draft_params, stops)


def test_the_loop_reads_the_head_in_bf16(target):
  """load_draft hands the loop decoding_params: every matrix in bf16 (the Linear kernels as
  panels), the norms f32, and logits that are the f32 head's up to the weights' rounding."""
  config, params, _ = target
  draft, draft_params = random_head(config, params, (0, 1, 2), list(range(0, 64, 3)))
  head = draft_params["head"]
  low = feature_draft.decoding_params(head)
  assert quantize.precision(low) == "bf16" and low["head"].dtype == jnp.bfloat16
  assert isinstance(low["layer"]["mlp"]["down_proj"]["kernel"], quantize.Bf16Weight)
  assert low["norm"]["scale"].dtype == jnp.float32
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(2, 5, draft.config.feature_dim)), jnp.float32)
  embeddings = jnp.asarray(rng.normal(size=(2, 5, config.dim)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  logits = [np.asarray(feature_draft.apply(p, draft.config, "__call__", features, embeddings,
                                           positions)) for p in (head, low)]
  scale = np.abs(logits[0]).max()
  assert 0 < np.abs(logits[1] - logits[0]).max() < 0.01 * scale


def test_sampling_with_a_pruned_vocabulary_matches_the_target_distribution(monkeypatch):
  """8000 seeds of 5 tokens over an 8-token vocabulary, the head proposing from 5 of the ids:
  each position passes a chi-square test against the exact target-only marginals (the 3 ids the
  draft never proposes reach the output only through the residual), and a deliberately wrong
  residual (p instead of normalize(max(0, p - q))) fails it."""
  config, params = small_model(seed=11, std=0.2)
  draft, draft_params = random_head(config, params, (0, 1), [0, 2, 3, 5, 7], seed=4)
  knobs = (1.0, 0, 1.0)
  prompt, n, length = [1, 2, 3], 8000, 5
  exact = exact_token_distributions(config, params, prompt, knobs, length)

  def run():
    result = speculative.speculative_generate(
        params, config, draft, draft_params, [prompt] * n, length, gamma=2,
        sampling_params=sampling.SamplingParams(*knobs), seed=list(range(n)))
    return np.asarray(result.tokens), result.totals["acceptance_rate"]

  tokens, acceptance = run()
  assert 0.05 < acceptance < 0.95
  assert all(chi_square_passes(tokens[:, i], exact[i]) for i in range(length))
  monkeypatch.setattr(speculative, "_residual", lambda p, q: p)
  jax.clear_caches()
  try:
    wrong, _ = run()
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  assert not all(chi_square_passes(wrong[:, i], exact[i]) for i in range(length))


def test_smollm2_greedy_with_random_and_trained_pruned_heads_equals_target_only(
    smollm2, smollm2_gguf, tmp_path):
  from amd135m.tokenizer import load_tokenizer
  from amd135m.training import feature_head
  config, params = smollm2
  tokenizer = load_tokenizer(smollm2_gguf)
  prompts = [tokenizer.encode("def fibonacci(n):\n"), tokenizer.encode("The capital of France is")]
  expected = sampling.generate(params, config, prompts, 24, stop_ids=tokenizer.stop_ids).tokens
  cuts = []
  for prompt, tokens in zip(prompts, expected):
    logits, _ = model_lib.forward(params, config, jnp.asarray([prompt + tokens]))
    cut = ref.first_small_margin(np.asarray(logits[0, len(prompt) - 1:-1]))
    cuts.append(len(tokens) if cut is None else cut)
  # The trained head's depths and K (2048): both heads run one compiled loop.
  layers = feature_draft.eagle3_layers(config.n_layers)
  random = random_head(config, params, layers, list(range(0, 49152, 24)))
  # A head trained on SmolLM2 itself (briefly: what matters here is that it is a real workdir's
  # head, with a vocabulary chosen from the target's own predictions).
  settings = feature_head.Settings(seq_len=48, prompt_tokens=32, batch=4, unroll=2, vocab=2048,
                                 eval_rows=2)
  feature_head.train_head(str(smollm2_gguf), tmp_path / "head", steps=4, prompts=8,
                        settings=settings, progress=False, log=lambda *_: None)
  trained = speculative.load_draft(str(tmp_path / "head"), config, params)
  for draft, draft_params in (random, trained):
    result = speculative.speculative_generate(params, config, draft, draft_params, prompts, 24,
                                              gamma=3, stop_ids=tokenizer.stop_ids)
    for row, cut in enumerate(cuts):
      assert result.tokens[row][:cut] == expected[row][:cut]
  # Behind prompt lookup, alone (long rounds where the code repeats a name).
  lookup_first = speculative.LookupFirstDraft(trained[0])
  result = speculative.speculative_generate(params, config, lookup_first, trained[1], prompts[:1],
                                            24, gamma=3, stop_ids=tokenizer.stop_ids)
  assert result.tokens[0][:cuts[0]] == expected[0][:cuts[0]]
  assert result.totals["long_rounds"] > 0


def test_fingerprint_tells_targets_apart(target):
  config, params, _ = target
  same = head_io.fingerprint(config, jax.tree.map(np.array, params))
  assert same == head_io.fingerprint(config, params)
  changed = jax.tree.map(np.array, params)
  changed["layers_1"]["mlp"]["down_proj"]["kernel"][0, 0] += 1.0
  assert head_io.fingerprint(config, changed) != same
  assert head_io.fingerprint(dataclasses.replace(config, rope_theta=1.0), params) != same


def test_check_refuses_another_architecture(target):
  config, params, _ = target
  draft, _ = random_head(config, params, (1,), list(range(8)))
  with pytest.raises(UserError, match="another architecture"):
    draft.check(dataclasses.replace(config, dim=config.dim * 2))

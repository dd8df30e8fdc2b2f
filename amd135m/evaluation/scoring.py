"""Log-likelihoods of token continuations: the one forward every scored evaluation shares."""
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amd135m import model as model_lib, sampling
from amd135m.errors import UserError


@functools.partial(jax.jit, static_argnames=("config",))
def score_positions(params, config: model_lib.ModelConfig, tokens: jax.Array,
                    positions: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """log p(targets[b, k] | tokens[b, :positions[b, k] + 1]) and whether it is the argmax.

  tokens: [B, T] int32 (right padding never reaches earlier positions); positions: [B, K] int32
  indices into T; targets: [B, K] int32. Returns ([B, K] f32, [B, K] bool). Only the K scored
  positions go through the output head.
  """
  logits, _ = model_lib.forward(params, config, tokens, logit_positions=positions)  # [B, K, V]
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  return target_logprobs, jnp.argmax(logits, axis=-1) == targets


def check_ids(config: model_lib.ModelConfig, ids: Sequence[int], what: str) -> None:
  """UserError when a token id does not exist in the model (a tokenizer of another model)."""
  bad = [t for t in ids if not 0 <= t < config.vocab_size]
  if bad:
    raise UserError(f"{what} has token id {bad[0]} outside the model's vocabulary "
                    f"[0, {config.vocab_size}): the tokenizer belongs to another model")


def loglikelihoods(params, config: model_lib.ModelConfig,
                   requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
  """(sum of log p(continuation | context), whether every continuation token is the argmax).

  requests: (context ids, continuation ids) pairs, both non-empty. As lm-eval's HF model does,
  a pair longer than the model's context keeps its last max_seq_len + 1 tokens, and requests run
  longest first. Batches are padded to `batch_size` rows and power-of-two lengths, so few
  shapes compile. `progress(n)` is called after each batch of n requests.
  """
  if batch_size < 1:
    raise UserError(f"batch size must be >= 1, got {batch_size}")
  rows = []
  for number, (context, continuation) in enumerate(requests):
    if not context or not continuation:
      raise ValueError(f"request {number} has an empty context or continuation")
    if len(continuation) > config.max_seq_len:
      raise UserError(f"a continuation of {len(continuation)} tokens exceeds the model's context "
                      f"of {config.max_seq_len}")
    whole = list(context) + list(continuation)
    check_ids(config, whole, f"request {number}")
    whole = whole[-(config.max_seq_len + 1):]
    rows.append((whole[:-1], list(continuation)))
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  results: list[tuple[float, bool] | None] = [None] * len(rows)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    width = min(sampling.bucket(len(rows[chunk[0]][0])), config.max_seq_len)
    scored = sampling.bucket(max(len(rows[i][1]) for i in chunk), minimum=8)
    tokens = np.zeros((batch_size, width), np.int32)
    positions = np.zeros((batch_size, scored), np.int32)
    targets = np.zeros((batch_size, scored), np.int32)
    for row, i in enumerate(chunk):
      inputs, continuation = rows[i]
      tokens[row, :len(inputs)] = inputs
      n = len(continuation)
      positions[row, :n] = np.arange(len(inputs) - n, len(inputs))
      targets[row, :n] = continuation
    logprobs, greedy = score_positions(params, config, jnp.asarray(tokens), jnp.asarray(positions),
                                       jnp.asarray(targets))
    logprobs, greedy = np.asarray(logprobs, np.float64), np.asarray(greedy)
    for row, i in enumerate(chunk):
      n = len(rows[i][1])
      results[i] = (float(logprobs[row, :n].sum()), bool(greedy[row, :n].all()))
    if progress is not None:
      progress(len(chunk))
  return results

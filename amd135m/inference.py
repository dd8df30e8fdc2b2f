"""Text in, records out: what the generate CLI and notebooks call, plain or speculative."""
import contextlib
import time
from typing import Sequence

import jax

from amd135m import model as model_lib, sampling, speculative
from amd135m.errors import UserError


def generate_text(params, config: model_lib.ModelConfig, tokenizer, texts: Sequence[str],
                  max_new_tokens: int,
                  sampling_params: sampling.SamplingParams = sampling.SamplingParams(),
                  seed: int = 0, draft=None, draft_params=None, gamma: int = 4,
                  adaptive_gamma: bool = False) -> list[dict]:
  """Encodes, generates as one batch, decodes; one record per text (the CLI's JSON lines).

  With a draft (any speculative.Draft: speculative.load_draft), decodes speculatively and adds
  acceptance_rate, tokens_per_target_call and target_calls (each row's own) to the records.
  `seconds` is the wall time of the whole batch (prefill, decode, host transfers) less the time
  spent tracing and compiling (reported as `compile_seconds`), so tokens_per_second of a row is
  its new tokens over the batch's generation time; `first_token_seconds` is the time to the
  first token (encoding and prefill, compiles excluded alike).
  """
  if any(not text for text in texts):
    raise UserError("empty prompt: give some text to continue")
  # On the device once: numpy weights (as checkpoints load them) were copied into every jitted
  # call, 0.2 s a call for SmolLM2, twice before the first token.
  params, draft_params = jax.device_put((params, draft_params))
  start = time.perf_counter()
  prompts = [tokenizer.encode(text) for text in texts]
  stop_ids = list(tokenizer.stop_ids)
  with compile_timer() as compile_seconds:
    result, extras = _generate(params, config, prompts, max_new_tokens, sampling_params, seed,
                               stop_ids, draft, draft_params, gamma, adaptive_gamma)
  seconds = time.perf_counter() - start - sum(d for _, d in compile_seconds)
  first_token_seconds = result.first_token_at - start - sum(
      d for at, d in compile_seconds if at <= result.first_token_at)
  records = []
  for text, ids, stopped, extra in zip(texts, result.tokens, result.stopped, extras):
    shown = ids[:-1] if stopped else ids  # the stop token ends the text; it is not part of it
    records.append(dict(prompt=text, completion=tokenizer.decode(shown), token_ids=ids,
                        new_tokens=len(ids), stopped=stopped, seconds=seconds,
                        tokens_per_second=len(ids) / seconds,
                        first_token_seconds=first_token_seconds,
                        compile_seconds=sum(d for _, d in compile_seconds), **extra))
  return records


@contextlib.contextmanager
def compile_timer():
  """Collects (when it ended, seconds) of each trace, lowering and compile inside the block."""
  durations = []

  def listener(event: str, duration: float, **kwargs):
    if event.startswith("/jax/core/compile/"):
      durations.append((time.perf_counter(), duration))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield durations
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _generate(params, config, prompts, max_new_tokens, sampling_params, seed, stop_ids, draft,
              draft_params, gamma, adaptive_gamma):
  if draft is None:
    result = sampling.generate(params, config, prompts, max_new_tokens, sampling_params, seed,
                               stop_ids=stop_ids)
    extras = [{} for _ in prompts]
  else:
    result = speculative.speculative_generate(params, config, draft, draft_params, prompts,
                                              max_new_tokens, gamma, sampling_params, seed,
                                              stop_ids,
                                              adaptive=adaptive_gamma)
    extras = [{key: row[key] for key in ("acceptance_rate", "tokens_per_target_call",
                                         "target_calls", "amd_acceptance")}
              for row in result.rows]
  return result, extras

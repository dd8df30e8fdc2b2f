"""Text in, records out: what the generate CLI and notebooks call, plain or speculative."""
import time
from typing import Sequence

from amd135m import model as model_lib, sampling, speculative
from amd135m.errors import UserError


def generate_text(params, config: model_lib.ModelConfig, tokenizer, texts: Sequence[str],
                  max_new_tokens: int,
                  sampling_params: sampling.SamplingParams = sampling.SamplingParams(),
                  seed: int = 0, draft=None, draft_params=None, gamma: int = 4,
                  adaptive_gamma: bool = False) -> list[dict]:
  """Encodes, generates as one batch, decodes; one record per text (the CLI's JSON lines).

  With a draft (speculative.ModelDraft or NgramDraft), decodes speculatively and adds
  acceptance_rate, tokens_per_target_call and target_calls (each row's own) to the records.
  `seconds` is the wall time of the whole batch (prefill, decode, host transfers), so
  tokens_per_second of a row is its new tokens over the batch's time.
  """
  if any(not text for text in texts):
    raise UserError("empty prompt: give some text to continue")
  prompts = [tokenizer.encode(text) for text in texts]
  stop_ids = list(tokenizer.stop_ids)
  start = time.perf_counter()
  if draft is None:
    result = sampling.generate(params, config, prompts, max_new_tokens, sampling_params, seed,
                               stop_ids=stop_ids)
    extras = [{} for _ in texts]
  else:
    result = speculative.speculative_generate(params, config, draft, draft_params, prompts,
                                              max_new_tokens, gamma, sampling_params, seed,
                                              stop_ids,
                                              adaptive=adaptive_gamma)
    extras = [{key: row[key] for key in ("acceptance_rate", "tokens_per_target_call",
                                         "target_calls", "amd_acceptance")}
              for row in result.rows]
  seconds = time.perf_counter() - start
  records = []
  for text, ids, stopped, extra in zip(texts, result.tokens, result.stopped, extras):
    shown = ids[:-1] if stopped else ids  # the stop token ends the text; it is not part of it
    records.append(dict(prompt=text, completion=tokenizer.decode(shown), token_ids=ids,
                        new_tokens=len(ids), stopped=stopped, seconds=seconds,
                        tokens_per_second=len(ids) / seconds, **extra))
  return records

"""Text in, records out: what the generate CLI and notebooks call, plain or speculative."""
import contextlib
import time
from typing import Sequence

import jax

from amd135m import (
  checkpoints,
  model as model_lib,
  quantize,
  sampling,
  speculative,
  tokenizer as tokenizer_lib,
)
from amd135m.errors import UserError, jsonl_records


def load_and_generate(model: str, prompts: Sequence[str], prompts_file: str | None = None, *,
                      max_new_tokens: int = 128,
                      sampling_params: sampling.SamplingParams = sampling.SamplingParams(),
                      seed: int = 0, weights: str = "f32", draft: str | None = None,
                      gamma: int | None = None, adaptive_gamma: bool = False) -> list[dict]:
  """`python -m amd135m.generate`: the model at `model` (GGUF, HF directory or workdir) continues
  `prompts` and those of `prompts_file` (JSONL) as one batch; one record per prompt.

  Every setting is checked before a model loads (seconds here, minutes for a 7B); a mistake is a
  UserError naming the generate flag. `draft` is a --draft spec (speculative.load_draft), `gamma`
  None its default 4; `weights` the precision decode reads the weights in (quantize.WEIGHTS).
  """
  prompts = read_prompts(prompts, prompts_file)
  sampling_params.validate()
  if max_new_tokens < 1:
    raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
  if draft is None and (gamma is not None or adaptive_gamma):
    raise UserError("--gamma and --adaptive-gamma set speculative decoding: add --draft "
                    "DRAFT|ngram, or drop them")
  if not 0 <= seed <= 2**32 - len(prompts):
    raise UserError(f"--seed {seed} is out of range: 0 to 2**32 - {len(prompts)} for "
                    f"{len(prompts)} prompt(s) (row i uses seed + i)")
  if weights != "f32" and draft in speculative.COPY_DRAFTS:
    raise UserError(f"--draft {draft} drafts for an f32 target: drop --weights {weights}, or "
                    "pick another draft")
  gamma = 4 if gamma is None else gamma
  if gamma < 1:
    raise UserError(f"--gamma must be >= 1, got {gamma}")
  config, params = checkpoints.load_params(model)
  tokenizer = tokenizer_lib.load_tokenizer(model)
  draft_model, draft_params = (None, None) if draft is None else speculative.load_draft(
      draft, config, params, tokenizer)
  params = quantize.cast_weights(params, config, weights)
  return generate_text(params, config, tokenizer, prompts, max_new_tokens, sampling_params, seed,
                       draft=draft_model, draft_params=draft_params, gamma=gamma,
                       adaptive_gamma=adaptive_gamma)


def read_prompts(prompts: Sequence[str], prompts_file: str | None = None) -> list[str]:
  """The --prompt texts, then the 'prompt' of each line of the JSONL `prompts_file`; at least one.
  A mistake is a UserError naming the flag or the file's line."""
  prompts = [_check_text(prompt, f"--prompt #{i}") for i, prompt in enumerate(prompts, 1)]
  if prompts_file:
    for where, record in jsonl_records(prompts_file, "--prompts-file"):
      # A non-string prompt would otherwise fail deep inside the tokenizer with a TypeError.
      if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise UserError(f"{where}: expected an object with a string 'prompt'")
      prompts.append(_check_text(record["prompt"], where))
  if not prompts and prompts_file:
    raise UserError(f"--prompts-file {prompts_file} holds no prompt: one JSON object with "
                    "a 'prompt' string per line")
  if not prompts:
    raise UserError("no prompt given: pass --prompt TEXT or --prompts-file F.jsonl")
  return prompts


def _check_text(prompt: str, where: str) -> str:
  """A prompt the tokenizer can take: Python hands non-UTF-8 argv bytes over as lone surrogates
  (and JSON may spell one, "\\ud800"), which the tokenizer rejects with a TypeError."""
  try:
    prompt.encode("utf-8")
  except UnicodeEncodeError as e:
    char = ord(prompt[e.start])
    what = (f"byte 0x{char - 0xdc00:02x}" if 0xdc80 <= char <= 0xdcff
            else f"lone surrogate U+{char:04X}")
    raise UserError(f"{where}: not UTF-8 text ({what} at character {e.start}); pass the prompt "
                    "as UTF-8") from None
  return prompt


def format_record(record: dict) -> str:
  """A record as generate prints it without --json: the text, then its statistics."""
  stats = f"{record['new_tokens']} tokens, {record['tokens_per_second']:.1f} tokens/s"
  if "acceptance_rate" in record:
    stats += (f", acceptance {record['acceptance_rate']:.2f}, "
              f"{record['tokens_per_target_call']:.2f} tokens per target call")
  return f"{record['prompt']}{record['completion']}\n  [{stats}]\n"


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
  # call (a copy of SmolLM2's 541 MB each time), twice before the first token.
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

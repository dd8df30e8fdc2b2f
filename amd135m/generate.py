"""python -m amd135m.generate --model PATH --prompt TEXT [--prompt ...] --max-new-tokens N

PATH is a GGUF file or a Hugging Face Llama directory. --temperature 0 (the default) is greedy.
With --draft DRAFT --gamma K it decodes speculatively (DRAFT: a feature-head workdir trained for
this target by amd135m.draft_head, a model whose vocabulary is an id-prefix of the target's,
`first:N`, `self`, `int8` or `bf16`, the target's own copy at that precision, or `ngram`, prompt
lookup) and each JSON record adds acceptance_rate, tokens_per_target_call and target_calls.
--weights bf16 or int8 decodes with the weights at that precision (bf16: half the bytes per
token; int8: one scale per output channel, a quarter), activations and the KV cache in f32.
"""
import json
import sys

from amd135m import (
  checkpoints,
  compilation_cache,
  inference,
  quantize,
  sampling,
  speculative,
  tokenizer as tokenizer_lib,
)
from amd135m.errors import ArgumentParser, UserError


def parse_args(argv):
  parser = ArgumentParser(prog="amd135m.generate", description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="a .gguf file or a Hugging Face directory")
  parser.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
  parser.add_argument("--prompts-file", help="JSONL with a 'prompt' field per line")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
  parser.add_argument("--top-k", type=int, default=0, help="0 disables")
  parser.add_argument("--top-p", type=float, default=1.0, help="1 disables")
  parser.add_argument("--seed", type=int, default=0, help="row i uses seed + i")
  parser.add_argument("--weights", choices=quantize.WEIGHTS, default="f32",
                      help="the precision decode reads the weights in (weight-only; int8 with "
                      "one scale per output channel)")
  parser.add_argument("--draft", help="speculative decoding: " + speculative.DRAFT_SPECS)
  parser.add_argument("--gamma", type=int, help="tokens drafted per target call (default 4)")
  parser.add_argument("--adaptive-gamma", action="store_true",
                      help="adapt gamma per batch (+2 after all accepted, else -1), up to 2x")
  parser.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
  return parser.parse_args(argv)


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


def read_prompts(args) -> list[str]:
  prompts = [_check_text(prompt, f"--prompt #{i}") for i, prompt in enumerate(args.prompt, 1)]
  if args.prompts_file:
    name = args.prompts_file
    try:
      with open(name, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            # Parsed one line at a time, so e.lineno is always 1: report the file's line number.
            raise UserError(f"{name}:{number}: not valid JSON ({e.msg})") from e
          # A non-string prompt would otherwise fail deep inside the tokenizer with a TypeError.
          if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f"{name}:{number}: expected an object with a string 'prompt'")
          prompts.append(_check_text(record["prompt"], f"{name}:{number}"))
    except OSError as e:
      raise UserError(f"cannot read --prompts-file: {e.strerror}: {name}") from e
    except UnicodeDecodeError as e:
      raise UserError(f"{name}: not UTF-8 text ({e.reason})") from e
  if not prompts and args.prompts_file:
    raise UserError(f"--prompts-file {args.prompts_file} holds no prompt: one JSON object with "
                    "a 'prompt' string per line")
  if not prompts:
    raise UserError("no prompt given: pass --prompt TEXT or --prompts-file F.jsonl")
  return prompts


def main(argv=None) -> int:
  args = parse_args(argv)
  compilation_cache.enable()
  try:
    # Every flag is checked before a model loads (seconds here, minutes for a 7B).
    prompts = read_prompts(args)
    sampling_params = sampling.SamplingParams(args.temperature, args.top_k, args.top_p)
    sampling_params.validate()
    if args.max_new_tokens < 1:
      raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.draft is None and (args.gamma is not None or args.adaptive_gamma):
      raise UserError("--gamma and --adaptive-gamma set speculative decoding: add --draft "
                      "DRAFT|ngram, or drop them")
    if not 0 <= args.seed <= 2**32 - len(prompts):
      raise UserError(f"--seed {args.seed} is out of range: 0 to 2**32 - {len(prompts)} for "
                      f"{len(prompts)} prompt(s) (row i uses seed + i)")
    if args.weights != "f32" and args.draft in ("int8", "bf16"):
      raise UserError(f"--draft {args.draft} drafts for an f32 target: drop --weights "
                      f"{args.weights}, or pick another draft")
    gamma = 4 if args.gamma is None else args.gamma
    if gamma < 1:
      raise UserError(f"--gamma must be >= 1, got {gamma}")
    config, params = checkpoints.load_params(args.model)
    tokenizer = tokenizer_lib.load_tokenizer(args.model)
    draft, draft_params = (None, None) if args.draft is None else speculative.load_draft(
        args.draft, config, params, tokenizer)
    params = quantize.cast_weights(params, config, args.weights)
    records = inference.generate_text(
        params, config, tokenizer, prompts, args.max_new_tokens,
        sampling_params, args.seed, draft=draft, draft_params=draft_params, gamma=gamma,
        adaptive_gamma=args.adaptive_gamma)
  except UserError as e:
    print(f"amd135m.generate: error: {e}", file=sys.stderr)
    return 2
  for record in records:
    if args.json:
      print(json.dumps(record, ensure_ascii=False))
    else:
      stats = f"{record['new_tokens']} tokens, {record['tokens_per_second']:.1f} tokens/s"
      if "acceptance_rate" in record:
        stats += (f", acceptance {record['acceptance_rate']:.2f}, "
                  f"{record['tokens_per_target_call']:.2f} tokens per target call")
      print(f"{record['prompt']}{record['completion']}\n  [{stats}]\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

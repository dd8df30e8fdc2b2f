"""python -m amd135m.generate --model PATH --prompt TEXT [--prompt ...] --max-new-tokens N

PATH is a GGUF file or a Hugging Face Llama directory. --temperature 0 (the default) is greedy.
With --draft DRAFT --gamma K it decodes speculatively (DRAFT: a feature-head workdir trained for
this target by amd135m.draft_head, a model whose vocabulary is an id-prefix of the target's,
`first:N`, `self`, `int8`, `int4` or `bf16`, the target's own copy at that precision, or `ngram`,
prompt lookup) and each JSON record adds acceptance_rate, tokens_per_target_call and target_calls.
--weights bf16, int8 or int4 decodes with the weights at that precision (bf16: half the bytes per
token; int8: one scale per output channel, a quarter; int4: GGUF's Q4_1 blocks in the layers, an
int8 head), activations and the KV cache in f32.
"""
import json
import sys

from amd135m import compilation_cache, inference, quantize, sampling, speculative
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
                      "one scale per output channel, int4 a scale and minimum per 32 inputs)")
  parser.add_argument("--draft", help="speculative decoding: " + speculative.DRAFT_SPECS)
  parser.add_argument("--gamma", type=int, help="tokens drafted per target call (default 4)")
  parser.add_argument("--adaptive-gamma", action="store_true",
                      help="adapt gamma per batch (+2 after all accepted, else -1), up to 2x")
  parser.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  compilation_cache.enable()
  try:
    records = inference.load_and_generate(
        args.model, args.prompt, args.prompts_file, max_new_tokens=args.max_new_tokens,
        sampling_params=sampling.SamplingParams(args.temperature, args.top_k, args.top_p),
        seed=args.seed, weights=args.weights, draft=args.draft, gamma=args.gamma,
        adaptive_gamma=args.adaptive_gamma)
  except UserError as e:
    print(f"amd135m.generate: error: {e}", file=sys.stderr)
    return 2
  for record in records:
    print(json.dumps(record, ensure_ascii=False) if args.json else inference.format_record(record))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Benchmarks with provenance. python -m amd135m.bench decode|speculative ... [--json]

decode: batch-1 greedy decode tokens/s, prefill and time to first token with the weights in f32,
bf16 and int8, beside transformers' `generate` and forward in f32 and bf16, in one run, with the
memory-bandwidth roofline (amd135m/benchmarks/decode_bench.py).
speculative: target-only and speculative decoding with any --draft on HumanEval prompts, beside
transformers' greedy, prompt lookup and assisted generation (amd135m/benchmarks/spec_bench.py).
train, data: amd135m/benchmarks/train_bench.py, data_bench.py.
Transformers runs in a subprocess (hf_bench/) so that this package never imports torch.
"""
import json
import sys

from amd135m import compilation_cache, sampling, speculative
from amd135m.benchmarks import decode_bench, spec_bench
from amd135m.errors import ArgumentParser, UserError


def main(argv=None) -> int:
  parser = ArgumentParser(prog="amd135m.bench", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="what", required=True)
  decode = sub.add_parser("decode", help="batch-1 greedy decode and 512-token prefill")
  decode.add_argument("--model", required=True)
  decode.add_argument("--new-tokens", type=int, default=128)
  decode.add_argument("--runs", type=int, default=3)
  decode.add_argument("--weights", default="f32,bf16,int8,int4",
                      help="our decode's weight precisions, measured side by side (speedups "
                      "against the first)")
  decode.add_argument("--reference", default="f32,bf16",
                      help="transformers' dtypes (its speedup column is against the first)")
  decode.add_argument("--no-reference", action="store_true", help="skip transformers")
  decode.add_argument("--json", action="store_true")
  spec = sub.add_parser("speculative", help="speculative decoding on HumanEval prompts")
  spec.add_argument("--target", required=True)
  spec.add_argument("--draft", required=True, help=speculative.DRAFT_SPECS)
  spec.add_argument("--gamma", type=int, default=4)
  spec.add_argument("--prompts", type=int, default=4, help="the first N HumanEval prompts")
  spec.add_argument("--new-tokens", type=int, default=64)
  spec.add_argument("--repeats", type=int, default=3,
                    help="timed passes (each prompt through every method in turn); medians")
  spec.add_argument("--batch", type=int, default=1,
                    help="prompts decoded together (ragged: each keeps its own length)")
  spec.add_argument("--sampling", choices=("greedy", "amd"), default="greedy",
                    help="greedy, or AMD's sampling settings (T 0.1, top-k 10, top-p 0.95)")
  spec.add_argument("--no-reference", action="store_true", help="skip transformers")
  spec.add_argument("--json", action="store_true")
  from amd135m.benchmarks import data_bench  # noqa: PLC0415 (data: logic in benchmarks/)
  data_bench.add_parser(sub)
  from amd135m.benchmarks import train_bench  # noqa: PLC0415 (train: logic in benchmarks/)
  train_bench.add_parser(sub)
  args = parser.parse_args(argv)
  compilation_cache.enable()
  if args.what == "data":
    return data_bench.main(args)
  if args.what == "train":
    return train_bench.main(args)
  try:
    if args.what == "decode":
      result = decode_bench.bench_decode(
          args.model, args.weights.split(","), () if args.no_reference else
          args.reference.split(","), args.new_tokens, args.runs)
    else:
      result = spec_bench.bench_speculative(args.target, args.draft, args.gamma, args.prompts,
                                 args.new_tokens, reference=not args.no_reference,
                                 repeats=args.repeats, batch=args.batch, sampling_params=(
                                     spec_bench.AMD_SAMPLING if args.sampling == "amd"
                                     else sampling.SamplingParams()))
  except UserError as e:
    print(f"amd135m.bench: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result, indent=1))
  elif args.what == "speculative":
    spec_bench.print_speculative(result)
  else:
    decode_bench.print_decode(result)
  return 0


if __name__ == "__main__":
  sys.exit(main())

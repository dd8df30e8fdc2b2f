"""AMD's speculative-decoding table: acceptance and speedup per setting (greedy/sampling) and gamma.

python -m amd135m.spec_eval --target T --draft D [--paper] [--prompts N] [--gammas 2 4] --out DIR

--paper is AMD's setting (codellama_spec.py in github.com/AMD-AIG-AIMA/AMD-LLM): the one-shot
`[PYTHON]` prefix before each of the 164 HumanEval prompts, temperature 0.1, top-k 10, top-p 0.95,
up to 512 new tokens ending at EOS, and transformers 4.37's default assistant schedule (gamma 5,
+2 after an all-accepted round, else -1); greedy beside it. Without --paper: the raw HumanEval
prompts, 64 new tokens with no stop (every decode the same length), fixed gammas. The logic lives
in amd135m/benchmarks/spec_table.py.
"""
import argparse
import functools
import json
import sys

from amd135m import compilation_cache, sampling, speculative
from amd135m.benchmarks.spec_table import PAPER_SAMPLING, format_table, run
from amd135m.errors import ArgumentParser, UserError


def main(argv=None) -> int:
  parser = ArgumentParser(prog="amd135m.spec_eval", description=__doc__.splitlines()[0])
  parser.add_argument("--target", required=True, help="HF directory or .gguf of the target")
  parser.add_argument("--draft", required=True, help=speculative.DRAFT_SPECS)
  parser.add_argument("--out", required=True, help="directory for spec_table.{csv,json,png}")
  parser.add_argument("--paper", action="store_true",
                      help="AMD's setting: one-shot [PYTHON] prefix, 164 prompts, 512 tokens to "
                           "EOS, gamma 5 with transformers' heuristic schedule")
  parser.add_argument("--prompts", type=int, help="the first N HumanEval prompts (4; paper 164)")
  parser.add_argument("--gammas", type=int, nargs="+", help="draft lengths (2 4; paper 5)")
  parser.add_argument("--max-new-tokens", type=int, help="per prompt (64; paper 512)")
  parser.add_argument("--settings", nargs="+", default=["greedy", "sampling"],
                      help="greedy and/or sampling")
  parser.add_argument("--temperature", type=float, default=PAPER_SAMPLING.temperature)
  parser.add_argument("--top-k", type=int, default=PAPER_SAMPLING.top_k)
  parser.add_argument("--top-p", type=float, default=PAPER_SAMPLING.top_p)
  parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction,
                      help="adapt gamma per round from its start value (paper: on)")
  parser.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction,
                      help="end each decode at the tokenizer's stop ids (paper: on)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", help="cast weights on load, e.g. bfloat16 (default: as stored)")
  parser.add_argument("--json", action="store_true", help="print the rows as JSON")
  args = parser.parse_args(argv)
  compilation_cache.enable()
  import tqdm  # noqa: PLC0415
  progress = functools.partial(tqdm.tqdm, file=sys.stderr, leave=False, unit="prompt")
  try:
    table, paths = run(args.target, args.draft, args.out, paper=args.paper,
                       n_prompts=args.prompts, gammas=args.gammas,
                       max_new_tokens=args.max_new_tokens, settings=args.settings,
                       sampling_params=sampling.SamplingParams(args.temperature, args.top_k,
                                                               args.top_p),
                       adaptive=args.adaptive, stop_at_eos=args.stop_at_eos, seed=args.seed,
                       dtype=args.dtype, progress=progress)
  except UserError as e:
    print(f"amd135m.spec_eval: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(table.rows, indent=1))
  else:
    print(format_table(table.rows))
    print("\nsaved " + ", ".join(str(p) for p in paths.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())

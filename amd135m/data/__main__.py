"""python -m amd135m.data prepare|stats ...

prepare: build a dataset from raw files in --manual-dir into --data-dir (array_record).
stats:   documents, skipped records and why, and (with --tokenizer) tokens, of a prepared dataset.
"""
import argparse
import contextlib
import json
import sys

import tqdm
from absl import logging as absl_logging

from amd135m.data import builders, tokenized
from amd135m.errors import UserError

NAMES = ["slimpajama", "project_gutenberg", "starcoder_python", "local_text"]


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="amd135m.data", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for command in ("prepare", "stats"):
    p = sub.add_parser(command)
    p.add_argument("--dataset", required=True, choices=NAMES)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--pattern", action="append", help="file glob (local_text); repeatable")
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    if command == "prepare":
      p.add_argument("--manual-dir", required=True, help="where the raw files were downloaded")
      p.add_argument("--overwrite", action="store_true")
    else:
      p.add_argument("--tokenizer", help="count tokens with this model's tokenizer")
  return parser.parse_args(argv)


def stats(args) -> dict:
  """The prepared dataset's stats file, plus a token count when a tokenizer is given."""
  source = builders.load(args.dataset, args.data_dir, patterns=args.pattern,
                         shard_index=args.shard_index, num_shards=args.num_shards)
  result = builders.read_stats(args.dataset, args.data_dir, patterns=args.pattern,
                               shard_index=args.shard_index, num_shards=args.num_shards)
  if args.tokenizer:
    from amd135m.tokenizer import load_tokenizer  # noqa: PLC0415 (only when counting tokens)
    docs = tokenized.TokenizedSource(source, load_tokenizer(args.tokenizer))
    result["tokens"] = sum(len(docs[i]) for i in tqdm.trange(len(docs), desc="tokenising",
                                                             unit="doc", file=sys.stderr))
  return result


def main(argv=None) -> int:
  args = parse_args(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)  # tfds warns on every custom config
  try:
    # tfds reports its progress on stdout; keep stdout for the JSON result.
    with contextlib.redirect_stdout(sys.stderr):
      result = run_command(args)
  except UserError as e:
    print(f"amd135m.data: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result, indent=1))
  return 0


def run_command(args) -> dict:
  if args.command == "prepare":
    return builders.prepare(args.dataset, args.manual_dir, args.data_dir, patterns=args.pattern,
                            shard_index=args.shard_index, num_shards=args.num_shards,
                            overwrite=args.overwrite)
  return stats(args)


if __name__ == "__main__":
  sys.exit(main())

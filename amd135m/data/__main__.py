"""python -m amd135m.data prepare|stats ...

prepare: build a dataset from raw files in --manual-dir into --data-dir (array_record), with
         --workers local processes; --tokenizer also tokenises once into the token store that
         the loader reads (tokenized.TokenStore) and counts tokens.
stats:   documents, skipped records and why, and (with --tokenizer) tokens, of a prepared dataset;
         counting tokens writes the token store if it is missing.
Progress goes to stderr; the result, as JSON, to stdout.
"""
import contextlib
import json
import sys

import tqdm
from absl import logging as absl_logging

from amd135m.data import builders
from amd135m.errors import ArgumentParser, UserError, make_dir

NAMES = ["slimpajama", "project_gutenberg", "starcoder_python", "local_text"]


def parse_args(argv):
  parser = ArgumentParser(prog="amd135m.data", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for command in ("prepare", "stats"):
    p = sub.add_parser(command)
    p.add_argument("--dataset", required=True, choices=NAMES)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--pattern", action="append", help="file glob (local_text); repeatable")
    p.add_argument("--shard-index", type=int, default=None if command == "stats" else 0,
                   help="this host's shard" + (" (default: all shards)" if command == "stats"
                                               else ""))
    p.add_argument("--num-shards", type=int, default=None if command == "stats" else 1)
    p.add_argument("--tokenizer", help="count tokens with this model's tokenizer (a GGUF, "
                   "tokenizer.json or tokenizer.model path) and write the token store")
    if command == "prepare":
      p.add_argument("--manual-dir", required=True, help="where the raw files were downloaded")
      p.add_argument("--workers", type=int, default=1,
                     help="local processes, each writing a contiguous run of the files")
      p.add_argument("--overwrite", action="store_true")
  return parser.parse_args(argv)


def prepare(args) -> dict:
  """Prepares with a progress bar over input files (documents and tokens in its postfix)."""
  total = len(builders.input_files(args.dataset, args.manual_dir, patterns=args.pattern,
                                   shard_index=args.shard_index, num_shards=args.num_shards))
  make_dir(args.data_dir, "--data-dir")
  counts = {"docs": 0, "tokens": 0}
  with contextlib.ExitStack() as stack:
    bars = []  # opened at the first file: a reuse shows none, a refusal is the only line

    def progress(files, documents, tokens):
      if not bars:
        bars.append(stack.enter_context(tqdm.tqdm(total=total, desc=f"prepare {args.dataset}",
                                                  unit="file", file=sys.stderr)))
      counts["docs"] += documents
      counts["tokens"] += tokens
      bars[0].set_postfix_str(f"docs={counts['docs']}" + (f", tokens={counts['tokens']}"
                                                          if args.tokenizer else ""),
                              refresh=False)
      bars[0].update(files)

    return builders.prepare(args.dataset, args.manual_dir, args.data_dir, patterns=args.pattern,
                            shard_index=args.shard_index, num_shards=args.num_shards,
                            workers=args.workers, tokenizer=args.tokenizer,
                            overwrite=args.overwrite, progress=progress)


def stats(args) -> dict:
  """The prepared dataset's stats, plus a token count when a tokenizer is given."""
  where = dict(patterns=args.pattern, shard_index=args.shard_index, num_shards=args.num_shards)
  result = builders.read_stats(args.dataset, args.data_dir, **where)
  if args.tokenizer:
    with tqdm.tqdm(total=result["documents"], desc="tokens", unit="doc",
                   file=sys.stderr) as bar:
      result["tokens"] = builders.count_tokens(args.dataset, args.data_dir, args.tokenizer,
                                               progress=bar.update, **where)
  return result


def main(argv=None) -> int:
  args = parse_args(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)  # tfds warns on every custom config
  import tensorflow_datasets as tfds  # noqa: PLC0415 (builders imported it already)
  tfds.disable_progress_bar()  # ours counts files, documents and tokens
  try:
    # tfds reports on stdout; keep stdout for the JSON result.
    with contextlib.redirect_stdout(sys.stderr):
      result = prepare(args) if args.command == "prepare" else stats(args)
  except UserError as e:
    print(f"amd135m.data: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""python -m amd135m.bench data: the loader's tokens/s per host, and preparation's per worker.

On the two local corpora (`make corpora`: gutenberg_shakespeare *.txt and python_stdlib *.py,
prepared under CACHE/data, raw under CACHE/corpora) with a model's tokenizer (default: the
SmolLM2 GGUF of tools/fetch_test_models.py):
- loader: a two-source mixture (equal weights, shuffled, endless), seq_len 2048, global batch
  64, one process; tokens/s counts the input tokens of delivered batches (B x seq_len) after a
  warm-up batch (worker start-up is reported apart). Two ways to get token ids: tokenised as
  documents are read (records prepared without a tokenizer), at each worker count; and read
  from the token store that `prepare --tokenizer` writes, in process. Also process 0 of 4
  hosts, both ways: what one host pays for the other hosts' rows.
- prepare: both corpora tokenised and written again (into a temporary directory) at each
  worker count; tokens/s is the corpus's tokens over the wall time, per worker its share.
Goal (issue 4): one host feeds an 8-GCD MI250 node at AMD's rate, 40k tokens/s per GCD.
"""
import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time

from amd135m import paths
from amd135m.data import builders, loader as loader_lib, tokenized
from amd135m.errors import UserError

CORPORA = (("gutenberg_shakespeare", "*.txt"), ("python_stdlib", "*.py"))
GOAL_PER_GCD = 40_000  # tokens/s per MI250 GCD, AMD's pretraining rate
GCDS_PER_NODE = 8


def _sources(data_root: pathlib.Path, tokenizer, store: bool) -> list:
  """Each corpus as token-id documents: from its token store, or tokenised on read."""
  sources = []
  for name, pattern in CORPORA:
    data_dir = data_root / name
    if store:  # writes the store once if this cache was prepared without a tokenizer
      builders.count_tokens("local_text", data_dir, tokenizer, patterns=[pattern])
      sources.append(builders.load_tokens("local_text", data_dir, tokenizer, patterns=[pattern]))
    else:
      sources.append(tokenized.TokenizedSource(
          builders.load("local_text", data_dir, patterns=[pattern]), tokenizer))
  return sources


def time_loader(sources, separator: int, *, seq_len: int, batch_size: int, seconds: float,
                worker_count: int = 0, process_index: int = 0, process_count: int = 1) -> dict:
  """Batches for `seconds` after one warm-up batch; tokens/s of this process's input tokens."""
  start = time.perf_counter()
  with loader_lib.DataLoader(sources, seq_len=seq_len, global_batch_size=batch_size,
                             separator_id=separator, seed=0, worker_count=worker_count,
                             process_index=process_index, process_count=process_count) as data:
    batch = next(data)
    startup = time.perf_counter() - start
    tokens, batches = 0, 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
      batch = next(data)
      tokens += batch["inputs"].size
      batches += 1
  return dict(worker_count=worker_count, process_index=process_index,
              process_count=process_count, tokens_per_second=tokens / elapsed, batches=batches,
              seconds=elapsed, first_batch_seconds=startup)


def time_prepare(corpora_root: pathlib.Path, tokenizer_path: str, workers: int) -> dict:
  """Tokenise and write both corpora afresh with `workers` processes (start-up included)."""
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    tokens = documents = 0
    for name, pattern in CORPORA:
      stats = builders.prepare("local_text", corpora_root / name, pathlib.Path(tmp) / name,
                               patterns=[pattern], workers=workers, tokenizer=tokenizer_path)
      tokens += stats["tokens"]
      documents += stats["documents"]
    elapsed = time.perf_counter() - start
  return dict(workers=workers, tokens=tokens, documents=documents, seconds=elapsed,
              tokens_per_second=tokens / elapsed, tokens_per_second_per_worker=tokens / elapsed
              / workers)


def bench_data(tokenizer_path=None, cache=None, worker_counts=(0, 1, 2), prepare_workers=(1, 2),
               seq_len: int = 2048, batch_size: int = 64, seconds: float = 8.0) -> dict:
  from absl import logging as absl_logging  # noqa: PLC0415

  from amd135m.provenance import provenance  # noqa: PLC0415
  from amd135m.tokenizer import load_tokenizer  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.ERROR)  # tfds warns on every custom config
  import tensorflow_datasets as tfds  # noqa: PLC0415 (builders imported it already)
  tfds.disable_progress_bar()
  cache = pathlib.Path(cache or paths.cache_path())
  tokenizer_path = tokenizer_path or cache.joinpath(*paths.SMOLLM2_GGUF)
  if not pathlib.Path(tokenizer_path).exists():
    raise UserError(f"no tokenizer at {tokenizer_path}: run tools/fetch_test_models.py or pass "
                    "--tokenizer")
  tokenizer = load_tokenizer(tokenizer_path)
  separator = tokenized.separator_id(tokenizer)
  on_read = _sources(cache / "data", tokenizer, store=False)
  stored = _sources(cache / "data", tokenizer, store=True)
  common = dict(seq_len=seq_len, batch_size=batch_size, seconds=seconds)
  loader = [dict(time_loader(on_read, separator, worker_count=n, **common), token_store=False)
            for n in worker_counts]
  loader.append(dict(time_loader(stored, separator, **common), token_store=True))
  hosts = [dict(time_loader(sources, separator, process_index=0, process_count=4, **common),
                token_store=store) for sources, store in ((stored, True), (on_read, False))]
  prepare = [time_prepare(cache / "corpora", str(tokenizer_path), n) for n in prepare_workers]
  goal = GOAL_PER_GCD * GCDS_PER_NODE

  def verdict(rows):
    reaching = [r["worker_count"] for r in rows if r["tokens_per_second"] >= goal]
    best = max(rows, key=lambda r: r["tokens_per_second"])
    return dict(reached=bool(reaching), worker_count=min(reaching) if reaching else None,
                best_tokens_per_second=best["tokens_per_second"],
                best_worker_count=best["worker_count"])

  return dict(
      benchmark="data", tokenizer=str(tokenizer_path),
      corpora={name: dict(documents=len(s), tokens=int(s.lengths.sum()))
               for (name, _), s in zip(CORPORA, stored)},
      seq_len=seq_len, global_batch_size=batch_size, loader=loader, four_hosts=hosts,
      prepare=prepare, load_average=os.getloadavg(),  # other work on the host slows all rows
      goal=dict(tokens_per_second=goal,
                token_store=verdict([r for r in loader if r["token_store"]]),
                tokenised_on_read=verdict([r for r in loader if not r["token_store"]])),
      provenance=provenance())


def add_parser(sub) -> None:
  """Registers `data` on bench's subcommands."""
  p = sub.add_parser("data", help="loader tokens/s per host and preparation tokens/s per worker")
  p.add_argument("--tokenizer", help="default: CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf")
  p.add_argument("--cache", help="default: $AMD135M_CACHE or ~/.cache/amd135m")
  p.add_argument("--workers", default="0,1,2", help="loader worker counts, comma-separated")
  p.add_argument("--prepare-workers", default="1,2", help="preparation worker counts")
  p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per loader setting")
  p.add_argument("--batch-size", type=int, default=64, help="global batch (rows)")
  p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
  try:
    with contextlib.redirect_stdout(sys.stderr):  # tfds prints; stdout carries the result
      result = bench_data(args.tokenizer, args.cache,
                          [int(n) for n in args.workers.split(",")],
                          [int(n) for n in args.prepare_workers.split(",")],
                          batch_size=args.batch_size, seconds=args.seconds)
  except UserError as e:
    print(f"amd135m.bench: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print_data(result)
  return 0


def print_data(r: dict) -> None:
  cpus = r["provenance"]["device"]["cpu_count"]
  for row in r["loader"]:
    how = "token store" if row["token_store"] else "tokenised on read"
    print(f"loader  {how}, workers {row['worker_count']}: {row['tokens_per_second']:,.0f} "
          f"tokens/s per host (first batch {row['first_batch_seconds']:.1f} s)")
  for row in r["four_hosts"]:
    how = "token store" if row["token_store"] else "tokenised on read"
    print(f"loader  host 0 of 4, {how}: {row['tokens_per_second']:,.0f} tokens/s of its rows")
  for row in r["prepare"]:
    print(f"prepare workers {row['workers']}: {row['tokens_per_second']:,.0f} tokens/s, "
          f"{row['tokens_per_second_per_worker']:,.0f} per worker ({row['tokens']:,} tokens in "
          f"{row['seconds']:.1f} s)")
  print(f"host    load average {', '.join(f'{x:.1f}' for x in r['load_average'])} on {cpus} "
        f"CPU cores after the run")
  g = r["goal"]
  for key, how in (("token_store", "from the token store"),
                   ("tokenised_on_read", "tokenising on read")):
    v = g[key]
    outcome = (f"reached with {v['worker_count']} worker(s)" if v["reached"] else
               f"not reached here; best {v['best_tokens_per_second']:,.0f} tokens/s with "
               f"{v['best_worker_count']} worker(s)")
    print(f"goal    {g['tokens_per_second']:,} tokens/s per 8-GCD MI250 node (40k per GCD) from "
          f"one host, {how}: {outcome} on {cpus} CPU cores")

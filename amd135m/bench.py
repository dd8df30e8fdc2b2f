"""Benchmarks with provenance. python -m amd135m.bench decode --model F.gguf [--json]

decode: batch-1 greedy decode tokens/s of our loop and of transformers' `generate` on the same
model, prompt and token count, in one run; the share of the memory-bandwidth roofline; and the
prefill of a 512-token prompt against transformers' forward. Transformers runs in a subprocess
(benchmarks/hf_reference.py) so that this package never imports torch.
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from amd135m import checkpoints, model as model_lib, sampling
from amd135m.errors import UserError
from amd135m.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DECODE_PROMPT = "The history of the printing press begins"


def provenance() -> dict:
  """What produced a number: git SHA, package versions, device, command."""
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
  except (OSError, subprocess.CalledProcessError):
    sha, dirty = None, None
  versions = {}
  for name in ["jax", "jaxlib", "flax", "numpy", "gguf", "tokenizers"]:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  cpu = platform.processor()
  try:
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
               if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  device = jax.devices()[0]
  return dict(git_sha=sha, git_dirty=dirty, versions=versions, python=platform.python_version(),
              device=dict(platform=device.platform, kind=device.device_kind, count=jax.device_count(),
                          cpu=cpu, cpu_count=os.cpu_count()),
              command=" ".join([os.path.basename(sys.executable), "-m", "amd135m.bench",
                                *sys.argv[1:]]),
              date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def copy_bandwidth(nbytes: int = 1 << 30, runs: int = 5) -> float:
  """Read+write bytes per second of a >= 1 GiB memory copy (the best of `runs`)."""
  src = np.ones(nbytes, np.uint8)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(runs):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return 2 * nbytes / best


def bytes_per_token(config: model_lib.ModelConfig, params, context: float) -> float:
  """Bytes a decode step must read: every weight once in its stored dtype (the tied head once, the
  embedding lookup one row), plus the keys and values of `context` cached positions."""
  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  embedding = params["embed_tokens"]["embedding"]
  if not config.tie_embeddings:  # the lookup touches one row, not the table
    weights -= embedding.nbytes - embedding.nbytes // embedding.shape[0]
  kv = 2 * config.n_layers * config.n_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
  return weights + kv * context


def _median_time(fn, runs: int) -> tuple[float, list[float]]:
  jax.block_until_ready(fn())  # warm-up and compile, excluded
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def _reference(what: str, model: str, prompt: list[int], new_tokens: int, runs: int) -> dict:
  command = [sys.executable, str(ROOT / "benchmarks" / "hf_reference.py"), what, "--model", model,
             "--prompt-ids", ",".join(map(str, prompt)), "--new-tokens", str(new_tokens),
             "--runs", str(runs)]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    raise UserError(f"the transformers reference failed (is the [dev] extra installed?): "
                    f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def bench_decode(model: str, new_tokens: int = 128, runs: int = 3, prefill_tokens: int = 512,
                 reference: bool = True) -> dict:
  config, params = checkpoints.load_params(model)
  params = jax.tree.map(jnp.asarray, params)
  tokenizer = load_tokenizer(model)
  prompt = tokenizer.encode(DECODE_PROMPT)

  # Our decode loop alone (prefill excluded): N tokens cost N - 1 single-token forwards.
  prompt_len, buffer_len = sampling.bucket(len(prompt)), sampling.bucket(new_tokens)
  tokens = np.zeros((1, prompt_len), np.int32)
  tokens[0, :len(prompt)] = prompt
  lens = jnp.asarray([len(prompt)], jnp.int32)
  first_logits, cache = sampling.prefill(params, config, jnp.asarray(tokens), lens,
                                         cache_len=prompt_len + buffer_len)
  no_stops = jnp.full((1, 1), -1, jnp.int32)

  def decode():
    return sampling.decode(params, config, first_logits, cache, jnp.int32(new_tokens),
                           jnp.zeros((1,), jnp.uint32), no_stops, jnp.float32(0), jnp.int32(0),
                           jnp.float32(1), buffer_len=buffer_len)

  decode_seconds, decode_times = _median_time(decode, runs)
  ours_tps = (new_tokens - 1) / decode_seconds

  bandwidth = copy_bandwidth()
  per_token = bytes_per_token(config, params, context=len(prompt) + new_tokens / 2)
  roofline_tps = bandwidth / per_token

  # Prefill of a 512-token prompt (real text, repeated to length).
  long_prompt = (tokenizer.encode(open(__file__).read()) * prefill_tokens)[:prefill_tokens]
  long = jnp.asarray([long_prompt], jnp.int32)
  long_lens = jnp.asarray([prefill_tokens], jnp.int32)
  prefill_seconds, prefill_times = _median_time(
      lambda: sampling.prefill(params, config, long, long_lens, cache_len=prefill_tokens), runs)

  result = dict(
      benchmark="decode", model=str(model), new_tokens=new_tokens, prompt_tokens=len(prompt),
      runs=runs,
      ours=dict(tokens_per_second=ours_tps, decode_seconds=decode_times,
                prefill_tokens_per_second=prefill_tokens / prefill_seconds,
                prefill_seconds=prefill_times),
      roofline=dict(copy_bandwidth_gb_s=bandwidth / 1e9, bytes_per_token=per_token,
                    tokens_per_second=roofline_tps, share=ours_tps / roofline_tps,
                    param_dtype=config.param_dtype),
      provenance=provenance())
  if reference:
    hf_decode = _reference("decode", model, prompt, new_tokens, runs)
    hf_prefill = _reference("prefill", model, long_prompt, new_tokens, runs)
    result["transformers"] = dict(tokens_per_second=hf_decode["tokens_per_second"],
                                  prefill_tokens_per_second=hf_prefill["tokens_per_second"],
                                  details=dict(decode=hf_decode, prefill=hf_prefill))
    result["speedup"] = dict(
        decode=ours_tps / hf_decode["tokens_per_second"],
        prefill=result["ours"]["prefill_tokens_per_second"] / hf_prefill["tokens_per_second"])
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="amd135m.bench", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="what", required=True)
  decode = sub.add_parser("decode", help="batch-1 greedy decode and 512-token prefill")
  decode.add_argument("--model", required=True)
  decode.add_argument("--new-tokens", type=int, default=128)
  decode.add_argument("--runs", type=int, default=3)
  decode.add_argument("--no-reference", action="store_true", help="skip transformers")
  decode.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  try:
    result = bench_decode(args.model, args.new_tokens, args.runs, reference=not args.no_reference)
  except UserError as e:
    print(f"amd135m.bench: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    ours, roof = result["ours"], result["roofline"]
    print(f"decode  ours {ours['tokens_per_second']:.1f} tokens/s, "
          f"{100 * roof['share']:.0f}% of the {roof['tokens_per_second']:.1f} tokens/s roofline "
          f"({roof['copy_bandwidth_gb_s']:.1f} GB/s copy, {roof['bytes_per_token'] / 1e6:.0f} MB/token)")
    print(f"prefill ours {ours['prefill_tokens_per_second']:.0f} tokens/s (512-token prompt)")
    if "transformers" in result:
      hf, speedup = result["transformers"], result["speedup"]
      print(f"transformers decode {hf['tokens_per_second']:.1f} tokens/s, prefill "
            f"{hf['prefill_tokens_per_second']:.0f} tokens/s; speedup decode "
            f"{speedup['decode']:.2f}x, prefill {speedup['prefill']:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())

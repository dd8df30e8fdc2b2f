"""python -m amd135m.bench decode: batch-1 greedy decode and prefill, per weight precision.

In one run, for each of `--weights` (f32, bf16, int8, int4; quantize.py): our decode loop's tokens/s
(prefill excluded: N tokens cost N - 1 single-token forwards), the prefill of a 512-token prompt,
and the time to the first token of a short prompt (its prefill and first pick, compiled). The
precisions take their timed runs in turn (f32, bf16, int8, f32, ...), so a shared machine's varying
load falls on all alike; each reports its median. Beside them transformers' `generate` and forward
on the same model and prompts, in f32 and bf16, in a subprocess (hf_bench/generation.py) so that
this package never imports torch.

The roofline: a decode step must read every weight once in its stored dtype (int8: values and
scales; the tied head once; an untied embedding's lookup one row) and the cached keys and values.
The bandwidth is the best of several streaming reads of a 1 GiB f32 matrix by the decode's own
1-row kernel (both cores, prefetched; far larger than any last-level cache) and, should a decode
ever stream faster than that, the decode's own bytes/s: the share of it a decode reaches is at
most 100% by construction, and `read_bandwidth_gb_s` says what the read test alone gave.
"""
import json
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from amd135m import checkpoints, cpu_kernels, quantize, sampling
from amd135m.errors import UserError
from amd135m.model_config import ModelConfig
from amd135m.provenance import provenance
from amd135m.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
DECODE_PROMPT = "The history of the printing press begins"
REFERENCE_DTYPES = ("f32", "bf16")


def read_bandwidth(nbytes: int = 1 << 30, runs: int = 5) -> float:
  """Bytes per second of the best of `runs` 1-row products with an f32 matrix of `nbytes` (the
  decode's streaming kernel where it runs, XLA's matrix-vector product otherwise): a pure
  streaming read, a few FLOPs per 4 bytes."""
  cols = 16384
  rows = nbytes // (4 * cols)
  w = jnp.ones((rows, cols), jnp.float32)
  x = jnp.ones((1, rows), jnp.float32)
  product = jax.jit(cpu_kernels.matmul)
  jax.block_until_ready(product(x, w))
  best = float("inf")
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(product(x, w))
    best = min(best, time.perf_counter() - start)
  del w
  return rows * cols * 4 / best


def bytes_per_token(config: ModelConfig, params, context: float) -> float:
  """Bytes a decode step must read: every weight once in its stored dtype (int8 and int4: values
  and scales; the tied head once; an untied embedding's lookup one row), plus the keys and values
  of `context` cached positions."""
  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  # The lookup touches one row, not the table, where the head reads another copy: an untied
  # head, or quantize.with_output_kernel's transposed one.
  if not config.tie_embeddings or quantize.OUTPUT_KERNEL in params["embed_tokens"]:
    table = sum(x.nbytes for x in jax.tree.leaves(params["embed_tokens"]["embedding"]))
    weights -= table - table // config.vocab_size
  kv = 2 * config.n_layers * config.n_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
  return weights + kv * context


def transformers_reference(what: str, model: str, prompt: list[int], new_tokens: int, runs: int,
                           *extra: str, dtype: str = "f32") -> dict:
  """hf_bench/generation.py's JSON for `what` (decode, prefill, assisted) with `extra` flags."""
  command = [sys.executable, str(ROOT / "hf_bench" / "generation.py"), what, "--model", model,
             "--prompt-ids", ",".join(map(str, prompt)), "--new-tokens", str(new_tokens),
             "--runs", str(runs), "--dtype", dtype, *extra]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    raise UserError(f"the transformers reference failed (is the [dev] extra installed?): "
                    f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def bench_decode(model: str, weights=("f32",), references=REFERENCE_DTYPES,
                 new_tokens: int = 128, runs: int = 3, prefill_tokens: int = 512) -> dict:
  """Ours at each precision in `weights`, transformers at each dtype in `references` (see the
  module docstring). Returns one JSON-able dict."""
  bad = [w for w in weights if w not in quantize.WEIGHTS]
  if bad or not weights:
    raise UserError(f"--weights {','.join(weights)}: choose from {','.join(quantize.WEIGHTS)}")
  bad = [d for d in references if d not in REFERENCE_DTYPES]
  if bad:
    raise UserError(f"--reference {','.join(references)}: choose from "
                    f"{','.join(REFERENCE_DTYPES)}")
  config, params = checkpoints.load_params(model)
  tokenizer = load_tokenizer(model)
  prompt = tokenizer.encode(DECODE_PROMPT)
  long_prompt = (tokenizer.encode(open(__file__).read()) * prefill_tokens)[:prefill_tokens]
  result = dict(benchmark="decode", model=str(model), **measure_decode(
      config, params, prompt, long_prompt, weights, new_tokens, runs))
  if references:
    hf = {}
    for dtype in references:
      hf_decode = transformers_reference("decode", model, prompt, new_tokens, runs, dtype=dtype)
      hf_prefill = transformers_reference("prefill", model, long_prompt, new_tokens, runs,
                                          dtype=dtype)
      hf[dtype] = dict(tokens_per_second=hf_decode["tokens_per_second"],
                       prefill_tokens_per_second=hf_prefill["tokens_per_second"],
                       details=dict(decode=hf_decode, prefill=hf_prefill))
    result["transformers"] = hf
    base = hf[references[0]]
    result["vs_transformers"] = {
        w: dict(decode=o["tokens_per_second"] / base["tokens_per_second"],
                prefill=o["prefill_tokens_per_second"] / base["prefill_tokens_per_second"])
        for w, o in result["ours"].items()}
  result["provenance"] = provenance()
  return result


def measure_decode(config: ModelConfig, params, prompt: list[int], long_prompt: list[int],
                   weights=("f32",), new_tokens: int = 128, runs: int = 3,
                   read_bytes: int = 1 << 30) -> dict:
  """Our side of bench_decode for f32 `params` cast to each of `weights`: `prompt` decodes
  `new_tokens`, `long_prompt` is the prefill."""
  f32_params = jax.tree.map(jnp.asarray, params)
  prefill_tokens = len(long_prompt)
  prompt_len, buffer_len = sampling.bucket(len(prompt)), sampling.bucket(new_tokens)
  tokens = np.zeros((1, prompt_len), np.int32)
  tokens[0, :len(prompt)] = prompt
  lens = jnp.asarray([len(prompt)], jnp.int32)
  long = jnp.asarray([long_prompt], jnp.int32)
  long_lens = jnp.asarray([prefill_tokens], jnp.int32)
  no_stops = jnp.full((1, 1), -1, jnp.int32)

  jobs = {}
  for w in weights:
    params = quantize.cast_weights(f32_params, config, w)

    def first_token(params=params):  # a short prompt's prefill: logits for the first pick
      return sampling.prefill(params, config, jnp.asarray(tokens), lens,
                              cache_size=prompt_len + buffer_len)

    def decode(params=params, start=first_token()):
      logits, cache = start
      return lambda: sampling.decode(
          params, config, logits, cache, jnp.int32(new_tokens), jnp.zeros((1,), jnp.uint32),
          no_stops, sampling.SamplingParams().traced(), buffer_len=buffer_len)

    jobs[w] = dict(
        params=params, decode=decode(), first_token=first_token,
        prefill=lambda params=params: sampling.prefill(params, config, long, long_lens,
                                                       cache_size=prefill_tokens))
  times = {w: {"decode": [], "first_token": [], "prefill": []} for w in weights}
  for w, job in jobs.items():  # compile and warm up, excluded
    for what in times[w]:
      _timed(job[what])
  for _ in range(runs):
    for w, job in jobs.items():
      for what in times[w]:
        times[w][what].append(_timed(job[what]))

  bandwidth = read_bandwidth(read_bytes)
  context = len(prompt) + new_tokens / 2
  ours = {}
  for w, job in jobs.items():
    tps = (new_tokens - 1) / statistics.median(times[w]["decode"])
    per_token = bytes_per_token(config, job["params"], context)
    ours[w] = dict(tokens_per_second=tps, decode_seconds=times[w]["decode"],
                   prefill_tokens_per_second=prefill_tokens / statistics.median(
                       times[w]["prefill"]),
                   prefill_seconds=times[w]["prefill"],
                   first_token_seconds=statistics.median(times[w]["first_token"]),
                   bytes_per_token=per_token, decode_bandwidth_gb_s=tps * per_token / 1e9)
  roofline_bandwidth = max([bandwidth] + [o["decode_bandwidth_gb_s"] * 1e9 for o in ours.values()])
  for o in ours.values():
    o["roofline_tokens_per_second"] = roofline_bandwidth / o["bytes_per_token"]
    o["roofline_share"] = o["tokens_per_second"] / o["roofline_tokens_per_second"]
  return dict(
      weights=list(weights), new_tokens=new_tokens, prompt_tokens=len(prompt),
      prefill_tokens=prefill_tokens, runs=runs, ours=ours,
      roofline=dict(read_bandwidth_gb_s=bandwidth / 1e9,
                    bandwidth_gb_s=roofline_bandwidth / 1e9),
      speedup={w: ours[w]["tokens_per_second"] / ours[weights[0]]["tokens_per_second"]
               for w in weights})


def print_decode(r: dict) -> None:
  """The result as a table: one line per precision, ours and then transformers'."""
  print(f"{'':18} {'decode tok/s':>12} {'prefill tok/s':>13} {'first token':>11} "
        f"{'MB/token':>8} {'roofline':>8}")
  for w, o in r["ours"].items():
    print(f"{'ours ' + w:18} {o['tokens_per_second']:12.1f} {o['prefill_tokens_per_second']:13.0f} "
          f"{1e3 * o['first_token_seconds']:9.0f}ms {o['bytes_per_token'] / 1e6:8.0f} "
          f"{100 * o['roofline_share']:7.0f}%")
  for dtype, h in r.get("transformers", {}).items():
    print(f"{'transformers ' + dtype:18} {h['tokens_per_second']:12.1f} "
          f"{h['prefill_tokens_per_second']:13.0f}")
  roof = r["roofline"]
  print(f"roofline: {roof['bandwidth_gb_s']:.1f} GB/s (a 1 GiB streaming read by the decode "
        f"kernel gave {roof['read_bandwidth_gb_s']:.1f}); the {r['prompt_tokens']}-token prompt, "
        f"{r['new_tokens']} new tokens, {r['runs']} runs each, medians")

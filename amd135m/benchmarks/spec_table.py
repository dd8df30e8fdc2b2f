"""AMD's speculative-decoding table, ours beside theirs: acceptance and speedup per setting
(greedy/sampling) and gamma, on HumanEval prompts (the logic of `python -m amd135m.spec_eval`).

AMD-Llama-135M-code drafting for CodeLlama-7b on HumanEval, as AMD measured it with transformers'
assisted generation (AMD_REFERENCE), beside ours: `speculative_table` times our target-only and
speculative decodes in one run at batch 1 per prompt; `run` loads the models and saves CSV, JSON
and a plot.

paper=True is AMD's setting (codellama_spec.py in github.com/AMD-AIG-AIMA/AMD-LLM): the one-shot
`[PYTHON]` prefix before each of the 164 HumanEval prompts, temperature 0.1, top-k 10, top-p 0.95,
up to 512 new tokens ending at EOS, and transformers 4.37's default assistant schedule (gamma 5,
+2 after an all-accepted round, else -1); greedy beside it. Otherwise: the raw HumanEval
prompts, 64 new tokens with no stop (every decode the same length), fixed gammas.
"""
import csv
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time
from typing import Callable, Iterable, Mapping, Sequence

from amd135m import (
  checkpoints,
  provenance as provenance_lib,
  quantize,
  sampling,
  speculative,
)
from amd135m.benchmarks import spec_bench
from amd135m.errors import UserError, check_dir_creatable, make_dir
from amd135m.model_config import ModelConfig
from amd135m.text_table import aligned, cell
from amd135m.tokenizer import load_tokenizer

# AMD's one-shot prefix, verbatim from clip_input() in speculative_decoding/codellama_spec.py of
# github.com/AMD-AIG-AIMA/AMD-LLM (commit 1f4de24); the HumanEval prompt follows the final '#'.
ONE_SHOT_PREFIX = ("# python code to complete some task. # Create a function to calculate the sum "
                   "of a sequence of integers. [PYTHON]\ndef sum_sequence(sequence):\n  sum = 0\n"
                   "  for num in sequence:\n    sum += num\n  return sum \n[/PYTHON]\n#")
PAPER_SAMPLING = sampling.SamplingParams(temperature=0.1, top_k=10, top_p=0.95)
PAPER_MAX_NEW_TOKENS = 512
PAPER_GAMMA = 5  # transformers 4.37: num_assistant_tokens=5, schedule "heuristic"
HUMANEVAL_SIZE = 164

AMD_SOURCE = ("github.com/AMD-AIG-AIMA/AMD-LLM README.md, 'Speculative Decoding' (commit 1f4de24): "
              "CodeLlama-7b target, AMD-Llama-135m-code draft, HumanEval, transformers 4.37.2 "
              "assisted generation, batch 1")
# (target device, draft device, setting, target pass@1, speculative pass@1, acceptance, speedup);
# 'sampling' is their 'Do Randomly Sampling TRUE'. Acceptance is their script's figure:
# (tokens the verification rounds produced - target forwards) / draft forwards.
_AMD_ROWS = [
    ("FP32 MI250", "FP32 MI250", "sampling", 0.3231, 0.2927, 0.650355, 2.58),
    ("FP32 MI250", "FP32 MI250", "greedy", 0.3110, 0.3110, 0.657839, 2.80),
    ("BF16 MI250", "BF16 MI250", "sampling", 0.3110, 0.3110, 0.668822, 1.67),
    ("BF16 MI250", "BF16 MI250", "greedy", 0.3415, 0.3354, 0.665497, 1.75),
    ("INT4 NPU", "BF16 CPU", "sampling", 0.2805, 0.3049, 0.722913, 2.83),
    ("INT4 NPU", "BF16 CPU", "greedy", 0.2866, 0.2866, 0.738072, 2.98),
    ("BF16 CPU", "BF16 CPU", "sampling", 0.3110, 0.3171, 0.723971, 3.68),
    ("BF16 CPU", "BF16 CPU", "greedy", 0.3354, 0.3354, 0.727548, 3.88),
    ("FP32 CPU", "FP32 CPU", "sampling", 0.2987, 0.2805, 0.727214, 3.57),
    ("FP32 CPU", "FP32 CPU", "greedy", 0.3110, 0.3110, 0.738641, 3.66),
]
AMD_REFERENCE = [dict(zip(("target_device", "draft_device", "setting", "target_pass_at_1",
                           "speculative_pass_at_1", "acceptance", "speedup"), row))
                 for row in _AMD_ROWS]

# Columns of a row, in CSV order (acceptance_by_position, a list, is in the JSON only).
ROW_FIELDS = ["setting", "gamma", "adaptive", "prompts", "acceptance", "amd_acceptance",
              "tokens_per_target_call", "target_tokens_per_s", "speculative_tokens_per_s",
              "speedup", "predicted_speedup", "cost_ratio", "exact", "target_new_tokens",
              "speculative_new_tokens", "target_seconds", "speculative_seconds"]

Progress = Callable[..., Iterable]  # progress(iterable, total=n, desc=s) -> iterable (tqdm.tqdm)


def default_settings(sampling_params: sampling.SamplingParams = PAPER_SAMPLING
                     ) -> dict[str, sampling.SamplingParams]:
  """Greedy and AMD's sampling (temperature 0.1, top-k 10, top-p 0.95)."""
  return {"greedy": sampling.SamplingParams(), "sampling": sampling_params}


@dataclasses.dataclass
class SpecTable:
  rows: list[dict]                         # one per (setting, gamma), ROW_FIELDS and more
  prompt_tokens: list[int]                 # each prompt's length in tokens
  outputs: dict[str, list[list[int]]]      # "greedy/target", "greedy/gamma=4" -> tokens per prompt


def speculative_table(target_params, target_config: ModelConfig, draft: speculative.Draft,
                      draft_params, tokenizer, prompts: Sequence[str], *,
                      settings: Mapping[str, sampling.SamplingParams] | None = None,
                      gammas: Sequence[int] = (2, 4), max_new_tokens: int = 64,
                      adaptive: bool = False, stop_ids: Sequence[int] = (), seed: int = 0,
                      predicted: bool = True, progress: Progress | None = None) -> SpecTable:
  """One row per (setting, gamma): our speculative decode against our target-only decode.

  draft: any speculative.Draft (speculative.load_draft makes one from a --draft value).
  Every prompt runs alone (batch 1). For each setting and prompt, in one pass: the target alone,
  then speculative decoding at each gamma, each timed after a
  warm-up run of the same prompt-length bucket (compiles excluded, as in bench). Prompt i uses
  seed + i in every method.

  Row columns:
    acceptance: accepted draft tokens / proposed draft tokens, over all prompts (AMD's
      definition); amd_acceptance: the figure AMD's script computes, (tokens the verification
      rounds produced - target forwards) / draft forwards (see speculative.statistics).
    tokens_per_target_call: tokens the verification rounds produced / target forwards.
    target_tokens_per_s, speculative_tokens_per_s: new tokens / wall seconds, prefill included,
      summed over prompts; speedup: their ratio (AMD's throughput speedup).
    cost_ratio: c, a draft round's time (spec_bench.draft_round_cost, when `predicted`) per drafted
      token over a target-only token's (prefill included, as the speedup); predicted_speedup:
      (1 - a^(gamma+1)) / ((1 - a)(gamma c + 1)) of Leviathan et al. (fixed gamma only).
    exact: for greedy settings, whether every speculative output equals the target-only one
      (None for sampling, whose outputs differ by design and only distributions agree).
  adaptive: start each prompt at gamma and adapt it (+2 after an all-accepted round, else -1, up
  to 2 gamma), as transformers' "heuristic" schedule.
  """
  return speculative_tables(
      target_params, target_config, {"draft": (draft, draft_params, gammas)}, tokenizer, prompts,
      settings=settings, max_new_tokens=max_new_tokens, adaptive=adaptive, stop_ids=stop_ids,
      seed=seed, predicted=predicted, progress=progress)["draft"]


def speculative_tables(target_params, target_config: ModelConfig,
                       drafts: Mapping[str, tuple[speculative.Draft, object, Sequence[int]]],
                       tokenizer, prompts: Sequence[str], *,
                       settings: Mapping[str, sampling.SamplingParams] | None = None,
                       max_new_tokens: int = 64, adaptive: bool = False,
                       stop_ids: Sequence[int] = (), seed: int = 0, predicted: bool = True,
                       progress: Progress | None = None) -> dict[str, SpecTable]:
  """`speculative_table` for several drafts against one target-only baseline: {name: table}.

  drafts: name -> (draft, draft_params, gammas). For each setting and prompt the target runs
  alone once, then every draft at each of its gammas right after it, so all the drafts' speedups
  share one target-only measurement (a comparison table's "target only" row) and the target-only
  decode is timed once per prompt rather than once per draft."""
  settings = default_settings() if settings is None else dict(settings)
  if not drafts:
    raise UserError("no draft given")
  drafts = {name: (draft, draft_params, list(gammas))
            for name, (draft, draft_params, gammas) in drafts.items()}
  for _, _, gammas in drafts.values():
    _check_gammas(gammas)
  if not settings:
    raise UserError("no setting given: choose greedy and/or sampling")
  for knobs in settings.values():
    knobs.validate()
  if not prompts:
    raise UserError("no prompts given")
  encoded = [tokenizer.encode(text) for text in prompts]
  sampling.prepare_request(target_config, encoded, max_new_tokens)  # one clear error, up front
  for draft, _, _ in drafts.values():
    draft.check(target_config)
    draft_context = getattr(getattr(draft, "config", None), "max_seq_len", None)
    if draft_context is not None and max(map(len, encoded)) + max_new_tokens > draft_context:
      raise UserError(f"the longest prompt ({max(map(len, encoded))} tokens) plus max_new_tokens "
                      f"({max_new_tokens}) exceeds the draft's context of "
                      f"{draft_context}: shorten one of them")
  progress = progress or (lambda it, **_: it)
  stop_ids = list(stop_ids)
  # (method, prompt bucket): compiled programs. Target-only decode is one program for every
  # setting; a speculative loop is one per draft for greedy settings and one for sampled ones.
  warmed = set()

  def timed(key, fn):
    if key not in warmed:  # the first prompt of each length bucket compiles; not timed
      fn()
      warmed.add(key)
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start

  @functools.cache
  def round_cost(name: str, gamma: int) -> float:
    draft, draft_params, _ = drafts[name]
    return spec_bench.draft_round_cost(draft, draft_params, target_params, target_config,
                                       [encoded[0]], gamma)

  rows = {name: [] for name in drafts}
  outputs = {name: {} for name in drafts}
  for setting, knobs in settings.items():
    target_runs = []
    spec_runs = {(name, g): [] for name, (_, _, gammas) in drafts.items() for g in gammas}
    for i, ids in enumerate(progress(encoded, total=len(encoded), desc=setting)):
      bucket = sampling.bucket(len(ids))
      target_runs.append(timed(("target", bucket), functools.partial(
          sampling.generate, target_params, target_config, [ids], max_new_tokens, knobs,
          seed + i, stop_ids)))
      for name, (draft, draft_params, gammas) in drafts.items():
        for gamma in gammas:
          run = functools.partial(
              speculative.speculative_generate, target_params, target_config, draft,
              draft_params, [ids], max_new_tokens, gamma, knobs, seed + i, stop_ids,
              adaptive=adaptive)
          spec_runs[name, gamma].append(
              timed(("speculative", name, gamma, bucket, knobs.temperature == 0), run))

    target_tokens = [out.tokens[0] for out, _ in target_runs]
    target_tps = _tokens(target_tokens) / _seconds(target_runs)
    for name, (_, _, gammas) in drafts.items():
      outputs[name][f"{setting}/target"] = target_tokens
      for gamma in gammas:
        cost_ratio = round_cost(name, gamma) / gamma * target_tps if predicted else None
        runs = spec_runs[name, gamma]
        results = [out for out, _ in runs]
        tokens = [r.tokens[0] for r in results]
        outputs[name][f"{setting}/gamma={gamma}"] = tokens
        row = _row(results, tokens, gamma, adaptive)
        spec_tps = _tokens(tokens) / _seconds(runs)
        row.update(setting=setting, target_tokens_per_s=target_tps,
                   speculative_tokens_per_s=spec_tps, speedup=spec_tps / target_tps,
                   cost_ratio=cost_ratio,
                   predicted_speedup=(
                       None if adaptive or cost_ratio is None
                       else speculative.predicted_speedup(row["acceptance"], gamma, cost_ratio)),
                   exact=tokens == target_tokens if knobs.temperature == 0 else None,
                   target_new_tokens=_tokens(target_tokens),
                   speculative_new_tokens=_tokens(tokens),
                   target_seconds=_seconds(target_runs), speculative_seconds=_seconds(runs))
        rows[name].append({k: row[k] for k in ROW_FIELDS} | {
            "acceptance_by_position": row["acceptance_by_position"]})
  lengths = [len(ids) for ids in encoded]
  return {name: SpecTable(rows[name], lengths, outputs[name]) for name in drafts}


def _check_gammas(gammas: Sequence[int]) -> None:
  if not gammas:
    raise UserError("no gamma given: pass at least one draft length, e.g. --gammas 2 4")
  for gamma in gammas:
    if gamma < 1:
      raise UserError(f"gamma must be >= 1 (the number of draft tokens per round), got {gamma}")


def _tokens(rows: Iterable[list[int]]) -> int:
  return sum(len(r) for r in rows)


def _seconds(runs) -> float:
  return sum(seconds for _, seconds in runs)


def _row(results, tokens, gamma: int, adaptive: bool) -> dict:
  """Acceptance and tokens per call summed over prompts (each a batch-1 SpeculativeResult)."""
  totals = [r.totals for r in results]
  drafted = sum(t["drafted"] for t in totals)
  accepted = sum(t["accepted"] for t in totals)
  calls = sum(t["target_calls"] for t in totals)
  draft_forwards = sum(t["draft_forwards"] for t in totals)
  verified = sum(len(t) - 1 for t in tokens)  # the first new token comes from the prefill
  by_position = None
  if not adaptive and calls:  # at batch 1 and fixed gamma, every round drafts each position
    by_position = [sum(t["acceptance_by_position"][j] * t["target_calls"] for t in totals) / calls
                   for j in range(gamma)]
  return dict(gamma=gamma, adaptive=adaptive, prompts=len(results),
              acceptance=accepted / drafted if drafted else 0.0,
              amd_acceptance=(verified - calls) / draft_forwards if draft_forwards else None,
              tokens_per_target_call=verified / calls if calls else 0.0,
              acceptance_by_position=by_position)


# ---------------------------------------------------------------------------------------------
# Text, files, plot.


def amd_ranges() -> dict[str, dict[str, tuple[float, float]]]:
  """AMD's (min, max) acceptance and speedup per setting, over their devices and dtypes."""
  out = {}
  for setting in ("greedy", "sampling"):
    rows = [r for r in AMD_REFERENCE if r["setting"] == setting]
    out[setting] = {k: (min(r[k] for r in rows), max(r[k] for r in rows))
                    for k in ("acceptance", "speedup")}
  return out


def format_table(rows: Sequence[dict], amd_reference: bool = True) -> str:
  """Our rows with AMD's reported range for the same setting beside each, then (amd_reference)
  AMD's table."""
  ranges = amd_ranges()
  header = ["setting", "gamma", "accept", "AMD's fig.", "tok/call", "target tok/s", "spec tok/s",
            "speedup", "predicted", "exact", "AMD accept", "AMD speedup"]
  lines = []
  for r in rows:
    amd = ranges.get(r["setting"])
    lines.append([
        r["setting"], f"{r['gamma']}{' adaptive' if r['adaptive'] else ''}",
        cell(r["acceptance"], ".3f"), cell(r["amd_acceptance"], ".3f"),
        cell(r["tokens_per_target_call"], ".2f"), cell(r["target_tokens_per_s"], ".1f"),
        cell(r["speculative_tokens_per_s"], ".1f"), cell(r["speedup"], ".2f") + "x",
        "-" if r["predicted_speedup"] is None else f"{r['predicted_speedup']:.2f}x",
        cell(r["exact"], ""),
        "-" if amd is None else "{:.2f}-{:.2f}".format(*amd["acceptance"]),
        "-" if amd is None else "{:.2f}-{:.2f}x".format(*amd["speedup"])])
  ours = (f"{aligned(header, lines)}\n\naccept: accepted / proposed draft tokens; AMD's fig.: "
          "their script's (produced - target calls) / draft calls")
  if not amd_reference:
    return ours
  amd_header = ["target", "draft", "setting", "target pass@1", "spec pass@1", "acceptance",
                "speedup"]
  amd_lines = [[r["target_device"], r["draft_device"], r["setting"],
                f"{100 * r['target_pass_at_1']:.2f}%", f"{100 * r['speculative_pass_at_1']:.2f}%",
                f"{r['acceptance']:.3f}", f"{r['speedup']:.2f}x"] for r in AMD_REFERENCE]
  return f"{ours}\n\nAMD's reported table ({AMD_SOURCE}):\n{aligned(amd_header, amd_lines)}"


def plot_table(rows: Sequence[dict], path: str | os.PathLike) -> None:
  """Acceptance and speedup against gamma, one line per setting, AMD's range shaded."""
  import matplotlib  # noqa: PLC0415 (only the saved table needs it)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415

  ranges = amd_ranges()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in [(axes[0], "acceptance", "acceptance rate"),
                         (axes[1], "speedup", "speedup over target-only")]:
    for i, setting in enumerate(dict.fromkeys(r["setting"] for r in rows)):
      color = f"C{i}"
      mine = sorted((r["gamma"], r[key]) for r in rows if r["setting"] == setting)
      ax.plot(*zip(*mine), "o-", color=color, label=f"ours, {setting}")
      if setting in ranges:
        low, high = ranges[setting][key]
        ax.axhspan(low, high, color=color, alpha=0.12, label=f"AMD {setting} (CodeLlama-7b)")
    ax.set_xticks(sorted({r["gamma"] for r in rows}))
    ax.set_xlabel("gamma (draft tokens per round)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[1].axhline(1.0, color="gray", lw=0.8)
  axes[0].set_ylim(0, 1.05)
  axes[1].set_ylim(bottom=0)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def save_table(table: SpecTable, out_dir: str | os.PathLike, setup: dict,
               decode: Callable[[list[int]], str] | None = None,
               task_ids: Sequence[str] | None = None) -> dict[str, pathlib.Path]:
  """spec_table.csv, spec_table.json (rows, setup, AMD's table, provenance), spec_table.png and,
  with `decode`, completions.jsonl (each method's text per prompt, for pass@1)."""
  out = make_dir(out_dir, "--out")
  paths = {kind: out / f"spec_table.{kind}" for kind in ("csv", "json", "png")}
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, ROW_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table.rows)
  provenance = provenance_lib.provenance()
  provenance["command"] = " ".join(["python", "-m", "amd135m.spec_eval", *sys.argv[1:]])
  paths["json"].write_text(json.dumps(dict(
      setup=setup, rows=table.rows, prompt_tokens=table.prompt_tokens,
      amd_reference=dict(source=AMD_SOURCE, rows=AMD_REFERENCE), provenance=provenance),
      indent=1) + "\n")
  plot_table(table.rows, paths["png"])
  if decode is not None:
    paths["completions"] = out / "completions.jsonl"
    stops = set(setup.get("stop_ids") or ())
    with open(paths["completions"], "w") as f:
      for method, rows in table.outputs.items():
        setting, name = method.split("/", 1)
        for i, ids in enumerate(rows):
          shown = ids[:-1] if ids and ids[-1] in stops else ids
          f.write(json.dumps(dict(task_id=task_ids[i] if task_ids else str(i), setting=setting,
                                  method=name, completion=decode(shown)),
                             ensure_ascii=False) + "\n")
  return paths


# ---------------------------------------------------------------------------------------------
# From paths: what the command line calls.


def humaneval_prompts(n: int, one_shot: bool) -> tuple[list[str], list[str]]:
  """(task ids, prompt texts) of the first n HumanEval problems, after AMD's prefix if one_shot."""
  if not 1 <= n <= HUMANEVAL_SIZE:
    raise UserError(f"--prompts must be between 1 and {HUMANEVAL_SIZE} (HumanEval's size), got {n}")
  texts = spec_bench.humaneval_prompts(n)
  return ([f"HumanEval/{i}" for i in range(n)],
          [ONE_SHOT_PREFIX + t if one_shot else t for t in texts])


def _load_model(path: str, role: str, dtype):
  if not pathlib.Path(path).expanduser().exists():
    raise UserError(f"{role} weights not found: {path} does not exist (pass a Hugging Face model "
                    "directory or a .gguf file)")
  return checkpoints.load_params(pathlib.Path(path).expanduser(), dtype)


def run(target: str, draft: str, out_dir: str, *, paper: bool = False, n_prompts: int | None = None,
        gammas: Sequence[int] | None = None, max_new_tokens: int | None = None,
        settings: Sequence[str] = ("greedy", "sampling"),
        sampling_params: sampling.SamplingParams = PAPER_SAMPLING, adaptive: bool | None = None,
        stop_at_eos: bool | None = None, seed: int = 0, dtype=None,
        progress: Progress | None = None) -> tuple[SpecTable, dict]:
  """Loads the pair, measures the table on HumanEval, saves it under out_dir.

  draft: a --draft value for speculative.load_draft (a model, a feature head, first:N, self,
  ngram). With
  paper=True the defaults become AMD's (module docstring); each can still be overridden.
  Returns the table and the paths written.
  """
  gammas = list(gammas or ([PAPER_GAMMA] if paper else [2, 4]))
  return run_many(target, {"draft": (draft, gammas, out_dir)}, paper=paper, n_prompts=n_prompts,
                  max_new_tokens=max_new_tokens, settings=settings,
                  sampling_params=sampling_params, adaptive=adaptive, stop_at_eos=stop_at_eos,
                  seed=seed, dtype=dtype, progress=progress)["draft"]


def run_many(target: str, drafts: Mapping[str, tuple[str, Sequence[int], str]], *,
             paper: bool = False, n_prompts: int | None = None,
             max_new_tokens: int | None = None, settings: Sequence[str] = ("greedy", "sampling"),
             sampling_params: sampling.SamplingParams = PAPER_SAMPLING,
             adaptive: bool | None = None, stop_at_eos: bool | None = None, seed: int = 0,
             dtype=None, progress: Progress | None = None) -> dict[str, tuple[SpecTable, dict]]:
  """`run` for several drafts of one target, measured together (`speculative_tables`: one
  target-only baseline, the target loaded once): drafts is name -> (--draft value, gammas,
  out_dir); returns name -> (table, paths written)."""
  # Everything is checked before loading anything: a 7B takes a while, the paper run hours.
  n_prompts = (HUMANEVAL_SIZE if paper else 4) if n_prompts is None else n_prompts
  if not 1 <= n_prompts <= HUMANEVAL_SIZE:
    raise UserError(f"--prompts must be 1 to {HUMANEVAL_SIZE}, got {n_prompts}")
  for _, gammas, _ in drafts.values():
    _check_gammas(gammas)
  max_new_tokens = (PAPER_MAX_NEW_TOKENS if paper else 64) if max_new_tokens is None \
      else max_new_tokens
  if max_new_tokens < 1:
    raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
  if not 0 <= seed < 2**32:
    raise UserError(f"--seed must be 0 to 2**32 - 1, got {seed}")
  sampling_params.validate()
  for _, _, out_dir in drafts.values():
    check_dir_creatable(out_dir, "--out")  # now, not after the measurement
  adaptive = paper if adaptive is None else adaptive
  stop_at_eos = paper if stop_at_eos is None else stop_at_eos
  unknown = [s for s in settings if s not in ("greedy", "sampling")]
  if unknown:
    raise UserError(f"unknown setting {unknown[0]!r}: choose greedy and/or sampling")
  task_ids, texts = humaneval_prompts(n_prompts, one_shot=paper)
  for spec, _, _ in drafts.values():
    speculative.check_draft_spec(spec)

  import jax  # noqa: PLC0415 (checks above stay fast)
  import jax.numpy as jnp  # noqa: PLC0415
  config, params = _load_model(target, "target", dtype)
  tokenizer = load_tokenizer(pathlib.Path(target).expanduser())
  params = quantize.decode_layout(jax.tree.map(jnp.asarray, params), config)
  # A model draft's tokenizer must agree with the target's id by id; a head its fingerprint.
  loaded = {name: speculative.load_draft(spec, config, params, tokenizer, dtype)
            for name, (spec, _, _) in drafts.items()}
  chosen = {name: knobs for name, knobs in default_settings(sampling_params).items()
            if name in settings}
  stop_ids = list(tokenizer.stop_ids) if stop_at_eos else []
  tables = speculative_tables(
      params, config, {name: (*loaded[name], gammas) for name, (_, gammas, _) in drafts.items()},
      tokenizer, texts, settings=chosen, max_new_tokens=max_new_tokens, adaptive=adaptive,
      stop_ids=stop_ids, seed=seed, progress=progress)
  results = {}
  for name, (spec, gammas, out_dir) in drafts.items():
    draft_model = loaded[name][0]
    setup = dict(target=str(target), draft=str(spec), paper=paper,
                 prompts=f"HumanEval/0..{n_prompts - 1}",
                 prompt_template=(ONE_SHOT_PREFIX + "{prompt}") if paper else "{prompt}",
                 settings={k: dataclasses.asdict(v) for k, v in chosen.items()},
                 gammas=list(gammas), adaptive=adaptive, max_new_tokens=max_new_tokens,
                 stop_ids=stop_ids, seed=seed, target_vocab=config.vocab_size,
                 target_param_dtype=config.param_dtype, draft_kind=type(draft_model).__name__,
                 # the drafts whose speedups share this table's target-only runs
                 baseline_shared_with=[d for n, (d, _, _) in drafts.items() if n != name])
    if isinstance(draft_model, speculative.ModelDraft):
      setup.update(draft_vocab=draft_model.config.vocab_size,
                   draft_param_dtype=draft_model.config.param_dtype)
    paths = save_table(tables[name], out_dir, setup, decode=tokenizer.decode, task_ids=task_ids)
    results[name] = (tables[name], paths)
  return results

"""The AMD-135M workflow at CPU scale, end to end (`python -m amd135m.reproduce` is its face):
pretrain a small Llama draft on Gutenberg -> fine-tune it on Python (the stdlib) -> optionally
distil the target's own greedy completions of stdlib function headers into it; train a feature
head on the target's own hidden states (amd135m.training.feature_head: EAGLE-3-style) -> let the
n-gram draft, the AMD-style draft, the head (alone, and behind prompt lookup) and the target's own
int8 and int4 copies each draft for the real SmolLM2-135M on HumanEval prompts -> AMD's table per
draft (acceptance, speedup; greedy and AMD's sampling), one comparison table and plots.

Every stage writes under one output directory and is skipped when already complete (a training
workdir with COMPLETE, a table on disk), so a rerun resumes where a crash stopped. No training
text derives from HumanEval: the prompts are stdlib function headers and Gutenberg passages.
"""
import dataclasses
import json
import pathlib
import time
from typing import Callable

from amd135m import config_lib, text_table
from amd135m.errors import UserError, make_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]
DRAFT_CONFIG = ROOT / "configs" / "draft.py"


@dataclasses.dataclass(frozen=True)
class Preset:
  pretrain_steps: int
  code_steps: int
  distill_prompts: int       # 0: no distillation stage
  distill_new_tokens: int
  distill_steps: int
  prompts: int               # HumanEval prompts in the table
  new_tokens: int
  gammas: tuple[int, ...]
  overrides: tuple[str, ...] = ()  # applied to every training stage
  head: dict = dataclasses.field(default_factory=dict)  # feature_head.train_head's budget
  head_settings: dict = dataclasses.field(default_factory=dict)  # feature_head.Settings fields
  # The target's own int8 and int4 copies, each with its gammas (they accept 0.95-0.99: longer
  # rounds pay, the cheaper int4 most); () leaves them out.
  copies: tuple[tuple[str, tuple[int, ...]], ...] = (("int8", (3,)), ("int4", (5,)))


PRESETS = {
    # Seconds: the tests' end-to-end run from an empty output directory.
    "test": Preset(3, 3, 2, 8, 3, 1, 8, (2,),
                   ("batch_size=2", "data.seq_len=32", "eval_batches=1", "log_every=1",
                    "devices=1"),
                   head=dict(steps=3, prompts=16),
                   head_settings=dict(seq_len=40, prompt_tokens=24, batch=4, unroll=2,
                                      vocab=1024, eval_rows=4),
                   copies=()),  # their loop is tested in test_speculative
    # make demo: a short variant of every step (<= 15 minutes on a 2-core CPU; see README).
    # The head gets most of it, and most of its 10 minutes go to collecting the target's own
    # continuations (32 rows a decode step): data, not steps, limits a head trained in minutes
    # (docs/RESULTS.md, issue 15: 200 rows agreed 0.36 on HumanEval, 352 rows 0.44).
    # Its table measures 4 prompts x 64 tokens, as `bench speculative` does (2 x 48 read the
    # same head 1.15-1.32x from run to run); all drafts share one target-only baseline.
    "demo": Preset(20, 20, 0, 0, 0, 4, 64, (2,),
                   ("batch_size=8", "data.seq_len=128", "eval_every=20"),
                   head=dict(minutes=10), head_settings=dict(collect_share=0.6)),
    # make reproduce: a longer run (README: its table and runtime on this 2-core CPU).
    "full": Preset(250, 250, 96, 96, 120, 6, 96, (1, 2, 4),
                   ("batch_size=8", "eval_every=50"),
                   head=dict(minutes=45), copies=(("int8", (3, 5)), ("int4", (5, 7)))),
}


def _train(stage: str, workdir: pathlib.Path, steps: int, init_from: str, overrides, log,
           distill_dir: str = "") -> None:
  from amd135m.training import loop
  if (workdir / loop.COMPLETE).exists():
    log(f"[{stage}] complete in {workdir}, skipped")
    return
  arg = f"stage={stage},steps={steps}" + (f",init_from={init_from}" if init_from else "") + (
      f",distill_dir={distill_dir}" if distill_dir else "")
  config = config_lib.load(f"{DRAFT_CONFIG}:{arg}")
  config_lib.apply_overrides(config, list(overrides))
  log(f"[{stage}] training {steps} steps into {workdir}")
  loop.train_and_evaluate(config, workdir)


def _distill_data(target_path: str, out: pathlib.Path, preset: Preset, log) -> str:
  """The target's greedy completions of stdlib headers, prepared as a local_text dataset."""
  prepared = out / "distill_data"
  raw = out / "distill_raw"
  if not (raw / "DONE").exists():
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from amd135m import checkpoints, inference, sampling  # noqa: PLC0415
    from amd135m.data import prompts  # noqa: PLC0415
    from amd135m.tokenizer import load_tokenizer  # noqa: PLC0415
    headers = prompts.stdlib_headers(preset.distill_prompts)
    config, params = checkpoints.load_params(target_path)
    params = jax.tree.map(jnp.asarray, params)
    tokenizer = load_tokenizer(target_path)
    raw.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm  # noqa: PLC0415
    batch = 8
    for start in tqdm(range(0, len(headers), batch), desc="target completions", unit="batch"):
      records = inference.generate_text(params, config, tokenizer, headers[start:start + batch],
                                        preset.distill_new_tokens, sampling.SamplingParams())
      for k, record in enumerate(records):
        (raw / f"{start + k:05d}.txt").write_text(record["prompt"] + record["completion"])
    (raw / "DONE").write_text(f"{len(headers)}\n")
  from amd135m.data import builders  # noqa: PLC0415
  builders.prepare("local_text", raw, prepared, patterns="*.txt")
  log(f"[distill] {len(list(raw.glob('*.txt')))} target completions in {prepared}")
  return str(prepared)


def plot_losses(workdirs: dict[str, pathlib.Path], path: pathlib.Path) -> None:
  """Train and eval loss of every stage on one step axis, a vertical line between stages."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(8, 4.5))
  offset = 0
  for stage, workdir in workdirs.items():
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line]
    train = [(r["step"] + offset, r["train_loss"]) for r in records if "train_loss" in r]
    evals = [(r["step"] + offset, r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
      ax.plot(*zip(*train), label=f"{stage} train")
    if evals:
      ax.plot(*zip(*evals), "o--", label=f"{stage} eval (held-out)")
    offset = max([offset] + [s for s, _ in train])
    ax.axvline(offset, color="grey", lw=0.5)
  ax.set_xlabel("step (all stages)")
  ax.set_ylabel("loss (nats per token)")
  ax.set_title("draft training: Gutenberg -> Python stdlib -> target completions")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def reproduce(out_dir, preset: str = "demo", target: str | None = None,
              log: Callable[[str], None] = print) -> dict:
  """Runs every stage into out_dir; returns {'rows', 'paths', 'seconds' per stage}."""
  if preset not in PRESETS:
    raise UserError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
  spec = PRESETS[preset]
  target = target or config_lib.cache_path(*config_lib.SMOLLM2_GGUF)
  if not pathlib.Path(target).exists():
    raise UserError(f"target {target} not found: run `make models` (or pass --target)")
  # The target is read now (header, tensor index, tokenizer), not after the training stages.
  from amd135m import checkpoints, tokenizer as tokenizer_lib  # noqa: PLC0415
  checkpoints.open_checkpoint(target)
  tokenizer_lib.load_tokenizer(target)
  out = make_dir(pathlib.Path(out_dir).expanduser().absolute(), "--out")
  seconds, workdirs = {}, {}

  def timed(name, fn):
    start = time.perf_counter()
    result = fn()
    seconds[name] = round(time.perf_counter() - start, 1)
    return result

  workdirs["pretrain"] = out / "pretrain"
  timed("pretrain", lambda: _train("pretrain", workdirs["pretrain"], spec.pretrain_steps, "",
                                   spec.overrides, log))
  workdirs["code"] = out / "code"
  timed("code", lambda: _train("code", workdirs["code"], spec.code_steps,
                               str(workdirs["pretrain"]), spec.overrides, log))
  draft = workdirs["code"]
  if spec.distill_prompts:
    data = timed("distill_data", lambda: _distill_data(target, out, spec, log))
    workdirs["distill"] = out / "distill"
    timed("distill", lambda: _train("distill", workdirs["distill"], spec.distill_steps,
                                    str(draft), spec.overrides, log, distill_dir=data))
    draft = workdirs["distill"]
  plot_losses(workdirs, out / "loss_curves.png")
  drafts = {"n-gram": "ngram", "AMD-style draft": str(draft)}
  if spec.head:
    head_dir = out / "head"
    timed("head", lambda: _train_head(target, head_dir, spec, log))
    drafts["feature head"] = str(head_dir)
    # The head where the text does not repeat itself, prompt lookup where it does.
    from amd135m.speculative import LOOKUP_FIRST  # noqa: PLC0415
    drafts["lookup + head"] = LOOKUP_FIRST + str(head_dir)
  copy_gammas = {f"{precision} copy": gammas for precision, gammas in spec.copies}
  drafts.update({name: name.split()[0] for name in copy_gammas})  # no training

  from amd135m.benchmarks import spec_table  # noqa: PLC0415
  measured, missing = {}, {}
  for name, draft_spec in drafts.items():
    table_dir = out / "table" / _slug(name)
    saved = table_dir / "spec_table.json"
    if saved.exists():
      measured[name] = json.loads(saved.read_text())["rows"]
      log(f"[table] {name}: measured earlier in {saved}, skipped (delete it to measure again)")
    else:
      missing[name] = (draft_spec, copy_gammas.get(name, spec.gammas), str(table_dir))
  if missing:
    # One run for every draft: the target loaded once and its target-only decode timed once per
    # prompt and setting, each draft right after it (all speedups over the same baseline).
    from tqdm.auto import tqdm  # noqa: PLC0415
    log(f"[table] {', '.join(missing)} drafting for the target")
    tables = timed("tables", lambda: spec_table.run_many(
        target, missing, n_prompts=spec.prompts, max_new_tokens=spec.new_tokens, progress=tqdm))
    measured.update({name: table.rows for name, (table, _) in tables.items()})
  rows = [{"draft": name, **row} for name in drafts for row in measured[name]]
  plot_comparison(rows, out / "comparison.png")
  summary_path = out / "summary.json"
  previous = json.loads(summary_path.read_text())["seconds"] if summary_path.exists() else {}
  # ("table NAME": one table per draft, before they were measured together)
  previous = {k: v for k, v in previous.items() if not k.startswith("table ")}
  seconds = {**previous, **{k: v for k, v in seconds.items() if v >= 1.0 or k not in previous}}
  summary = {"preset": preset, "target": target, "drafts": drafts, "seconds": seconds,
             "total_seconds": round(sum(seconds.values()), 1), "rows": rows}
  summary_path.write_text(json.dumps(summary, indent=1) + "\n")
  for name in drafts:
    log(f"\n{name}:\n" + spec_table.format_table([r for r in rows if r["draft"] == name],
                                                 amd_reference=False))
  log("\n" + format_comparison(rows))
  log(f"stages (s): {seconds}; total {summary['total_seconds']} s; outputs in {out}")
  return {**summary, "table_dir": str(out / "table"), "loss_plot": str(out / "loss_curves.png"),
          "comparison_plot": str(out / "comparison.png")}


def _slug(name: str) -> str:
  return name.lower().replace(" + ", "_and_").replace(" ", "_").replace("-", "_")


def _train_head(target: str, head_dir: pathlib.Path, spec: Preset, log) -> None:
  """The feature head (training.feature_head) on the target's own continuations, in its budget."""
  from amd135m.training import feature_head  # noqa: PLC0415
  if (head_dir / feature_head.COMPLETE).exists():
    log(f"[head] complete in {head_dir}, skipped")
    return
  settings = dataclasses.replace(feature_head.Settings(), **spec.head_settings)
  resume = head_dir.exists() and any(head_dir.iterdir())
  log(f"[head] training a feature head into {head_dir} ({spec.head})")
  summary = feature_head.train_head(target, head_dir, settings=settings, resume=resume,
                                  log=log, **spec.head)
  last = summary["last"]
  log(f"[head] {summary['rows']} rows collected in {summary['collect_seconds']} s, "
      f"{summary['step']} steps in {summary['train_seconds']} s; held-out agreement "
      f"{last.get('eval_agreement_0', float('nan')):.3f}, expected tokens per target call "
      f"{last.get('eval_expected_tokens_per_call', float('nan')):.2f}")
  if not summary["complete"]:
    raise UserError(f"the head in {head_dir} did not finish: rerun to resume it")


def format_comparison(rows: list[dict]) -> str:
  """One line per (setting, draft) at its best gamma, after a target-only line per setting."""
  header = ["setting", "draft", "gamma", "tokens/s", "acceptance", "tok/call", "speedup",
            "exact"]
  lines = []
  for setting in dict.fromkeys(r["setting"] for r in rows):
    mine = [r for r in rows if r["setting"] == setting]
    target_tps = sum(r["target_tokens_per_s"] for r in mine) / len(mine)
    lines.append([setting, "target only", "-", f"{target_tps:.1f}", "-", "1.00", "1.00x", "-"])
    for draft in dict.fromkeys(r["draft"] for r in mine):
      best = max((r for r in mine if r["draft"] == draft), key=lambda r: r["speedup"])
      lines.append([setting, draft, str(best["gamma"]), f"{best['speculative_tokens_per_s']:.1f}",
                    f"{best['acceptance']:.3f}", f"{best['tokens_per_target_call']:.2f}",
                    f"{best['speedup']:.2f}x", text_table.cell(best["exact"], "")])
  return (text_table.aligned(header, lines) + "\n(target-only tokens/s: its runs beside "
          "the drafts, each prompt's just before theirs; speedup: over them; AMD's CodeLlama-7b: "
          "acceptance 0.65-0.74, 2.6-3.9x)")


def plot_comparison(rows: list[dict], path: pathlib.Path) -> None:
  """Speedup over target-only per draft (best gamma), one bar group per setting."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  settings = list(dict.fromkeys(r["setting"] for r in rows))
  drafts = list(dict.fromkeys(r["draft"] for r in rows))
  fig, ax = plt.subplots(figsize=(7, 4))
  width = 0.8 / len(settings)
  for i, setting in enumerate(settings):
    best = [max((r["speedup"] for r in rows if r["draft"] == d and r["setting"] == setting),
                default=0.0) for d in drafts]
    bars = ax.bar([x + i * width for x in range(len(drafts))], best, width, label=setting)
    ax.bar_label(bars, fmt="%.2fx", fontsize=8)
  ax.axhline(1.0, color="grey", lw=0.8)
  ax.set_xticks([x + width * (len(settings) - 1) / 2 for x in range(len(drafts))], drafts)
  ax.set_ylabel("speedup over target-only (best gamma)")
  ax.set_title("drafts for SmolLM2-135M on HumanEval prompts, this CPU")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

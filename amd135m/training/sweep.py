"""The hyperparameter sweep driver behind `python -m amd135m.sweep` (its docstring says how a
config declares a sweep): each trial one `python -m amd135m.train` subprocess in its own
workdir, finished only once FINISHED is written after the trainer exited 0; reruns skip finished
trials and resume the others; trainers die with the driver; results.csv and plots summarise.
`run_sweep`, `summarize`, `write_slurm_script`, `failure_report`, `read_metrics` are the entry
points.
"""
import csv
import ctypes
import dataclasses
import datetime
import difflib
import fcntl
import hashlib
import json
import math
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable

import ml_collections

from amd135m.errors import UserError, make_dir
from amd135m.paths import COMPLETE  # the trainer's own marker: a trial without it is rerun
from amd135m.training import workdir_lock

# What one trial runs, before its flags; tests substitute a fake trainer script.
TRAINER = (sys.executable, "-m", "amd135m.train")
FINISHED = "FINISHED"  # marker: the trainer exited 0 and the sweep recorded it
FAILED = "FAILED"  # marker: holds the exit code of the trial's last attempt
LOG = "log.txt"
METRICS = "metrics.jsonl"
SWEEP_JSON = "sweep.json"
RESULTS_CSV = "results.csv"
SBATCH = "sweep.sbatch"
LOG_TAIL_LINES = 15
MAX_NAME_CHARS = 120  # file names stay well under the 255-byte limit


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run of the trainer: the config overrides that sweep() passed to add()."""
  name: str
  overrides: dict

  def flags(self) -> list[str]:
    return [f"--config.{key}={format_value(value)}" for key, value in self.overrides.items()]


@dataclasses.dataclass(frozen=True)
class Sweep:
  config: str  # 'ABSOLUTE/PATH.py[:arg]', as the trainer receives it
  trials: tuple[Trial, ...]


@dataclasses.dataclass(frozen=True)
class TrialResult:
  name: str
  status: str  # 'finished' | 'failed' | 'skipped' (finished by an earlier run)
  exit_code: int | None = None
  log_tail: str = ""


def format_value(value) -> str:
  """A flag value as the trainer's --config.KEY=VALUE parser reads it."""
  return str(value)


def trial_name(index: int, overrides: dict) -> str:
  """'003_lr=0.001,warmup_steps=10': stable for the same trial, safe as a file name."""
  text = ",".join(f"{key}={format_value(value)}" for key, value in overrides.items()) or "defaults"
  text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
  if len(text) > MAX_NAME_CHARS:
    # The digest keeps two long names that share a prefix apart.
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    text = f"{text[:MAX_NAME_CHARS - 9]}~{digest}"
  return f"{index:03d}_{text}"


def _config_keys(config: ml_collections.ConfigDict, prefix="") -> list[str]:
  """Every leaf key, dotted: ['lr', 'optimizer.b2', ...]."""
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += _config_keys(value, f"{prefix}{key}.")
    else:
      keys.append(f"{prefix}{key}")
  return keys


def _check_override(config: ml_collections.ConfigDict, key: str, value, trial: str):
  """Sets key=value on config as the trainer would; a wrong key or type is a UserError."""
  valid = _config_keys(config)
  if key not in valid:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"trial {trial}: unknown config key {key!r}{hint}; valid keys: "
                    f"{', '.join(valid)}")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  try:
    node[leaf] = value
  except TypeError as e:
    raise UserError(f"trial {trial}: {key}={value!r} does not fit the config's "
                    f"{type(node[leaf]).__name__} value {node[leaf]!r}") from e


def load_sweep(spec: str) -> Sweep:
  """Imports 'F.py[:arg]', collects the trials its sweep(add) declares and checks every key
  and value against get_config(arg), so nothing is launched for a sweep with a typo."""
  # train's own loading (a config may import a sibling); imported here, as it imports jax.
  from amd135m import config_lib  # noqa: PLC0415
  path, colon, arg = spec.partition(":")
  file = pathlib.Path(path).resolve()
  module = config_lib.import_file(file)
  if not callable(getattr(module, "sweep", None)):
    raise UserError(f"{path} declares no sweep: define `def sweep(add)` beside get_config that "
                    f"calls add(key=value, ...) once per trial")
  overrides_list = []
  module.sweep(lambda **overrides: overrides_list.append(dict(overrides)))
  if not overrides_list:
    raise UserError(f"sweep(add) in {path} added no trials: call add(key=value, ...) per trial")
  trials = []
  for index, overrides in enumerate(overrides_list):
    name = trial_name(index, overrides)
    config = config_lib.load(f"{file}{colon}{arg}")  # afresh per trial: no override leaks
    for key, value in overrides.items():
      _check_override(config, key, value, name)
    trials.append(Trial(name, overrides))
  return Sweep(f"{file}{colon}{arg}", tuple(trials))


def trial_command(sweep: Sweep, trial: Trial, workdir: pathlib.Path,
                  trainer=TRAINER) -> list[str]:
  return [*trainer, "--config", sweep.config, "--workdir", str(workdir / trial.name),
          *trial.flags()]


def _write_sweep_json(sweep: Sweep, workdir: pathlib.Path, trainer):
  """Records the trials; refuses a workdir that holds a sweep of another config."""
  path = workdir / SWEEP_JSON
  if path.exists():
    previous = json.loads(path.read_text()).get("config")
    if previous != sweep.config:
      raise UserError(f"{workdir} holds a sweep of {previous}, not {sweep.config}: "
                      f"pass another --workdir")
  record = {"config": sweep.config, "trials": [
      {"name": trial.name, "overrides": trial.overrides,
       "command": trial_command(sweep, trial, workdir, trainer)} for trial in sweep.trials]}
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
  tmp.replace(path)


def _write_marker(path: pathlib.Path, text: str):
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text + "\n")
  tmp.replace(path)  # atomic: a marker is whole or absent


def log_tail(trial_dir: pathlib.Path, lines=LOG_TAIL_LINES) -> str:
  try:
    with open(trial_dir / LOG, newline="", errors="replace") as f:  # keep the \r
      text = f.read()
  except OSError:
    return ""
  # A progress bar redraws one line with carriage returns: keep its latest state only.
  text = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))
  return "\n".join(text.splitlines()[-lines:])


def _lock(workdir: pathlib.Path):
  """Two local sweeps in one workdir would run the same trainer twice in one trial dir."""
  handle = open(workdir / ".sweep.lock", "w")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    handle.close()
    raise UserError(f"another sweep is running in {workdir}: wait for it or use another "
                    f"--workdir") from e
  return handle


def run_sweep(spec: str, workdir, parallel: int = 1, trainer=None,
              log: Callable[[str], None] = print) -> list[TrialResult]:
  """Runs every unfinished trial, `parallel` at a time, then writes results.csv and plots.

  Returns one TrialResult per trial, in sweep order."""
  if parallel < 1:
    raise UserError(f"--parallel must be at least 1, not {parallel}")
  trainer = tuple(trainer or TRAINER)
  sweep = load_sweep(spec)
  workdir = make_dir(pathlib.Path(workdir).resolve(), "--workdir")
  with _lock(workdir):
    _write_sweep_json(sweep, workdir, trainer)
    results = {}
    pending = []
    for trial in sweep.trials:
      if (workdir / trial.name / FINISHED).exists():
        results[trial.name] = TrialResult(trial.name, "skipped")
      else:
        pending.append(trial)
    log(f"sweep of {sweep.config}: {len(sweep.trials)} trials, {len(results)} finished "
        f"earlier, {len(pending)} to run, {parallel} at a time")
    results.update(_run_trials(sweep, pending, workdir, parallel, trainer, log))
    paths = summarize(workdir)
    log(f"results: {', '.join(map(str, paths))}")
  return [results[trial.name] for trial in sweep.trials]


def _run_trials(sweep, pending, workdir, parallel, trainer, log) -> dict[str, TrialResult]:
  """Local subprocesses, at most `parallel` alive; a trial's failure never stops the others."""
  results = {}
  queue = list(pending)
  running = {}  # Popen -> (trial, log file, start time)
  waiting = set()  # trials whose workdir a trainer of an earlier sweep still holds
  previous_handler = None
  try:
    # A SIGTERM to the sweep (kill, a cancelled job) stops it like Ctrl-C: no orphaned trainers.
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
  except ValueError:
    pass  # not the main thread: signals stay as they are
  try:
    while queue or running:
      while queue and len(running) < parallel:
        trial = next((t for t in queue if not _held(workdir / t.name, t, waiting, log)), None)
        if trial is None:
          break
        queue.remove(trial)
        trial_dir = workdir / trial.name
        trial_dir.mkdir(exist_ok=True)
        (trial_dir / FAILED).unlink(missing_ok=True)
        command = trial_command(sweep, trial, workdir, trainer)
        log_file = open(trial_dir / LOG, "a")
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log_file.write(f"==> {stamp} {shlex.join(command)}\n")
        log_file.flush()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=_die_with(os.getpid()))
        running[process] = (trial, log_file, time.monotonic())
        log(f"started {trial.name}")
      time.sleep(0.05)
      for process in [p for p in running if p.poll() is not None]:
        trial, log_file, start = running.pop(process)
        log_file.close()
        results[trial.name] = _record_exit(workdir / trial.name, trial, process.returncode,
                                           time.monotonic() - start, log)
  except KeyboardInterrupt:
    # The trainers save on SIGTERM; no marker is written, so the rerun resumes them.
    for process in running:
      process.send_signal(signal.SIGTERM)
    for process, (trial, log_file, _) in running.items():
      process.wait()
      log_file.close()
    raise
  finally:
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  return results


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt


def _held(trial_dir: pathlib.Path, trial: Trial, waiting: set, log) -> bool:
  """Whether a live trainer (left by a sweep that was killed) still holds the trial's workdir: a
  second one there would be refused, and the trial counted failed. Says so once per trial."""
  holder = workdir_lock.holder(trial_dir)
  if holder is not None and trial.name not in waiting:
    waiting.add(trial.name)
    log(f"waiting for {trial.name}: a trainer of an earlier run ({workdir_lock.describe(holder)}) "
        "still holds it")
  return holder is not None


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent_pid: int):
  """A preexec_fn by which the trainer gets SIGTERM (saves, exits) when the sweep dies, kill -9
  included, instead of training on unwatched beside the trainer a rerun would start; None off
  Linux, where a rerun still waits for such a trainer (_held)."""
  if not sys.platform.startswith("linux"):
    return None
  prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it

  def set_death_signal():
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the sweep died before prctl: the signal would never come
      os.kill(os.getpid(), signal.SIGTERM)
  return set_death_signal


def _record_exit(trial_dir, trial, code, seconds, log) -> TrialResult:
  if code == 0 and not (trial_dir / COMPLETE).exists():
    log(f"preempted {trial.name} after {seconds:.1f} s (saved; a rerun resumes it)")
    return TrialResult(trial.name, "unfinished", 0)
  if code == 0:
    _write_marker(trial_dir / FINISHED, datetime.datetime.now().isoformat(timespec="seconds"))
    log(f"finished {trial.name} in {seconds:.1f} s")
    return TrialResult(trial.name, "finished", 0)
  _write_marker(trial_dir / FAILED, str(code))
  log(f"FAILED {trial.name}: exit code {code} after {seconds:.1f} s, log: {trial_dir / LOG}")
  return TrialResult(trial.name, "failed", code, log_tail(trial_dir))


def failure_report(results: list[TrialResult], workdir) -> str:
  """Each failed trial: name, exit code and the last lines of its log."""
  parts = []
  for result in results:
    if result.status == "failed":
      tail = "\n".join(f"    {line}" for line in result.log_tail.splitlines())
      parts.append(f"trial {result.name} failed with exit code {result.exit_code}; last lines "
                   f"of {pathlib.Path(workdir) / result.name / LOG}:\n{tail}")
  return "\n".join(parts)


def read_metrics(path) -> dict[str, dict[int, float]]:
  """metrics.jsonl -> {metric: {step: value}}; a step logged again after a resume keeps its
  latest value, and a torn last line (a killed writer) is ignored."""
  curves = {}
  try:
    lines = pathlib.Path(path).read_text().splitlines()
  except OSError:
    return curves
  for line in lines:
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (ValueError, KeyError, TypeError):
      continue
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        curves.setdefault(key, {})[step] = float(value)
  return curves


def _status(trial_dir: pathlib.Path) -> tuple[str, str]:
  """(status, exit code) of a trial from the files in its directory."""
  if (trial_dir / FINISHED).exists():
    return "finished", "0"
  if (trial_dir / FAILED).exists():
    return "failed", (trial_dir / FAILED).read_text().strip()
  if (trial_dir / LOG).exists():
    return "unfinished", ""  # interrupted, or still running
  return "not run", ""


def summarize(workdir) -> list[pathlib.Path]:
  """Writes results.csv and the plots; returns their paths.

  One row per trial of sweep.json: trial, status ('finished', 'failed', 'unfinished' or
  'not run'), exit_code, the overrides, the last step, each metric's final value (prefixed
  'final_' where an override has its name) and best_eval_loss."""
  workdir = pathlib.Path(workdir)
  try:
    trials = json.loads((workdir / SWEEP_JSON).read_text())["trials"]
  except OSError as e:
    raise UserError(f"{workdir} holds no {SWEEP_JSON}: run the sweep there first") from e
  override_keys = list(dict.fromkeys(key for trial in trials for key in trial["overrides"]))
  rows, curves = [], {}
  for trial in trials:
    trial_dir = workdir / trial["name"]
    status, exit_code = _status(trial_dir)
    metrics = read_metrics(trial_dir / METRICS)
    curves[trial["name"]] = metrics
    row = {"trial": trial["name"], "status": status, "exit_code": exit_code,
           **{key: trial["overrides"].get(key, "") for key in override_keys}}
    steps = [step for values in metrics.values() for step in values]
    row["step"] = max(steps) if steps else ""
    for key, values in sorted(metrics.items()):
      # The final value; a metric named like an override (the schedule's lr) gets a prefix.
      row[f"final_{key}" if key in override_keys else key] = values[max(values)]
    if "eval_loss" in metrics:
      row["best_eval_loss"] = min(metrics["eval_loss"].values())
    rows.append(row)
  columns = list(dict.fromkeys(key for row in rows for key in row))
  with open(workdir / RESULTS_CSV, "w", newline="") as f:
    writer = csv.DictWriter(f, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
  return [workdir / RESULTS_CSV, *plot(workdir, trials, rows, curves)]


def plot(workdir: pathlib.Path, trials, rows, curves) -> list[pathlib.Path]:
  """curves.png: eval loss (else train loss) per trial over steps; heatmap.png for a 2-D grid."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  metric = "eval_loss" if any("eval_loss" in c for c in curves.values()) else "train_loss"
  paths = []
  varying = _varying_keys(trials)
  fig, ax = plt.subplots(figsize=(8, 5))
  for trial, row in zip(trials, rows):
    values = curves[row["trial"]].get(metric)
    if values:
      steps = sorted(values)
      # The legend names a trial by what sets it apart: its index and the keys that vary.
      index = row["trial"].split("_", 1)[0]
      label = ", ".join([index] + [f"{key}={trial['overrides'].get(key, '-')}"
                                   for key in varying])
      ax.plot(steps, [values[s] for s in steps], marker="." if len(steps) < 30 else None,
              linestyle="-" if row["status"] == "finished" else "--", label=label)
  ax.set(xlabel="step", ylabel=metric, title=f"{metric} per trial (dashed: not finished)")
  if ax.lines:
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(workdir / "curves.png", dpi=100)
  plt.close(fig)
  paths.append(workdir / "curves.png")

  grid = _grid(trials)
  if grid:
    (x_key, xs), (y_key, ys) = grid
    score = "best_eval_loss" if metric == "eval_loss" else "train_loss"
    cells = [[math.nan] * len(xs) for _ in ys]
    for trial, row in zip(trials, rows):
      value = row.get(score, "")
      if value != "":
        cells[ys.index(repr(trial["overrides"][y_key]))][
            xs.index(repr(trial["overrides"][x_key]))] = value
    fig, ax = plt.subplots(figsize=(1.4 * len(xs) + 2.5, 1.0 * len(ys) + 2))
    image = ax.imshow(cells, cmap="viridis_r")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set(xlabel=x_key, ylabel=y_key, title=score)
    for i, line in enumerate(cells):
      for j, value in enumerate(line):
        if not math.isnan(value):
          color = "k" if image.norm(value) < 0.5 else "w"  # dark text on the light cells
          ax.text(j, i, f"{value:.4g}", ha="center", va="center", color=color, fontsize="small")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(workdir / "heatmap.png", dpi=100)
    plt.close(fig)
    paths.append(workdir / "heatmap.png")
  return paths


_MISSING = object()


def _varying_keys(trials) -> list[str]:
  """Override keys whose value differs between trials (or that some trials lack)."""
  keys = list(dict.fromkeys(key for trial in trials for key in trial["overrides"]))
  return [key for key in keys
          if len({repr(trial["overrides"].get(key, _MISSING)) for trial in trials}) > 1]


def _grid(trials):
  """((x key, x values), (y key, y values)) when exactly two keys vary, each pair once."""
  varying = _varying_keys(trials)
  if len(varying) != 2 or any(key not in trial["overrides"] for trial in trials
                              for key in varying):
    return None
  pairs = [tuple(repr(trial["overrides"][key]) for key in varying) for trial in trials]
  if len(set(pairs)) != len(pairs):
    return None
  axes = []
  for key in varying:
    values = {repr(trial["overrides"][key]): trial["overrides"][key] for trial in trials}
    try:
      order = sorted(values, key=lambda text: values[text])
    except TypeError:
      order = sorted(values)
    axes.append((key, order))
  return tuple(axes)


def write_slurm_script(spec: str, workdir, parallel: int | None = None,
                       trainer=None) -> pathlib.Path:
  """DIR/sweep.sbatch: one array task per trial, running the same command as a local sweep
  and writing the same markers; a finished trial's task exits at once."""
  if parallel is not None and parallel < 1:
    raise UserError(f"--parallel must be at least 1, not {parallel}")
  trainer = tuple(trainer or TRAINER)
  sweep = load_sweep(spec)
  workdir = make_dir(pathlib.Path(workdir).resolve(), "--workdir")
  _write_sweep_json(sweep, workdir, trainer)
  throttle = f"%{parallel}" if parallel else ""
  cases = []
  for index, trial in enumerate(sweep.trials):
    command = shlex.join(trial_command(sweep, trial, workdir, trainer))
    cases.append(f"  {index}) trial_dir={shlex.quote(str(workdir / trial.name))}\n"
                 f"     command=({command}) ;;")
  script = f"""#!/bin/bash
# Sweep of {sweep.config}: {len(sweep.trials)} trials, one per array task.
# Written by `python -m amd135m.sweep --slurm`. Submit: sbatch {workdir / SBATCH}
# Add your cluster's lines here (#SBATCH --partition=..., --gres=gpu:1, --time=...); for a
# multi-node trial also set --nodes/--ntasks-per-node and put `srun` before "${{command[@]}}".
#SBATCH --job-name=sweep_{pathlib.Path(spec.partition(':')[0]).stem}
#SBATCH --array=0-{len(sweep.trials) - 1}{throttle}
#SBATCH --output={workdir}/slurm-%A_%a.out
set -u
cd {shlex.quote(str(pathlib.Path.cwd()))}
case "${{SLURM_ARRAY_TASK_ID:?run this script with sbatch}}" in
{chr(10).join(cases)}
  *) echo "no trial $SLURM_ARRAY_TASK_ID in this sweep" >&2; exit 2 ;;
esac
if [ -e "$trial_dir/{FINISHED}" ]; then echo "$trial_dir is finished"; exit 0; fi
mkdir -p "$trial_dir"
rm -f "$trial_dir/{FAILED}"
echo "==> $(date -Iseconds) ${{command[*]}}" >> "$trial_dir/{LOG}"
"${{command[@]}}" >> "$trial_dir/{LOG}" 2>&1
code=$?
if [ "$code" -ne 0 ]; then echo "$code" > "$trial_dir/{FAILED}"; exit "$code"; fi
if [ ! -e "$trial_dir/{COMPLETE}" ]; then echo "$trial_dir was preempted"; exit 0; fi
date -Iseconds > "$trial_dir/{FINISHED}.tmp"
mv "$trial_dir/{FINISHED}.tmp" "$trial_dir/{FINISHED}"  # atomic: whole or absent
"""
  path = workdir / SBATCH
  path.write_text(script)
  path.chmod(0o755)
  return path

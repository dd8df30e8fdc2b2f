"""Sweeps: every trial runs once, reruns skip finished trials and resume the rest, failures are
reported without losing the others, and the SLURM script runs the same trials.

Most tests use a fake trainer (a small script written here) that speaks the trainer's contract:
flags in, metrics.jsonl and a checkpoint out, resume from the checkpoint, exit 0 when done. It
logs each invocation so the tests can count them. One test runs the real amd135m.train.
"""
import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from amd135m import sweep as sweep_face
from amd135m.training import sweep as sweep_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

FAKE_TRAINER = r'''
import json, os, pathlib, sys, time
args = sys.argv[1:]
workdir = pathlib.Path(args[args.index("--workdir") + 1])
config = args[args.index("--config") + 1]
overrides = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
from amd135m.errors import UserError
from amd135m.training import workdir_lock
try:  # as amd135m.train: one trainer per workdir
  lock = workdir_lock.WorkdirLock(workdir, "fake trainer").__enter__()
except UserError as e:
  print("error:", e, file=sys.stderr)
  sys.exit(2)
with open(os.environ["FAKE_CALLS"], "a") as calls:
  calls.write(json.dumps({"trial": workdir.name, "config": config, "pid": os.getpid()}) + "\n")
print("fake trainer starts", overrides, flush=True)
step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", 0))
preempted = []
if step_seconds:  # as amd135m.train: SIGTERM ends the run after the current step's checkpoint
  import signal
  signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
running = os.environ.get("FAKE_RUNNING")
if running:  # record the most trials seen alive at once, waiting (<= 10 s) for a partner
  state = pathlib.Path(running)
  (state / "running" / workdir.name).touch()
  (state / "started" / workdir.name).touch()
  most, deadline = 0, time.time() + 10
  while time.time() < deadline:
    most = max(most, len(os.listdir(state / "running")))
    # The last trial to start has no partner to wait for.
    if most >= 2 or len(os.listdir(state / "started")) == int(os.environ["FAKE_TOTAL"]):
      break
    time.sleep(0.02)
  with open(state / "most_alive.txt", "a") as f:
    f.write(f"{most}\n")
  (state / "running" / workdir.name).unlink()
if os.environ.get("FAKE_HANG"):  # until SIGTERM, on which the trainer saves and exits 0
  import signal
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  print("hanging", flush=True)
  time.sleep(60)
if overrides.get("crash") == "True":
  print("step 1/4\rstep 2/4", flush=True)  # a progress bar redrawn in place
  print("boom: told to crash", file=sys.stderr)
  sys.exit(3)
lr, total = float(overrides.get("lr", 0.1)), int(overrides.get("total_steps", 4))
checkpoint = workdir / "checkpoint.json"
step = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
print("resuming from step", step, flush=True)
with open(workdir / "metrics.jsonl", "a") as metrics:
  while step < total:
    step += 1
    metrics.write(json.dumps({"step": step, "train_loss": 10 - lr * step,
                              "lr": lr * (1 - step / (2 * total))}) + "\n")
    if step % 2 == 0:
      metrics.write(json.dumps({"step": step, "eval_loss": 11 - lr * step + (step == total),
                                "eval_perplexity": 2.0 ** step}) + "\n")
    metrics.flush()
    checkpoint.write_text(json.dumps({"step": step}))
    if os.environ.get("FAKE_KILL") == workdir.name and step == 2:
      sys.exit(-9 % 256)  # as if killed mid-run, after the step-2 checkpoint
    deadline = time.time() + step_seconds
    while time.time() < deadline and not preempted:
      time.sleep(0.02)
    if preempted:
      print("preempted at step", step, flush=True)
      sys.exit(0)  # saved, not COMPLETE
(workdir / "COMPLETE").write_text(str(step))  # as amd135m.train: all steps done, saved
print("done", flush=True)
'''

CONFIG = '''
import ml_collections

def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.lr = 0.1
  config.warmup_steps = 0
  config.total_steps = 4
  config.crash = False
  config.optimizer = ml_collections.ConfigDict({"b2": 0.95})
  return config
'''

GRID = '''
def sweep(add):
  for lr in (0.1, 0.2):
    for warmup_steps in (0, 2):
      add(lr=lr, warmup_steps=warmup_steps)
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """The fake trainer as sweep.TRAINER; `fake.calls()` lists the trial dir of each invocation."""
  script = tmp_path / "fake_train.py"
  script.write_text(FAKE_TRAINER)
  calls = tmp_path / "calls.jsonl"
  monkeypatch.setenv("FAKE_CALLS", str(calls))
  monkeypatch.setattr(sweep_lib, "TRAINER", (sys.executable, str(script)))

  class Fake:
    path = script

    @staticmethod
    def calls():
      if not calls.exists():
        return []
      return [json.loads(line)["trial"] for line in calls.read_text().splitlines()]
  return Fake


def write_config(tmp_path, sweep_source=GRID, name="exp.py"):
  path = tmp_path / name
  path.write_text(CONFIG + textwrap.dedent(sweep_source))
  return path


def read_csv(workdir):
  with open(workdir / "results.csv", newline="") as f:
    return list(csv.DictReader(f))


def run(config, workdir, *flags, capsys=None):
  """main() as a user calls it; returns (exit code, stdout, stderr)."""
  code = sweep_face.main(["--config", str(config), "--workdir", str(workdir), *flags])
  out, err = capsys.readouterr()
  return code, out, err


def test_runs_every_trial_and_summarises(tmp_path, fake, capsys):
  config, workdir = write_config(tmp_path), tmp_path / "sweep"
  code, out, err = run(config, workdir, capsys=capsys)
  assert code == 0, err
  names = ["000_lr=0.1,warmup_steps=0", "001_lr=0.1,warmup_steps=2",
           "002_lr=0.2,warmup_steps=0", "003_lr=0.2,warmup_steps=2"]
  assert sorted(fake.calls()) == names
  recorded = json.loads((workdir / "sweep.json").read_text())
  assert [t["name"] for t in recorded["trials"]] == names
  # Each key is a --config.KEY=VALUE flag; the config path is absolute so any cwd works.
  assert recorded["trials"][3]["command"][-2:] == ["--config.lr=0.2", "--config.warmup_steps=2"]
  assert recorded["config"] == str(config.resolve())
  rows = read_csv(workdir)
  assert [row["trial"] for row in rows] == names
  for row in rows:
    lr = float(row["lr"])
    assert row["status"] == "finished" and row["step"] == "4"
    assert float(row["train_loss"]) == pytest.approx(10 - 4 * lr)  # the last value
    assert float(row["eval_loss"]) == pytest.approx(11 - 4 * lr + 1)  # the last eval...
    assert float(row["best_eval_loss"]) == pytest.approx(11 - 2 * lr)  # ...is not the best
    assert float(row["final_lr"]) == pytest.approx(lr / 2)  # the metric beside the override
    assert (workdir / row["trial"] / "FINISHED").exists()
    assert "fake trainer starts" in (workdir / row["trial"] / "log.txt").read_text()
  assert {row["warmup_steps"] for row in rows} == {"0", "2"}
  assert (workdir / "curves.png").stat().st_size > 0
  assert (workdir / "heatmap.png").stat().st_size > 0  # lr x warmup_steps is a 2-D grid


def test_rerun_skips_finished_and_resumes_unfinished(tmp_path, fake, monkeypatch, capsys):
  config, workdir = write_config(tmp_path), tmp_path / "sweep"
  half_done = "001_lr=0.1,warmup_steps=2"
  monkeypatch.setenv("FAKE_KILL", half_done)
  code, _, err = run(config, workdir, capsys=capsys)
  assert code == 1 and half_done in err
  assert len(fake.calls()) == 4
  assert not (workdir / half_done / "FINISHED").exists()
  assert {row["trial"]: row["status"] for row in read_csv(workdir)}[half_done] == "failed"

  monkeypatch.delenv("FAKE_KILL")
  code, out, err = run(config, workdir, capsys=capsys)
  assert code == 0, err
  assert fake.calls()[4:] == [half_done]  # only the unfinished trial ran again...
  steps = [json.loads(line)["step"] for line in
           (workdir / half_done / "metrics.jsonl").read_text().splitlines()
           if "train_loss" in line]
  assert steps == [1, 2, 3, 4]  # ...and resumed after its step-2 checkpoint
  assert all(row["status"] == "finished" for row in read_csv(workdir))

  # The marker, not the trainer's exit, makes a trial finished: without it the trial reruns
  # (the trainer resumes at its final checkpoint and exits at once).
  (workdir / "000_lr=0.1,warmup_steps=0" / "FINISHED").unlink()
  code, _, err = run(config, workdir, capsys=capsys)
  assert code == 0, err
  assert fake.calls()[5:] == ["000_lr=0.1,warmup_steps=0"]
  code, _, _ = run(config, workdir, capsys=capsys)
  assert code == 0 and len(fake.calls()) == 6  # all finished: nothing runs


def test_failing_trial_is_reported_and_the_others_kept(tmp_path, fake, capsys):
  config = write_config(tmp_path, '''
      def sweep(add):
        add(lr=0.1)
        add(lr=0.2, crash=True)
        add(lr=0.3)
      ''')
  workdir = tmp_path / "sweep"
  code, out, err = run(config, workdir, capsys=capsys)
  assert code == 1
  failed = "001_lr=0.2,crash=True"
  assert f"trial {failed} failed with exit code 3" in err
  assert "boom: told to crash" in err  # the log's last lines,
  assert "step 2/4" in err and "step 1/4" not in err  # a progress bar in its latest state
  assert sorted(fake.calls()) == ["000_lr=0.1", failed, "002_lr=0.3"]
  rows = {row["trial"]: row for row in read_csv(workdir)}
  assert rows[failed]["status"] == "failed" and rows[failed]["exit_code"] == "3"
  assert rows[failed]["train_loss"] == ""
  for name, lr in [("000_lr=0.1", 0.1), ("002_lr=0.3", 0.3)]:
    assert rows[name]["status"] == "finished"
    assert float(rows[name]["train_loss"]) == pytest.approx(10 - 4 * lr)
  # A rerun retries only the failed trial, which fails again the same way.
  code, _, err = run(config, workdir, capsys=capsys)
  assert code == 1 and failed in err and fake.calls()[3:] == [failed]


def test_interrupted_sweep_stops_its_trainers_and_marks_nothing(tmp_path, fake, monkeypatch):
  config, workdir = write_config(tmp_path), tmp_path / "sweep"
  code = (f"import sys; from amd135m import sweep; from amd135m.training import sweep as lib; "
          f"lib.TRAINER = (sys.executable, {str(fake.path)!r}); sys.exit(sweep.main(sys.argv[1:]))")
  monkeypatch.setenv("FAKE_HANG", "1")
  proc = subprocess.Popen([sys.executable, "-c", code, "--config", str(config), "--workdir",
                           str(workdir), "--parallel", "2"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  logs = [workdir / name / "log.txt" for name in ("000_lr=0.1,warmup_steps=0",
                                                  "001_lr=0.1,warmup_steps=2")]
  deadline = time.time() + 60
  while not all(log.exists() and "hanging" in log.read_text() for log in logs):
    assert time.time() < deadline and proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # as `kill` or a cancelled job would
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 130, err
  assert "interrupted; rerun the same command to resume" in err
  assert len(fake.calls()) == 2
  # Both trainers got SIGTERM and exited 0, as a preempted trainer does: not finished.
  assert not list(workdir.glob("*/FINISHED"))
  monkeypatch.delenv("FAKE_HANG")
  results = sweep_lib.run_sweep(str(config), workdir, log=lambda line: None)
  assert [r.status for r in results] == ["finished"] * 4 and len(fake.calls()) == 6


def _alive(pid: int) -> bool:
  """Running (not exited, not a zombie waiting for a parent that is gone)."""
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the death signal is Linux's")
def test_kill_9_of_the_sweep_stops_its_trainers_and_the_rerun_ends_with_every_result(
    tmp_path, fake, monkeypatch):
  """Trainers left running by a killed sweep trained on beside the ones its rerun started, in the
  same trial folders. Now they get SIGTERM with their sweep's death, save and exit; the rerun
  resumes every trial once, and each curve has each step once."""
  config = write_config(tmp_path, GRID.replace("add(lr=lr,", "add(total_steps=8, lr=lr,"))
  workdir = tmp_path / "sweep"
  code = (f"import sys; from amd135m import sweep; from amd135m.training import sweep as lib; "
          f"lib.TRAINER = (sys.executable, {str(fake.path)!r}); sys.exit(sweep.main(sys.argv[1:]))")
  monkeypatch.setenv("FAKE_STEP_SECONDS", "0.5")  # a trial takes 4 s
  driver = subprocess.Popen([sys.executable, "-c", code, "--config", str(config), "--workdir",
                             str(workdir), "--parallel", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  names = ["000_total_steps=8,lr=0.1,warmup_steps=0", "001_total_steps=8,lr=0.1,warmup_steps=2"]
  metrics = [workdir / name / "metrics.jsonl" for name in names]
  deadline = time.time() + 60
  while not all(m.exists() and m.read_text() for m in metrics):  # both trainers are at step 1
    assert time.time() < deadline and driver.poll() is None
    time.sleep(0.02)
  driver.kill()
  driver.wait()
  pids = [json.loads(line)["pid"] for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
  assert len(pids) == 2
  deadline = time.time() + 2  # one step and an exit; unwatched, they would train 3 s more
  while any(_alive(pid) for pid in pids):
    assert time.time() < deadline, "the trainers outlived their sweep"
    time.sleep(0.02)
  assert not list(workdir.glob("*/COMPLETE"))

  monkeypatch.delenv("FAKE_STEP_SECONDS")
  results = sweep_lib.run_sweep(str(config), workdir, parallel=2, log=lambda line: None)
  assert [r.status for r in results] == ["finished"] * 4
  assert sorted(fake.calls()) == sorted(names + [r.name for r in results])
  for row in read_csv(workdir):
    steps = [json.loads(line)["step"] for line in
             (workdir / row["trial"] / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    assert steps == list(range(1, 9)), (row["trial"], steps)
    assert float(row["train_loss"]) == pytest.approx(10 - 8 * float(row["lr"]))


def test_rerun_waits_for_a_trainer_that_still_holds_its_trial(tmp_path, fake):
  """A trainer a killed sweep left (off Linux, or one started by hand) still holds trial 000: the
  rerun runs the others and starts 000 once it is free, not a second trainer beside it."""
  config, workdir = write_config(tmp_path), tmp_path / "sweep"
  held = workdir / "000_lr=0.1,warmup_steps=0"
  held.mkdir(parents=True)
  leftover = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from amd135m.training import workdir_lock; "
       "lock = workdir_lock.WorkdirLock(sys.argv[1], 'amd135m.train').__enter__(); "
       "print('held', flush=True); time.sleep(1.5)", str(held)], stdout=subprocess.PIPE,
      text=True)
  assert leftover.stdout.readline() == "held\n"
  lines = []
  results = sweep_lib.run_sweep(str(config), workdir, log=lines.append)
  assert leftover.wait() == 0
  assert [r.status for r in results] == ["finished"] * 4, lines
  assert f"waiting for {held.name}: a trainer of an earlier run (pid {leftover.pid} on host " in (
      "\n".join(lines))
  assert sorted(fake.calls()) == [r.name for r in results]


def test_parallel_runs_that_many_at_once(tmp_path, fake, monkeypatch):
  config, workdir = write_config(tmp_path), tmp_path / "sweep"
  state = tmp_path / "state"
  (state / "running").mkdir(parents=True)
  (state / "started").mkdir()
  monkeypatch.setenv("FAKE_RUNNING", str(state))
  monkeypatch.setenv("FAKE_TOTAL", "4")
  results = sweep_lib.run_sweep(str(config), workdir, parallel=2, log=lambda line: None)
  assert [r.status for r in results] == ["finished"] * 4
  # Each trial waits for a partner and records the most trials it saw alive: two at once,
  # never three (with parallel=1 the first would wait alone until its deadline and see 1).
  most = [int(n) for n in (state / "most_alive.txt").read_text().split()]
  assert len(most) == 4 and max(most) == 2


def test_slurm_script_runs_one_trial_per_array_task(tmp_path, fake, capsys):
  config, workdir = write_config(tmp_path), tmp_path / "sweep"
  code, out, err = run(config, workdir, "--slurm", "--parallel", "2", capsys=capsys)
  assert code == 0, err
  script = workdir / "sweep.sbatch"
  assert f"sbatch {script}" in out
  assert fake.calls() == []  # nothing ran
  text = script.read_text()
  assert "#SBATCH --array=0-3%2" in text
  names = [t["name"] for t in json.loads((workdir / "sweep.json").read_text())["trials"]]
  for index, name in enumerate(names):
    assert f"  {index}) trial_dir={workdir / name}\n" in text

  # Run array task 2 as SLURM would (bash, the task id in the environment).
  env = dict(os.environ, SLURM_ARRAY_TASK_ID="2")
  subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
  assert fake.calls() == [names[2]]
  assert (workdir / names[2] / "FINISHED").exists()
  subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
  assert fake.calls() == [names[2]]  # a finished task exits at once
  assert sweep_face.main(["--workdir", str(workdir), "--collect"]) == 0
  statuses = [row["status"] for row in read_csv(workdir)]
  assert statuses == ["not run", "not run", "finished", "not run"]

  # A failing task writes FAILED with its exit code and fails the array task.
  bad = write_config(tmp_path, "def sweep(add):\n  add(crash=True)\n", name="bad.py")
  bad_dir = tmp_path / "bad"
  sweep_lib.write_slurm_script(str(bad), bad_dir)
  proc = subprocess.run(["bash", str(bad_dir / "sweep.sbatch")],
                        env=dict(os.environ, SLURM_ARRAY_TASK_ID="0"), capture_output=True)
  assert proc.returncode == 3
  assert (bad_dir / "000_crash=True" / "FAILED").read_text().strip() == "3"


@pytest.mark.parametrize("sweep_source, flags, message", [
    (None, [], "not found"),
    ("", [], "declares no sweep"),
    ("def sweep(add):\n  pass\n", [], "added no trials"),
    ("def sweep(add):\n  add(lr=0.1)\n  add(learning_rate=0.1)\n", [],
     "unknown config key 'learning_rate'"),
    ("def sweep(add):\n  add(**{'optimizer.b3': 0.9})\n", [], "unknown config key 'optimizer.b3'"),
    ("def sweep(add):\n  add(optimizer=0.9)\n", [], "unknown config key 'optimizer'"),
    ("def sweep(add):\n  add(warmup_steps=0.5)\n", [], "warmup_steps=0.5 does not fit"),
    ("def sweep(add):\n  add(lr=0.1)\n", ["--parallel", "0"], "--parallel must be at least 1"),
])
def test_bad_input_is_one_line_and_runs_nothing(tmp_path, fake, capsys, sweep_source, flags,
                                                message):
  config = (write_config(tmp_path, sweep_source) if sweep_source is not None
            else tmp_path / "missing.py")
  code, out, err = run(config, tmp_path / "sweep", *flags, capsys=capsys)
  assert code == 2
  assert out == ""
  assert len(err.splitlines()) == 1 and err.startswith("amd135m.sweep: error: "), err
  assert message in err
  assert fake.calls() == []


@pytest.mark.parametrize("flags", [[], ["--slurm"]])
def test_workdir_under_a_file_is_one_line(tmp_path, fake, capsys, flags):
  (tmp_path / "a_file").write_text("")
  code, out, err = run(write_config(tmp_path), tmp_path / "a_file" / "sweep", *flags,
                       capsys=capsys)
  assert code == 2 and out == "" and fake.calls() == []
  assert len(err.splitlines()) == 1 and "--workdir" in err and "cannot create" in err, err


def test_workdir_of_another_config_is_refused(tmp_path, fake, capsys):
  workdir = tmp_path / "sweep"
  assert run(write_config(tmp_path), workdir, "--slurm", capsys=capsys)[0] == 0
  other = write_config(tmp_path, name="other.py")
  code, _, err = run(other, workdir, capsys=capsys)
  assert code == 2 and "holds a sweep of" in err and fake.calls() == []


def test_a_config_that_imports_its_sibling_loads_as_train_loads_it(tmp_path, fake, capsys):
  """configs/amd_llama_135m_code.py imports amd_llama_135m.py: a sweep beside such a config
  once failed with ModuleNotFoundError, where `train` loaded it (config_lib.load)."""
  (tmp_path / "sibling_base.py").write_text(CONFIG)
  child = tmp_path / "child.py"
  child.write_text(textwrap.dedent('''
      import sibling_base
      from amd135m import config_lib

      def get_config(arg=None):
        config = sibling_base.get_config()
        config.total_steps = config_lib.parse_arg(arg, steps=4).steps
        return config
      ''') + GRID)
  sweep = sweep_lib.load_sweep(f"{child}:steps=2")
  assert [t.overrides for t in sweep.trials][-1] == {"lr": 0.2, "warmup_steps": 2}
  code, out, err = run(f"{child}:steps=2", tmp_path / "sweep", capsys=capsys)
  assert code == 0, err
  assert len(fake.calls()) == 4
  # And its arguments are parsed as train parses them: a bare int is refused in one line.
  code, out, err = run(f"{child}:steps", tmp_path / "sweep2", capsys=capsys)
  assert code == 2 and len(err.splitlines()) == 1, err
  assert "config argument steps: expected an int" in err and len(fake.calls()) == 4


def test_tiny_example_sweep_resolves():
  tiny = ROOT / "configs" / "tiny.py"
  sweep = sweep_lib.load_sweep(f"{tiny}:runlocal")
  assert len(sweep.trials) >= 2
  assert {"lr", "warmup_steps"} <= {key for t in sweep.trials for key in t.overrides}


def test_real_trainer_two_trials(tmp_path):
  """`python -m amd135m.sweep` over the real trainer: 2 tiny trials, then a rerun runs none."""
  config = tmp_path / "tiny_sweep.py"
  config.write_text(textwrap.dedent(f'''
      import importlib.util
      _spec = importlib.util.spec_from_file_location("_tiny", {str(ROOT / "configs" / "tiny.py")!r})
      _tiny = importlib.util.module_from_spec(_spec)
      _spec.loader.exec_module(_tiny)
      get_config = _tiny.get_config

      def sweep(add):
        for lr in (1e-3, 3e-3):
          add(lr=lr, warmup_steps=1, total_steps=3, batch_size=2, **{{"data.seq_len": 32}})
      '''))
  workdir = tmp_path / "sweep"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cache_dir = jax.config.jax_compilation_cache_dir
  if cache_dir:  # the second trial reuses the first one's compiles
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                   str(jax.config.jax_persistent_cache_min_compile_time_secs))
  command = [sys.executable, "-m", "amd135m.sweep", "--config", f"{config}:runlocal",
             "--workdir", str(workdir)]
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  rows = read_csv(workdir)
  assert len(rows) == 2 and all(row["status"] == "finished" for row in rows)
  for row in rows:
    assert row["step"] == "3"
    assert 0 < float(row["train_loss"]) < 20
  logs = [(workdir / row["trial"] / "log.txt").read_text() for row in rows]
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "2 finished earlier, 0 to run" in proc.stdout
  assert [(workdir / row["trial"] / "log.txt").read_text() for row in rows] == logs

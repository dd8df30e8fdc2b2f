"""The training loop as users run it: resume after kill -9 (also mid-save), SIGTERM, several
processes, every config's runlocal variant, and learning on the real Gutenberg corpus."""
import errno
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from amd135m import checkpoints, config_lib
from amd135m.checkpoints import orbax_io
from amd135m.training import data as data_lib, loop, workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.py", "--config.batch_size=4", "--config.data.seq_len=32",
        "--config.total_steps=12", "--config.log_every=1", "--config.eval_every=6",
        "--config.checkpoint_every=4", "--config.warmup_steps=2", "--no_progress"]


def _train(workdir, *extra, devices=1, hooks=None):
  """`python -m amd135m.train`; with `hooks` (loop.Hooks fields), through the test entry that
  passes them to the loop."""
  entry = (["-m", "amd135m.train"] if hooks is None
           else [str(ROOT / "tests" / "train_with_hooks.py"), json.dumps(hooks)])
  command = [sys.executable, *entry, *TINY, "--workdir", str(workdir),
             "--devices", str(devices), *extra]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _train_losses(workdir) -> dict[int, float]:
  text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
  lines = [json.loads(line) for line in text.split("\n") if line]
  return {r["step"]: r["train_loss"] for r in lines if "train_loss" in r}


def _final_params(workdir):
  return jax.tree.leaves(orbax_io.load_workdir_params(workdir)[1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  done = _train(workdir)
  assert done.returncode == 0, done.stderr[-2000:]
  return workdir


def _assert_same_run(workdir, reference):
  assert _train_losses(workdir) == _train_losses(reference)  # the curve, bitwise, steps 1..12
  assert sorted(_train_losses(workdir)) == list(range(1, 13))
  for a, b in zip(_final_params(workdir), _final_params(reference), strict=True):
    np.testing.assert_array_equal(a, b)


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(uninterrupted, tmp_path):
  killed = _train(tmp_path, hooks={"kill_after_step": 6})
  assert killed.returncode == -9
  assert max(_train_losses(tmp_path)) == 6  # it died between checkpoints 4 and 8
  rerun = _train(tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  # The dead trainer's lock file is taken over, in one line naming it.
  assert "amd135m.train: taking over " in rerun.stderr
  assert "which is no longer running" in rerun.stderr
  _assert_same_run(tmp_path, uninterrupted)


def test_a_second_trainer_in_a_held_workdir_is_refused_naming_the_holder(tmp_path):
  """Two trainers in one workdir would interleave checkpoints and metrics.jsonl records: the
  second stops before writing anything, naming the first (here this test's process)."""
  with workdir_lock.WorkdirLock(tmp_path, "amd135m.train"):
    run = _train(tmp_path)
  assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
  line = run.stderr.strip()
  assert len(line.splitlines()) == 1, line
  assert line.startswith(f"amd135m.train: error: --workdir {tmp_path} is in use by another "
                         f"amd135m.train (pid {os.getpid()} on host {socket.gethostname()} "), line
  assert line.endswith("wait for it to end or stop it, or choose another --workdir"), line
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_workdir_lock_names_a_live_holder_and_takes_over_from_a_dead_one(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from amd135m.training import workdir_lock; "
       "lock = workdir_lock.WorkdirLock(sys.argv[1], 'amd135m.train').__enter__(); "
       "print('held', flush=True); time.sleep(60)", str(tmp_path)],
      stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert holder.stdout.readline() == "held\n"
    assert workdir_lock.holder(tmp_path)["pid"] == holder.pid
    with pytest.raises(loop.UserError, match=re.escape(
        f"--workdir {tmp_path} is in use by another amd135m.train (pid {holder.pid} on host ")):
      with workdir_lock.WorkdirLock(tmp_path, "amd135m.train"):
        pass
  finally:
    holder.kill()
    holder.wait()
  assert workdir_lock.holder(tmp_path) is None  # the kernel dropped the dead holder's flock
  notices = []
  with workdir_lock.WorkdirLock(tmp_path, "amd135m.train", notice=notices.append):
    assert workdir_lock.holder(tmp_path)["pid"] == os.getpid()
  assert len(notices) == 1 and f"left by pid {holder.pid} on host " in notices[0], notices
  # A clean release leaves nothing to report to the next holder.
  with workdir_lock.WorkdirLock(tmp_path, "amd135m.train", notice=notices.append):
    pass
  assert len(notices) == 1 and workdir_lock.holder(tmp_path) is None


def test_kill_9_during_a_save_never_restores_the_half_written_step(uninterrupted, tmp_path):
  killed = _train(tmp_path, hooks={"kill_during_save": 8})
  assert killed.returncode == -9
  entries = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert "8" not in entries and any(name.startswith("8.") for name in entries), entries
  rerun = _train(tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  _assert_same_run(tmp_path, uninterrupted)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_continues_from_the_one_before(
    uninterrupted, tmp_path):
  """Bytes flipped in step 12 (once restored silently, then "loss is nan"): the rerun warns in
  one line naming the step, keeps it as 12.damaged, redoes 9..12 from step 8, bitwise."""
  workdir = shutil.copytree(uninterrupted, tmp_path / "workdir")
  step_dir = workdir / "checkpoints" / "12"
  assert (step_dir / orbax_io.CHECKSUM_FILE).is_file()
  data = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  flipped = bytearray(data.read_bytes())
  flipped[len(flipped) // 2] ^= 0xFF
  data.write_bytes(bytes(flipped))
  rerun = _train(workdir)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert rerun.stderr.strip().splitlines() == [
      f"amd135m.train: warning: checkpoint step 12 is damaged "
      f"(state/{data.relative_to(step_dir / 'state').as_posix()} differs from its checksum); set "
      f"it aside as {workdir / 'checkpoints' / '12.damaged'} and resuming from the newest intact "
      "step"]
  assert (workdir / "checkpoints" / "12.damaged").is_dir()
  _assert_same_run(workdir, uninterrupted)


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
  done = _train(tmp_path, "--config.checkpoint_every=100", hooks={"sigterm_after_step": 5})
  assert done.returncode == 0, done.stderr[-2000:]
  assert "preempted: saved step 5" in done.stdout
  assert checkpoints.orbax_io.TrainCheckpoints(tmp_path).latest_step() == 5


@pytest.mark.parametrize("hooks, line", [
    ({"sigterm_at_start": True},
     "amd135m.train: SIGTERM before training started: exiting; nothing was written (rerun the "
     "same command to train)"),
    ({"sigterm_before_handler": True},
     "preempted before step 1: nothing new to save, exiting")])
def test_sigterm_before_the_loop_takes_over_exits_0_in_a_line(tmp_path, hooks, line):
  """A scheduler's SIGTERM while the trainer still imports, loads or compiles was a silent exit
  143; now main() records it first thing and the run stops cleanly, as a preempted one does."""
  run = _train(tmp_path / "w", hooks=hooks)
  assert run.returncode == 0, run.stderr[-2000:]
  assert line in run.stdout.splitlines(), run.stdout
  assert "Traceback" not in run.stderr
  assert not (tmp_path / "w" / loop.COMPLETE).exists()
  assert not (tmp_path / "w" / "checkpoints").exists() or not any(
      (tmp_path / "w" / "checkpoints").iterdir())


def test_a_relative_workdir_path_reads_as_the_absolute_one(uninterrupted, monkeypatch):
  """`--model runs/w` (generate, evaluate) and `--input runs/w` (convert) gave orbax's
  "'StepMetadata' object is not subscriptable"."""
  run = subprocess.run([sys.executable, "-m", "amd135m.convert", "--input", uninterrupted.name,
                        "--output", "converted"], cwd=uninterrupted.parent, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert (uninterrupted.parent / "converted" / "config.json").is_file()
  monkeypatch.chdir(uninterrupted.parent)
  for a, b in zip(jax.tree.leaves(checkpoints.load_params(uninterrupted.name)[1]),
                  _final_params(uninterrupted), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_read_only_workdir_is_one_line(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  if os.geteuid():
    workdir.chmod(0o555)
    prefix = []
  else:  # root writes through permissions: a read-only bind mount, in a namespace of its own
    prefix = ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{workdir}" "{workdir}" && '
              'exec "$@"', "sh"]
    if subprocess.run([*prefix, "true"], capture_output=True).returncode:
      pytest.skip("running as root, and no mount namespace to make a read-only directory")
  command = [*prefix, sys.executable, "-m", "amd135m.train", *TINY, "--workdir", str(workdir),
             "--devices", "1"]
  run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  workdir.chmod(0o755)
  assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
  reason = "Read-only file system" if prefix else "Permission denied"
  assert run.stderr.strip() == (
      f"amd135m.train: error: --workdir {workdir} is not writable (creating .lock in it: "
      f"{reason}): choose a writable directory")


def test_four_processes_see_the_same_batches_and_losses_as_one(uninterrupted, tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  hashes = ["--config.debug_batch_hashes=true", "--config.total_steps=10"]
  assert _train(single, *hashes).returncode == 0
  run = _train(multi, *hashes, "--local_processes", "4")
  assert run.returncode == 0, run.stderr[-3000:]

  def rows(path, process):
    text = (path / f"batch_hashes.p{process}.jsonl").read_text()
    lines = [json.loads(line) for line in text.split("\n") if line]
    return {r["step"]: r["rows"] for r in lines}
  one = rows(single, 0)
  four = [rows(multi, p) for p in range(4)]
  assert sorted(one) == list(range(1, 11))
  for step, global_rows in one.items():
    assert sum((f[step] for f in four), []) == global_rows  # slices in order make the batch
  a, b = _train_losses(single), _train_losses(multi)
  assert sorted(a) == sorted(b) == list(range(1, 11))
  np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5)


def test_bad_config_keys_and_values_are_one_line_errors(tmp_path):
  for flag, message in [("--config.lrr=1", "unknown config key 'lrr': valid keys are "),
                        ("--config.batch_size=x", "--config.batch_size=x: expected an int"),
                        ("--config.data.sources=nowhere", "data source 'nowhere'"),
                        ("--config.lr=nan", "--config.lr must be a finite number, got nan")]:
    run = _train(tmp_path, flag)
    assert run.returncode == 2
    assert run.stderr.startswith("amd135m.train: error: ") and message in run.stderr
    assert "Traceback" not in run.stderr


def _tiny(*overrides):
  config = config_lib.load(str(ROOT / "configs/tiny.py"))
  config_lib.apply_overrides(config, list(overrides))
  return config


@pytest.mark.parametrize("override, message", [
    ("grad_accum=0", "--config.grad_accum must be >= 1, got 0"),
    ("grad_accum=3", "--config.batch_size 8 does not divide into --config.grad_accum 3"),
    ("batch_size=0", "--config.batch_size must be >= 1, got 0"),
    ("data.seq_len=0", "--config.data.seq_len must be >= 1, got 0"),
    ("data.seq_len=512", "--config.data.seq_len 512 exceeds --config.model.max_seq_len 256"),
    ("eval_batches=0", "--config.eval_batches must be >= 1"),
    ("data.num_epochs=-1", "--config.data.num_epochs must be >= 0"),
    ("devices=-1", "--config.devices must be >= 0"),
    ("seed=-1", "--config.seed -1 is out of range: seeds are 0 to 2**32 - 1"),
    ("seed=4294967296", "--config.seed 4294967296 is out of range"),
    ("distill.weight=1.5", "--config.distill.weight must be in [0, 1]"),
    ("distill.temperature=0", "--config.distill.temperature must be > 0"),
    # Once "loss is nan" after a compile, or a run that silently never learns.
    ("lr=nan", "--config.lr must be a finite number, got nan"),
    ("lr=inf", "--config.lr must be a finite number, got inf"),
    ("lr=-0.001", "--config.lr must be >= 0, got -0.001"),
    ("end_lr=-1", "--config.end_lr must be >= 0, got -1.0"),
    ("warmup_steps=-5", "--config.warmup_steps must be >= 0, got -5"),
    ("total_tokens=-1", "--config.total_tokens must be >= 0, got -1"),
    ("b1=1.0", "--config.b1 must be in [0, 1), got 1.0"),
    ("b2=nan", "--config.b2 must be a finite number, got nan"),
    ("eps=0", "--config.eps must be > 0, got 0.0"),
    ("weight_decay=-0.1", "--config.weight_decay must be >= 0, got -0.1"),
    ("grad_clip=inf", "--config.grad_clip must be a finite number, got inf"),
    ("distill.temperature=inf", "--config.distill.temperature must be a finite number"),
])
def test_resolve_refuses_bad_settings_naming_the_flag(override, message):
  with pytest.raises(loop.UserError) as error:
    loop.resolve(_tiny(override))
  assert message in str(error.value)


def test_resolve_accepts_the_largest_seed():
  assert loop.resolve(_tiny("seed=4294967295")).seed == 2**32 - 1


@pytest.mark.parametrize("weights, message", [
    ("1,x", "--config.data.weights=1,x: expected comma-separated numbers"),
    ("1,2,3", "--config.data.weights has 3 entries for 2 sources"),
    ("1,-1", "--config.data.weights=1,-1: the weights must be non-negative")])
def test_bad_data_weights_name_the_flag(weights, message):
  config = _tiny("data.sources=synthetic,synthetic", f"data.weights={weights}")
  with pytest.raises(loop.UserError) as error:
    data_lib.open_sources(config.data, None, 512, 0)
  assert message in str(error.value)


def test_model_differences_name_architecture_fields_not_run_choices(tmp_path):
  saved = config_lib.model_config(_tiny().model)
  orbax_io.write_model_config(tmp_path, saved)
  changed = config_lib.model_config(_tiny("model.n_layers=3", "model.remat=full",
                                          "model.dtype=bfloat16").model)
  assert orbax_io.model_differences(tmp_path, changed) == {"n_layers": (2, 3)}
  assert orbax_io.model_differences(tmp_path, saved) == {}
  assert orbax_io.model_differences(tmp_path / "new", changed) == {}


def test_bad_workdir_flags_and_model_fields_are_one_line_errors(tmp_path):
  in_the_way = tmp_path / "a_file"
  in_the_way.write_text("")
  for workdir, extra, message in [
      (in_the_way, [], f"--workdir {in_the_way}: a file is in the way"),
      ("/proc/amd135m_workdir", [], "--workdir /proc/amd135m_workdir: cannot create"),
      (tmp_path / "w", ["--config.model.attention=bogus"], "choose one of einsum, cudnn"),
      (tmp_path / "w", ["--config.model.attention=cudnn"],
       "--config.model.attention=cudnn needs NVIDIA GPUs (cuDNN flash attention); this run's "
       "devices are cpu: use einsum"),
      (tmp_path / "w", ["--local_processes", "-1"], "--local_processes must be >= 1")]:
    run = _train(workdir, *extra)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith("amd135m.train: error: ") and message in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
  run = _train(tmp_path / "w", devices=-1)
  assert run.returncode == 2 and run.stderr.strip() == (
      "amd135m.train: error: --devices must be >= 1 (0 or absent: the real devices), got -1")


def test_rerun_with_another_model_names_the_fields_in_one_line(uninterrupted, tmp_path):
  workdir = shutil.copytree(uninterrupted, tmp_path / "workdir")
  run = _train(workdir, "--config.model.n_layers=3", "--config.model.remat=full")
  assert run.returncode == 2 and "Traceback" not in run.stderr
  assert run.stderr.strip() == (
      f"amd135m.train: error: --workdir {workdir} holds a checkpoint of a different model "
      "(model.n_layers 2 there, 3 now; see its model_config.json): use a new --workdir or the "
      "same model settings")


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    uninterrupted, tmp_path):
  """Step 5's loss and weights are NaN; log_every=100 so no logging check runs at step 5: only
  the check before each save keeps step 5 off disk."""
  run = _train(tmp_path, "--config.log_every=100", "--config.checkpoint_every=1",
               hooks={"nan_at_step": 5})
  assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
  message = run.stderr.strip().splitlines()[-1]
  assert message.startswith("amd135m.train: error: loss is nan at step 5; the last good "
                            "checkpoint is step 4 in "), message
  assert orbax_io.TrainCheckpoints(tmp_path).latest_step() == 4
  entries = [p.name for p in (tmp_path / "checkpoints").iterdir()]
  assert not any(name.split(".")[0] == "5" for name in entries), entries
  assert all(np.isfinite(p).all() for p in _final_params(tmp_path))
  # Rerun without the fault: it continues from step 4 as if nothing had happened.
  rerun = _train(tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  resumed, reference = _train_losses(tmp_path), _train_losses(uninterrupted)
  assert resumed == {step: reference[step] for step in range(5, 13)}
  for a, b in zip(_final_params(tmp_path), _final_params(uninterrupted), strict=True):
    np.testing.assert_array_equal(a, b)


def test_weights_that_overflow_in_the_first_step_are_never_saved(tmp_path):
  """The loss of step 1 is finite (it uses the initial weights), its new weights are not: the
  param_norm check stops the run before step 1 is saved."""
  config = _tiny("lr=1e30", "warmup_steps=0", "grad_clip=0", "total_steps=3", "log_every=100",
                 "checkpoint_every=1", "batch_size=4", "data.seq_len=32", "devices=1")
  with pytest.raises(loop.TrainingDiverged,
                     match=r"^param_norm is (inf|nan) at step 1; no checkpoint was saved "
                           r"before it: lower --config.lr"):
    loop.train_and_evaluate(config, tmp_path, progress=False)
  assert orbax_io.TrainCheckpoints(tmp_path).latest_step() is None


def test_a_full_disk_during_a_save_stops_in_one_error_naming_the_last_good_step(
    tmp_path, monkeypatch):
  """Step 8's save runs out of space while orbax writes it in the background: the run stops with
  the step and the last good one named, and only steps that were written whole remain."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  handler = ocp.handlers.JsonCheckpointHandler
  write = handler._save_fn

  async def disk_full_at_step_8(self, item, directory):
    if "/8.orbax-checkpoint-tmp" in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await write(self, item, directory)
  monkeypatch.setattr(handler, "_save_fn", disk_full_at_step_8)
  config = _tiny("batch_size=4", "data.seq_len=32", "total_steps=12", "checkpoint_every=4",
                 "devices=1")
  with pytest.raises(orbax_io.DiskFull) as error:
    loop.train_and_evaluate(config, tmp_path, progress=False)
  assert str(error.value) == (
      f"no space left on device at {tmp_path / 'checkpoints'}; step 8 not written; the last good "
      "checkpoint is step 4: free some space (or move --workdir to a larger disk) and rerun")
  assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
  assert orbax_io.TrainCheckpoints(tmp_path).latest_step() == 4


def test_distillation_from_a_teacher_trains_and_refuses_a_smaller_vocabulary(tmp_path):
  """--config.distill.teacher: a saved teacher (vocabulary 80 > the student's 64) drives the
  loss; the student moves toward it (the KL falls by over a quarter in 20 steps)."""
  import dataclasses  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from amd135m import checkpoints, model as model_lib  # noqa: PLC0415
  student = config_lib.model_config(_tiny("model.vocab_size=64").model)
  for name, vocab in (("teacher", 80), ("small_teacher", 48)):
    teacher = dataclasses.replace(student, vocab_size=vocab, n_layers=1)
    params = jax.tree.map(np.array, model_lib.init_params(teacher, jax.random.key(3)))
    params["lm_head"]["kernel"] *= 100  # a confident teacher: far from the student's uniform
    checkpoints.save_hf(tmp_path / name, teacher, params)
  config = _tiny("model.vocab_size=64", f"distill.teacher={tmp_path / 'teacher'}",
                 "total_steps=20", "log_every=1", "eval_every=20", "checkpoint_every=20",
                 "batch_size=4", "data.seq_len=32", "lr=1e-2", "warmup_steps=1", "devices=1")
  loop.train_and_evaluate(config, tmp_path / "run", progress=False)
  losses = [v for _, v in sorted(_train_losses(tmp_path / "run").items())]
  assert len(losses) == 20 and losses[-1] < 0.75 * losses[0], losses  # KL to the teacher
  small = _tiny("model.vocab_size=64", f"distill.teacher={tmp_path / 'small_teacher'}")
  with pytest.raises(loop.UserError, match="smaller than the model's 64"):
    loop.train_and_evaluate(small, tmp_path / "run_small", progress=False)

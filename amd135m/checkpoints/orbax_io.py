"""Training checkpoints: orbax steps inside a workdir, and a trained workdir read as plain params.

A workdir holds `model_config.json`, the tokenizer's Hugging Face files, `config.json` (the
training config), `metrics.jsonl` and `checkpoints/<step>/{state,data,meta}`. Orbax writes each
step into a temporary directory and renames it when complete (on every host), so a step that
`all_steps()` lists is whole: a save killed half-way is never restored.

Whole is not intact: a disk, a copy or a person can later truncate, zero, flip or remove its
files. Once a save is complete, `<step>/sha256.json` records a digest of each of its files; a
restore checks them and falls back to the newest intact step, setting the damaged one aside as
`<step>.damaged` (never deleted). Steps saved before checksums existed still restore: for them,
a restore that fails or gives non-finite weights is the sign of damage.
"""
import contextlib
import dataclasses
import errno
import gc
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
from typing import Any, Callable

import numpy as np

from amd135m.errors import UserError
from amd135m.model_config import ModelConfig


class DiskFull(UserError):
  """A save ran out of space: the step is not written, earlier ones are intact."""


def _out_of_space(error: BaseException | None) -> bool:
  """ENOSPC / EDQUOT as Python raises it, or as tensorstore words it inside a ValueError."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(words in str(error) for words in ("No space left on device", "Disk quota exceeded",
                                             "RESOURCE_EXHAUSTED: Error writing")):
      return True
    error = error.__cause__ or error.__context__
  return False


def _not_out_of_space(record: logging.LogRecord) -> bool:
  """A logging filter: orbax's threads and asyncio log each failed write of a full disk with its
  traceback (dozens); DiskFull says it once."""
  return not (_out_of_space(record.exc_info[1] if record.exc_info else None)
              or _out_of_space(Exception(record.getMessage())))


MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINT_DIR = "checkpoints"
CHECKSUM_FILE = "sha256.json"  # in each step's directory, written once its save is complete
DAMAGED = ".damaged"  # suffix of a step set aside


def is_workdir(path) -> bool:
  path = pathlib.Path(path)
  return (path / MODEL_CONFIG_FILE).is_file() and (path / CHECKPOINT_DIR).is_dir()


def write_model_config(workdir, config: ModelConfig) -> None:
  path = pathlib.Path(workdir) / MODEL_CONFIG_FILE
  path.write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")


def read_model_config(workdir) -> ModelConfig:
  """The architecture a workdir trained; training-only choices (remat, a cuDNN-only attention
  kernel) are reset, so the weights run wherever they are read back (a CPU, a notebook)."""
  fields = json.loads((pathlib.Path(workdir) / MODEL_CONFIG_FILE).read_text())
  return dataclasses.replace(ModelConfig(**fields), remat="none", attention="einsum")


# Choices that change how a step runs, not the weights it restores: free to differ on resume.
RUN_ONLY_FIELDS = ("dtype", "remat", "attention")


def model_differences(workdir, config: ModelConfig) -> dict[str, tuple[Any, Any]]:
  """{field: (the workdir's value, config's value)} for each architecture field where `config`
  differs from the workdir's model_config.json; {} when the file is absent."""
  path = pathlib.Path(workdir) / MODEL_CONFIG_FILE
  if not path.is_file():
    return {}
  saved = json.loads(path.read_text())
  return {name: (saved[name], value) for name, value in dataclasses.asdict(config).items()
          if name in saved and name not in RUN_ONLY_FIELDS and saved[name] != value}


def _digests(step_dir: pathlib.Path) -> dict[str, str]:
  """{path under the step: sha256} of every file of a step, its checksum file aside."""
  digests = {}
  for path in sorted(step_dir.rglob("*")):
    name = path.relative_to(step_dir).as_posix()
    if path.is_file() and not name.startswith(CHECKSUM_FILE):
      with open(path, "rb") as f:
        digests[name] = hashlib.file_digest(f, "sha256").hexdigest()
  return digests


def _size(directory: pathlib.Path) -> int:
  return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def seal(step_dir) -> None:
  """Writes the step's checksum file (atomically: a reader sees all of it or none)."""
  step_dir = pathlib.Path(step_dir)
  tmp = step_dir / (CHECKSUM_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"sha256": _digests(step_dir)}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, step_dir / CHECKSUM_FILE)


# The files a step's restore reads first, all but the manifest JSON: for steps without checksums.
_STEP_INDEX_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt",
                     "data/metadata", "meta/metadata")


def damage(step_dir) -> str | None:
  """What is wrong with a step's files, or None. Checked against its checksum file; a step saved
  without one (before checksums, or killed between its save and the checksums) is checked for
  the index files a restore reads first (a missing or empty one gives orbax's tracebacks): the
  soundness of its data shows only when it restores."""
  step_dir = pathlib.Path(step_dir)
  if not (step_dir / CHECKSUM_FILE).exists():
    for name in _STEP_INDEX_FILES:
      path = step_dir / name
      if not path.is_file():
        return f"{name} is missing"
      try:
        if path.suffix != ".ocdbt":
          json.loads(path.read_text())
        elif not path.stat().st_size:
          raise ValueError
      except (OSError, ValueError):
        return f"{name} is unreadable"
    return None
  try:
    expected = json.loads((step_dir / CHECKSUM_FILE).read_text())["sha256"]
  except (OSError, ValueError, KeyError, TypeError):
    expected = None
  if not isinstance(expected, dict):
    return f"its {CHECKSUM_FILE} is unreadable"
  actual = _digests(step_dir)
  for name, digest in expected.items():
    if name not in actual:
      return f"{name} is missing"
    if actual[name] != digest:
      return f"{name} differs from its checksum"
  return None


@contextlib.contextmanager
def _quiet_unraisable():
  """A failed orbax restore or save abandons coroutines whose cleanup prints tracebacks
  ("Exception ignored in ...") long after the error was handled: they are collected here,
  silently."""
  previous = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  except BaseException:
    gc.collect()
    raise
  finally:
    sys.unraisablehook = previous


class TrainCheckpoints:
  """An orbax CheckpointManager for {state, data iterator state, meta}; async, keeps `keep`.
  Process 0 writes each step's checksums once its save is complete."""

  def __init__(self, workdir, keep: int = 3, async_save: bool = True, cleanup: bool = False):
    """cleanup: remove what saves that were killed or ran out of space left (never listed as
    steps); only for a caller that holds the workdir's lock, as no other save can be under way."""
    import jax
    import orbax.checkpoint as ocp
    self._ocp = ocp
    absl_logger = logging.getLogger("absl")
    for logger in (absl_logger, logging.getLogger("asyncio")):
      if _not_out_of_space not in logger.filters:
        logger.addFilter(_not_out_of_space)
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    # Orbax logs an ERROR for a step whose metadata it cannot parse as it lists the steps;
    # restore_newest names such a step in its own words.
    absl_logger.setLevel(logging.CRITICAL)
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
              cleanup_tmp_directories=cleanup))
    finally:
      absl_logger.setLevel(logging.WARNING)  # orbax logs every file it touches
    if cleanup:
      # Orbax starts the clean-up in a thread and waits for it only in its first save: a run
      # that stops before saving (a one-line error) would exit under the thread, which then
      # raises at interpreter shutdown and leaves the leftovers in place.
      getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self._lead = jax.process_index() == 0
    self._unsealed = []  # steps saved (or saving) whose checksums are not written yet

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts saving (returns before the write completes when async); waits for the last save.
    Out of space (seen before writing, or while writing), a DiskFull names the last good step."""
    import jax
    args = self._ocp.args
    self.wait()  # the previous step is complete and sealed before this one starts
    # The newest step's size on disk, or the state's raw size before the first save.
    needed = (_size(self.directory / str(self.latest_step())) if self.latest_step() is not None
              else sum(leaf.nbytes for leaf in jax.tree.leaves(state)))
    if needed > shutil.disk_usage(self.directory).free:
      raise self._disk_full(step, f"{needed / 2**20:.1f} MiB needed, "
                            f"{shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free")
    try:
      self.manager.save(step, args=args.Composite(state=args.StandardSave(state),
                                                  data=args.JsonSave(data_state),
                                                  meta=args.JsonSave(meta)), force=True)
    except Exception as e:
      if not _out_of_space(e):
        raise
      raise self._disk_full(step) from None
    self._unsealed.append(step)
    self.poll()

  def poll(self) -> None:
    """Seals the saved steps if no save is under way (cheap: call it every step)."""
    if self._lead and self._unsealed and not self.manager.is_saving_in_progress():
      self.wait()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state placed as abstract_state's shardings say, data iterator state, meta)."""
    args = self._ocp.args
    restored = self.manager.restore(step, args=args.Composite(
        state=args.StandardRestore(abstract_state), data=args.JsonRestore(),
        meta=args.JsonRestore()))
    return restored["state"], restored["data"], restored["meta"]

  def restore_newest(self, abstract_state: Any, check: Callable[[Any], str | None],
                     warn: Callable[[str], None], agree: Callable[[bool], bool] = bool
                     ) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data iterator state, meta) of the newest intact step; None if there is none.

    A step whose files differ from its checksums is set aside at once, with one `warn` line. A
    step that fails to restore (or whose state `check` names a problem with) is set aside only
    once an older step restores: when none does, the cause is more likely this run's settings
    than the files, and a UserError says so. agree(flag) is True if any process's flag is."""
    failed = []  # (step, problem) of steps that did not restore, newest first
    set_aside = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = damage(self.directory / str(step))
      if agree(problem is not None):
        self._set_aside(step, problem or "damaged as another process sees it", warn)
        set_aside.append(step)
        continue
      try:
        with _quiet_unraisable():
          state, data_state, meta = self.restore(step, abstract_state)
        problem = check(state)
      except Exception as e:  # noqa: BLE001  tensorstore, orbax and JSON each raise their own
        detail = (str(e).splitlines() or [""])[0][:120].rstrip(" :.")
        problem = f"it does not restore: {type(e).__name__}: {detail}"
      if agree(problem is not None):
        failed.append((step, problem or "it does not restore on another process"))
        continue
      for bad_step, bad_problem in failed:
        self._set_aside(bad_step, bad_problem, warn)
      return step, state, data_state, meta
    if failed:
      step, problem = failed[0]
      raise UserError(f"no checkpoint in {self.directory} restores; the newest, step {step}: "
                      f"{problem}. If model or optimizer settings changed since it was saved, "
                      "use the ones it was saved with or a new --workdir")
    if set_aside:
      raise UserError(f"every checkpoint in {self.directory} is damaged (set aside as "
                      f"<step>{DAMAGED}): rerun to start from the beginning, or put back an "
                      "intact copy of a step")
    return None

  def _set_aside(self, step: int, problem: str, warn: Callable[[str], None]) -> None:
    """Renames a damaged step to <step>.damaged (orbax ignores the name), for a person to look
    at, and tells them which step and why."""
    source = self.directory / str(step)
    target = self.directory / f"{step}{DAMAGED}"
    index = 1
    while target.exists():
      index += 1
      target = self.directory / f"{step}{DAMAGED}.{index}"
    if self._lead:
      source.rename(target)
      warn(f"checkpoint step {step} is damaged ({problem}); set it aside as {target} and "
           "resuming from the newest intact step")
    self.manager.reload()

  def wait(self) -> None:
    """Waits for the save under way, then writes the checksums of every saved step."""
    steps, self._unsealed = self._unsealed, []
    try:
      with _quiet_unraisable():  # a failed write's abandoned coroutines
        self.manager.wait_until_finished()
    except Exception as e:
      if not (steps and _out_of_space(e)):
        raise
      raise self._disk_full(steps[-1]) from None
    for step in steps:
      if self._lead and (self.directory / str(step)).is_dir():  # orbax may have dropped it
        try:
          seal(self.directory / str(step))
        except OSError as e:
          (self.directory / str(step) / (CHECKSUM_FILE + ".tmp")).unlink(missing_ok=True)
          if not _out_of_space(e):
            raise
          raise self._disk_full(None, f"step {step} is saved, without its checksums") from None

  def _disk_full(self, step: int | None, detail: str = "") -> DiskFull:
    """The error for a save that found no space. What orbax wrote of the step stays in its
    temporary directory (other writes may still be under way), never listed as a step; the
    trainer's next run removes it (cleanup)."""
    self.manager.reload()
    good = [s for s in self.manager.all_steps() if s != step]
    written = f"step {step} not written" if step is not None else detail
    if step is not None and detail:
      written += f" ({detail})"
    last = (f"the last good checkpoint is step {max(good)}" if good
            else "no checkpoint was saved before it")
    return DiskFull(f"no space left on device at {self.directory}; {written}; {last}: free some "
                    "space (or move --workdir to a larger disk) and rerun")

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def load_workdir_params(workdir, step: int | None = None) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params as numpy) of a training workdir's latest (or given) checkpoint."""
  # Absolute: given a relative path, orbax reads the step's metadata for the item's
  # ('StepMetadata' object is not subscriptable).
  workdir = pathlib.Path(workdir).expanduser().absolute()
  if not is_workdir(workdir):
    raise UserError(f"{workdir} is not a training workdir (no {MODEL_CONFIG_FILE} and "
                    f"{CHECKPOINT_DIR}/): pass the --workdir of a training run")
  steps = sorted((int(p.name) for p in (workdir / CHECKPOINT_DIR).iterdir()
                  if p.name.isdigit() and (p / "state").is_dir()), reverse=True)
  if step is None:  # the newest intact step; a trainer's next run sets damaged ones aside
    for step in steps:
      problem = damage(workdir / CHECKPOINT_DIR / str(step))
      if problem is None:
        break
      print(f"warning: checkpoint step {step} of {workdir} is damaged ({problem}); reading an "
            "older step", file=sys.stderr)
    else:
      raise UserError(f"{workdir} has no finished checkpoint yet: train longer or wait for a save"
                      if not steps else f"every checkpoint of {workdir} is damaged (see the "
                      "warnings above): rerun its training, which sets them aside")
  return read_model_config(workdir), read_params(workdir / CHECKPOINT_DIR / str(step) / "state")


def read_params(state_dir: pathlib.Path) -> dict:
  """The `params` item of a saved step's state directory, as numpy, without the optimizer
  state (training workdirs and feature-head workdirs alike)."""
  import jax
  import orbax.checkpoint as ocp
  from absl import logging as absl_logging
  # Reading one item of the step, orbax warns that the step's metadata file is not in the item's
  # directory (it is one level up): a line on every load that means nothing to the user.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir)
    tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": tree["params"]}, restore_args={"params": as_numpy}, partial_restore=True))
  finally:
    absl_logging.set_verbosity(verbosity)
  return restored["params"]

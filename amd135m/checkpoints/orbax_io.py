"""Training checkpoints: orbax steps inside a workdir, and a trained workdir read as plain params.

A workdir holds `model_config.json`, the tokenizer's Hugging Face files, `config.json` (the
training config), `metrics.jsonl` and `checkpoints/<step>/{state,data,meta}`. Orbax writes each
step into a temporary directory and renames it when complete (on every host), so a step that
`all_steps()` lists is whole: a save killed half-way is never restored.
"""
import dataclasses
import json
import logging
import pathlib
from typing import Any

import numpy as np

from amd135m.errors import UserError
from amd135m.model_config import ModelConfig

MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINT_DIR = "checkpoints"


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


class TrainCheckpoints:
  """An orbax CheckpointManager for {state, data iterator state, meta}; async, keeps `keep`."""

  def __init__(self, workdir, keep: int = 3, async_save: bool = True):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it touches
    self.manager = ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts saving (returns before the write completes when async); waits for the last save."""
    args = self._ocp.args
    self.manager.save(step, args=args.Composite(state=args.StandardSave(state),
                                                data=args.JsonSave(data_state),
                                                meta=args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state placed as abstract_state's shardings say, data iterator state, meta)."""
    args = self._ocp.args
    restored = self.manager.restore(step, args=args.Composite(
        state=args.StandardRestore(abstract_state), data=args.JsonRestore(),
        meta=args.JsonRestore()))
    return restored["state"], restored["data"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def load_workdir_params(workdir, step: int | None = None) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params as numpy) of a training workdir's latest (or given) checkpoint."""
  import jax
  import orbax.checkpoint as ocp
  workdir = pathlib.Path(workdir)
  if not is_workdir(workdir):
    raise UserError(f"{workdir} is not a training workdir (no {MODEL_CONFIG_FILE} and "
                    f"{CHECKPOINT_DIR}/): pass the --workdir of a training run")
  steps = sorted(int(p.name) for p in (workdir / CHECKPOINT_DIR).iterdir()
                 if p.name.isdigit() and (p / "state").is_dir())
  if not steps:
    raise UserError(f"{workdir} has no finished checkpoint yet: train longer or wait for a save")
  step = steps[-1] if step is None else step
  path = workdir / CHECKPOINT_DIR / str(step) / "state"
  from absl import logging as absl_logging
  # Reading one item of the step, orbax warns that the step's metadata file is not in the item's
  # directory (it is one level up): a line on every load that means nothing to the user.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path)
    tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item={"params": tree["params"]}, restore_args={"params": as_numpy}, partial_restore=True))
  finally:
    absl_logging.set_verbosity(verbosity)
  return read_model_config(workdir), restored["params"]

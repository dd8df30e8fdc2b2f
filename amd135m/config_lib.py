"""Experiment configs: ml_collections files under configs/, each exporting `get_config(arg)`.

`load("configs/tiny.py:runlocal")` imports the file by path and passes the text after the colon;
`parse_arg` turns "a=1,runlocal" into a ConfigDict of typed values, as big_vision does.
"""
import dataclasses
import importlib.util
import os
import pathlib
import sys

import ml_collections

from amd135m import attention as attention_lib, model as model_lib
from amd135m.data import splits
from amd135m.errors import UserError
from amd135m.model_config import ModelConfig
from amd135m.paths import SMOLLM2_GGUF, cache_path  # noqa: F401 (configs read them here)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'key=value,flag' -> ConfigDict; each value is parsed by its default's type, as --config.KEY
  values are, and a bare key is allowed only for a bool (it means true)."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise UserError(f"unknown config argument {key!r}: valid ones are {sorted(defaults)}")
    if not sep and not isinstance(defaults[key], bool):
      # 'steps' alone once became True, and so one training step.
      raise UserError(f"config argument {key}: expected {_a(type(defaults[key]))}; "
                      f"write {key}=VALUE")
    parsed[key] = _typed(defaults[key], value, f"config argument {key}") if sep else True
  return parsed


BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _a(kind: type) -> str:
  """'an int', 'a float', 'a string': the type a value must have, as a user reads it."""
  return {int: "an int", float: "a float", str: "a string",
          bool: f"one of {', '.join(BOOLS)} (any case)"}.get(kind, f"a {kind.__name__}")


def _typed(current, value: str, what: str):
  """`value` parsed as the type of `current`, or a UserError naming `what` and the type: a typo
  ('ture') is refused rather than read as false."""
  try:
    if isinstance(current, bool):
      return BOOLS[value.lower()]
    if isinstance(current, int):
      try:
        return int(value)
      except ValueError:  # '1e6' steps is a whole number; '2.5' is not
        if float(value).is_integer():
          return int(float(value))
        raise
    if isinstance(current, float):
      return float(value)
  except (KeyError, ValueError):
    raise UserError(f"{what}={value}: expected {_a(type(current))}") from None
  return value


# The local corpora as training sources (BUILDER@DATA_DIR:PATTERN), prepared by `make corpora`.
GUTENBERG = "local_text@{}:*.txt"
PYTHON_STDLIB = "local_text@{}:*.py"


def local_corpus(name: str) -> str:
  """'gutenberg' or 'python_stdlib' as a config.data.sources entry."""
  if name == "gutenberg":
    return GUTENBERG.format(cache_path("data", "gutenberg_shakespeare"))
  return PYTHON_STDLIB.format(cache_path("data", "python_stdlib"))


def base_config(model: dict) -> ml_collections.ConfigDict:
  """The schema every experiment config shares; `model` holds ModelConfig's fields.

  Durations are in steps (`total_steps`) or tokens (`total_tokens`, which wins when > 0).
  `batch_size` is global (all hosts), in sequences of `data.seq_len` tokens."""
  config = ml_collections.ConfigDict()
  # Training-only model fields: --config.model.remat=full, --config.model.attention=cudnn.
  config.model = ml_collections.ConfigDict({"remat": "none", "attention": "einsum", **model})
  # Where weights and the tokenizer come from: a Hugging Face dir, a GGUF file, a training
  # workdir, or '' (random init). A workdir's own checkpoints always win over init_from.
  config.init_from = ""
  config.tokenizer = ""
  config.seed = 0
  # Logit distillation from a teacher (HF dir, GGUF or workdir; '' = none) whose vocabulary the
  # model's is an id-prefix of: loss = (1 - weight) * NLL + weight * T^2 * KL(teacher || model).
  config.distill = ml_collections.ConfigDict(dict(teacher="", weight=1.0, temperature=1.0))

  # Sources: comma-separated 'synthetic' or BUILDER@DATA_DIR[:PATTERN] (prepared by
  # `python -m amd135m.data prepare`); weights: comma-separated mixture weights, '' = equal.
  config.data = ml_collections.ConfigDict(dict(
      sources="synthetic", weights="", seq_len=256, separator_id=-1, shuffle=True,
      num_epochs=0, eval_fraction=splits.DEFAULT_EVAL_FRACTION, worker_count=0))

  config.batch_size = 8
  config.grad_accum = 1        # micro-batches per step (lax.scan), normalised by token count
  config.total_steps = 100
  config.total_tokens = 0
  config.lr = 6e-4
  config.end_lr = 6e-5
  config.warmup_steps = 10
  config.b1 = 0.9
  config.b2 = 0.95
  config.eps = 1e-8
  config.weight_decay = 0.1
  config.weight_decay_mask = "all"  # 'all' (TinyLlama/AMD), 'matrices' (no norms), 'kernels'
  config.grad_clip = 1.0

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.devices = 0           # use the first N devices (one process only); 0 = all of them
  config.sharding_rules = ""   # overrides of sharding.DEFAULT_RULES, e.g. 'kv_heads=replicate'

  config.log_every = 10
  config.eval_every = 100
  config.eval_batches = 4
  config.checkpoint_every = 100
  config.keep_checkpoints = 3
  config.async_checkpoint = True
  config.peak_flops = 0.0      # per device, for MFU; 0 = known accelerators' table or measured
  config.debug_batch_hashes = False  # write per-row hashes of every batch (multi-host tests)
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Applies 'key.path=value' strings; values take the type of the current value."""
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"--config.{item}: write --config.KEY=VALUE")
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise UserError(f"unknown config key {key!r}: valid keys are {', '.join(keys(config))}")
      node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node or isinstance(
        node[leaf], ml_collections.ConfigDict):
      raise UserError(f"unknown config key {key!r}: valid keys are {', '.join(keys(config))}")
    node[leaf] = _typed(node[leaf], value, f"--config.{key}")


def keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf key path of a config, sorted ('data.seq_len', 'lr', ...)."""
  out = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(keys(value, f"{prefix}{name}."))
    else:
      out.append(prefix + name)
  return sorted(out)


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/file.py[:arg]' by path and returns get_config(arg)."""
  path, _, arg = spec.partition(":")
  get_config = getattr(import_file(path), "get_config", None)
  if not callable(get_config):
    raise UserError(f"config file {path} defines no get_config(arg): write one that returns "
                    "config_lib.base_config(...), as configs/tiny.py does")
  return get_config(arg or None)


def import_file(path: str | os.PathLike):
  """Imports a config file by path, for `load` and for sweep.py (its `sweep(add)`); the file's
  folder is importable meanwhile, so one config may build on another
  (configs/amd_llama_135m_code.py extends amd_llama_135m.py)."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise UserError(f"config file {path} not found: pass a path such as configs/tiny.py")
  if file.suffix != ".py":
    raise UserError(f"config file {path} is not a .py file: pass an experiment config such as "
                    "configs/tiny.py (weights to start from go in --config.init_from)")
  module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  sys.path.insert(0, str(file.parent.absolute()))
  try:
    module_spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(file.parent.absolute()))
  return module


def model_config(model: ml_collections.ConfigDict) -> ModelConfig:
  """The frozen ModelConfig described by a config's `model` field, checked so that a bad value is
  a UserError naming its --config.model flag, not a failure deep inside the model."""
  fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(model) - set(fields))
  if unknown:
    raise UserError(f"unknown model fields {unknown}: valid ones are {sorted(fields)}")
  missing = sorted(name for name, f in fields.items() if name not in model
                   and f.default is dataclasses.MISSING)
  if missing:
    raise UserError(f"config.model lacks {missing}: set them in the config file")
  config = ModelConfig(**model.to_dict())
  config.validate(prefix="--config.model.")
  if config.attention not in attention_lib.ATTENTION_IMPLS:
    raise UserError(f"--config.model.attention={config.attention}: choose one of "
                    f"{', '.join(attention_lib.ATTENTION_IMPLS)}")
  remat = ("none", *sorted(model_lib.REMAT_POLICIES))
  if config.remat not in remat:
    raise UserError(f"--config.model.remat={config.remat}: choose one of {', '.join(remat)}")
  return config

"""Experiment configs: ml_collections files under configs/, each exporting `get_config(arg)`.

`load("configs/tiny.py:runlocal")` imports the file by path and passes the text after the colon;
`parse_arg` turns "a=1,runlocal" into a ConfigDict of typed values, as big_vision does.
"""
import importlib.util
import pathlib

import ml_collections

from amd135m import model as model_lib
from amd135m.errors import UserError


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'key=value,flag' -> ConfigDict; values take the type of their default, a bare flag is True."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise UserError(f"unknown config argument {key!r}: valid ones are {sorted(defaults)}")
    kind = type(defaults[key])
    if not value:
      parsed[key] = True
    elif kind is bool:
      parsed[key] = value.lower() in ("1", "true", "yes")
    else:
      parsed[key] = kind(value)
  return parsed


def base_config(model: dict) -> ml_collections.ConfigDict:
  """The schema every experiment config shares (training extends it); `model` is a ModelConfig."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(model)
  # Where weights and the tokenizer come from: a Hugging Face dir, a GGUF file, or '' (random init).
  config.init_from = ""
  config.tokenizer = ""
  config.seed = 0
  return config


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/file.py[:arg]' by path and returns get_config(arg)."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise UserError(f"config file {path} not found: pass a path such as configs/tiny.py")
  module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def model_config(model: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  """The frozen ModelConfig described by a config's `model` field."""
  return model_lib.ModelConfig(**model.to_dict())

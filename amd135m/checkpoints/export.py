"""Writing Hugging Face Llama directories, and converting any checkpoint we read into one."""
import dataclasses
import errno
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from amd135m.checkpoints import gguf_io, hf, orbax_io
from amd135m.checkpoints.layout import (
  CheckpointTensors,
  TensorSpec,
  as_dtype,
  check_specs,
  flatten_params,
  hf_shapes,
)
from amd135m.checkpoints.safetensors_io import ShardedWriter
from amd135m.errors import UserError
from amd135m.model_config import ModelConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers 4.x's default; one 7B bf16 fits in 3 shards
Progress = Callable[..., Iterable]  # progress(iterable, total=n) -> iterable, e.g. tqdm.tqdm


@dataclasses.dataclass(frozen=True)
class SavedCheckpoint:
  directory: pathlib.Path
  n_tensors: int
  n_params: int
  n_bytes: int
  n_shards: int
  dtype: str
  tokenizer: bool


def _as_tensors(config: ModelConfig, tensors_or_params: Any) -> CheckpointTensors:
  """A CheckpointTensors view of a stream, a params pytree, or {hf_name: array}."""
  if isinstance(tensors_or_params, CheckpointTensors):
    return tensors_or_params
  if isinstance(tensors_or_params, Mapping):
    flat = dict(tensors_or_params)
    if not all("." in str(key) for key in flat):
      flat = flatten_params(tensors_or_params)
  else:
    flat = dict(tensors_or_params)  # a plain iterator has no shapes up front: hold it all
  # Shapes and dtypes come from array metadata, so device arrays are copied to host one at a time.
  specs = {name: TensorSpec(tuple(array.shape), np.dtype(array.dtype))
           for name, array in flat.items()}
  order = [name for name in hf_shapes(config) if name in specs]
  specs = {name: specs[name] for name in order + [name for name in specs if name not in order]}
  return CheckpointTensors(config, specs, lambda name: np.asarray(flat[name]), "params")


def _remove_stale_weights(directory: pathlib.Path) -> None:
  """An earlier save's shards would otherwise mix with ours."""
  for stale in [*directory.glob("model*.safetensors"), directory / "model.safetensors.index.json"]:
    stale.unlink(missing_ok=True)


def save_hf(directory: str | os.PathLike, config: ModelConfig, tensors_or_params: Any,
            tokenizer: Any = None, dtype: Any = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            progress: Progress | None = None) -> SavedCheckpoint:
  """Write a transformers-loadable LlamaForCausalLM directory, one tensor in memory at a time.

  tensors_or_params: the stream from iter_hf_tensors, a params pytree, or {hf_name: array}.
  dtype: cast every tensor (e.g. 'bfloat16'); None writes each as given.
  """
  directory = pathlib.Path(directory)
  tensors = _as_tensors(config, tensors_or_params).cast(as_dtype(dtype))
  check_specs(config, tensors.specs, f"saving to {directory}")
  directory.mkdir(parents=True, exist_ok=True)
  _remove_stale_weights(directory)
  stream = iter(tensors)
  if progress is not None:
    stream = progress(stream, total=len(tensors))
  with ShardedWriter(directory, tensors.specs, max_shard_bytes) as writer:
    for name, array in stream:
      writer.write(name, array)
  weight_dtype = tensors.config.param_dtype
  bos_id, eos_id = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
  stop_ids = list(getattr(tokenizer, "stop_ids", None) or ([] if eos_id is None else [eos_id]))
  config_json = hf.config_json(config, weight_dtype, bos_id, eos_id)
  (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
  generation = {}
  if bos_id is not None:
    generation["bos_token_id"] = bos_id
  if stop_ids:
    # transformers stops on any id in a list; chat models end turns with more than one token.
    generation["eos_token_id"] = stop_ids if len(stop_ids) > 1 else stop_ids[0]
  (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  saved_tokenizer = tokenizer is not None and hasattr(tokenizer, "save_hf")
  if saved_tokenizer:
    tokenizer.save_hf(directory)
  return SavedCheckpoint(directory, len(tensors), tensors.n_params,
                         sum(spec.nbytes for spec in tensors.specs.values()),
                         len(writer.files), weight_dtype, saved_tokenizer)


def open_checkpoint(path: str | os.PathLike) -> CheckpointTensors:
  """Dispatch on what `path` is: a Hugging Face directory or a GGUF file."""
  path = pathlib.Path(path)
  if orbax_io.is_workdir(path):
    # A training workdir's params are restored whole (orbax reads by array, not by HF name).
    config, params = orbax_io.load_workdir_params(path)
    tensors = _as_tensors(config, params)
    tensors.source = f"{path} (training workdir)"
    return tensors.cast(None)
  if path.is_dir():
    return hf.open_hf_dir(path)
  if not path.exists():
    raise UserError(f"{path}: no such file or directory")
  with open(path, "rb") as f:
    is_gguf = f.read(4) == b"GGUF"
  if is_gguf or path.suffix == ".gguf":
    return gguf_io.open_gguf(path)  # a .gguf with a bad magic gets the GGUF reader's message
  raise UserError(f"{path}: expected a Hugging Face model directory or a .gguf file")


def _has_tokenizer(path: pathlib.Path) -> bool:
  if path.is_dir():
    return any((path / name).exists()
               for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
  return "tokenizer.ggml.tokens" in gguf_io.read_gguf_header(path).metadata


def _load_tokenizer(path: pathlib.Path) -> tuple[Any, str]:
  """(tokenizer or None, what happened to it, for the summary line)."""
  if not _has_tokenizer(path):
    return None, "none in input"
  try:
    from amd135m.tokenizer import load_tokenizer
  except ImportError as e:
    if e.name != "amd135m.tokenizer":
      raise
    return None, "skipped (amd135m.tokenizer unavailable)"
  return load_tokenizer(path), "copied"


@dataclasses.dataclass(frozen=True)
class ConvertSummary:
  source: str
  saved: SavedCheckpoint
  tokenizer: str
  seconds: float

  def __str__(self) -> str:
    s = self.saved
    shards = f"{s.n_shards} shards" if s.n_shards > 1 else "1 file"
    return (f"converted {self.source} -> {s.directory}: {s.n_tensors} tensors, "
            f"{s.n_params / 1e6:.1f}M params, {s.dtype}, {s.n_bytes / 1e6:.0f} MB in {shards}; "
            f"tokenizer {self.tokenizer}; {self.seconds:.1f}s")


def convert_checkpoint(input_path: str | os.PathLike, output_dir: str | os.PathLike,
                       dtype: Any = None, progress: Progress | None = None,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ConvertSummary:
  """HF directory or GGUF -> HF directory, streamed; the output appears whole or not at all.

  Everything is written to a fresh `.<name>.staging-*` directory beside the output (mkdtemp, so
  never a path a user may own) and renamed at the end, so an interrupted or failed conversion
  never leaves a half-written model under the requested name, nor touches anything else.
  """
  start = time.perf_counter()
  input_path, output_dir = pathlib.Path(input_path), pathlib.Path(output_dir)
  tensors = open_checkpoint(input_path)
  if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
    raise UserError(f"{output_dir}: already exists; remove it or choose another --output")
  tokenizer, tokenizer_note = _load_tokenizer(input_path)
  parent = output_dir.absolute().parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
    staging_root = pathlib.Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging-",
                                                 dir=parent))
  except OSError as e:
    raise UserError(f"--output {output_dir}: cannot create it ({e.strerror}); "
                    "choose a writable path") from None
  # A plain mkdir inside it, so the output gets the user's umask rather than mkdtemp's 0700.
  staging = staging_root / output_dir.name
  try:
    saved = save_hf(staging, tensors.config, tensors, tokenizer=tokenizer, dtype=dtype,
                    max_shard_bytes=max_shard_bytes, progress=progress)
    if output_dir.exists():
      output_dir.rmdir()  # empty, checked above; rename cannot replace a directory
    staging.rename(output_dir)
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    raise UserError(f"no space left on device at {parent}; {output_dir} was not written and "
                    "nothing half-written is left: free some space and rerun") from None
  finally:
    shutil.rmtree(staging_root, ignore_errors=True)  # ours alone: mkdtemp made it for this run
  saved = dataclasses.replace(saved, directory=output_dir)
  return ConvertSummary(tensors.source, saved, tokenizer_note, time.perf_counter() - start)


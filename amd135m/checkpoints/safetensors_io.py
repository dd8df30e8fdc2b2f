"""A small safetensors reader and writer that hold one tensor in memory at a time.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then raw little-endian data, offsets relative to the end of the header. We read with seek+read
rather than mmap, because touched mmap pages count towards resident memory until unmapped.
"""
import json
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

from amd135m.checkpoints.layout import TensorSpec
from amd135m.errors import UserError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 << 20  # the reference implementation's limit; more means a corrupt length


class SafetensorsEntry:
  """Where one tensor lives: file, absolute byte offset, shape, dtype."""

  def __init__(self, path: pathlib.Path, offset: int, spec: TensorSpec):
    self.path, self.offset, self.spec = path, offset, spec

  def read(self) -> np.ndarray:
    array = np.empty(self.spec.shape, self.spec.dtype)
    with open(self.path, "rb", buffering=0) as f:
      f.seek(self.offset)
      got = f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
    if got != self.spec.nbytes:
      raise UserError(f"{self.path}: truncated: a tensor ends past the end of the file")
    return array


def read_header(path: str | os.PathLike) -> dict[str, SafetensorsEntry]:
  """{name: entry} of a .safetensors file, validating offsets against the file's size."""
  path = pathlib.Path(path)
  try:
    size = path.stat().st_size
    with open(path, "rb") as f:
      prefix = f.read(8)
      (header_len,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (None,)
      if header_len is None or header_len > _MAX_HEADER or 8 + header_len > size:
        raise UserError(f"{path}: not a safetensors file, or truncated (bad header length)")
      header = json.loads(f.read(header_len))
  except FileNotFoundError:
    raise UserError(f"{path}: no such file") from None
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise UserError(f"{path}: corrupt safetensors header (not JSON)") from None
  if not isinstance(header, dict):
    raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
  data_start = 8 + header_len
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype_code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise UserError(f"{path}: corrupt safetensors header entry for {name!r}") from None
    if dtype_code not in _DTYPES:
      raise UserError(f"{path}: tensor {name} has dtype {dtype_code}, which we do not read "
                      f"(supported: {', '.join(_DTYPES)})")
    spec = TensorSpec(shape, _DTYPES[dtype_code])
    if end - begin != spec.nbytes or begin < 0:
      raise UserError(f"{path}: corrupt safetensors header: {name} has {end - begin} bytes for "
                      f"shape {list(shape)} {dtype_code}")
    if data_start + end > size:
      raise UserError(f"{path}: truncated: tensor {name} ends at byte {data_start + end} "
                      f"but the file has {size}")
    entries[name] = SafetensorsEntry(path, data_start + begin, spec)
  return entries


def _header_bytes(specs: dict[str, TensorSpec]) -> tuple[bytes, dict[str, int]]:
  """The encoded header (length prefix included) and each tensor's offset after it."""
  header: dict = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
  offsets, cursor = {}, 0
  for name, spec in specs.items():
    if spec.dtype not in _NAMES:
      raise ValueError(f"cannot write dtype {spec.dtype} to safetensors")
    header[name] = {"dtype": _NAMES[spec.dtype], "shape": list(spec.shape),
                    "data_offsets": [cursor, cursor + spec.nbytes]}
    offsets[name], cursor = cursor, cursor + spec.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the reference writer pads so data starts 8-aligned
  return struct.pack("<Q", len(encoded)) + encoded, offsets


class SafetensorsWriter:
  """Writes one .safetensors file whose header is fixed up front; tensors may come in any order.

  The file is laid out (header plus a sparse data region of the final size) on creation, and
  each `write` seeks to its tensor's slot, so the caller holds only the tensor it is writing.
  """

  def __init__(self, path: str | os.PathLike, specs: dict[str, TensorSpec]):
    self.path = pathlib.Path(path)
    self.specs = dict(specs)
    header, offsets = _header_bytes(self.specs)
    self._offsets = {name: len(header) + offset for name, offset in offsets.items()}
    self._pending = set(self.specs)
    self._file = open(self.path, "wb")
    self._file.write(header)
    self._file.truncate(len(header) + sum(spec.nbytes for spec in self.specs.values()))

  def write(self, name: str, array: np.ndarray) -> None:
    spec = self.specs[name]
    array = np.ascontiguousarray(np.asarray(array).astype(spec.dtype, copy=False))
    if array.shape != spec.shape:
      raise ValueError(f"{name}: shape {array.shape} differs from the planned {spec.shape}")
    self._file.seek(self._offsets[name])
    self._file.write(memoryview(array.reshape(-1).view(np.uint8)))
    self._pending.discard(name)

  def close(self) -> None:
    self._file.close()
    if self._pending:
      raise ValueError(f"{self.path}: never written: {sorted(self._pending)[:3]}")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if exc[0] is None:
      self.close()
    else:
      self._file.close()


def plan_shards(specs: dict[str, TensorSpec], max_shard_bytes: int) -> list[dict[str, TensorSpec]]:
  """Split specs, in order, into shards of at most max_shard_bytes (a bigger tensor goes alone)."""
  shards: list[dict[str, TensorSpec]] = [{}]
  used = 0
  for name, spec in specs.items():
    if shards[-1] and used + spec.nbytes > max_shard_bytes:
      shards.append({})
      used = 0
    shards[-1][name] = spec
    used += spec.nbytes
  return shards


class ShardedWriter:
  """model.safetensors, or model-0000i-of-0000n.safetensors plus HF's index json, by size."""

  def __init__(self, directory: str | os.PathLike, specs: dict[str, TensorSpec],
               max_shard_bytes: int):
    directory = pathlib.Path(directory)
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
      names = ["model.safetensors"]
    else:
      names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
      index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs.values())},
               "weight_map": {name: file for file, shard in zip(names, shards) for name in shard}}
      (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    self.files = [directory / name for name in names]
    self._writers = [SafetensorsWriter(path, shard) for path, shard in zip(self.files, shards)]
    self._writer_of = {name: writer for writer in self._writers for name in writer.specs}

  def write(self, name: str, array: np.ndarray) -> None:
    self._writer_of[name].write(name, array)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for writer in self._writers:  # each closes; only a clean exit checks for unwritten tensors
      writer.__exit__(*exc)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
  """Convenience: one file from an in-memory dict (tests, small exports)."""
  arrays = {name: np.asarray(array) for name, array in tensors.items()}
  specs = {name: TensorSpec(array.shape, array.dtype) for name, array in arrays.items()}
  with SafetensorsWriter(path, specs) as writer:
    for name, array in arrays.items():
      writer.write(name, array)

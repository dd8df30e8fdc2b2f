"""Feature-head workdirs (amd135m.draft_head): what they hold and how a draft is read back.

A head workdir holds `draft_head.json` (the head's shape and the target it was trained for: its
architecture and a fingerprint of its weights), `vocab.npy` (the K target ids of the head's rows),
`checkpoints/<step>/` (orbax: the train state), `metrics.jsonl`, and `data/` (the collected target
features it trains on). A head is only ever used with the target whose fingerprint it records.
"""
import dataclasses
import hashlib
import json
import pathlib

import numpy as np

from amd135m.errors import UserError
from amd135m.model_config import ModelConfig

HEAD_FILE = "draft_head.json"
VOCAB_FILE = "vocab.npy"
CHECKPOINT_DIR = "checkpoints"
FORMAT = 1

# The fields of ModelConfig that are the architecture (not how it runs).
_ARCHITECTURE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                 "rope_theta", "norm_eps", "max_seq_len", "tie_embeddings")


def architecture(config: ModelConfig) -> dict:
  return {name: getattr(config, name) for name in _ARCHITECTURE}


def fingerprint(config: ModelConfig, params) -> str:
  """A short hash of a model's architecture and weights: every tensor's name, shape and about 4096
  of its values (evenly strided, as float32). Equal weights give an equal fingerprint whatever
  file they came from (a GGUF, its Hugging Face export); retrained or other weights do not."""
  digest = hashlib.sha256(json.dumps(architecture(config), sort_keys=True).encode())

  def visit(prefix: str, tree) -> None:
    for name in sorted(tree):
      if name == "output_kernel":  # quantize.with_output_kernel's copy of the embedding
        continue
      value = tree[name]
      if isinstance(value, dict):
        visit(f"{prefix}{name}/", value)
        continue
      array = np.asarray(value)
      flat = array.reshape(-1)
      sample = flat[::max(1, flat.size // 4096)].astype(np.float32)
      digest.update(f"{prefix}{name}{array.shape}".encode())
      digest.update(np.ascontiguousarray(sample).tobytes())

  visit("", params)
  return digest.hexdigest()[:16]


def is_head_workdir(path) -> bool:
  return (pathlib.Path(path) / HEAD_FILE).is_file()


@dataclasses.dataclass(frozen=True)
class HeadRecord:
  """draft_head.json: the head's shape and what it was trained for."""
  target: dict                 # the target's architecture (`architecture`)
  target_fingerprint: str
  target_path: str             # where the target was read from, for the user's information
  feature_layers: tuple[int, ...]
  draft_vocab: int
  format: int = FORMAT

  def model_config(self) -> ModelConfig:
    return ModelConfig(**self.target)


def write_record(workdir, record: HeadRecord) -> None:
  path = pathlib.Path(workdir) / HEAD_FILE
  text = json.dumps({**dataclasses.asdict(record),
                     "feature_layers": list(record.feature_layers)}, indent=1) + "\n"
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(text)
  temporary.replace(path)


def read_record(workdir) -> HeadRecord:
  path = pathlib.Path(workdir) / HEAD_FILE
  try:
    fields = json.loads(path.read_text())
    fields["feature_layers"] = tuple(fields["feature_layers"])
    return HeadRecord(**fields)
  except (OSError, ValueError, TypeError, KeyError) as e:
    raise UserError(f"{path} is unreadable or not a feature-head record ({e}): train the head "
                    "again into a fresh --workdir") from None


def read_vocab(workdir) -> np.ndarray:
  path = pathlib.Path(workdir) / VOCAB_FILE
  try:
    return np.load(path).astype(np.int32)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is missing or unreadable ({e}): train the head again") from None


def finished_steps(workdir) -> list[int]:
  root = pathlib.Path(workdir) / CHECKPOINT_DIR
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def load_head_params(workdir, step: int | None = None) -> tuple[HeadRecord, np.ndarray, dict]:
  """(record, vocab [K] int32, the head's params as numpy) from a head workdir's latest (or
  given) checkpoint."""
  from amd135m.checkpoints import orbax_io  # noqa: PLC0415 (the record needs no orbax)
  workdir = pathlib.Path(workdir).expanduser().absolute()
  record = read_record(workdir)
  vocab = read_vocab(workdir)
  steps = finished_steps(workdir)
  if not steps:
    raise UserError(f"{workdir} has no finished checkpoint yet: train the head longer "
                    "(python -m amd135m.draft_head train ... --resume)")
  state = workdir / CHECKPOINT_DIR / str(steps[-1] if step is None else step) / "state"
  return record, vocab, orbax_io.read_params(state)

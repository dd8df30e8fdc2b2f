"""The architecture of a Llama, free of jax so that checkpoint conversion stays light."""
import dataclasses

from amd135m.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")  # of weights and of activations
_SIZES = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  dtype: str = "float32"        # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of the weights
  remat: str = "none"           # training: recompute each layer in the backward: none|full|dots
  attention: str = "einsum"     # forward without a cache: einsum (+ softmax, XLA) | cudnn (flash)

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  def validate(self, *, source: str = "", prefix: str = "") -> None:
    """Refuses an architecture this Llama cannot express, in a UserError naming the field.

    The one check for experiment configs and checkpoints alike: `source` opens the message (a
    checkpoint's path) and `prefix` spells each field as its user set it ('--config.model.').
    remat and attention are training choices whose values model.py owns: config_lib checks them.
    """
    at = f"{source}: " if source else ""
    for name in _SIZES:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{at}{prefix}{name} must be an int >= 1, got {value!r}")
    if not self.rope_theta > 0:
      raise UserError(f"{at}{prefix}rope_theta must be > 0, got {self.rope_theta!r}")
    if self.dim % self.n_heads:
      raise UserError(f"{at}{prefix}n_heads {self.n_heads} does not divide {prefix}dim "
                      f"{self.dim}: dim / n_heads must be a whole head size")
    if self.head_dim % 2:
      raise UserError(f"{at}{prefix}dim / n_heads = {self.head_dim} is odd: rotary embeddings "
                      "rotate pairs, so the head size must be even")
    if self.n_heads % self.n_kv_heads:
      raise UserError(f"{at}{prefix}n_kv_heads {self.n_kv_heads} does not divide {prefix}n_heads "
                      f"{self.n_heads}: each key/value head serves a whole group of query heads")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise UserError(f"{at}{prefix}{name}={getattr(self, name)}: choose one of "
                        f"{', '.join(DTYPES)}")

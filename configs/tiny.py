"""A tiny Llama (GQA, untied) for tests, sweeps and CPU smoke runs."""
from amd135m.config_lib import base_config, parse_arg

MODEL = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
             rope_theta=10000.0, norm_eps=1e-5, max_seq_len=256, tie_embeddings=False,
             dtype="float32", param_dtype="float32")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, vocab_size=512)
  config = base_config(MODEL)
  config.model.vocab_size = arg.vocab_size
  return config

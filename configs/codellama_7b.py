"""CodeLlama-7b: the target AMD-Llama-135M-code drafts for. 32 layers, d=4096, vocab 32016."""
from amd135m.config_lib import base_config, parse_arg

MODEL = dict(vocab_size=32016, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
             rope_theta=1e6, norm_eps=1e-5, max_seq_len=16384, tie_embeddings=False,
             dtype="bfloat16", param_dtype="bfloat16")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  config = base_config(MODEL)
  if arg.runlocal:  # same kind of model, small enough for a CPU smoke run
    config.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128,
                        max_seq_len=512, dtype="float32", param_dtype="float32")
  return config

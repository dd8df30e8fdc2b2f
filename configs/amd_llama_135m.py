"""AMD-Llama-135M: 12 layers, d=768, 12 heads, FFN 2048, vocab 32000 (Llama-2 tokenizer), untied."""
from amd135m.config_lib import base_config, parse_arg

MODEL = dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
             rope_theta=10000.0, norm_eps=1e-5, max_seq_len=2048, tie_embeddings=False,
             dtype="float32", param_dtype="float32")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, bf16=False)
  config = base_config(MODEL)
  if arg.bf16:  # GPUs: bf16 compute over f32 master weights
    config.model.dtype = "bfloat16"
  if arg.runlocal:
    config.model.max_seq_len = 256
  return config

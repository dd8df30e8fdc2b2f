"""The CPU reproduction's draft for SmolLM2-135M: a small Llama with SmolLM2's tokenizer
(4 layers, d=256, tied embeddings: about 1/8 of the target's bytes per token), trained as
AMD-135M was, scaled down: pretrain on Gutenberg, then fine-tune on Python code.

Args: stage=pretrain|code|distill; init_from=WORKDIR (code, distill); steps=N (0: the stage's
default); runlocal (20 steps of 4 x 128); distill_dir=DIR (a prepared local_text dataset of the
target's own completions, for stage=distill: sequence-level distillation, see
amd135m/reproduce.py).
"""
from amd135m import config_lib
from amd135m.config_lib import base_config, parse_arg

MODEL = dict(vocab_size=49152, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=768,
             rope_theta=100000.0, norm_eps=1e-5, max_seq_len=1024, tie_embeddings=True,
             dtype="float32", param_dtype="float32")


def get_config(arg=None):
  arg = parse_arg(arg, stage="pretrain", init_from="", steps=0, distill_dir="", runlocal=False)
  config = base_config(MODEL)
  config.tokenizer = config_lib.cache_path(*config_lib.SMOLLM2_GGUF)
  config.data.update(seq_len=256, eval_fraction=0.05)
  config.batch_size = 16
  config.log_every, config.eval_every, config.eval_batches = 10, 100, 4
  config.keep_checkpoints = 1
  if arg.stage == "pretrain":
    config.data.sources = config_lib.local_corpus("gutenberg")
    config.total_steps, config.lr, config.end_lr, config.warmup_steps = 400, 3e-3, 3e-4, 40
  elif arg.stage == "code":
    config.data.sources = config_lib.local_corpus("python_stdlib")
    config.total_steps, config.lr, config.end_lr, config.warmup_steps = 400, 2e-3, 2e-4, 20
  elif arg.stage == "distill":
    # The target's completions of stdlib function headers, mixed with the stdlib itself.
    config.data.sources = (f"local_text@{arg.distill_dir}:*.txt,"
                           + config_lib.local_corpus("python_stdlib"))
    config.data.weights = "3,1"
    config.total_steps, config.lr, config.end_lr, config.warmup_steps = 300, 1e-3, 1e-4, 10
  else:
    raise config_lib.UserError(f"stage {arg.stage!r}: choose pretrain, code or distill")
  config.init_from = arg.init_from
  if arg.runlocal:  # a smoke run of the stage: 20 steps of 4 x 128
    config.batch_size, config.data.seq_len, config.total_steps = 4, 128, 20
    config.log_every, config.eval_every = 5, 20
  config.checkpoint_every = config.total_steps
  if arg.steps:
    config.total_steps = config.checkpoint_every = arg.steps
    config.warmup_steps = min(config.warmup_steps, max(1, arg.steps // 10))
  return config

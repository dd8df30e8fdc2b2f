"""AMD-Llama-135M-code: AMD-Llama-135M fine-tuned for one epoch on the Python part of
StarCoderData (~20B tokens), from the pretrained checkpoint, lr 3e-4 cosine to 3e-5.

AMD does not state the fine-tune's warmup; we keep pretraining's 2000 steps. The run ends when the
data does (num_epochs=1) or at total_steps (20B tokens / (1024 x 2048) ~ 9.5k steps).
Args: init_from=PATH (the pretraining workdir, an HF dir or a GGUF), starcoder=DIR, tokenizer=PATH,
cluster, runlocal (the Python-stdlib corpus with SmolLM2's tokenizer; pass
init_from=<a runlocal amd_llama_135m workdir>).
"""
import amd_llama_135m  # configs/ is on sys.path while a config loads
from amd135m import config_lib
from amd135m.config_lib import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, cluster=False, init_from="~/workdirs/amd_llama_135m",
                  starcoder="~/data/starcoder_python", tokenizer="")
  pretrain = amd_llama_135m.get_config(
      ",".join(name for name, on in (("runlocal", arg.runlocal), ("cluster", arg.cluster)) if on))
  config = pretrain
  config.init_from = arg.init_from
  config.tokenizer = arg.tokenizer or pretrain.tokenizer
  config.data.update(sources=f"amd135m_starcoder_python@{arg.starcoder}", weights="",
                     num_epochs=1)
  config.total_steps = 9_537
  config.lr, config.end_lr = 3e-4, 3e-5
  if arg.runlocal:
    config.data.update(sources=config_lib.local_corpus("python_stdlib"), num_epochs=0)
    config.total_steps = 20
  return config

"""Transformers' side of `python -m amd135m.bench train`: a LlamaForCausalLM training step on torch
(CPU), in its own process so that the package never imports torch.

python hf_bench/train_step.py --spec '{"model": {...}, "optimizer": {...},
    "batch": 2, "seq_len": 512, "seed": 0, "threads": 0}'

threads: torch's intra-op threads (0: one per CPU, torch's default); model: ModelConfig's fields
(vocab_size, dim, ...); optimizer: the training config's b1, b2, eps, lr, weight_decay,
weight_decay_mask, grad_clip; weights (optional): a Hugging Face directory to start from instead
of a seeded init; tokens (optional): an .npy of [count, B, T + 1] batches instead of seeded ones.
The step is the one ours takes: forward, mean next-token cross-entropy in f32 over all B x T
targets, backward, global-norm clipping, AdamW.

Steps on request, so the caller can interleave them with its own (a shared machine's load then
falls on both alike): prints one JSON line when ready, then for each line 'step' (or 'step LR',
that step's learning rate) on stdin runs one step and prints {"seconds", "loss"}; exits at end of
input.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import transformers


def build(model: dict, seed: int):
  config = transformers.LlamaConfig(
      vocab_size=model["vocab_size"], hidden_size=model["dim"],
      intermediate_size=model["ffn_dim"], num_hidden_layers=model["n_layers"],
      num_attention_heads=model["n_heads"], num_key_value_heads=model["n_kv_heads"],
      rope_theta=model["rope_theta"], rms_norm_eps=model["norm_eps"],
      max_position_embeddings=model["max_seq_len"], tie_word_embeddings=model["tie_embeddings"],
      initializer_range=0.02, attn_implementation="sdpa", use_cache=False)
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(config).train()


def param_groups(hf_model, opt: dict) -> list[dict]:
  """Weight decay on the parameters our mask names ('all', 'matrices' or 'kernels')."""
  decay, no_decay = [], []
  for name, p in hf_model.named_parameters():
    mask = opt["weight_decay_mask"]
    decays = (mask == "all" or (mask == "matrices" and p.ndim >= 2)
              or (mask == "kernels" and p.ndim >= 2 and "embed_tokens" not in name))
    (decay if decays else no_decay).append(p)
  return [{"params": decay, "weight_decay": opt["weight_decay"]},
          {"params": no_decay, "weight_decay": 0.0}]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--spec", required=True,
                      help="JSON: model, optimizer, batch, seq_len, seed, threads")
  spec = json.loads(parser.parse_args().spec)
  torch.set_num_threads(spec.get("threads") or os.cpu_count())
  model, opt = spec["model"], spec["optimizer"]
  compute = {"float32": None, "bfloat16": torch.bfloat16}[model["dtype"]]
  if spec.get("weights"):
    hf_model = transformers.LlamaForCausalLM.from_pretrained(
        spec["weights"], dtype=torch.float32, attn_implementation="sdpa").train()
  else:
    hf_model = build(model, spec["seed"])
  optimizer = torch.optim.AdamW(param_groups(hf_model, opt), lr=opt["lr"],
                                betas=(opt["b1"], opt["b2"]), eps=opt["eps"])
  if spec.get("tokens"):
    batches = [torch.from_numpy(t).long() for t in np.load(spec["tokens"])]
  else:
    generator = torch.Generator().manual_seed(spec["seed"])
    batches = [torch.randint(0, model["vocab_size"], (spec["batch"], spec["seq_len"] + 1),
                             generator=generator) for _ in range(4)]

  def step(tokens):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=compute, enabled=compute is not None):
      logits = hf_model(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    if opt["grad_clip"] > 0:
      torch.nn.utils.clip_grad_norm_(hf_model.parameters(), opt["grad_clip"])
    optimizer.step()
    return loss.item()

  print(json.dumps(dict(ready=True, torch=torch.__version__, transformers=transformers.__version__,
                        torch_threads=torch.get_num_threads(),
                        attention=hf_model.config._attn_implementation)), flush=True)
  for i, line in enumerate(sys.stdin):
    request = line.split()
    if not request or request[0] != "step" or len(request) > 2:
      raise SystemExit(f"hf_bench/train_step.py: unknown request {line.strip()!r}")
    if len(request) == 2:  # the caller's schedule: set before the step, outside its timing
      for group in optimizer.param_groups:
        group["lr"] = float(request[1])
    start = time.perf_counter()
    loss = step(batches[i % len(batches)])
    print(json.dumps({"seconds": time.perf_counter() - start, "loss": loss}), flush=True)


if __name__ == "__main__":
  main()

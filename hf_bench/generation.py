"""Transformers' side of `python -m amd135m.bench`: run in its own process so that the package
never imports torch. Prints one JSON object.

python hf_bench/generation.py decode --model F.gguf --prompt-ids 1,2,3 --new-tokens N --runs R
python hf_bench/generation.py prefill --model F.gguf --prompt-ids ... --runs R
python hf_bench/generation.py assisted --model HF_DIR --assistant HF_DIR|lookup \
    --prompts-file ids.json --new-tokens N --gamma K
"""
import argparse
import json
import os
import pathlib
import statistics
import time

import torch
import transformers

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def load(model: str, dtype: str = "f32"):
  path = pathlib.Path(model)
  if path.suffix == ".gguf":
    return transformers.LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=DTYPES[dtype]).eval()
  return transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=DTYPES[dtype]).eval()


def timed(fn, runs: int) -> list[float]:
  fn()  # warm-up, excluded
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def assisted(model, args) -> dict:
  """Batch-1 greedy generation per prompt: plain, with an assistant model (constant schedule of
  `gamma` tokens), or with prompt lookup (`gamma` tokens). Each prompt runs once to warm up."""
  prompts = json.load(open(args.prompts_file))
  model.generation_config.eos_token_id = None  # no stops: exactly new_tokens per prompt, as ours
  kwargs = dict(do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=0)
  if args.assistant == "lookup":
    kwargs.update(prompt_lookup_num_tokens=args.gamma)
  elif args.assistant != "none":
    assistant = load(args.assistant)
    assistant.generation_config.eos_token_id = None
    assistant.generation_config.num_assistant_tokens = args.gamma
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0  # always draft gamma
    kwargs.update(assistant_model=assistant)
  seconds, tokens = [], []
  with torch.no_grad():
    for ids in prompts:
      prompt = torch.as_tensor([ids])
      model.generate(prompt, **kwargs)  # warm-up
      start = time.perf_counter()
      out = model.generate(prompt, **kwargs)
      seconds.append(time.perf_counter() - start)
      tokens.append(out[0, len(ids):].tolist())
  return dict(seconds=seconds, tokens=tokens,
              tokens_per_second=sum(map(len, tokens)) / sum(seconds))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("what", choices=["decode", "prefill", "assisted"])
  parser.add_argument("--model", required=True)
  parser.add_argument("--prompt-ids", default="")
  parser.add_argument("--prompts-file", help="JSON list of token-id lists (assisted)")
  parser.add_argument("--assistant", help="an HF dir, 'lookup' (prompt lookup) or 'none'")
  parser.add_argument("--gamma", type=int, default=4)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32",
                      help="the model's weights and compute")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  model = load(args.model, args.dtype)
  result = dict(torch=torch.__version__, transformers=transformers.__version__,
                torch_threads=torch.get_num_threads(), dtype=args.dtype)
  if args.what == "assisted":
    result.update(assisted(model, args))
    print(json.dumps(result))
    return
  prompt = torch.as_tensor([[int(t) for t in args.prompt_ids.split(",")]])

  with torch.no_grad():
    if args.what == "decode":
      def gen(n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)
      # Prefill treated as in ours: the time of N tokens minus the time of 1 (prefill + sample)
      # leaves N - 1 single-token forwards.
      full, first = timed(gen(args.new_tokens), args.runs), timed(gen(1), args.runs)
      decode_seconds = statistics.median(full) - statistics.median(first)
      result.update(decode_seconds=decode_seconds,
                    tokens_per_second=(args.new_tokens - 1) / decode_seconds,
                    generate_seconds=full, first_token_seconds=first)
    else:
      # The last position's logits only, as our prefill computes (and as generate's prefill does).
      times = timed(lambda: model(prompt, use_cache=True, logits_to_keep=1), args.runs)
      result.update(prefill_seconds=times,
                    tokens_per_second=prompt.shape[1] / statistics.median(times))
  print(json.dumps(result))


if __name__ == "__main__":
  main()

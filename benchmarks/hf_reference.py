"""Transformers' side of `python -m amd135m.bench`: run in its own process so that the package
never imports torch. Prints one JSON object.

python benchmarks/hf_reference.py decode --model F.gguf --prompt-ids 1,2,3 --new-tokens N --runs R
python benchmarks/hf_reference.py prefill --model F.gguf --prompt-ids ... --runs R
"""
import argparse
import json
import os
import pathlib
import statistics
import time

import torch
import transformers


def load(model: str):
  path = pathlib.Path(model)
  if path.suffix == ".gguf":
    return transformers.LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
  return transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def timed(fn, runs: int) -> list[float]:
  fn()  # warm-up, excluded
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("what", choices=["decode", "prefill"])
  parser.add_argument("--model", required=True)
  parser.add_argument("--prompt-ids", required=True)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--runs", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  model = load(args.model)
  prompt = torch.as_tensor([[int(t) for t in args.prompt_ids.split(",")]])
  result = dict(torch=torch.__version__, transformers=transformers.__version__,
                torch_threads=torch.get_num_threads())

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

"""Where a SmolLM2 decode step's time goes, per weight precision (f32 in the decode layout and
row-major, bf16, int8, int4): one jitted step at 200 cached positions (the cache donated, medians
of 30), as is; with every weight product replaced by zeros; and with attention skipped too. Prints
one dict of milliseconds, each setting measured `--repeats` times in turn. A development tool (it
swaps library internals), not a benchmark with provenance.

python tools/decode_step_breakdown.py [--repeats 2]
"""
import argparse
import time

import fetch_test_models
import jax
import jax.numpy as jnp
import numpy as np

from amd135m import (
  attention as attention_lib,
  checkpoints,
  compilation_cache,
  cpu_kernels,
  model as model_lib,
  quantize,
)


def step_ms(config, params, runs: int = 30) -> float:
  # The decoder layer is jitted on its own (model._apply_layer) and its trace cached by shapes:
  # without this, a swapped kernel below would reuse the layer traced with the real one.
  jax.clear_caches()

  def step(p, token, cache):
    logits, cache = model_lib.forward(p, config, token, cache)
    return jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), cache
  step = jax.jit(step, donate_argnums=2)
  cache = model_lib.init_cache(config, 1, 512).replace(length=jnp.array([200], jnp.int32))
  token = jnp.zeros((1, 1), jnp.int32)
  token, cache = step(params, token, cache)
  jax.block_until_ready(token)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    token, cache = step(params, token, cache)
    jax.block_until_ready(token)
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  compilation_cache.enable()
  config, params = checkpoints.load_params(fetch_test_models.smollm2_path())
  params = jax.device_put(params)
  weights = {w: quantize.cast_weights(params, config, w) for w in quantize.WEIGHTS}
  weights["f32 row-major"] = quantize.with_output_kernel(params, config)
  products = [(cls, cls.matmul) for cls in quantize.QUANTIZED] + [(cpu_kernels, cpu_kernels.matmul)]
  real_attention = attention_lib.attend_cached

  def zeroed(product):  # the product's output shape, zeros that still depend on the rows
    def zeros(*args, **kwargs):
      shape = jax.eval_shape(product, *args, **kwargs).shape
      rows = args[1] if product is not cpu_kernels.matmul else args[0]
      return jnp.zeros(shape, jnp.float32) + rows[:, :1].astype(jnp.float32) * 0
    return zeros

  def restore():
    for owner, fn in products:
      setattr(owner, "matmul", fn)
    attention_lib.attend_cached = real_attention

  results = {}
  for _ in range(args.repeats):
    restore()
    for name, p in weights.items():
      results.setdefault(name, []).append(step_ms(config, p))
    for owner, fn in products:
      setattr(owner, "matmul", zeroed(fn))
    for name in ("f32", "int8"):
      results.setdefault(f"{name}, no products", []).append(step_ms(config, weights[name]))
    attention_lib.attend_cached = lambda q, k, v, k_cache, v_cache, length, dtype, **_: (
        q, k_cache, v_cache)
    results.setdefault("int8, no products, no attention", []).append(
        step_ms(config, weights["int8"]))
  restore()
  print({name: [round(t, 2) for t in times] for name, times in results.items()})


if __name__ == "__main__":
  main()

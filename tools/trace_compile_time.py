"""Seconds to trace and to compile a 30-layer program, from shapes alone (no weights, nothing
run, no compile cache): what most of the test suite's and a first `generate`'s time goes to.

python tools/trace_compile_time.py [--program grad|forward|decode] [--config smollm2_135m]
"""
import argparse
import os
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # measure the compile, not a cache hit
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from amd135m import config_lib, model as model_lib  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--program", choices=("grad", "forward", "decode"), default="grad")
  parser.add_argument("--config", default="smollm2_135m", help="a file in configs/")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq-len", type=int, default=128)
  args = parser.parse_args()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.model_config(
      config_lib.load(f"{root}/configs/{args.config}.py").model)
  params = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32)

  def loss(p, t):
    return jnp.mean(jax.nn.logsumexp(model_lib.forward(p, config, t)[0], -1))

  if args.program == "grad":
    fn, inputs = jax.jit(jax.value_and_grad(loss)), (params, tokens)
  elif args.program == "forward":
    fn, inputs = jax.jit(lambda p, t: model_lib.forward(p, config, t)[0]), (params, tokens)
  else:  # one decode step against a cache of seq_len positions
    cache = jax.eval_shape(lambda: model_lib.init_cache(config, args.batch, args.seq_len))
    token = jax.ShapeDtypeStruct((args.batch, 1), jnp.int32)
    fn = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c), donate_argnums=2)
    inputs = (params, token, cache)
  start = time.perf_counter()
  lowered = fn.lower(*inputs)
  traced = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()
  print(f"{args.config} {args.program} batch {args.batch} x {args.seq_len}: "
        f"trace {traced:.1f} s, compile {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()

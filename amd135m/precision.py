"""Products of low-precision operands that accumulate in f32, forward and backward.

Why: a bf16 x bf16 product whose output is bf16 runs on XLA's CPU backend at its f32 GEMM's speed
or below (352 GFLOP/s for 1024 x 768 x 2048 on a 2-core Intel Xeon, family 6 model 207), while
one that asks for an f32 output runs the CPU's bf16 dot instructions (AMX there: 2300 GFLOP/s;
AVX512-BF16 on a Zen 4 about 1.9x its f32 GEMM). GPUs accumulate a bf16 GEMM in f32 either way.
So a bf16 model's products ask for f32 and round the result to bf16 once, which is also the
better arithmetic.

The backward needs the same care: JAX's transpose of such a product multiplies the f32 cotangent
by the bf16 operand, which XLA runs as an f32 GEMM. `einsum` rounds the cotangent to bf16 first
(what the forward's rounded output implies anyway) so that both gradient products are bf16 x bf16
with f32 accumulation too.
"""
import functools

import jax
import jax.numpy as jnp


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum(spec, a, b) in a's dtype. f32 or wider operands: exactly jnp.einsum. Narrower
  floats (a and b of one dtype): the products are summed in f32 and the result rounded once, and
  the backward's two products likewise. spec: two operands, each of whose indices is also in the
  other operand or in the output (contractions, batch and free axes; no sum over one operand's
  axis alone, whose gradient is not a product)."""
  if not jnp.issubdtype(a.dtype, jnp.floating) or jnp.dtype(a.dtype).itemsize >= 4:
    return jnp.einsum(spec, a, b)
  if b.dtype != a.dtype:
    raise ValueError(f"precision.einsum: operands of {a.dtype} and {b.dtype}; cast one first")
  _check(spec)
  return _low_precision_einsum(spec, a, b)


@functools.cache
def _check(spec: str) -> None:
  inputs, out = spec.split("->")
  left, right = inputs.split(",")
  for operand, other in ((left, right), (right, left)):
    for index in operand:
      if index not in other + out:
        raise ValueError(f"precision.einsum: {spec!r}: index {index!r} of one operand is summed "
                         "alone; sum it before the product")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _forward(spec, a, b):
  return _low_precision_einsum(spec, a, b), (a, b)


def _backward(spec, residuals, g):
  a, b = residuals
  inputs, out = spec.split("->")
  left, right = inputs.split(",")
  g = g.astype(a.dtype)
  grad_a = jnp.einsum(f"{out},{right}->{left}", g, b, preferred_element_type=jnp.float32)
  grad_b = jnp.einsum(f"{left},{out}->{right}", a, g, preferred_element_type=jnp.float32)
  return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_low_precision_einsum.defvjp(_forward, _backward)

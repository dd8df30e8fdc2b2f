"""precision.einsum: bf16 products summed in f32, forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amd135m import precision
from jaxpr_dots import dot_dtypes


def _bf16(shape, seed):
  return jnp.asarray(np.random.RandomState(seed).standard_normal(shape), jnp.bfloat16)


def _rounded(x):
  """An f32 array rounded to bf16 (round to nearest even), as f32."""
  return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))


def _ulp(x):
  """bf16's spacing at |x| (8 significant bits)."""
  return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), 1e-30))) - 7)


def test_f32_operands_are_plain_einsum():
  a = jnp.asarray(np.random.RandomState(0).standard_normal((5, 7)), jnp.float32)
  b = jnp.asarray(np.random.RandomState(1).standard_normal((7, 3)), jnp.float32)
  np.testing.assert_array_equal(precision.einsum("NI,IO->NO", a, b), jnp.einsum("NI,IO->NO", a, b))
  assert str(jax.make_jaxpr(lambda a, b: precision.einsum("NI,IO->NO", a, b))(a, b)) == str(
      jax.make_jaxpr(lambda a, b: jnp.einsum("NI,IO->NO", a, b))(a, b))


@pytest.mark.parametrize("spec, shapes", [
    ("NI,IO->NO", ((16, 2048), (2048, 24))),
    ("NI,OI->NO", ((16, 2048), (24, 2048))),
    ("BKMH,BKSH->BKMS", ((2, 3, 8, 512), (2, 3, 6, 512))),
])
def test_bf16_sums_in_f32_and_rounds_once(spec, shapes):
  """The result is the f64 product of the bf16 operands rounded once to bf16 (up to f32's own
  rounding of the sum: at most one bf16 step, rarely), where a bf16 running sum over 2048 terms
  is off by many steps."""
  a, b = _bf16(shapes[0], 2), _bf16(shapes[1], 3)
  out = precision.einsum(spec, a, b)
  assert out.dtype == jnp.bfloat16
  exact = np.einsum(spec, np.asarray(a, np.float64), np.asarray(b, np.float64))
  got = np.asarray(out, np.float64)
  steps = np.abs(got - exact) / _ulp(exact)
  assert steps.max() <= 1.0, steps.max()
  assert np.mean(got == _rounded(exact)) > 0.97


def test_the_backward_multiplies_bf16_operands_and_sums_in_f32():
  """Gradients: the bf16 cotangent times the other operand, summed in f32 and rounded once; and
  every product of forward and backward is bf16 x bf16 asking for f32 (JAX's own transpose
  would multiply the f32 cotangent by a bf16 operand, which XLA's CPU backend runs as an f32
  GEMM)."""
  a, b = _bf16((16, 1024), 4), _bf16((1024, 24), 5)
  weights = _bf16((16, 24), 6)
  loss = lambda a, b: (precision.einsum("NI,IO->NO", a, b).astype(jnp.float32)
                       * weights.astype(jnp.float32)).sum()
  grad_a, grad_b = jax.grad(loss, (0, 1))(a, b)
  assert grad_a.dtype == grad_b.dtype == jnp.bfloat16
  g = np.asarray(weights, np.float64)  # the cotangent, exactly a bf16 value
  expect_a = np.asarray(g @ np.asarray(b, np.float64).T)
  expect_b = np.asarray(np.asarray(a, np.float64).T @ g)
  for got, exact in [(grad_a, expect_a), (grad_b, expect_b)]:
    assert (np.abs(np.asarray(got, np.float64) - exact) / _ulp(exact)).max() <= 1.0
  dots = set(dot_dtypes(jax.make_jaxpr(jax.grad(loss, (0, 1)))(a, b).jaxpr))
  assert dots == {("bfloat16", "bfloat16", "float32")}, dots


def test_specs_and_dtypes_it_cannot_take_are_errors():
  a, b = _bf16((4, 8), 7), _bf16((8, 3), 8)
  with pytest.raises(ValueError, match="index 'O' of one operand is summed alone"):
    precision.einsum("NI,IO->N", a, b)
  with pytest.raises(ValueError, match="cast one first"):
    precision.einsum("NI,IO->NO", a, b.astype(jnp.float32))

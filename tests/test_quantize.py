"""Int8 weights (amd135m/quantize.py, cpu_kernels.matmul_int8): the quantizer's error bound, the
kernel against float64 on the same int8 weights, the model's int8 decode against f32 math on the
dequantized weights, and the target's own int8 copy as an exact speculative draft."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as ref
from amd135m import cpu_kernels, model as model_lib, quantize, sampling, speculative
from amd135m.errors import UserError

# Tails everywhere: K not a multiple of the 8-row blocks or the lanes, N not a multiple of the
# column blocks, V not a multiple of the 4-row blocks; and SmolLM2's real shapes.
SHAPES = [(37, 45), (8, 16), (576, 192), (1536, 576), (3, 1)]


def test_quantizer_error_is_at_most_half_a_step_per_channel():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((300, 70)).astype(np.float32) * rng.uniform(0.01, 3, 70)
  w[:, 5] = 0  # an all-zero channel
  for axis in (0, 1):
    q = quantize.quantize(w, axis)
    assert q.values.dtype == jnp.int8 and q.values.shape == w.shape
    scale = np.expand_dims(np.asarray(q.scale), axis)
    error = np.abs(np.asarray(q.dequantize()) - w)
    np.testing.assert_array_less(error, np.broadcast_to(scale / 2 * (1 + 1e-6) + 1e-30, w.shape))
    assert np.abs(np.asarray(q.values)).max() == 127  # each channel's largest weight is +-127
  assert (np.asarray(quantize.quantize(w, 0).dequantize())[:, 5] == 0).all()


def _int8_product(rows, k, n, transposed, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, k)).astype(np.float32)
  values = rng.integers(-127, 128, size=(n, k) if transposed else (k, n)).astype(np.int8)
  scale = rng.uniform(1e-3, 1e-2, n).astype(np.float32)
  out = jax.jit(lambda x, v, s: cpu_kernels.matmul_int8(x, v, s, transposed))(x, values, scale)
  return x, values, scale, np.asarray(out)


def _assert_near_float64(out, x, values, scale, transposed):
  """Within f32 rounding of the float64 product: each element a sum of k f32 products, error
  below k * eps * sum |x_i w_i| (far below it in practice)."""
  w = values.astype(np.float64) * (scale[None, :] if not transposed else scale[:, None])
  w = w.T if transposed else w
  exact = x.astype(np.float64) @ w
  bound = x.shape[1] * 6e-8 * (np.abs(x).astype(np.float64) @ np.abs(w)) + 1e-30
  assert out.shape == exact.shape
  np.testing.assert_array_less(np.abs(out - exact), bound)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("k,n", SHAPES)
def test_int8_products_equal_float64_and_rows_are_their_one_row_product(k, n, transposed):
  for rows in range(1, cpu_kernels.MAX_ROWS + 1):
    x, values, scale, out = _int8_product(rows, k, n, transposed, seed=rows)
    _assert_near_float64(out, x, values, scale, transposed)
    # Each row alone: bitwise the same (a verification's row is the decode step that scores it).
    product = jax.jit(lambda x, v, s: cpu_kernels.matmul_int8(x, v, s, transposed))
    for m in range(rows):
      assert np.array_equal(np.asarray(product(x[m:m + 1], values, scale))[0], out[m]), (rows, m)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
def test_the_check_catches_a_dropped_tail_and_a_wrong_scale():
  """The comparison above fails for a kernel that skipped the last input row or column, or
  scaled by a neighbour's scale: the defects a blocked kernel's tails invite."""
  x, values, scale, out = _int8_product(3, 37, 45, False)
  dropped_k = values.copy()
  dropped_k[-1] = 0
  dropped_n = out.copy()
  dropped_n[:, -1] = 0
  wrong = [(dropped_k, scale, None), (values, np.roll(scale, 1), None), (values, scale, dropped_n)]
  for bad_values, bad_scale, bad_out in wrong:
    got = bad_out if bad_out is not None else np.asarray(
        cpu_kernels.int8_reference(x, bad_values, bad_scale, False))
    with pytest.raises(AssertionError):
      _assert_near_float64(got, x, values, scale, False)


def _dequantized(params):
  is_int8 = lambda leaf: isinstance(leaf, quantize.Int8Weight)
  return jax.tree.map(lambda leaf: leaf.dequantize() if is_int8(leaf) else leaf, params,
                      is_leaf=is_int8)


@pytest.mark.slow
def test_int8_decode_equals_f32_math_on_the_dequantized_weights(smollm2):
  """Greedy decode with int8 weights equals greedy decode in f32 on the very weights they stand
  for (values * scale), up to each prompt's first near-tie; logits agree to f32 rounding."""
  config, params = smollm2
  int8 = quantize.quantize_params(params, config)
  dequantized = _dequantized(int8)
  prompts = [[1, 504, 3074, 4303, 282, 253, 1345, 314], [2, 1348, 30, 2210]]
  expected = sampling.generate(dequantized, config, prompts, 20).tokens
  got = sampling.generate(int8, config, prompts, 20).tokens
  for prompt, want, have in zip(prompts, expected, got):
    logits, _ = model_lib.forward(dequantized, config, jnp.asarray([prompt + want]))
    cut = ref.first_small_margin(np.asarray(logits[0, len(prompt) - 1:-1]))
    cut = len(want) if cut is None else cut
    assert have[:cut] == want[:cut]
  tokens = jnp.asarray([prompts[0]])
  a, _ = model_lib.forward(int8, config, tokens)
  b, _ = model_lib.forward(dequantized, config, tokens)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                             atol=1e-4 * float(np.abs(np.asarray(b)).max()))


def test_int8_draft_refuses_an_int8_target(smollm2):
  config, params = smollm2
  with pytest.raises(UserError, match="int8 already"):
    speculative.load_draft("int8", config, quantize.quantize_params(params, config))


def test_generate_refuses_a_bad_weights_choice_in_one_line(smollm2_gguf):
  proc = subprocess.run([sys.executable, "-m", "amd135m.generate", "--model", str(smollm2_gguf),
                         "--prompt", "x", "--weights", "int3"], capture_output=True, text=True)
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1 and "int3" in proc.stderr
  proc = subprocess.run([sys.executable, "-m", "amd135m.generate", "--model", str(smollm2_gguf),
                         "--prompt", "x", "--weights", "int8", "--draft", "int8"],
                        capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "amd135m.generate: error: --draft int8 drafts for an f32 target: drop --weights int8, or "
      "pick another draft"]

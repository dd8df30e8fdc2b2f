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

# Tails everywhere: K not a multiple of the 32-input blocks (and under one block), N not a
# multiple of the 4-row blocks; and SmolLM2's real shapes (K, N) = (in, out).
SHAPES = [(37, 45), (8, 16), (576, 192), (1536, 576), (3, 1), (64, 7)]


def test_quantizer_error_is_at_most_half_a_step_per_channel():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((70, 300)).astype(np.float32) * rng.uniform(0.01, 3, (70, 1))
  w[5] = 0  # an all-zero channel
  q = quantize.quantize(w)
  assert q.values.dtype == jnp.int8 and q.values.shape == w.shape and q.scale.shape == (70,)
  scale = np.asarray(q.scale)[:, None]
  error = np.abs(np.asarray(q.dequantize()) - w)
  np.testing.assert_array_less(error, np.broadcast_to(scale / 2 * (1 + 1e-6) + 1e-30, w.shape))
  assert (np.abs(np.asarray(q.values)).max(axis=1)[np.arange(70) != 5] == 127).all()
  assert (np.asarray(q.dequantize())[5] == 0).all()


def _int8_product(rows, k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, k)).astype(np.float32)
  x[:, :min(k, 32)] *= 50  # an outlier block beside ordinary ones
  values = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
  scale = rng.uniform(1e-3, 1e-2, n).astype(np.float32)
  out = jax.jit(cpu_kernels.matmul_int8)(x, values, scale)
  return x, values, scale, np.asarray(out)


def _numpy_quantized_rows(x):
  """The activation quantization in numpy, written from its definition: per row and block of
  32 inputs, scale = max |x| / 127 (f32), q = x / scale rounded half to even, clipped to 127."""
  m, k = x.shape
  blocks = -(-k // 32)
  padded = np.zeros((m, blocks * 32), np.float32)
  padded[:, :k] = x
  padded = padded.reshape(m, blocks, 32)
  scale = (np.abs(padded).max(-1) / np.float32(127)).astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    q = np.where(scale[..., None] > 0, np.clip(np.rint(padded / scale[..., None]), -127, 127), 0)
  return q, scale


def _assert_near_float64(out, x, values, scale):
  """Within f32 rounding of the float64 value of the same arithmetic (activations quantized per
  block, integer dots exact, summed over blocks and lanes): error below (blocks + 8) * eps *
  sum_k |q_k w_k| sx scale."""
  q, x_scale = _numpy_quantized_rows(x)
  blocks = q.shape[1]
  w = np.zeros((values.shape[0], blocks * 32))
  w[:, :values.shape[1]] = values
  w = w.reshape(-1, blocks, 32)
  dots = np.einsum("mbk,nbk->mnb", q.astype(np.float64), w)
  exact = (dots * x_scale[:, None, :]).sum(-1) * scale.astype(np.float64)
  # Partial sums (a kernel's lanes) may exceed the block's total: bound by sum |q_k w_k| sx.
  magnitude = np.einsum("mbk,nbk->mnb", np.abs(q).astype(np.float64), np.abs(w))
  bound = (blocks + 8) * 6e-8 * (magnitude * x_scale[:, None, :]).sum(-1) * scale + 1e-30
  assert out.shape == exact.shape
  np.testing.assert_array_less(np.abs(out - exact), bound)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
@pytest.mark.parametrize("k,n", SHAPES)
def test_int8_products_equal_float64_and_rows_are_their_one_row_product(k, n):
  product = jax.jit(cpu_kernels.matmul_int8)
  for rows in range(1, cpu_kernels.MAX_ROWS + 1):
    x, values, scale, out = _int8_product(rows, k, n, seed=rows)
    _assert_near_float64(out, x, values, scale)
    # XLA's form of the same arithmetic (other platforms) agrees as closely
    _assert_near_float64(np.asarray(cpu_kernels.int8_reference(x, values, scale)), x, values,
                         scale)
    # Each row alone: bitwise the same (a verification's row is the decode step that scores it).
    for m in range(rows):
      assert np.array_equal(np.asarray(product(x[m:m + 1], values, scale))[0], out[m]), (rows, m)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
def test_the_check_catches_a_dropped_tail_and_a_wrong_scale():
  """The comparison above fails for a kernel that skipped the last inputs (the partial block),
  scaled by a neighbour's scale, or left the last output row out: the defects a blocked
  kernel's tails invite."""
  x, values, scale, out = _int8_product(3, 45, 37)
  dropped_k = values.copy()
  dropped_k[:, 32:] = 0
  dropped_n = out.copy()
  dropped_n[:, -1] = 0
  wrong = [(dropped_k, scale, None), (values, np.roll(scale, 1), None), (values, scale, dropped_n)]
  for bad_values, bad_scale, bad_out in wrong:
    got = bad_out if bad_out is not None else np.asarray(
        cpu_kernels.int8_reference(x, bad_values, bad_scale))
    with pytest.raises(AssertionError):
      _assert_near_float64(got, x, values, scale)


@pytest.mark.slow
def test_int8_decode_equals_the_reference_arithmetic_and_tracks_f32(smollm2):
  """Greedy decode with int8 weights (the kernels, a row per step) equals the argmax of a full
  forward through XLA's form of the same arithmetic (int8_reference: more than 8 rows), up to
  each prompt's first near-tie; and its choices agree with the f32 model on the dequantized
  weights at most positions (the activations' rounding is the only other difference)."""
  config, params = smollm2
  int8 = quantize.quantize_params(params, config)
  prompts = [[1, 504, 3074, 4303, 282, 253, 1345, 314, 2, 1348, 30, 2210]]
  tokens = sampling.generate(int8, config, prompts, 24).tokens[0]
  sequence = jnp.asarray([prompts[0] + tokens])
  logits, _ = model_lib.forward(int8, config, sequence)
  chosen = np.asarray(logits[0, len(prompts[0]) - 1:-1])
  cut = ref.first_small_margin(chosen)
  cut = len(tokens) if cut is None else cut
  assert tokens[:cut] == np.argmax(chosen, -1).tolist()[:cut]
  f32, _ = model_lib.forward(quantize.dequantize_params(int8, config), config, sequence)
  agreement = np.mean(np.argmax(np.asarray(f32[0]), -1) == np.argmax(np.asarray(logits[0]), -1))
  assert agreement >= 0.8, agreement


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

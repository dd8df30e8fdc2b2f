"""Low-precision weights (amd135m/quantize.py). int8 (cpu_kernels.matmul_int8): the quantizer's
error bound, the kernel against float64 on the same int8 weights, the model's int8 decode against
f32 math on the dequantized weights. int4 (cpu_kernels.matmul_int4) alike, and SmolLM2's Q4_1
layers given back. bf16: the rounding bound, products bitwise the f32 kernel's on the widened
weights, and decode alike. The target's own copies as exact speculative drafts."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amd135m import cpu_kernels, model as model_lib, quantize, sampling, speculative
from amd135m.errors import UserError

# Tails everywhere: K not a multiple of the 32-input blocks (and under one block), N not a
# multiple of the 4-row blocks; and SmolLM2's real shapes (K, N) = (in, out).
# (50, 61), (50, 229): on two threads, several-stream passes (cpu_kernels F32/bf16 panels, int8
# row groups) ending in a partial panel or group, and a thread's panels left over after them.
SHAPES = [(37, 45), (8, 16), (576, 192), (1536, 576), (3, 1), (64, 7), (50, 61), (50, 229)]


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


@pytest.mark.parametrize("k,n", SHAPES)
def test_row_groups_hold_the_values_and_the_lookup_reads_them(k, n):
  """The int8 weight's stored layout (four output rows interleaved by block of 32 inputs, padded
  with zeros) gives back every value, and an embedding's lookup of any id finds its row."""
  rng = np.random.default_rng(k * n)
  w = rng.standard_normal((n, k)).astype(np.float32)
  q = quantize.quantize(w)
  groups = np.asarray(q.groups)
  assert groups.shape == (-(-n // 4), -(-k // 32), 4, 32)
  values = np.clip(np.rint(w / np.asarray(q.scale)[:, None]), -127, 127).astype(np.int8)
  assert np.array_equal(np.asarray(q.values), values)
  assert np.array_equal(groups[0, 0, 1, :min(k, 32)], values[1, :32]) if n > 1 else True
  padded = np.zeros((groups.shape[0] * 4, groups.shape[1] * 32), np.int8)
  padded[:n, :k] = values
  assert np.array_equal(groups.transpose(0, 2, 1, 3).reshape(padded.shape), padded)
  ids = jnp.asarray([[n - 1, 0], [n // 2, min(n - 1, 5)]])
  np.testing.assert_array_equal(np.asarray(q.lookup(ids)), np.asarray(q.dequantize())[ids])
  top = q.rows(0, n - n // 2)
  np.testing.assert_array_equal(np.asarray(top.dequantize()),
                                np.asarray(q.dequantize())[:n - n // 2])


def _int8_product(rows, k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, k)).astype(np.float32)
  x[:, :min(k, 32)] *= 50  # an outlier block beside ordinary ones
  values = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
  scale = rng.uniform(1e-3, 1e-2, n).astype(np.float32)
  out = jax.jit(cpu_kernels.matmul_int8)(x, cpu_kernels.to_row_groups(values), scale)
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


def _assert_near_float64(out, x, values, scale, terms=None):
  """Within f32 rounding of the float64 value of the same arithmetic (activations quantized per
  block, integer dots exact, summed over blocks and lanes): error below (blocks + 8) * eps *
  sum_k |q_k w_k| sx scale. `terms` replaces blocks + 8 for a plain f32 sum over k of the
  dequantized activations (XLA's form: each q sx rounded once, then K additions: K + 2)."""
  q, x_scale = _numpy_quantized_rows(x)
  blocks = q.shape[1]
  w = np.zeros((values.shape[0], blocks * 32))
  w[:, :values.shape[1]] = values
  w = w.reshape(-1, blocks, 32)
  dots = np.einsum("mbk,nbk->mnb", q.astype(np.float64), w)
  exact = (dots * x_scale[:, None, :]).sum(-1) * scale.astype(np.float64)
  # Partial sums (a kernel's lanes) may exceed the block's total: bound by sum |q_k w_k| sx.
  magnitude = np.einsum("mbk,nbk->mnb", np.abs(q).astype(np.float64), np.abs(w))
  terms = blocks + 8 if terms is None else terms
  bound = terms * 6e-8 * (magnitude * x_scale[:, None, :]).sum(-1) * scale + 1e-30
  assert out.shape == exact.shape
  np.testing.assert_array_less(np.abs(out - exact), bound)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
@pytest.mark.parametrize("k,n", SHAPES)
def test_int8_products_equal_float64_and_rows_are_their_one_row_product(k, n):
  product = jax.jit(cpu_kernels.matmul_int8)
  for rows in range(1, cpu_kernels.MAX_ROWS + 1):
    x, values, scale, out = _int8_product(rows, k, n, seed=rows)
    _assert_near_float64(out, x, values, scale)
    # XLA's form (other platforms, more rows): the same operands, one f32 GEMM
    groups = cpu_kernels.to_row_groups(values)
    _assert_near_float64(np.asarray(cpu_kernels.int8_reference(x, groups, scale)), x, values,
                         scale, terms=k + 2)
    # Each row alone: bitwise the same (a verification's row is the decode step that scores it).
    for m in range(rows):
      assert np.array_equal(np.asarray(product(x[m:m + 1], groups, scale))[0], out[m]), (rows, m)


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
        cpu_kernels.int8_reference(x, cpu_kernels.to_row_groups(bad_values), bad_scale))
    for terms in (None, 45 + 2):  # the kernel's bound and the looser one of XLA's form
      with pytest.raises(AssertionError):
        _assert_near_float64(got, x, values, scale, terms)


@pytest.mark.slow
def test_int8_decode_equals_the_reference_arithmetic_and_tracks_f32(smollm2):
  """Greedy decode with int8 weights (the kernels, a row per step) picks the argmax of its own
  step logits; the same steps through XLA's form of the same operands (int8_reference, kernels
  off) choose the same tokens at nearly every position and stay within INT8_PATH_BOUND; the
  choices agree with the f32 model on the dequantized weights at most positions.

  Why not the margin rule of the f32 tests: activations are rounded to int8 per block of 32, so
  the f32 rounding difference between the kernel's integer dots and XLA's f32 GEMM can flip an
  activation by one quantum, and 30 layers carry that to the logits: measured 0.4-1.3 on
  SmolLM2's logits (scale ~20) at the positions of this prompt (2026-12-06, AMD EPYC), with every
  choice equal. A wrong scale or a dropped block breaks the product tests above."""
  config, params = smollm2
  int8 = quantize.quantize_params(params, config)
  prompt = [1, 504, 3074, 4303, 282, 253, 1345, 314, 2, 1348, 30, 2210]
  tokens = sampling.generate(int8, config, [prompt], 24).tokens[0]

  def step_logits(allow_cpu_kernels):
    logits, cache = jax.jit(lambda p, t: model_lib.prefill(p, config, t, 64))(
        int8, jnp.asarray([prompt]))
    step = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c,
                                                     allow_cpu_kernels=allow_cpu_kernels))
    out = [np.asarray(logits[0, -1])]
    for token in tokens[:-1]:
      logits, cache = step(int8, jnp.asarray([[token]]), cache)
      out.append(np.asarray(logits[0, -1]))
    return np.stack(out)

  kernel, xla = step_logits(True), step_logits(False)
  assert tokens == np.argmax(kernel, -1).tolist()
  assert np.max(np.abs(kernel - xla)) < INT8_PATH_BOUND
  assert np.mean(np.argmax(kernel, -1) == np.argmax(xla, -1)) >= 0.9
  sequence = jnp.asarray([prompt + tokens])
  logits, _ = model_lib.forward(int8, config, sequence)
  f32, _ = model_lib.forward(quantize.dequantize_params(int8, config), config, sequence)
  agreement = np.mean(np.argmax(np.asarray(f32[0]), -1) == np.argmax(np.asarray(logits[0]), -1))
  assert agreement >= 0.8, agreement


INT8_PATH_BOUND = 2.0  # logits; see the test above (measured up to 1.27)


def test_generate_refuses_a_bad_weights_choice_in_one_line(smollm2_gguf):
  proc = subprocess.run([sys.executable, "-m", "amd135m.generate", "--model", str(smollm2_gguf),
                         "--prompt", "x", "--weights", "int3"], capture_output=True, text=True)
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1 and "int3" in proc.stderr


@pytest.mark.parametrize("spec", ["int8", "int4", "bf16"])
def test_a_low_precision_draft_needs_an_f32_target(spec, smollm2, smollm2_gguf):
  config, params = smollm2
  for stored, low in [("int8", quantize.quantize_params(params, config)),
                      ("int4", quantize.quantize_params(params, config, "int4")),
                      ("bf16", quantize.to_bfloat16(params))]:
    with pytest.raises(UserError, match=f"{stored} already"):
      speculative.load_draft(spec, config, low)
  proc = subprocess.run([sys.executable, "-m", "amd135m.generate", "--model", str(smollm2_gguf),
                         "--prompt", "x", "--weights", spec, "--draft", spec],
                        capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"amd135m.generate: error: --draft {spec} drafts for an f32 target: drop --weights {spec}, "
      "or pick another draft"]


# ---------------------------------------------------------------------------------------------
# int4: GGUF's Q4_1 arithmetic, a scale and a minimum per output row and block of 32 inputs.

def test_int4_quantizer_error_is_at_most_half_a_step_per_block():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((9, 70)).astype(np.float32) * rng.uniform(0.01, 3, (9, 1))
  w[2, 32:64] = 0.25  # a constant block: its minimum, scale 0
  w[4, 64:] = [-1e-3, 7.0, 0.5, 0.5, 0.5, 0.5]  # the partial last block, a wide range
  q = quantize.quantize_int4(w)
  assert q.nibbles.dtype == jnp.uint8 and q.nibbles.shape == (3, 3, 4, 16)  # row groups
  assert q.row_nibbles.shape == (9, 3 * 16)
  assert q.scale.shape == q.minimum.shape == (9, 3) and q.inputs == 70
  back = np.asarray(q.dequantize())
  step = np.repeat(np.asarray(q.scale), 32, axis=1)[:, :70]
  np.testing.assert_array_less(np.abs(back - w), step / 2 * (1 + 1e-5) + 1e-6)
  assert (back[2, 32:64] == np.float32(0.25)).all() and float(q.scale[2, 1]) == 0
  # Each block's minimum and maximum are weights of the block (u = 0 and u = 15 are used).
  u = cpu_kernels.unpack_nibbles(q.row_nibbles.reshape(9, 3, 16))
  u = np.asarray(u).reshape(9, 96)[:, :70]
  assert u[4, 64:].min() == 0 and u[4, 64:].max() == 15 and back[4, 65] == np.float32(7.0)


def _int4_weight(k, n, seed):
  rng = np.random.default_rng(seed)
  return quantize.quantize_int4(rng.standard_normal((n, k)).astype(np.float32))


def _assert_int4_near_float64(out, x, weight, terms):
  """Within f32 rounding of the float64 value of the kernel's arithmetic: activations quantized
  per block (numpy, from the definition), times scale * u + minimum per block."""
  q, x_scale = _numpy_quantized_rows(x)
  rows = weight.row_nibbles.reshape(*weight.scale.shape, 16)
  u = np.asarray(cpu_kernels.unpack_nibbles(rows)).astype(np.float64)
  w = u * np.asarray(weight.scale, np.float64)[..., None] + np.asarray(weight.minimum,
                                                                        np.float64)[..., None]
  dq = q.astype(np.float64) * x_scale[..., None]
  exact = np.einsum("mbk,nbk->mn", dq, w)
  magnitude = np.einsum("mbk,nbk->mn", np.abs(dq), np.abs(w))
  assert out.shape == exact.shape
  np.testing.assert_array_less(np.abs(out - exact), terms * 6e-8 * magnitude + 1e-30)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
@pytest.mark.parametrize("k,n", SHAPES)
def test_int4_products_equal_float64_and_rows_are_their_one_row_product(k, n):
  product, reference = jax.jit(cpu_kernels.matmul_int4), jax.jit(cpu_kernels.int4_reference)
  weight = _int4_weight(k, n, seed=k + n)
  operands = weight.nibbles, weight.scale, weight.minimum
  blocks = -(-k // 32)
  for rows in range(1, cpu_kernels.MAX_ROWS + 1):
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    x[:, :min(k, 32)] *= 50  # an outlier block beside ordinary ones
    out = np.asarray(product(x, *operands))
    _assert_int4_near_float64(out, x, weight, terms=2 * blocks + 10)
    _assert_int4_near_float64(np.asarray(reference(x, *operands)), x, weight,
                              terms=blocks * 32 + 4)
    for m in range(rows):
      assert np.array_equal(np.asarray(product(x[m:m + 1], *operands))[0], out[m]), (rows, m)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
def test_a_short_prefill_runs_the_int_kernels_eight_rows_at_a_time():
  """Up to CHUNKED_ROWS rows an int8 or int4 product is the kernel's, 8 rows a call: every row is
  bitwise its one-row product (a prompt's rows are scored as decode steps would score them);
  past that, XLA's form, within f32 rounding of it."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((cpu_kernels.CHUNKED_ROWS + 3, 70)).astype(np.float32)
  int8 = quantize.quantize(rng.standard_normal((37, 70)).astype(np.float32))
  int4 = quantize.quantize_int4(rng.standard_normal((37, 70)).astype(np.float32))
  for weight in (int8, int4):
    product = jax.jit(type(weight).matmul)
    short = np.asarray(product(weight, x[:21]))
    one = [np.asarray(product(weight, x[m:m + 1]))[0] for m in range(21)]
    assert np.array_equal(short, np.stack(one))
    long = np.asarray(product(weight, x))
    assert not np.array_equal(long[:21], short)  # XLA's summation order, not the kernel's
    np.testing.assert_allclose(long[:21], short, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
def test_the_int4_check_catches_a_dropped_tail_a_wrong_scale_and_a_lost_minimum():
  weight = _int4_weight(45, 37, seed=3)
  x = np.random.default_rng(4).standard_normal((3, 45)).astype(np.float32)
  out = np.asarray(jax.jit(cpu_kernels.matmul_int4)(x, weight.nibbles, weight.scale,
                                                    weight.minimum))
  _assert_int4_near_float64(out, x, weight, terms=14)
  dropped_k = np.asarray(weight.nibbles).copy()
  dropped_k[:, 1:] = 0  # the partial block's nibbles (row groups [G, B, 4, 16])
  dropped_n = out.copy()
  dropped_n[:, -1] = 0
  nibbles = np.asarray(weight.nibbles)
  swapped = (nibbles << 4) | (nibbles >> 4)  # inputs i and 16 + i of each block exchanged
  wrong = [
      cpu_kernels.int4_reference(x, dropped_k, weight.scale, weight.minimum),
      cpu_kernels.int4_reference(x, weight.nibbles, np.roll(weight.scale, 1, 0), weight.minimum),
      cpu_kernels.int4_reference(x, weight.nibbles, weight.scale, 0 * weight.minimum),
      cpu_kernels.int4_reference(x, swapped, weight.scale, weight.minimum),
      dropped_n]
  for got in wrong:
    with pytest.raises(AssertionError):
      _assert_int4_near_float64(np.asarray(got), x, weight, terms=14)


def test_smollm2s_int4_copy_gives_its_q4_1_layers_back_and_keeps_an_int8_head(smollm2):
  """SmolLM2's GGUF stores every layer's matrices as Q4_1 (the embedding as Q8_0): its f32
  weights are 4-bit blocks already, and quantize_int4 finds each block's values again. The
  embedding (the tied head) stays int8."""
  config, params = smollm2
  int4 = quantize.quantize_params(params, config, "int4")
  assert quantize.precision(int4) == "int4"
  assert isinstance(int4["embed_tokens"]["embedding"], quantize.Int8Weight)
  back = quantize.dequantize_params(int4, config)
  for layer in ("layers_0", "layers_29"):
    for group, name in [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")]:
      w = np.asarray(params[layer][group][name]["kernel"])
      np.testing.assert_allclose(np.asarray(back[layer][group][name]["kernel"]), w,
                                 rtol=0, atol=np.abs(w).max() * 2e-6)


@pytest.mark.slow
def test_int4_decode_equals_the_reference_arithmetic_and_tracks_f32(smollm2):
  """As for int8 (above): greedy decode with int4 layers picks the argmax of its own step
  logits, XLA's form of the same operands stays within INT8_PATH_BOUND and picks the same tokens
  at nearly every position, and the f32 model on the dequantized weights mostly agrees."""
  config, params = smollm2
  int4 = quantize.quantize_params(params, config, "int4")
  prompt = [1, 504, 3074, 4303, 282, 253, 1345, 314, 2, 1348, 30, 2210]
  tokens = sampling.generate(int4, config, [prompt], 24).tokens[0]
  step = {allow: jax.jit(lambda p, t, c, allow=allow: model_lib.forward(
      p, config, t, c, allow_cpu_kernels=allow)) for allow in (True, False)}
  steps = {}
  for allow in (True, False):
    logits, cache = jax.jit(lambda p, t: model_lib.prefill(p, config, t, 64))(
        int4, jnp.asarray([prompt]))
    out = [np.asarray(logits[0, -1])]
    for token in tokens[:-1]:
      logits, cache = step[allow](int4, jnp.asarray([[token]]), cache)
      out.append(np.asarray(logits[0, -1]))
    steps[allow] = np.stack(out)
  kernel, xla = steps[True], steps[False]
  assert tokens == np.argmax(kernel, -1).tolist()
  assert np.max(np.abs(kernel - xla)) < INT8_PATH_BOUND
  assert np.mean(np.argmax(kernel, -1) == np.argmax(xla, -1)) >= 0.9
  sequence = jnp.asarray([prompt + tokens])
  logits, _ = model_lib.forward(int4, config, sequence)
  f32, _ = model_lib.forward(quantize.dequantize_params(int4, config), config, sequence)
  agreement = np.mean(np.argmax(np.asarray(f32[0]), -1) == np.argmax(np.asarray(logits[0]), -1))
  assert agreement >= 0.8, agreement


# ---------------------------------------------------------------------------------------------
# bf16: the weights rounded to nearest even, widened to f32 in the kernels' registers.

def test_bf16_rounding_is_within_half_an_ulp_and_keeps_the_layout(smollm2):
  config, params = smollm2
  bf16 = quantize.to_bfloat16(params)
  assert quantize.precision(bf16) == "bf16" and quantize.precision(params) == "f32"
  flat = jax.tree_util.tree_leaves_with_path(params)
  rounded = jax.tree.leaves(bf16, is_leaf=lambda x: isinstance(x, quantize.Bf16Weight))
  for (path, w), r in zip(flat, rounded):
    if path[-1].key == "kernel":  # panels: the [in, out] matrix they hold
      assert isinstance(r, quantize.Bf16Weight) and r.panels.dtype == jnp.bfloat16
      r = r.dequantize().T
    matrix = path[-1].key in ("kernel", "embedding")
    assert r.shape == w.shape and r.dtype == (jnp.float32 if path[-1].key == "kernel" else
                                              jnp.bfloat16 if matrix else w.dtype), path
    w, r = np.asarray(w, np.float32), np.asarray(r, np.float32)
    # 8 significant bits, rounded to nearest: half an ulp, |r - w| <= 2^-8 |w|
    np.testing.assert_array_less(np.abs(r - w), np.abs(w) * 2.0 ** -8 * (1 + 1e-6) + 1e-38)
  with pytest.raises(ValueError, match="bf16 already"):
    quantize.cast_weights(bf16, config, "int8")


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_bf16_products_are_bitwise_the_f32_kernels_on_the_widened_weights(k, n, transposed):
  """The bf16 kernel widens each weight exactly (a shift) and sums in the f32 kernel's order, so
  its products equal the f32 kernel's (itself checked against float64 in test_cpu_kernels) on
  the widened weights bit for bit, tails included; and near float64 as that one is."""
  rng = np.random.default_rng(k * n)
  product = jax.jit(cpu_kernels.matmul, static_argnums=2)
  for rows in range(1, cpu_kernels.MAX_ROWS + 1):
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n)), jnp.bfloat16)
    widened = np.asarray(w, np.float32)
    out = np.asarray(product(x, w, transposed))
    assert out.dtype == np.float32 and out.shape == (rows, n)
    assert np.array_equal(out, np.asarray(product(x, jnp.asarray(widened), transposed)))
    exact = x.astype(np.float64) @ (widened.T if transposed else widened).astype(np.float64)
    bound = k * 6e-8 * (np.abs(x).astype(np.float64) @ np.abs(widened.T if transposed
                                                               else widened)) + 1e-30
    np.testing.assert_array_less(np.abs(out - exact), bound)
    # XLA's path (other platforms, more rows) widens the same way
    np.testing.assert_allclose(np.asarray(cpu_kernels._xla(x, w, transposed)), exact,
                               rtol=0, atol=float(bound.max()))


@pytest.fixture
def widened_prefill(monkeypatch):
  """bf16 weights widened in every product, the prefill's too (on CPUs with bf16 dot instructions
  a prefill otherwise rounds its rows to bf16: the test after next)."""
  monkeypatch.setattr(cpu_kernels, "native_bf16_dot", lambda: False)
  jax.clear_caches()  # programs traced with the other choice
  yield
  jax.clear_caches()


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
@pytest.mark.parametrize("k,n", SHAPES)
def test_bf16_panels_are_bitwise_the_row_major_kernels(k, n):
  """A bf16 weight stored as panels (quantize.Bf16Weight) multiplies 1-8 rows bitwise as the
  row-major kernel does on the same weight (each output summed over k in order), the last panel's
  padding never reaching the output; more rows go through XLA on the weight put back together."""
  rng = np.random.default_rng(k * n)
  w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32)).astype(jnp.bfloat16)
  panels = quantize.Bf16Weight(cpu_kernels.to_panels(w), n)
  assert np.array_equal(np.asarray(panels.dequantize()).T, np.asarray(w, np.float32))
  row_major, ours = jax.jit(cpu_kernels.matmul), jax.jit(type(panels).matmul)
  for rows in range(1, cpu_kernels.MAX_ROWS + 1):
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    assert np.array_equal(np.asarray(ours(panels, x)), np.asarray(row_major(x, w))), rows
  # 9-16 rows: the kernel, 8 rows a call; more: XLA's product (its own summation order)
  x = jnp.asarray(rng.standard_normal((16, k)).astype(np.float32))
  assert np.array_equal(np.asarray(ours(panels, x)),
                        np.concatenate([np.asarray(row_major(x[:8], w)),
                                        np.asarray(row_major(x[8:], w))]))
  x = jnp.asarray(rng.standard_normal((20, k)).astype(np.float32))
  bound = (k + 2) * 6e-8 * (np.abs(np.asarray(x)) @ np.abs(np.asarray(w, np.float32))) + 1e-30
  np.testing.assert_array_less(np.abs(np.asarray(ours(panels, x)) - np.asarray(row_major(x, w))),
                               bound)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the kernels")
@pytest.mark.parametrize("k,n", SHAPES)
def test_f32_panels_are_bitwise_the_row_major_kernels(k, n):
  """An f32 weight stored as panels (quantize.F32Panels, the decode layout) multiplies any number
  of rows with the row-major kernel's sums: bitwise its product of 1-8 rows (and of 9-16 where it
  takes them), each row of a longer product (a prefill: groups of 12 rows, blocks of 256) bitwise
  that row alone, within f32 summation of the float64 product; the last panel's padding never
  reaches the output."""
  rng = np.random.default_rng(k * n + 1)
  w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
  panels = quantize.F32Panels(cpu_kernels.to_panels(w, cpu_kernels.F32_PANEL), n)
  assert panels.panels.shape == (-(-n // cpu_kernels.F32_PANEL), k, cpu_kernels.F32_PANEL)
  assert np.array_equal(np.asarray(panels.dequantize()).T, np.asarray(w))
  ours = jax.jit(type(panels).matmul)
  widest = cpu_kernels.WIDE_ROWS if cpu_kernels.wide_rows() else cpu_kernels.MAX_ROWS
  for rows in range(1, widest + 1):
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    row_major = jax.jit(lambda x, w: cpu_kernels.matmul(x, w, wide=True))(x, w)
    assert np.array_equal(np.asarray(ours(panels, x)), np.asarray(row_major)), rows
  for rows in (17, 40, 300):
    x = rng.standard_normal((rows, k)).astype(np.float32)
    out = np.asarray(ours(panels, jnp.asarray(x)))
    for m in (0, 11, 12, 16, rows - 1):
      alone = np.asarray(ours(panels, jnp.asarray(x[m:m + 1])))
      assert np.array_equal(out[m], alone[0]), (rows, m)
    exact = x.astype(np.float64) @ np.asarray(w, np.float64)
    bound = k * 6e-8 * (np.abs(x).astype(np.float64) @ np.abs(np.asarray(w, np.float64)))
    np.testing.assert_array_less(np.abs(out - exact), bound + 1e-30)


@pytest.mark.slow
@pytest.mark.usefixtures("widened_prefill")
def test_bf16_decode_is_f32_decode_on_the_rounded_weights(smollm2):
  """The whole model: greedy decode with bf16 weights gives the tokens (and final logits) of f32
  decode on the same weights widened, bit for bit: nothing but the weights' storage differs."""
  config, params = smollm2
  bf16 = quantize.to_bfloat16(params)
  widened = jax.tree.map(  # the f32 model on the rounded weights, kernels row-major as usual
      lambda w: w.dequantize().T if isinstance(w, quantize.Bf16Weight) else w.astype(jnp.float32),
      bf16, is_leaf=lambda w: isinstance(w, quantize.Bf16Weight))
  prompts = [[1, 504, 3074, 4303, 282, 253, 1345, 314, 2, 1348, 30, 2210], [1, 422, 5]]
  ours = sampling.generate(bf16, config, prompts, 16)
  f32 = sampling.generate(widened, config, prompts, 16)
  assert ours.tokens == f32.tokens
  cache = model_lib.init_cache(config, 1, 32)
  step = jax.jit(lambda p, c: model_lib.forward(p, config, jnp.asarray([[504, 3074]]), c)[0])
  assert np.array_equal(np.asarray(step(bf16, cache)), np.asarray(step(widened, cache)))


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_prefill_rounds_its_rows_only_where_the_cpu_has_bf16_dots(native, monkeypatch):
  """More than 8 rows with a bf16 weight (a prefill): on a CPU with bf16 dot instructions the rows
  are rounded to bf16 and the products summed in f32 (XLA's bf16 GEMM, ~1.9x its f32 one), so
  the result is the float64 product of the rounded rows up to f32 summation, and off the f32
  rows' product by more than that; elsewhere the f32 rows' product. 1-8 rows (decode steps,
  verifications) keep f32 rows either way."""
  monkeypatch.setattr(cpu_kernels, "native_bf16_dot", lambda: native)
  jax.clear_caches()
  rng = np.random.default_rng(7)
  k, n = 576, 192
  x = rng.standard_normal((40, k)).astype(np.float32)
  w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32)).astype(jnp.bfloat16)
  wide = np.asarray(w.astype(jnp.float32), np.float64)
  rounded = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  product = jax.jit(cpu_kernels.matmul)
  out = np.asarray(product(jnp.asarray(x), w))
  bound = (k + 2) * 6e-8 * (np.abs(x) @ np.abs(wide))
  exact_rounded, exact_f32 = rounded @ wide, x.astype(np.float64) @ wide
  expected, other = (exact_rounded, exact_f32) if native else (exact_f32, exact_rounded)
  np.testing.assert_array_less(np.abs(out - expected), bound)
  assert np.mean(np.abs(out - other) > bound) > 0.5  # the other arithmetic would not pass
  few = np.asarray(product(jnp.asarray(x[:8]), w))
  np.testing.assert_array_less(np.abs(few - exact_f32[:8]), bound[:8])
  jax.clear_caches()


def test_bf16_weights_carry_the_tied_head_as_panels(smollm2):
  """cast_weights(bf16) adds the tied head as Bf16Weight panels of the rounded table transposed
  (with_bf16_output_kernel): the same numbers, summed in another order than the table's rows, so
  decode logits agree with the table's head to f32 rounding and greedy picks are the same;
  plain_layout drops the copy."""
  config, params = smollm2
  bf16 = quantize.cast_weights(params, config, "bf16")
  embed = bf16["embed_tokens"]
  if not cpu_kernels.available():
    assert quantize.OUTPUT_KERNEL not in embed
    return
  head = embed[quantize.OUTPUT_KERNEL]
  assert isinstance(head, quantize.Bf16Weight)
  assert np.array_equal(np.asarray(head.dequantize()), np.asarray(embed["embedding"], np.float32))
  table_only = {**bf16, "embed_tokens": {"embedding": embed["embedding"]}}
  assert quantize.OUTPUT_KERNEL not in quantize.plain_layout(bf16)["embed_tokens"]
  forward = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c)[0])
  cache = model_lib.init_cache(config, 1, 32)
  for tokens in ([[504]], [[504, 3074, 4303]]):
    tokens = jnp.asarray(tokens)
    ours = np.asarray(forward(bf16, tokens, cache), np.float64)
    rows = np.asarray(forward(table_only, tokens, cache), np.float64)
    assert not np.array_equal(ours, rows)  # the copy is what runs (another summation order)
    np.testing.assert_allclose(ours, rows, rtol=0, atol=1e-4 * np.abs(rows).max())
    assert np.array_equal(ours.argmax(-1), rows.argmax(-1))


def test_f32_decode_layout_is_the_same_model_in_panels(smollm2):
  """cast_weights(f32) gives the decode layout (decode_layout): every Linear kernel as F32Panels
  holding the same numbers (q, k, v as one qkv_proj, gate and up as one gate_up_proj), and the
  tied head a transposed copy [D, V], as panels too. Decode
  steps and verifications give bitwise the row-major kernels' logits, a prompt's logits agree to
  f32 rounding, greedy tokens are the same; plain_layout gives the params back bit for bit; the
  other precisions and the fingerprint see the plain params."""
  from amd135m.benchmarks import decode_bench
  from amd135m.checkpoints import head_io
  config, params = smollm2
  copied = quantize.cast_weights(params, config, "f32")
  table = params["embed_tokens"]["embedding"]
  head = copied["embed_tokens"]["output_kernel"]
  if cpu_kernels.available():
    assert isinstance(head, quantize.F32Panels)
    assert np.array_equal(np.asarray(head.dequantize()), np.asarray(table))
    attention, mlp = copied["layers_0"]["self_attn"], copied["layers_0"]["mlp"]
    assert attention.keys() == {"qkv_proj", "o_proj"} and mlp.keys() == {"gate_up_proj",
                                                                         "down_proj"}
    original = params["layers_0"]
    for fused, block, parts in ((attention["qkv_proj"], original["self_attn"],
                                 ("q_proj", "k_proj", "v_proj")),
                                (mlp["gate_up_proj"], original["mlp"], ("gate_proj", "up_proj"))):
      assert isinstance(fused, quantize.F32Panels)  # the projections' columns side by side
      assert np.array_equal(np.asarray(fused.dequantize()).T, np.concatenate(
          [np.asarray(block[part]["kernel"]) for part in parts], axis=1))
  assert quantize.precision(copied) == "f32"
  again = quantize.cast_weights(copied, config, "f32")  # cast again: still one copy
  assert again["embed_tokens"].keys() == {"embedding", "output_kernel"}
  plain = quantize.plain_layout(again)
  assert jax.tree.structure(plain) == jax.tree.structure(params)
  assert all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(params)))

  row_major = quantize.with_output_kernel(params, config)
  forward = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c)[0])
  rng = np.random.default_rng(3)
  # A step, a verification, and a batch's where the row-major path takes the kernel for 12 rows
  # (AVX-512 hosts; elsewhere XLA's GEMM sums them in its own order).
  shapes = ((1, 1), (1, 5), (4, 3)) if cpu_kernels.wide_rows() else ((1, 1), (1, 5))
  for batch, length in shapes:
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, length)), jnp.int32)
    cache = model_lib.init_cache(config, batch, 64).replace(
        length=jnp.full((batch,), 20, jnp.int32))
    assert np.array_equal(np.asarray(forward(copied, tokens, cache)),
                          np.asarray(forward(row_major, tokens, cache))), (batch, length)
  # A prompt's logits: the kernel's order, not XLA's (test_smollm2 holds both near float64).
  prompts = [[1, 504, 3074, 4303, 282, 253, 1345, 314, 2, 1348, 30, 2210], [1, 422, 5]]
  assert (sampling.generate(copied, config, prompts, 16).tokens ==
          sampling.generate(params, config, prompts, 16).tokens)

  int8 = quantize.cast_weights(copied, config, "int8")
  assert "output_kernel" not in int8["embed_tokens"]
  assert head_io.fingerprint(config, quantize.plain_layout(copied)) == head_io.fingerprint(
      config, params)
  # The head reads the copy, the lookup one row of the table.
  assert (decode_bench.bytes_per_token(config, copied, 100) ==
          decode_bench.bytes_per_token(config, params, 100) + config.dim * 4)

"""The CPU kernels (amd135m/csrc/small_matmul.cc): products of a few rows, exact to f32 rounding
and row by row the same whatever the number of rows; cached attention for a few new tokens, equal
to XLA's form; both used by the model where they should be and nowhere else."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amd135m import attention as attention_lib, cpu_kernels, model as model_lib, quantize

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="no C++ compiler: the kernel could not be built")

# Tails everywhere: K not a multiple of the 8-row blocks or 16 lanes, N not a multiple of 16,
# V not a multiple of the 4-row blocks, and SmolLM2's real shapes.
SHAPES = [(37, 50), (8, 16), (576, 192), (1536, 576), (3, 1)]
# Rows past 8 on AVX-512 hosts: one group of 9 or 12 rows, two groups (8 + 5, 8 + 8).
WIDE = (9, 12, 13, 16) if cpu_kernels.wide_rows() else ()


def _product(rows, k, n, transposed, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, k)).astype(np.float32)
  w = rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32)
  out = jax.jit(lambda x, w: cpu_kernels.matmul(x, w, transposed, wide=True))(x, w)
  return x, w, np.asarray(out)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("k,n", SHAPES)
def test_products_equal_float64_within_f32_rounding(k, n, transposed):
  for rows in (*range(1, cpu_kernels.MAX_ROWS + 1), *WIDE):
    x, w, out = _product(rows, k, n, transposed)
    w64 = w.astype(np.float64)
    exact = x.astype(np.float64) @ (w64.T if transposed else w64)
    # A sum of k products in f32: error below k * eps * sum |x_i w_i|, far below it in practice.
    scale = np.abs(x).astype(np.float64) @ np.abs(w64.T if transposed else w64)
    assert out.shape == exact.shape
    np.testing.assert_array_less(np.abs(out - exact), k * 6e-8 * scale + 1e-30)
    # and as close to XLA's own product as two f32 summation orders are
    xla = np.asarray(jnp.einsum("NK,VK->NV" if transposed else "NK,KV->NV", x, w))
    np.testing.assert_allclose(out, xla, rtol=0, atol=2e-6 * np.sqrt(k) * scale.max())


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("k,n", [(576, 200), (584, 200), (587, 200), (40, 12011)])
def test_each_row_is_bitwise_its_one_row_product(transposed, k, n):
  """A speculative verification's row m equals the decode step that would have scored it
  (K a multiple of the kernels' 16-row blocks, of 8 only, and neither; and N wide enough that
  several rows go in column tiles, with a partial last tile and single columns, where one row
  does not, on two kernel threads)."""
  for rows in (2, 5, 7, 8, *WIDE):
    x, w, out = _product(rows, k, n, transposed, seed=rows)
    for m in range(rows):
      alone = np.asarray(jax.jit(lambda x, w: cpu_kernels.matmul(x, w, transposed))(x[m:m + 1], w))
      assert np.array_equal(out[m], alone[0]), (rows, m)


def test_gradients_and_vmap_follow_xla():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 40)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(2).standard_normal((40, 24)), jnp.float32)
  loss = lambda f: lambda x, w: (jnp.sin(f(x, w)) ** 2).sum()
  ours = jax.grad(loss(cpu_kernels.matmul), argnums=(0, 1))(x, w)
  xla = jax.grad(loss(lambda x, w: x @ w), argnums=(0, 1))(x, w)
  for a, b in zip(ours, xla):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  batched = jax.vmap(lambda x: cpu_kernels.matmul(x, w))(jnp.stack([x, 2 * x]))
  np.testing.assert_allclose(batched, jnp.stack([x @ w, 2 * x @ w]), rtol=1e-5, atol=1e-4)


def _lowered(rows, platforms=None, dtype=jnp.float32, weight_dtype=None, wide=False):
  x, w = jnp.ones((rows, 16), dtype), jnp.ones((16, 32), weight_dtype or dtype)
  lowered = jax.jit(lambda x, w: cpu_kernels.matmul(x, w, wide=wide)).trace(x, w)
  return (lowered.lower(lowering_platforms=platforms) if platforms else lowered.lower()).as_text()


def test_only_few_f32_rows_on_cpu_reach_the_kernel(monkeypatch):
  assert "amd135m_small_matmul" in _lowered(1)
  assert "amd135m_small_matmul" in _lowered(cpu_kernels.MAX_ROWS)
  assert "amd135m_small_matmul" not in _lowered(cpu_kernels.MAX_ROWS + 1)
  # A batch's few tokens a sequence: 16 rows where wide_rows(), not 17; not with a bf16 weight
  # (XLA's, with bf16 dots where the CPU has them).
  widest = cpu_kernels.WIDE_ROWS if cpu_kernels.wide_rows() else cpu_kernels.MAX_ROWS
  assert "amd135m_small_matmul" in _lowered(widest, wide=True)
  assert "amd135m_small_matmul" not in _lowered(widest + 1, wide=True)
  assert "amd135m_small_matmul" in _lowered(cpu_kernels.MAX_ROWS, weight_dtype=jnp.bfloat16)
  assert "amd135m_small_matmul" not in _lowered(cpu_kernels.MAX_ROWS + 1, wide=True,
                                                weight_dtype=jnp.bfloat16)
  assert "amd135m_small_matmul" not in _lowered(2, dtype=jnp.bfloat16)
  # Where the default backend is not the CPU (a GPU host), XLA's product, lowered for a GPU.
  monkeypatch.setattr(cpu_kernels.jax, "default_backend", lambda: "gpu")
  cpu_kernels.available.cache_clear()
  try:
    assert not cpu_kernels.available()
    assert "amd135m_small_matmul" not in _lowered(2, platforms=("cuda",))
  finally:
    monkeypatch.undo()
    cpu_kernels.available.cache_clear()
  assert cpu_kernels.available()


def test_the_model_decodes_through_the_kernel():
  config = model_lib.ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                 ffn_dim=48, max_seq_len=64, tie_embeddings=True)
  params = model_lib.init_params(config, jax.random.PRNGKey(0))
  cache = model_lib.init_cache(config, 1, 16)
  step = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c)[0])
  # The compiled program, where XLA has inlined each layer's call (model._apply_layer): 7 layer
  # products per layer and the tied head; one attention call per layer.
  text = step.trace(params, jnp.zeros((1, 3), jnp.int32), cache).lower().compile().as_text()
  assert text.count('custom_call_target="amd135m_small_matmul"') == 7 * config.n_layers + 1
  assert text.count('custom_call_target="amd135m_cached_attention"') == config.n_layers
  # A 12-token prompt: XLA's products and attention; 4 sequences of 3 tokens (12 rows): the
  # kernels where they take 16 rows.
  wide = step.trace(params, jnp.zeros((1, 12), jnp.int32), cache).lower().as_text()
  assert "amd135m_small_matmul" not in wide and "amd135m_cached_attention" not in wide
  batch = model_lib.init_cache(config, 4, 24)
  text = step.trace(params, jnp.zeros((4, 3), jnp.int32), batch).lower().compile().as_text()
  expected = 7 * config.n_layers + 1 if cpu_kernels.wide_rows() else 0
  assert text.count('custom_call_target="amd135m_small_matmul"') == expected
  assert text.count('custom_call_target="amd135m_cached_attention"') == config.n_layers
  # The decode layout (quantize.decode_layout): every product through the f32 panel kernel, q, k,
  # v as one and gate, up as one (4 a layer), the head's transposed copy too, whatever the number
  # of rows (a prompt's as well).
  panels = quantize.decode_layout(params, config)
  for tokens, c in ((jnp.zeros((1, 3), jnp.int32), cache), (jnp.zeros((1, 12), jnp.int32), cache),
                    (jnp.zeros((4, 3), jnp.int32), batch)):
    text = step.trace(panels, tokens, c).lower().compile().as_text()
    assert text.count('custom_call_target="amd135m_small_matmul_f32_panels"') == (
        4 * config.n_layers + 1), tokens.shape
    assert 'amd135m_small_matmul"' not in text


def test_switching_it_off_leaves_xla_and_the_same_logits(tmp_path):
  """AMD135M_CPU_KERNELS=0 takes XLA's products; the logits agree to f32 rounding."""
  script = (
      "import sys, numpy as np, jax, jax.numpy as jnp\n"
      "from amd135m import model as m\n"
      "c = m.ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,"
      " max_seq_len=64, tie_embeddings=False)\n"
      "p = m.init_params(c, jax.random.PRNGKey(0))\n"
      "f = jax.jit(lambda p, t, cache: m.forward(p, c, t, cache)[0])\n"
      "t, cache = jnp.arange(4, dtype=jnp.int32)[None], m.init_cache(c, 1, 8)\n"
      "print('kernel' if 'amd135m_small_matmul' in f.trace(p, t, cache).lower().as_text()"
      " else 'xla')\n"
      "np.save(sys.argv[1], np.asarray(f(p, t, cache)))\n")
  outputs = {}
  for switch in ("1", "0"):
    env = dict(os.environ, AMD135M_CPU_KERNELS=switch, JAX_PLATFORMS="cpu")
    path = tmp_path / f"{switch}.npy"
    run = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True,
                         text=True, check=True)
    outputs[run.stdout.strip()] = np.load(path)
  assert set(outputs) == {"kernel", "xla"}
  np.testing.assert_allclose(outputs["kernel"], outputs["xla"], rtol=0, atol=1e-5)
  assert np.abs(outputs["kernel"]).max() > 1e-2


def _attention_inputs(b, t, s, lengths, seed=0):
  rng = np.random.default_rng(seed)
  n, k, h = 9, 3, 64
  shapes = [(b, t, n, h), (b, t, k, h), (b, t, k, h), (b, s, k, h), (b, s, k, h)]
  arrays = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]
  return (*arrays, jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("t,lengths", [(1, [0, 19]), (5, [3, 30]), (8, [0, 32]), (3, [38, 20])])
def test_cached_attention_equals_xla(t, lengths):
  """Ragged rows, an empty cache, a write reaching the last slot and one running past it (dropped,
  as XLA's masked write drops it)."""
  args = _attention_inputs(2, t, 40, lengths)
  reference = functools.partial(attention_lib._cached_attention, dtype="float32")
  ours = jax.jit(lambda *a: cpu_kernels.cached_attention(reference, *a))(*args)
  xla = jax.jit(reference)(*args)
  np.testing.assert_allclose(ours[0], xla[0], rtol=0, atol=2e-6)
  for cache, expected in zip(ours[1:], xla[1:]):
    assert np.array_equal(cache, expected)
  # The caches passed in are left as they were (XLA copies them for the in-place write when the
  # caller keeps them).
  assert np.array_equal(args[3], _attention_inputs(2, t, 40, lengths)[3])
  assert "amd135m_cached_attention" in jax.jit(
      lambda *a: cpu_kernels.cached_attention(reference, *a)).trace(*args).lower().as_text()


def test_a_rows_attention_is_bitwise_the_same_in_a_batch_and_alone():
  """Many rows split the work by kv head (its query heads together), one row by query head:
  each output is the same sums either way, so a batch's step scores what single steps would."""
  lengths = [0, 17, 190, 63, 5, 199]
  args = _attention_inputs(len(lengths), 1, 200, lengths, seed=3)
  reference = functools.partial(attention_lib._cached_attention, dtype="float32")
  attend = jax.jit(lambda *a: cpu_kernels.cached_attention(reference, *a))
  batch = attend(*args)[0]
  for b in range(len(lengths)):
    alone = attend(*(a[b:b + 1] for a in args))[0]
    assert np.array_equal(batch[b], alone[0]), b


def test_cached_attention_gradient_is_xlas():
  args = _attention_inputs(1, 2, 12, [4])
  reference = functools.partial(attention_lib._cached_attention, dtype="float32")
  loss = lambda f: lambda q, k: (f(q, k, *args[2:])[0] ** 2).sum()
  ours = jax.grad(loss(lambda *a: cpu_kernels.cached_attention(reference, *a)), (0, 1))(*args[:2])
  xla = jax.grad(loss(reference), (0, 1))(*args[:2])
  for a, b in zip(ours, xla):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _causal_inputs(b, t, n, k, h, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32)
          for shape in ((b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h))]


def _causal_float64(q, k, v, grad):
  """Dense causal attention and its gradient (dq, dk, dv) for the cotangent grad, in float64."""
  q, k, v, grad = (x.astype(np.float64) for x in (q, k, v, grad))
  b, t, n, h = q.shape
  groups = n // k.shape[2]
  kk, vv = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bnts,bsnh->btnh", p, vv)
  dp = np.einsum("btnh,bsnh->bnts", grad, vv)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(h)
  dq = np.einsum("bnts,bsnh->btnh", ds, kk)
  per_head = lambda x: x.reshape(b, t, n // groups, groups, h).sum(3)
  dk = per_head(np.einsum("bnts,btnh->bsnh", ds, q))
  dv = per_head(np.einsum("bnts,btnh->bsnh", p, grad))
  return out, (dq, dk, dv)


# One token; a 16-wide head (the tiny config's) in two blocks with a tail; SmolLM2's heads (9
# query heads on 3 kv heads) with a 2-row tail block; a single whole block.
CAUSAL_SHAPES = [(1, 1, 2, 1, 16), (2, 100, 4, 2, 16), (2, 130, 9, 3, 64), (1, 64, 2, 2, 32)]


@pytest.mark.parametrize("b,t,n,k,h", CAUSAL_SHAPES)
def test_causal_attention_is_as_exact_as_xlas(b, t, n, k, h):
  """The kernel's output and gradients against float64: within 1e-6 of each tensor's largest
  value (a few f32 ulps; the kernel sums over blocks of 64 keys, XLA's dense form in one
  product), as XLA's f32 form of the same (the dense grouped attention) is."""
  q, k_, v, grad = _causal_inputs(b, t, n, k, h)
  exact_out, exact_grads = _causal_float64(q, k_, v, grad)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  xla = lambda q, k, v: attention_lib.grouped_attention(q, k, v, mask, jnp.float32)[0].reshape(
      q.shape)
  for name, attend in (("kernel", cpu_kernels.causal_attention), ("xla", xla)):
    out, pullback = jax.vjp(jax.jit(attend), q, k_, v)
    for what, ours, exact in zip(("out", "dq", "dk", "dv"), (out, *pullback(grad)),
                                 (exact_out, *exact_grads)):
      error = np.abs(np.asarray(ours, np.float64) - exact).max()
      assert error <= 1e-6 * np.abs(exact).max(), (name, what, error, np.abs(exact).max())
  assert "amd135m_causal_attention" in jax.jit(cpu_kernels.causal_attention).trace(
      q, k_, v).lower().as_text()


def test_causal_attention_errors_are_xlas_on_realistic_scores():
  """Queries and keys scaled 3x (scores of a few tens, as trained models have): the kernel's RMS
  error against float64, over 5 draws, within 1.2x of XLA's for the output and each gradient.
  (From the log-sum-exp rather than each row's max and sum, or from dO . O rather than the rows'
  P . dP, the gradients' errors were 1.4-2x XLA's; one chain of 64 FMAs a score, the output's.)"""
  b, t, n, k, h = 1, 200, 9, 3, 64
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  xla = jax.jit(lambda q, k, v: attention_lib.grouped_attention(q, k, v, mask, jnp.float32)[0]
                .reshape(q.shape))
  errors = {"kernel": np.zeros(4), "xla": np.zeros(4)}
  for seed in range(5):
    q, k_, v, grad = _causal_inputs(b, t, n, k, h, seed=seed)
    q, k_ = 3 * q, 3 * k_
    exact = _causal_float64(q, k_, v, grad)
    exact = (exact[0], *exact[1])
    for name, attend in (("kernel", jax.jit(cpu_kernels.causal_attention)), ("xla", xla)):
      out, pullback = jax.vjp(attend, q, k_, v)
      errors[name] += [np.sqrt(np.mean((np.asarray(a, np.float64) - e) ** 2) / np.mean(e ** 2))
                       for a, e in zip((out, *pullback(grad)), exact)]
  assert np.all(errors["kernel"] <= 1.2 * errors["xla"]), errors


def test_causal_attention_never_reads_later_keys():
  """Keys and values after a position change nothing before it, bitwise, and get no gradient
  from it; they do change what comes after."""
  q, k, v, _ = _causal_inputs(1, 150, 4, 2, 16, seed=2)
  attend = jax.jit(cpu_kernels.causal_attention)
  t0 = 70
  out = attend(q, k, v)
  k2, v2 = k.copy(), v.copy()
  k2[:, t0 + 1:], v2[:, t0 + 1:] = 30.0, -30.0
  changed = attend(q, k2, v2)
  assert np.array_equal(out[:, :t0 + 1], changed[:, :t0 + 1])
  assert np.abs(np.asarray(out[:, t0 + 1:]) - np.asarray(changed[:, t0 + 1:])).min() > 0
  dk, dv = jax.grad(lambda k, v: attend(q, k, v)[:, :t0 + 1].sum(), (0, 1))(k, v)
  assert np.all(np.asarray(dk)[:, t0 + 1:] == 0) and np.all(np.asarray(dv)[:, t0 + 1:] == 0)
  assert np.abs(np.asarray(dk)[:, :t0 + 1]).max() > 0


def test_a_one_device_train_step_attends_through_the_kernel():
  """compile_step on a one-device mesh: the attention's forward and backward in the kernel, once
  per layer each; the sharded step (allow_cpu_kernels=False) keeps XLA's form."""
  from amd135m.training import step as step_lib
  config = model_lib.ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                 ffn_dim=48, max_seq_len=128, tie_embeddings=True)
  params = model_lib.init_params(config, jax.random.PRNGKey(0))
  batch = {"inputs": jnp.zeros((2, 100), jnp.int32), "targets": jnp.ones((2, 100), jnp.int32)}
  for allow, count in ((True, config.n_layers), (False, 0)):
    grads = jax.jit(lambda p, b: step_lib.loss_and_grads(p, config, b, 1,
                                                        allow_cpu_kernels=allow))
    text = grads.trace(params, batch).lower().compile().as_text()
    assert text.count('custom_call_target="amd135m_causal_attention"') == count
    assert text.count('custom_call_target="amd135m_causal_attention_backward"') == count


def test_without_a_compiler_xla_does_the_work(tmp_path):
  """A machine where the kernels cannot be built warns once and runs everything through XLA."""
  script = (
      "import jax, jax.numpy as jnp\n"
      "from amd135m import cpu_kernels\n"
      "x, w = jnp.ones((2, 16)), jnp.ones((16, 8))\n"
      "f = jax.jit(lambda x, w: cpu_kernels.matmul(x, w))\n"
      "assert 'amd135m_small_matmul' not in f.trace(x, w).lower().as_text()\n"
      "assert float(f(x, w)[0, 0]) == 16.0\n"
      "print(cpu_kernels.available())\n")
  env = dict(os.environ, AMD135M_CACHE=str(tmp_path), CXX="/bin/false", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       check=True)
  assert run.stdout.strip() == "False"
  assert "the CPU kernels are unavailable" in run.stderr
  assert not list(tmp_path.glob("kernels/*.so"))

"""CPU kernels for decode steps and speculative verifications (C++ in csrc/small_matmul.cc).

A decode step multiplies one row by every weight, a speculative verification gamma + 1 rows. On
CPUs XLA runs the first as a matrix-vector kernel and the second as a GEMM that packs the weight
on every call, so verifying 5 tokens cost 1.6 single-token steps where reading the weights once
should cost about 1. `matmul` sends products of 1-8 f32 rows to a kernel that streams each weight
once for all rows (f32 weights, or bf16 widened in registers: half the bytes, the same sums),
`matmul_int8` integer products with int8 weights (a quarter of the bytes), `matmul_int4` with
4-bit ones in GGUF's Q4_1 arithmetic (a scale and a minimum per 32 inputs: 3/16 of the bytes), and
`cached_attention` does a layer's cached attention for 1-8 new tokens in one call (XLA ran it as
a dozen small ops scoring every cache slot). `matmul_panels` multiplies weights stored as panels
(quantize.F32Panels, the decode layout of f32 params, and quantize.Bf16Weight): each thread's
share one contiguous stream, a row group's sums in registers over all of K. Everything else (more
rows with row-major weights, other dtypes, GPUs, gradients) stays with XLA.

The kernels are compiled with the system's C++ compiler on first use and cached per CPU under
$AMD135M_CACHE/kernels. Each product is split over the cores (at most 8; AMD135M_KERNEL_THREADS=N
sets N). Without a compiler, or with AMD135M_CPU_KERNELS=0, XLA does all of it
(the numbers agree to f32 rounding; only speed differs).
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp

from amd135m import paths, precision

MAX_ROWS = 8
_SOURCE = pathlib.Path(__file__).parent / "csrc" / "small_matmul.cc"
_TARGET = "amd135m_small_matmul"
_BF16 = "amd135m_small_matmul_bf16"
_ATTENTION = "amd135m_cached_attention"
_INT8 = "amd135m_small_matmul_int8"
_INT4 = "amd135m_small_matmul_int4"
_PANELS = "amd135m_small_matmul_bf16_panels"
_F32_PANELS = "amd135m_small_matmul_f32_panels"
_CAUSAL = "amd135m_causal_attention"
_CAUSAL_BACKWARD = "amd135m_causal_attention_backward"


def _cpu_signature() -> str:
  """What -march=native compiles for: the CPU model and its flags."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(lines)
  except OSError:
    return platform.processor()


def _compile() -> pathlib.Path:
  source = _SOURCE.read_bytes()
  key = hashlib.sha256(source + jax.__version__.encode() + _cpu_signature().encode()).hexdigest()
  target = pathlib.Path(paths.cache_path("kernels")) / f"small_matmul-{key[:16]}.so"
  if target.exists():
    return target
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise RuntimeError("no C++ compiler (g++) on PATH")
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built beside the target and renamed into place, so concurrent processes never load half a file.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / target.name
    command = [compiler, "-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared",
               "-fPIC", "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(built, target)
  return target


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered with XLA (compiling them on first call): on
  hosts whose default JAX backend is the CPU, where jit places the programs that call them. (A
  program lowered there for another platform must run with AMD135M_CPU_KERNELS=0.)"""
  if os.environ.get("AMD135M_CPU_KERNELS", "1") == "0" or jax.default_backend() != "cpu":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(_compile()))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.Amd135mSmallMatmul),
                                platform="cpu")
    jax.ffi.register_ffi_target(_ATTENTION, jax.ffi.pycapsule(library.Amd135mCachedAttention),
                                platform="cpu")
    jax.ffi.register_ffi_target(_INT8, jax.ffi.pycapsule(library.Amd135mSmallMatmulInt8),
                                platform="cpu")
    jax.ffi.register_ffi_target(_BF16, jax.ffi.pycapsule(library.Amd135mSmallMatmulBf16),
                                platform="cpu")
    jax.ffi.register_ffi_target(_INT4, jax.ffi.pycapsule(library.Amd135mSmallMatmulInt4),
                                platform="cpu")
    jax.ffi.register_ffi_target(_PANELS,
                                jax.ffi.pycapsule(library.Amd135mSmallMatmulBf16Panels),
                                platform="cpu")
    jax.ffi.register_ffi_target(_F32_PANELS,
                                jax.ffi.pycapsule(library.Amd135mSmallMatmulF32Panels),
                                platform="cpu")
    jax.ffi.register_ffi_target(_CAUSAL, jax.ffi.pycapsule(library.Amd135mCausalAttention),
                                platform="cpu")
    jax.ffi.register_ffi_target(_CAUSAL_BACKWARD,
                                jax.ffi.pycapsule(library.Amd135mCausalAttentionBackward),
                                platform="cpu")
    return True
  except (OSError, RuntimeError) as e:
    warnings.warn(f"amd135m: the CPU kernels are unavailable, XLA does their work "
                  f"({str(e).splitlines()[0]})", stacklevel=2)
    return False


def _kernel(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
  if not available():
    raise RuntimeError("the CPU kernels are unavailable (see the warning above)")
  n = w.shape[0] if transposed else w.shape[1]
  target = _BF16 if w.dtype == jnp.bfloat16 else _TARGET
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                          vmap_method="sequential")
  return call(x, w, transposed=transposed)


@functools.cache
def native_bf16_dot() -> bool:
  """Whether this host's CPU multiplies bf16 pairs in hardware (AVX512-BF16 or AMX-BF16), where
  XLA's bf16 GEMM with f32 accumulation runs ~1.9x its f32 GEMM (400 vs 215 GFLOP/s on a 2-core
  Zen 4 for 512 x 576 x 1536; docs/RESULTS.md)."""
  flags = _cpu_signature().split()
  return "avx512_bf16" in flags or "amx_bf16" in flags


def _xla(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
  if x.dtype != jnp.float32:  # a bf16 model (training or inference): f32 accumulation
    return precision.einsum("NI,OI->NO" if transposed else "NI,IO->NO", x, w.astype(x.dtype))
  # dot_general rather than einsum: this is traced some 240 times per SmolLM2 program.
  return _bf16_aware_dot(x, w, (((1,), (1 if transposed else 0,)), ((), ())))


def _bf16_aware_dot(x: jax.Array, w: jax.Array, dims) -> jax.Array:
  """XLA's dot of f32 rows with a weight. A prefill's many rows with a bf16 weight, on a CPU with
  bf16 dot instructions: the rows are rounded to bf16 for the product and it accumulates in f32
  (transformers' bf16 arithmetic, XLA's bf16 GEMM at ~1.9x the f32 one); decode steps and
  verifications (1-8 rows) keep f32 rows in the kernel. Otherwise the weight widened to x's
  dtype: the kernel's arithmetic (XLA fuses the convert)."""
  if (w.dtype == jnp.bfloat16 and x.dtype == jnp.float32 and x.shape[0] > MAX_ROWS
      and jax.default_backend() == "cpu" and native_bf16_dot()):
    return jax.lax.dot_general(x.astype(jnp.bfloat16), w, dims,
                               preferred_element_type=jnp.float32)
  return jax.lax.dot_general(x, w.astype(x.dtype), dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _small_matmul(x, w, transposed):
  # Decided when tracing (available()), not by lax.platform_dependent, which traced both
  # branches at each of a SmolLM2 program's 241 kernel calls: seconds of every first generate.
  return _kernel(x, w, transposed)


def _forward(x, w, transposed):
  return _small_matmul(x, w, transposed), (x, w)


def _backward(transposed, residuals, g):
  x, w = residuals
  _, pullback = jax.vjp(lambda x, w: _xla(x, w, transposed), x, w)
  return pullback(g)


_small_matmul.defvjp(_forward, _backward)


def matmul(x: jax.Array, w: jax.Array, transposed: bool = False, *, wide: bool = False
           ) -> jax.Array:
  """x [M, K] @ w [K, N] (or @ w.T for w [N, K] when transposed), in x's dtype: the kernel for 1-8
  f32 rows with f32 or bf16 weights on a CPU-capable build, XLA's dot otherwise (a bf16 weight
  widened to x's dtype, as the kernel does in registers; or, for more rows on a CPU with bf16 dot
  instructions, the rows rounded to bf16 and the products accumulated in f32: see _xla).
  wide: the rows come from sequences of 8 or fewer new tokens each (a batch's decode step or
  verification); then 9-16 of them with an f32 weight go to the kernel too where wide_rows().
  Longer prompts keep XLA's product and its summation order."""
  if (x.dtype == jnp.float32 and w.dtype in (jnp.float32, jnp.bfloat16) and x.ndim == 2
      and w.ndim == 2 and available()
      and (x.shape[0] <= MAX_ROWS or (wide and x.shape[0] <= WIDE_ROWS
                                      and w.dtype == jnp.float32 and wide_rows()))):
    return _small_matmul(x, w, transposed)
  return _xla(x, w, transposed)


WIDE_ROWS = 16


@functools.cache
def wide_rows() -> bool:
  """Whether 9-16 f32 rows times an f32 weight go through the kernel too (`matmul(wide=True)`: a
  batch of 4 verifying 2-3 tokens a row): on AVX-512 hosts, where 12 rows' accumulators, or two
  groups of 8, fit the registers in one pass over the weight. On a 2-core Zen 4, SmolLM2
  forwards of 4 rows x 3 tokens 54-65 -> 39-45 ms, 4 x 4 58-64 -> 47-51 against XLA's GEMM,
  which packs the weight on every call (docs/RESULTS.md); on the Intel Xeon kind (AVX-512 too)
  it is on but not yet timed. AVX2 hosts (16 registers) keep XLA's product: not measured there."""
  return "avx512f" in _cpu_signature().split()


PANEL = 64  # output columns per panel of a bf16 weight stored as panels (quantize.Bf16Weight)
F32_PANEL = 32  # and of an f32 one (quantize.F32Panels): 2 vectors a row, 12 rows in registers


def to_panels(w: jax.Array, width: int = PANEL) -> jax.Array:
  """w [K, N] -> [ceil(N / width), K, width], the last panel padded with zeros."""
  k, n = w.shape
  panels = -(-n // width)
  w = jnp.pad(w, ((0, 0), (0, panels * width - n)))
  return w.reshape(k, panels, width).transpose(1, 0, 2)


def from_panels(panels: jax.Array, n: int) -> jax.Array:
  """The inverse of to_panels: [P, K, width] -> [K, n]."""
  p, k, width = panels.shape
  return panels.transpose(1, 0, 2).reshape(k, p * width)[:, :n]


def matmul_panels(x: jax.Array, panels: jax.Array, n: int) -> jax.Array:
  """x [M, K] @ w [K, n] for a weight stored as panels (to_panels): bf16 panels of PANEL columns
  or f32 ones of F32_PANEL.

  bf16: the panel kernel for 1-16 f32 rows (bitwise the row-major kernel's sums: each output
  summed over k in order), otherwise XLA with `matmul`'s arithmetic (rows rounded to bf16 on CPUs
  with bf16 dots, else f32).
  f32: the f32 panel kernel for any number of f32 rows, each output summed over k in order (as
  the row-major kernel does): decode steps and verifications stream the weight at nearly one
  row's pace, and a prompt's rows go 12 at a time over each panel while it is in L2, split with
  XLA's own threads from 64 rows on (a 512-token prefill as fast as XLA's GEMM on row-major
  weights: docs/RESULTS.md). XLA's product
  of the panels copies the weight on every call (a 24-token SmolLM2 forward 93 -> 235 ms), so it
  is only the fallback where the kernels are unavailable."""
  if x.dtype == jnp.float32 and x.ndim == 2 and available():
    if panels.dtype == jnp.float32:
      return jax.ffi.ffi_call(_F32_PANELS, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                              vmap_method="sequential")(x, panels)
    if panels.dtype == jnp.bfloat16 and x.shape[0] <= 2 * MAX_ROWS:
      # Up to 16 rows (a short prompt) the kernel, 8 rows a call: XLA's product took the first
      # token of a 7-token prompt (16 rows) from 45 to 99 ms.
      call = lambda rows, panels: jax.ffi.ffi_call(
          _PANELS, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32),
          vmap_method="sequential")(rows, panels)
      return _in_chunks(call, x, panels)
  # XLA contracts the panels as they lie ([M, K] . [P, K, PANEL] -> [M, P, PANEL]): putting the
  # weight back together first cost a transposing copy per product (a 512-token prefill ran
  # 800 tokens/s instead of 1100).
  out = _bf16_aware_dot(x, panels, (((1,), (1,)), ((), ())))
  return out.reshape(x.shape[0], -1)[:, :n]


INT8_BLOCK = 32  # inputs per activation scale
# Up to this many rows an int8 or int4 product runs the kernel 8 rows at a time rather than XLA's
# form, which widens the whole weight to f32 on every call: a 16-token SmolLM2 prefill took
# 41 ms instead of 209 (int8), 64 tokens 174 instead of 316; at 256 the two are even (Zen 4).
CHUNKED_ROWS = 128


def _in_chunks(kernel, x, *operands):
  """kernel over x's rows MAX_ROWS at a time (each row is its one-row product either way)."""
  x = x.astype(jnp.float32)
  return jnp.concatenate([kernel(x[i:i + MAX_ROWS], *operands)
                          for i in range(0, x.shape[0], MAX_ROWS)], axis=0)


ROW_GROUP = 4  # output rows of an int8 or int4 weight interleaved by block (to_row_groups)


def to_row_groups(values: jax.Array, block: int = INT8_BLOCK) -> jax.Array:
  """A weight's rows [N, W] (int8 values, K = W; or int4 nibbles, 16 bytes a block) -> row groups
  [ceil(N / ROW_GROUP), ceil(W / block), ROW_GROUP, block]: block b of a group's ROW_GROUP rows
  side by side, then block b + 1, so the kernel reads a thread's share as one stream (2x the
  bytes per second of the rows as they lie; docs/RESULTS.md). Padded with zeros."""
  n, w = values.shape
  groups, blocks = -(-n // ROW_GROUP), -(-w // block)
  values = jnp.pad(values, ((0, groups * ROW_GROUP - n), (0, blocks * block - w)))
  return values.reshape(groups, ROW_GROUP, blocks, block).transpose(0, 2, 1, 3)


def from_row_groups(groups: jax.Array, n: int, w: int) -> jax.Array:
  """The inverse of to_row_groups: [G, B, ROW_GROUP, block] -> [n, w]."""
  g, b, _, block = groups.shape
  return groups.transpose(0, 2, 1, 3).reshape(g * ROW_GROUP, b * block)[:n, :w]


def _int8_kernel(x, groups, scale):
  if not available():
    raise RuntimeError("the CPU kernels are unavailable (see the warning above)")
  call = jax.ffi.ffi_call(_INT8, jax.ShapeDtypeStruct((x.shape[0], scale.shape[0]), jnp.float32),
                          vmap_method="sequential")
  return call(x, groups, scale)


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [M, K] f32 as int8 per row and block of INT8_BLOCK inputs, as the kernel does: q [M, B,
  INT8_BLOCK] (f32 holding integers; K padded with zeros) and scales [M, B] = max |x| / 127 over
  the block, q = x / scale rounded to nearest even (0 where the block is all zero)."""
  m, k = x.shape
  blocks = -(-k // INT8_BLOCK)
  x = jnp.pad(x, ((0, 0), (0, blocks * INT8_BLOCK - k))).reshape(m, blocks, INT8_BLOCK)
  scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
  safe = jnp.where(scale > 0, scale, 1.0)[..., None]
  q = jnp.where(scale[..., None] > 0, jnp.clip(jnp.round(x / safe), -127, 127), 0.0)
  return q, scale


def int8_reference(x, groups, scale):
  """XLA's form of matmul_int8: the same operands (x quantized per block as the kernel does, the
  int8 weight's row groups, its scales) multiplied as f32 in one contraction over the groups as
  they lie, so a prefill's hundreds of rows run at XLA's GEMM speed; the sums differ from the
  kernel's exact per-block integer dots by f32 rounding only (each dequantized activation q * sx
  rounded once, then XLA's summation order)."""
  m = x.shape[0]
  q, x_scale = quantize_activations(x.astype(jnp.float32))
  activations = q * x_scale[..., None]                                           # [M, B, 32]
  out = jnp.einsum("MBi,GBji->MGj", activations, groups.astype(jnp.float32))
  return out.reshape(m, -1)[:, :scale.shape[0]] * scale


def matmul_int8(x: jax.Array, groups: jax.Array, scale: jax.Array) -> jax.Array:
  """x [M, K] @ (values * scale[:, None]).T for int8 values [N, K] (a weight as [out, in], one
  f32 scale per output) stored as row groups (to_row_groups), with x quantized to int8 per block
  of 32 inputs (llama.cpp's Q8_0 products): integer dot products in a kernel on CPUs with AVX2
  (up to CHUNKED_ROWS rows, 8 at a time), XLA's equal arithmetic (int8_reference) otherwise. No
  gradient: inference weights."""
  if x.shape[0] <= CHUNKED_ROWS and x.ndim == 2 and available():
    return _in_chunks(_int8_kernel, x, groups, scale)
  return int8_reference(x, groups, scale)


def _int4_kernel(x, nibbles, scale, minimum):
  if not available():
    raise RuntimeError("the CPU kernels are unavailable (see the warning above)")
  call = jax.ffi.ffi_call(_INT4, jax.ShapeDtypeStruct((x.shape[0], scale.shape[0]),
                                                      jnp.float32), vmap_method="sequential")
  return call(x, nibbles, scale, minimum)


def unpack_nibbles(nibbles: jax.Array) -> jax.Array:
  """uint8 [..., 16] (a block of 32 inputs: byte i holds input i in its low nibble and input
  16 + i in its high one, as GGUF's Q4_1) -> the 4-bit values [..., 32] as uint8."""
  return jnp.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1)


def int4_reference(x, nibbles, scale, minimum):
  """XLA's form of matmul_int4: x quantized per block as the kernel does, times the weight it
  stands for (scale * u + minimum per block), as f32 in one contraction over the row groups as
  they lie; the sums differ from the kernel's per-block integer dots by f32 rounding only."""
  m, n = x.shape[0], scale.shape[0]
  q, x_scale = quantize_activations(x.astype(jnp.float32))
  activations = q * x_scale[..., None]                                           # [M, B, 32]
  grouped = lambda a: to_row_groups(a, a.shape[1])[:, 0].transpose(0, 2, 1)      # [G, B, 4]
  weight = (unpack_nibbles(nibbles).astype(jnp.float32) * grouped(scale)[..., None]
            + grouped(minimum)[..., None])                                       # [G, B, 4, 32]
  return jnp.einsum("MBi,GBji->MGj", activations, weight).reshape(m, -1)[:, :n]


def matmul_int4(x: jax.Array, nibbles: jax.Array, scale: jax.Array,
                minimum: jax.Array) -> jax.Array:
  """x [M, K] @ W.T for a 4-bit weight W [N, K] stored as nibbles in row groups (to_row_groups
  of [N, B * 16], 16 bytes a block) with a scale and a minimum [N, B] per block of 32 inputs (B =
  ceil(K / 32); quantize.Int4Weight), x quantized to int8 per block as for matmul_int8: integer
  dot products in a kernel on CPUs with AVX2 (up to CHUNKED_ROWS rows, 8 at a time), XLA's equal
  arithmetic (int4_reference) otherwise. No gradient: inference weights."""
  if x.shape[0] <= CHUNKED_ROWS and x.ndim == 2 and available():
    return _in_chunks(_int4_kernel, x, nibbles, scale, minimum)
  return int4_reference(x, nibbles, scale, minimum)


# ---------------------------------------------------------------------------------------------
# Cached attention for 1-8 new tokens per row: one call per layer instead of XLA's dozen ops.

def attention_applies(q: jax.Array, k_cache: jax.Array, dtype) -> bool:
  """Whether cached_attention takes this layer: f32 throughout, 1-8 new tokens per row, a head
  dimension in whole 16-lane vectors."""
  return (q.shape[1] <= MAX_ROWS and q.shape[-1] % 16 == 0 and q.dtype == jnp.float32
          and k_cache.dtype == jnp.float32 and jnp.dtype(dtype) == jnp.float32 and available())


def _attention_kernel(q, k, v, k_cache, v_cache, length):
  if not available():
    raise RuntimeError("the CPU kernels are unavailable (see the warning above)")
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  cache = jax.ShapeDtypeStruct(k_cache.shape, jnp.float32)
  # The caches are aliased to the results: the kernel writes the new slots in place.
  call = jax.ffi.ffi_call(_ATTENTION, (out, cache, cache), vmap_method="sequential",
                          input_output_aliases={3: 1, 4: 2})
  return call(q, k, v, k_cache, v_cache, length.astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def cached_attention(reference, q, k, v, k_cache, v_cache, length):
  """reference(q, k, v, k_cache, v_cache, length) -> (out [B, T, N, H], k_cache, v_cache): XLA's
  form, which this computes in one kernel call (callers check attention_applies); the reference
  gives the gradient. q [B, T, N, H]; k, v [B, T, K, H]; caches [B, S, K, H]; length [B]."""
  return _attention_kernel(q, k, v, k_cache, v_cache, length)


def _attention_forward(reference, *args):
  return cached_attention(reference, *args), args


def _attention_backward(reference, args, g):
  return jax.vjp(reference, *args)[1](g)


cached_attention.defvjp(_attention_forward, _attention_backward)


def causal_attention_applies(q: jax.Array, k: jax.Array, dtype) -> bool:
  """Whether causal_attention takes this layer's attention: f32 throughout, a head dimension in
  whole 16-lane vectors, on a CPU-capable build."""
  return (q.dtype == jnp.float32 and k.dtype == jnp.float32 and jnp.dtype(dtype) == jnp.float32
          and q.shape[-1] % 16 == 0 and q.shape[1] > 0 and available())


def _causal_forward_call(q, k, v):
  if not available():
    raise RuntimeError("the CPU kernels are unavailable (see the warning above)")
  b, t, n, _ = q.shape
  call = jax.ffi.ffi_call(_CAUSAL, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                    jax.ShapeDtypeStruct((b, n, t, 2), jnp.float32)),
                          vmap_method="sequential")
  return call(q, k, v)


@jax.custom_vjp
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention with a causal mask and no cache, softmax(q k^T / sqrt(H)) v per head, in
  one kernel call (blocks of 64 x 64 in local buffers, FlashAttention's online softmax; the
  backward recomputes the probabilities from each row's max and softmax sum, FlashAttention-2).
  q [B, T, N, H]; k, v [B, T, K, H] (query head n reads kv head n // (N / K)). Returns [B, T, N,
  H]. As exact as XLA's form against float64 (tests/test_cpu_kernels.py). Callers check
  causal_attention_applies."""
  return _causal_forward_call(q, k, v)[0]


def _causal_forward(q, k, v):
  out, stats = _causal_forward_call(q, k, v)
  return out, (q, k, v, stats)


def _causal_backward(residuals, g):
  q, k, v, stats = residuals
  call = jax.ffi.ffi_call(_CAUSAL_BACKWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                             jax.ShapeDtypeStruct(k.shape, jnp.float32),
                                             jax.ShapeDtypeStruct(v.shape, jnp.float32)),
                          vmap_method="sequential")
  return call(q, k, v, stats, g.astype(jnp.float32))


causal_attention.defvjp(_causal_forward, _causal_backward)

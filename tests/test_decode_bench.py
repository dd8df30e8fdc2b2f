"""bench decode's measurement (amd135m/benchmarks/decode_bench.py) on a tiny random model: every
precision measured, the bytes a step reads in each stored dtype, a roofline share that cannot
pass 100%, and one line for a bad --weights. Its timings are a benchmark, never asserted."""
import subprocess
import sys

import jax
import pytest

from amd135m import model as model_lib
from amd135m.benchmarks import decode_bench
from amd135m.errors import UserError

CONFIG = model_lib.ModelConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                               ffn_dim=256, max_seq_len=256, tie_embeddings=True)


def test_every_precision_is_measured_with_its_bytes_and_a_bounded_roofline():
  params = model_lib.init_params(CONFIG, jax.random.key(0))
  r = decode_bench.measure_decode(CONFIG, params, [1, 5, 9], list(range(1, 33)),
                                  ("f32", "bf16", "int8", "int4"), new_tokens=4, runs=1,
                                  read_bytes=1 << 24)
  assert list(r["ours"]) == ["f32", "bf16", "int8", "int4"] and r["speedup"]["f32"] == 1
  ours = r["ours"]
  for o in ours.values():
    assert o["tokens_per_second"] > 0 and o["prefill_tokens_per_second"] > 0
    assert o["first_token_seconds"] > 0 and len(o["decode_seconds"]) == 1
    assert 0 < o["roofline_share"] <= 1
  # The matrices dominate: bf16 reads about half of f32's bytes, int8 about a quarter (+ scales)
  kv = 2 * CONFIG.n_layers * CONFIG.n_kv_heads * CONFIG.head_dim * 4 * (3 + 4 / 2)
  matrices = ours["f32"]["bytes_per_token"] - kv
  assert abs((ours["bf16"]["bytes_per_token"] - kv) / matrices - 0.5) < 0.01
  assert 0.25 < (ours["int8"]["bytes_per_token"] - kv) / matrices < 0.27
  # int4: 4 bits and two f32 per 32 weights in the layers (3/16 of f32), the embedding int8
  layers = sum(x.nbytes for name, layer in params.items() if name.startswith("layers_")
               for x in jax.tree.leaves(layer) if x.ndim == 2)
  embedding = params["embed_tokens"]["embedding"].nbytes
  expected = layers * 3 / 16 + embedding / 4 + CONFIG.vocab_size * 4  # + the int8 scales
  assert abs(ours["int4"]["bytes_per_token"] - kv - expected) / expected < 0.02
  assert r["roofline"]["bandwidth_gb_s"] >= r["roofline"]["read_bandwidth_gb_s"] > 0


def test_bad_weights_and_references_are_one_line():
  with pytest.raises(UserError, match="choose from f32,bf16,int8,int4"):
    decode_bench.bench_decode("unused.gguf", ("f32", "int3"))
  with pytest.raises(UserError, match="choose from f32,bf16"):
    decode_bench.bench_decode("unused.gguf", ("f32",), ("fp8",))
  proc = subprocess.run([sys.executable, "-m", "amd135m.bench", "decode", "--model", "x.gguf",
                         "--weights", "f32,int2"], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "amd135m.bench: error: --weights f32,int2: choose from f32,bf16,int8,int4"]

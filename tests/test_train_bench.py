"""`python -m amd135m.bench train` as a user runs it: both steps run and are timed; the rates and
MFU follow from the timings, the hand-counted FLOPs and the measured peak."""
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_train_times_the_same_training_on_both_sides():
  """Both sides start from our initial weights and take our batches at our schedule's lr (the
  runlocal warmup: 0, 1e-3, 2e-3), so their losses agree step by step; tokens/s and MFU follow
  from the timed steps."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "amd135m.bench", "train", "--config", "configs/tiny.py:runlocal",
       "--batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1", "--matmul-n", "256",
       "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  ours, torch = result["ours"], result["transformers"]
  assert result["tokens_per_step"] == 64 and ours["dtype"] == "float32"
  # tiny, untied: per layer q, o 64x64, k, v 64x32, mlp 3 x 64x128, 2 norms; a final norm; the
  # head 64x512 (the input embedding is a lookup) -> N = 106816; attention 12 * L * T * d.
  assert result["flops_per_token"] == 6 * 106816 + 12 * 2 * 32 * 64
  peak = result["peak"]
  assert len(peak["measured"]) == 2 and peak["flops_per_second"] == max(peak["measured"]) > 0
  for side in (ours, torch):
    assert len(side["step_seconds"]) == 2 and len(side["losses"]) == 3  # + the untimed first
    assert side["median_step_seconds"] == statistics.median(side["step_seconds"]) > 0
    assert math.isclose(side["tokens_per_second"], 64 / side["median_step_seconds"])
    assert math.isclose(side["mfu"], result["flops_per_token"] * side["tokens_per_second"]
                        / peak["flops_per_second"])
    assert side["mfu"] < 1.5  # a measured peak can be beaten a little, not many times
  assert math.isclose(result["ratio"], ours["tokens_per_second"] / torch["tokens_per_second"])
  # The same loss, weights, batches and updates: f32 on both sides, 2e-7 measured.
  assert result["loss_difference"] == max(abs(a - b) / abs(b)
                                          for a, b in zip(ours["losses"], torch["losses"]))
  assert result["loss_difference"] < 1e-5, (ours["losses"], torch["losses"])
  assert len(set(ours["losses"])) == 3  # three batches, two updates: not one loss repeated
  # Random init (std 0.02) on uniform tokens: the first loss is ~ln(vocab), a mean over tokens.
  assert abs(ours["losses"][0] - math.log(512)) < 0.05, ours["losses"]
  assert result["provenance"]["device"]["platform"] == "cpu"


def test_bench_train_refuses_a_sequence_longer_than_the_model():
  proc = subprocess.run(
      [sys.executable, "-m", "amd135m.bench", "train", "--config", "configs/tiny.py",
       "--seq-len", "100000", "--no-reference"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("amd135m.bench: error: --seq-len 100000 exceeds")

"""`python -m amd135m.bench train` as a user runs it: both steps run, on the same loss."""
import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_train_runs_ours_and_transformers_on_the_same_loss():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "amd135m.bench", "train", "--config", "configs/tiny.py", "--batch",
       "2", "--seq-len", "32", "--steps", "2", "--warmup", "1", "--matmul-n", "256", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  ours, torch = result["ours"], result["transformers"]
  assert result["tokens_per_step"] == 64 and ours["dtype"] == "float32"
  for side in (ours, torch):
    assert len(side["step_seconds"]) == 2 and side["tokens_per_second"] > 0
    assert 0 < side["mfu"] < 1.5  # a measured peak can be beaten a little, not many times
  assert math.isclose(result["ratio"], ours["tokens_per_second"] / torch["tokens_per_second"])
  # Random init (std 0.02) on uniform tokens: both losses start at ~ln(vocab), the mean per token
  # (a summed or unshifted loss on either side would be far off).
  for side in (ours, torch):
    assert abs(side["losses"][0] - math.log(512)) < 0.05, side["losses"]
  assert result["provenance"]["device"]["platform"] == "cpu"


def test_bench_train_refuses_a_sequence_longer_than_the_model():
  proc = subprocess.run(
      [sys.executable, "-m", "amd135m.bench", "train", "--config", "configs/tiny.py",
       "--seq-len", "100000", "--no-reference"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("amd135m.bench: error: --seq-len 100000 exceeds")

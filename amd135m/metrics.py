"""Training metrics out: metrics.jsonl, TensorBoard event files, a progress bar, peak FLOP/s."""
import hashlib
import json
import pathlib
import sys
import time

import numpy as np

# Dense peak FLOP/s per device for MFU (bf16 unless noted), from the vendors' data sheets.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "AMD Instinct MI250X": 191.5e12,  # per GCD (383 TFLOP/s per two-GCD package)
    "AMD Instinct MI250": 181e12,     # per GCD (362 TFLOP/s per package)
}


def measured_matmul_flops(n: int = 1024, runs: int = 5) -> float:
  """The best f32 FLOP/s of an n^3 matmul on the default device (CPU MFU's denominator)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(runs):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops(configured: float = 0.0) -> float:
  """Per-device peak: the configured value, else the data-sheet table, else measured (CPU)."""
  if configured > 0:
    return configured
  import jax
  device = jax.devices()[0]
  for name, flops in PEAK_FLOPS.items():
    if device.device_kind.startswith(name):
      return flops
  if device.platform == "cpu":
    return measured_matmul_flops()
  return 0.0  # unknown accelerator: MFU is reported as NaN rather than guessed


class MetricsWriter:
  """Appends {'step', ...} lines to workdir/metrics.jsonl and scalars to TensorBoard.

  On resume from step s, lines after s (written by a run that died before its next checkpoint)
  are dropped, so the file reads as one uninterrupted run."""

  def __init__(self, workdir, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self._tb = None
    if not enabled:
      return
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    self._file = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=resume_step + 1)
    except ImportError:  # TensorBoard files are a convenience; metrics.jsonl is the record
      self._tb = None

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps({"step": step, **record}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if isinstance(value, (int, float)) and np.isfinite(value):
          self._tb.add_scalar(key.replace("_", "/", 1), value, step)

  def batch_hashes(self, step: int, rows: np.ndarray, process_index: int) -> None:
    """Per-row sha1 of a process's batch rows (every process writes its own file)."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    path = self.workdir / f"batch_hashes.p{process_index}.jsonl"
    hashes = [hashlib.sha1(np.ascontiguousarray(row).tobytes()).hexdigest() for row in rows]
    with open(path, "a") as f:
      f.write(json.dumps({"step": step, "rows": hashes}) + "\n")

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


class _NoBar:
  def update(self, n=1):
    pass

  def set_postfix(self, **kwargs):
    pass

  def reset(self, total=None):
    pass

  def close(self):
    pass


def progress_bar(total: int, initial: int, enabled: bool = True):
  """tqdm on stderr with ETA (process 0 only), or a silent stand-in."""
  if not enabled:
    return _NoBar()
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
              mininterval=1.0)

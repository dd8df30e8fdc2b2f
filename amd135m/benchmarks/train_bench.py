"""python -m amd135m.bench train: tokens/s and MFU of our train step and of transformers'.

In one run: (a) our jitted step (`training.step.compile_step` on a 1-device mesh, AdamW as the
config says, synthetic token batches); (b) transformers' LlamaForCausalLM step on torch with the
same model, batch, sequence length, loss and optimizer (torch.optim.AdamW with the config's betas,
eps, weight decay and mask, global-norm clipping), started from our initial weights (exported to
Hugging Face format) and fed our batches at our schedule's lr, in a subprocess
(hf_bench/train_step.py) so this package never imports torch. The two take their steps in turn
(ours, theirs, ours, ...), so a shared machine's varying load falls on both alike; each reports
the median of its timed steps after compile and warm-up, and their losses must agree step by step
(`loss_difference`, the largest relative gap: both sides train the same).
(c) The best f32 FLOP/s of an n^3 matmul, measured before and after, is MFU's denominator on a
CPU (a known accelerator uses its data-sheet peak). FLOPs per token are
`training.step.flops_per_token` (model FLOPs: 6N + 12 L T d; remat not counted). The load
average before and after is recorded.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from amd135m import checkpoints, config_lib, metrics, optim, sharding
from amd135m.errors import UserError
from amd135m.provenance import provenance
from amd135m.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "hf_bench" / "train_step.py"


def synthetic_tokens(vocab_size: int, batch: int, seq_len: int, count: int = 4,
                     seed: int = 0) -> np.ndarray:
  """`count` batches of uniform random tokens, [count, B, T + 1] int32 (inputs and targets)."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab_size, (count, batch, seq_len + 1), dtype=np.int32)


def synthetic_batches(vocab_size: int, batch: int, seq_len: int, count: int = 4,
                      seed: int = 0) -> list[dict]:
  """The same tokens as {'inputs', 'targets'} [B, T] int32 batches."""
  return [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
          for tokens in synthetic_tokens(vocab_size, batch, seq_len, count, seed)]


class OurStep:
  """Our jitted step on one device, compiled by the first call (timed apart)."""

  def __init__(self, config, batch: int, seq_len: int):
    self.model_config = config_lib.model_config(config.model)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    schedule = optim.schedule(config.lr, config.end_lr, config.warmup_steps, config.total_steps)
    self.compiled = step_lib.compile_step(self.model_config, optim.make_optimizer(config),
                                          schedule, mesh,
                                          sharding.parse_rules(config.sharding_rules))
    self.schedule = schedule
    self.state = self.compiled.init(jax.random.key(config.seed))
    self.tokens = synthetic_tokens(self.model_config.vocab_size, batch, seq_len)
    self.batches = [{k: jax.device_put(v, self.compiled.batch_sharding)
                     for k, v in (("inputs", t[:, :-1]), ("targets", t[:, 1:]))}
                    for t in self.tokens]
    self.calls = 0

  def next_lr(self) -> float:
    """The learning rate the next call's update uses (the schedule at the optimizer's count)."""
    return float(self.schedule(self.calls))

  def __call__(self) -> tuple[float, float]:
    """(seconds, loss) of one step."""
    start = time.perf_counter()
    self.state, out = self.compiled.step(self.state, self.batches[self.calls % len(self.batches)])
    jax.block_until_ready(out)
    self.calls += 1
    return time.perf_counter() - start, float(out["loss"])


class TorchStep:
  """transformers' step in a subprocess (hf_bench/train_step.py), step by step.

  weights: a Hugging Face directory to start from and tokens: an .npy of [count, B, T + 1] batches
  (ours, so that both sides take the same steps); without them, its own init and batches."""

  def __init__(self, config, batch: int, seq_len: int, threads: int = 0, weights: str = "",
               tokens: str = ""):
    model = dataclasses.asdict(config_lib.model_config(config.model))
    optimizer = {k: config[k] for k in ("lr", "b1", "b2", "eps", "weight_decay",
                                        "weight_decay_mask", "grad_clip")}
    spec = dict(model=model, optimizer=optimizer, batch=batch, seq_len=seq_len, seed=config.seed,
                threads=threads, weights=weights, tokens=tokens)
    self.proc = subprocess.Popen([sys.executable, str(REFERENCE), "--spec", json.dumps(spec)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      err = self.proc.stderr.read().strip().splitlines()
      raise UserError(f"the torch reference failed (is the [dev] extra installed?): "
                      f"{err[-1] if err else 'no output'}")
    return json.loads(line)

  def __call__(self, lr: float | None = None) -> tuple[float, float]:
    """(seconds, loss) of one step; lr: this step's learning rate (None: the config's lr)."""
    self.proc.stdin.write("step\n" if lr is None else f"step {lr!r}\n")
    self.proc.stdin.flush()
    out = self._read()
    return out["seconds"], out["loss"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def _summary(times: list[float], losses: list[float], tokens: int) -> dict:
  seconds = statistics.median(times)
  return dict(step_seconds=times, median_step_seconds=seconds, tokens_per_second=tokens / seconds,
              losses=losses)


def peak(n: int, runs: int) -> float:
  """Per-device peak FLOP/s: a known accelerator's data sheet, else a measured f32 n^3 matmul."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return metrics.measured_matmul_flops(n, runs)
  return metrics.peak_flops()


def bench_train(config_spec: str, batch: int = 2, seq_len: int = 512, steps: int = 5,
                warmup: int = 2, reference: bool = True, matmul_n: int = 4096,
                matmul_runs: int = 3, dtype: str = "auto", torch_threads: int = 0) -> dict:
  """dtype: the compute dtype of both steps; 'auto' is float32 on a CPU (the peak is an f32
  matmul; bf16 runs the CPU's bf16 dot instructions where it has them, AVX512-BF16 or AMX, and
  is emulated and slow elsewhere) and the config's own elsewhere.
  torch_threads: torch's intra-op threads; 0 is its default, one per CPU. (On a CPU that other
  processes also load, torch's 2-thread small ops can wait a scheduler slice at each barrier:
  the tiny config's step once ran ~70x slower on 2 threads than on 1.)"""
  config = config_lib.load(config_spec)
  if dtype == "auto":
    dtype = "float32" if jax.devices()[0].platform == "cpu" else config.model.dtype
  if dtype not in ("float32", "bfloat16"):
    raise UserError(f"--dtype {dtype}: choose auto, float32 or bfloat16")
  config.model.dtype = dtype
  if seq_len > config.model.max_seq_len:
    raise UserError(f"--seq-len {seq_len} exceeds the config's model.max_seq_len "
                    f"{config.model.max_seq_len}")
  if steps < 1 or warmup < 1 or batch < 1:
    raise UserError("--steps, --warmup and --batch must be >= 1")
  model_config = config_lib.model_config(config.model)
  flops_per_token = step_lib.flops_per_token(model_config, seq_len)
  load = [os.getloadavg()[0]]
  peaks = [peak(matmul_n, matmul_runs)]
  ours_step = OurStep(config, batch, seq_len)
  theirs = None
  with tempfile.TemporaryDirectory() as tmp:
    if reference:
      # Both sides start from our initial weights and take our batches at our schedule's lr, so
      # their losses must agree step by step: the benchmark times the same training.
      weights, tokens = pathlib.Path(tmp) / "weights", pathlib.Path(tmp) / "tokens.npy"
      checkpoints.save_hf(weights, model_config,
                          jax.tree.map(np.asarray, ours_step.state["params"]))
      np.save(tokens, ours_step.tokens)
      theirs = TorchStep(config, batch, seq_len, torch_threads, str(weights), str(tokens))
    try:
      times = {"ours": [], "theirs": []}
      losses = {"ours": [], "theirs": []}  # every step's, the untimed first included
      lr = ours_step.next_lr()
      compile_seconds, loss = ours_step()  # compile + one step, excluded
      losses["ours"].append(loss)
      if theirs is not None:
        losses["theirs"].append(theirs(lr)[1])  # its first step (allocations), excluded alike
      # Alternate the two steps, so that another process's load on the machine falls on both.
      for i in range(warmup - 1 + steps):
        lr = ours_step.next_lr()
        for name, step in (("ours", ours_step), ("theirs", theirs)):
          if step is None:
            continue
          seconds, loss = step() if name == "ours" else step(lr)
          losses[name].append(loss)
          if i >= warmup - 1:
            times[name].append(seconds)
    finally:
      if theirs is not None:
        theirs.close()
  peaks.append(peak(matmul_n, matmul_runs))
  load.append(os.getloadavg()[0])
  best_peak = max(peaks)
  tokens = batch * seq_len
  ours = _summary(times["ours"], losses["ours"], tokens)
  ours.update(compile_and_first_step_seconds=compile_seconds, remat=model_config.remat,
              dtype=model_config.dtype, param_dtype=model_config.param_dtype)
  hf = None if theirs is None else {**theirs.info, **_summary(times["theirs"], losses["theirs"],
                                                              tokens)}

  def rates(tokens_per_second):
    flops = flops_per_token * tokens_per_second
    return dict(model_flops_per_second=flops, mfu=flops / best_peak if best_peak else float("nan"))

  ours.update(rates(ours["tokens_per_second"]))
  result = dict(
      benchmark="train", config=config_spec, batch=batch, seq_len=seq_len, steps=steps,
      warmup=warmup, tokens_per_step=batch * seq_len, flops_per_token=flops_per_token,
      params=step_lib.count_params(model_config), load_average=load,
      peak=dict(flops_per_second=best_peak, measured=[float(p) for p in peaks],
                source=(f"f32 {matmul_n}^3 matmul, best of {matmul_runs}, before and after"
                        if jax.devices()[0].platform == "cpu" else "data sheet (bf16 dense)")),
      ours=ours)
  if hf is not None:
    hf.update(rates(hf["tokens_per_second"]))
    result["transformers"] = hf
    result["ratio"] = ours["tokens_per_second"] / hf["tokens_per_second"]
    result["loss_difference"] = max(
        abs(a - b) / abs(b) for a, b in zip(losses["ours"], losses["theirs"]))
  result["provenance"] = provenance()
  return result


def add_parser(sub) -> None:
  """Registers `train` on bench's subcommands."""
  p = sub.add_parser("train", help="train step tokens/s and MFU, ours and transformers'")
  p.add_argument("--config", required=True, help="configs/F.py[:arg]")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps, the compile included")
  p.add_argument("--matmul-n", type=int, default=4096, help="size of the peak-FLOP/s matmul")
  p.add_argument("--dtype", default="auto", help="compute dtype: auto (f32 on CPU), float32, "
                 "bfloat16")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="the reference's intra-op threads (default 0: torch's own, one per CPU)")
  p.add_argument("--no-reference", action="store_true", help="skip transformers")
  p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
  try:
    result = bench_train(args.config, args.batch, args.seq_len, args.steps, args.warmup,
                         reference=not args.no_reference, matmul_n=args.matmul_n,
                         dtype=args.dtype, torch_threads=args.torch_threads)
  except UserError as e:
    print(f"amd135m.bench: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print_train(result)
  return 0


def print_train(r: dict) -> None:
  peak_g = r["peak"]["flops_per_second"] / 1e9
  print(f"config {r['config']} ({r['ours']['dtype']}): batch {r['batch']} x {r['seq_len']}, "
        f"{r['flops_per_token'] / 1e6:.0f} MFLOP/token; peak {peak_g:.0f} GFLOP/s "
        f"({r['peak']['source']})")
  rows = [("ours", r["ours"])] + ([("transformers", r["transformers"])]
                                  if "transformers" in r else [])
  for name, row in rows:
    print(f"{name:12s} {row['tokens_per_second']:8.1f} tokens/s, "
          f"{row['model_flops_per_second'] / 1e9:6.1f} GFLOP/s, MFU {100 * row['mfu']:.1f}% "
          f"(median step {row['median_step_seconds']:.3f} s)")
  if "ratio" in r:
    print(f"ours / transformers: {r['ratio']:.2f}x (same weights, batches and lr: losses agree "
          f"to {r['loss_difference']:.1e} relative)")

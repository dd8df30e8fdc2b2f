"""The GPU check of issue 5: train-step tokens/s and MFU of the 135M config at seq 2048 in bf16,
per attention implementation, batch size and remat, and greedy decode tokens/s of SmolLM2-sized
random weights. Prints one JSON line per measurement (and a summary line last).

Run through experiments/gpu_check.sh (which puts carried wheels on the path). The parent process
never imports JAX: each group of measurements runs in a child process that the parent restarts
when one hangs (per-measurement time limit) or dies, so one failure costs one line, not the run.
Out-of-memory is caught and reported as status "oom"; with --remat-fallback a train measurement
that runs out of memory without remat is retried with remat 'full'.

--quick: the tiny config at seq 64 on whatever device there is (CPU here), to prove the script.
$GPU_CHECK_COMPILATION_CACHE: a persistent XLA compilation cache for the children (the .sh sets
one under /tmp, so a rerun on a still-warm machine skips compiles).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package from this checkout, installed or not
CONFIG_135M = "configs/amd_llama_135m.py"
CONFIG_SMOLLM2 = "configs/smollm2_135m.py"


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------
# Child: runs measurements in one JAX process, one JSON line each.

def _is_oom(error: BaseException) -> bool:
  text = f"{type(error).__name__}: {error}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OOM", "Resource exhausted"))


def _error_record(error: BaseException) -> dict:
  lines = str(error).strip().splitlines()
  return {"status": "oom" if _is_oom(error) else "error",
          "error": f"{type(error).__name__}: {lines[0][:400] if lines else ''}"}


def measure_env() -> dict:
  import jax

  from amd135m import metrics, provenance
  device = jax.devices()[0]
  record = {"what": "env", "status": "ok", "provenance": provenance.provenance(),
            "devices": [d.device_kind for d in jax.devices()], "platform": device.platform,
            "peak_flops_per_device": metrics.peak_flops() if device.platform != "cpu" else None}
  try:
    stats = device.memory_stats() or {}
    record["memory_bytes_limit"] = stats.get("bytes_limit")
  except Exception:  # noqa: BLE001 (CPU devices have no memory stats)
    pass
  import contextlib
  import io
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    jax.print_environment_info()  # jax, jaxlib, numpy, python, and nvidia-smi where there is one
  record["environment_info"] = text.getvalue()
  return record


def _attention_kernel(hlo_text: str) -> str:
  """What the compiled step really runs for attention."""
  if "__cudnn$fmha" in hlo_text:
    return "cudnn flash attention (custom call __cudnn$fmha*)"
  return "XLA fusions (einsum + softmax; no fused attention kernel)"


def measure_train(spec: dict) -> dict:
  import jax
  import numpy as np

  from amd135m import config_lib, metrics, optim, sharding
  from amd135m.benchmarks.train_bench import synthetic_batches
  from amd135m.training import step as step_lib

  if spec["attention"] == "cudnn" and jax.devices()[0].platform != "gpu":
    return {"what": "train", "status": "unsupported", "attention": "cudnn",
            "error": f"cuDNN attention needs an NVIDIA GPU, not {jax.devices()[0].platform}"}
  config = config_lib.load(spec["config"])
  config.model.update(remat=spec["remat"], attention=spec["attention"])
  if spec.get("dtype"):
    config.model.dtype = spec["dtype"]
  model_config = config_lib.model_config(config.model)
  batch, seq_len = spec["batch"], spec["seq_len"]
  record = {"what": "train", "config": spec["config"], "batch": batch, "seq_len": seq_len,
            "remat": model_config.remat, "attention": model_config.attention,
            "dtype": model_config.dtype, "param_dtype": model_config.param_dtype}
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  schedule = optim.schedule(config.lr, config.end_lr, config.warmup_steps, config.total_steps)
  compiled = step_lib.compile_step(model_config, optim.make_optimizer(config), schedule, mesh,
                                   sharding.parse_rules(config.sharding_rules))
  state = compiled.init(jax.random.key(0))
  batches = [{k: jax.device_put(v, compiled.batch_sharding) for k, v in b.items()}
             for b in synthetic_batches(model_config.vocab_size, batch, seq_len, count=2)]
  start = time.perf_counter()
  executable = compiled.step.lower(state, batches[0]).compile()
  record["compile_seconds"] = time.perf_counter() - start
  record["attention_kernel"] = _attention_kernel(executable.as_text())
  try:
    memory = executable.memory_analysis()
    record["temp_bytes"] = int(memory.temp_size_in_bytes)
  except Exception:  # noqa: BLE001 (not every backend reports it)
    pass

  deadline = time.perf_counter() + spec["seconds"]
  times, losses = [], []
  for i in range(spec["warmup"] + spec["steps"]):
    start = time.perf_counter()
    state, out = executable(state, batches[i % 2])
    loss = float(out["loss"])  # waits for the step
    if i >= spec["warmup"]:
      times.append(time.perf_counter() - start)
    losses.append(loss)
    if times and time.perf_counter() > deadline:
      break
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"non-finite loss {losses}")
  seconds = float(np.median(times))
  tokens_per_second = batch * seq_len / seconds
  flops_per_token = step_lib.flops_per_token(model_config, seq_len)
  peak = metrics.peak_flops() if jax.devices()[0].platform != "cpu" else 0.0
  record.update(status="ok", steps_timed=len(times), median_step_seconds=seconds,
                step_seconds=[round(t, 5) for t in times], tokens_per_second=tokens_per_second,
                flops_per_token=flops_per_token,
                model_tflops_per_second=flops_per_token * tokens_per_second / 1e12,
                peak_tflops=peak / 1e12 if peak else None,
                mfu=flops_per_token * tokens_per_second / peak if peak else None,
                first_loss=losses[0], last_loss=losses[-1])
  try:
    record["peak_bytes_in_use"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
  except Exception:  # noqa: BLE001
    pass
  return record


def measure_decode(spec: dict) -> dict:
  """Batch-1 greedy decode of random weights in the config's architecture: a prefill of
  `prompt` tokens, then `new_tokens` tokens (N - 1 forwards: the first comes from the prefill),
  the prefill excluded, as `python -m amd135m.bench decode` measures."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from amd135m import config_lib, model as model_lib, sampling

  config = config_lib.load(spec["config"])
  config.model.update(dtype=spec["dtype"], param_dtype=spec["dtype"])
  model_config = config_lib.model_config(config.model)
  params = jax.jit(lambda rng: model_lib.init_params(model_config, rng))(jax.random.key(0))
  new_tokens, prompt_len = spec["new_tokens"], spec["prompt"]
  buffer_len = sampling.bucket(new_tokens)
  tokens = np.random.default_rng(0).integers(0, model_config.vocab_size, (1, prompt_len),
                                             dtype=np.int32)
  lens = jnp.asarray([prompt_len], jnp.int32)
  first_logits, cache = jax.jit(
      lambda p, t: sampling.prefill(p, model_config, t, lens, cache_size=prompt_len + buffer_len))(
      params, jnp.asarray(tokens))
  no_stops = jnp.full((1, 1), -1, jnp.int32)

  def run():
    out, counts = sampling.decode(params, model_config, first_logits, cache,
                                  jnp.int32(new_tokens), jnp.zeros((1,), jnp.uint32), no_stops,
                                  sampling.SamplingParams().traced(), buffer_len=buffer_len)
    return np.asarray(out), int(np.asarray(counts)[0])

  start = time.perf_counter()
  _, produced = run()  # compile + one run
  compile_seconds = time.perf_counter() - start
  times = []
  deadline = time.perf_counter() + spec["seconds"]
  for _ in range(spec["runs"]):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
    if time.perf_counter() > deadline:
      break
  seconds = float(np.median(times))
  return {"what": "decode", "status": "ok", "config": spec["config"],
          "weights": "random", "dtype": model_config.dtype, "batch": 1, "prompt_tokens": prompt_len,
          "new_tokens": produced, "compile_and_first_run_seconds": compile_seconds,
          "run_seconds": [round(t, 4) for t in times],
          "tokens_per_second": (produced - 1) / seconds}


def child(specs: list[dict]) -> None:
  """Runs each spec in turn, one JSON line each; an error costs only its own line."""
  import gc

  import jax
  if os.environ.get("GPU_CHECK_COMPILATION_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["GPU_CHECK_COMPILATION_CACHE"])
  for spec in specs:
    attempts = [spec]
    if spec["what"] == "train" and spec.get("remat_fallback") and spec["remat"] == "none":
      attempts.append({**spec, "remat": "full"})  # only if the first runs out of memory
    for attempt in attempts:
      start = time.perf_counter()
      try:
        measure = {"env": lambda s: measure_env(), "train": measure_train,
                   "decode": measure_decode}[attempt["what"]]
        record = measure(attempt)
      except Exception as error:  # noqa: BLE001 (reported, and the next measurement runs)
        record = {**attempt, **_error_record(error)}
      record["id"] = spec["id"]
      record["wall_seconds"] = round(time.perf_counter() - start, 2)
      last = attempt is attempts[-1] or record["status"] != "oom"
      record["final"] = last  # the parent moves on after a final line
      emit(record)
      jax.clear_caches()  # drops executables, and the collection below the last step's buffers,
      gc.collect()        # before the next size
      if last:
        break


# ---------------------------------------------------------------------------------------------
# Parent: plans the measurements, runs children with time limits, prints the lines.

def plan(args) -> list[dict]:
  """env, then train with the first attention implementation, decode, the other attentions."""
  seq_len = args.seq_len or (64 if args.quick else 2048)
  config = args.config or ("configs/tiny.py" if args.quick else CONFIG_135M)
  decode_config = args.decode_config or ("configs/tiny.py" if args.quick else CONFIG_SMOLLM2)
  batches = [int(b) for b in (args.batches or ("2,4" if args.quick else "8,16,32")).split(",")]
  common = dict(config=config, seq_len=seq_len, dtype=args.dtype, warmup=args.warmup,
                steps=args.steps, seconds=args.measure_seconds,
                remat_fallback=not args.no_remat_fallback)
  trains = [[dict(what="train", attention=attention, remat=remat, batch=batch, **common)
             for remat in args.remat.split(",") for batch in batches]
            for attention in args.attention.split(",")]
  decodes = [dict(what="decode", config=decode_config, dtype=dtype, prompt=16,
                  new_tokens=32 if args.quick else 256, runs=3, seconds=args.measure_seconds)
             for dtype in args.decode_dtypes.split(",") if dtype]
  specs = [{"what": "env"}] + trains[0] + decodes + [s for group in trains[1:] for s in group]
  for i, spec in enumerate(specs):
    spec["id"] = i
  return specs


def run_children(specs: list[dict], limit: float, budget: float) -> list[dict]:
  """Runs the specs in as few child processes as possible. A measurement with no result within
  `limit` seconds is reported as a timeout, its child killed, and a new child takes the rest."""
  import queue
  import threading
  records, pending = [], list(specs)
  start = time.perf_counter()
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  while pending:
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child",
               json.dumps(pending)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    stderr_tail: list[str] = []

    def read_stdout():
      for line in proc.stdout:
        lines.put(line)
      lines.put(None)  # the child closed its output: it exited

    def read_stderr():
      for line in proc.stderr:
        stderr_tail.append(line)
        del stderr_tail[:-40]
    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=read_stderr, daemon=True).start()

    deadline = time.perf_counter() + limit
    while pending:
      try:
        line = lines.get(timeout=max(0.0, deadline - time.perf_counter()))
      except queue.Empty:
        proc.kill()
        failed = {**pending.pop(0), "status": "timeout",
                  "error": f"no result within {limit:.0f} s; the child was killed"}
        emit(failed)
        records.append(failed)
        break
      if line is None:
        proc.wait()
        last = "".join(stderr_tail).strip().splitlines()
        failed = {**pending.pop(0), "status": "error",
                  "error": f"child exited with {proc.returncode}: "
                           f"{last[-1][:400] if last else 'no stderr'}"}
        emit(failed)
        records.append(failed)
        break
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        print(line, end="", file=sys.stderr)  # stray output of a library
        continue
      emit(record)
      records.append(record)
      deadline = time.perf_counter() + limit
      if record.get("final", True):
        pending = [s for s in pending if s["id"] != record["id"]]
        if pending and time.perf_counter() - start > budget:
          break
    proc.kill()
    proc.wait()
    if pending and time.perf_counter() - start > budget:
      for spec in pending:
        skipped = {**spec, "status": "skipped",
                   "error": f"the time budget of {budget:.0f} s was spent"}
        emit(skipped)
        records.append(skipped)
      break
  return records


def summary(records: list[dict]) -> dict:
  train = [r for r in records if r.get("what") == "train" and r.get("status") == "ok"]
  best = max(train, key=lambda r: r["tokens_per_second"]) if train else None
  decode = [r for r in records if r.get("what") == "decode" and r.get("status") == "ok"]
  env = next((r for r in records if r.get("what") == "env" and r.get("status") == "ok"), {})
  failed = [{"id": r.get("id"), "what": r.get("what"), "status": r.get("status"),
             "remat": r.get("remat"), "batch": r.get("batch"), "attention": r.get("attention")}
            for r in records if r.get("status") != "ok"]
  out = {"what": "summary", "device": env.get("devices", [None])[0],
         "best_train": None if best is None else {
             k: best.get(k) for k in ("batch", "seq_len", "remat", "attention", "attention_kernel",
                                      "tokens_per_second", "mfu", "median_step_seconds")},
         "goal_mfu": 0.45,
         "decode_tokens_per_second": {r["dtype"]: r["tokens_per_second"] for r in decode},
         "not_ok": failed}
  if best is not None and best.get("mfu") is not None:
    out["goal_met"] = best["mfu"] >= 0.45
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
  parser.add_argument("--config", help=f"train config (default {CONFIG_135M})")
  parser.add_argument("--decode-config", help=f"decode architecture (default {CONFIG_SMOLLM2})")
  parser.add_argument("--seq-len", type=int, default=0, help="default 2048 (quick: 64)")
  parser.add_argument("--batches", help="comma-separated (default 8,16,32; quick: 2,4)")
  parser.add_argument("--attention", default="cudnn,einsum", help="comma-separated")
  parser.add_argument("--remat", default="none", help="comma-separated: none,full,dots")
  parser.add_argument("--no-remat-fallback", action="store_true",
                      help="do not retry an out-of-memory remat-none step with remat full")
  parser.add_argument("--dtype", default="", help="compute dtype (default: the config's)")
  parser.add_argument("--decode-dtypes", default="bfloat16,float32",
                      help="decode weights and compute dtypes, comma-separated ('' for none)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
  parser.add_argument("--measure-seconds", type=float, default=20.0,
                      help="stop timing a measurement after this many seconds")
  parser.add_argument("--limit", type=float, default=120.0,
                      help="kill a measurement (compile included) after this many seconds")
  parser.add_argument("--budget", type=float, default=330.0,
                      help="start no measurement after this many seconds in all")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(json.loads(args.child))
    return 0
  specs = plan(args)
  records = run_children(specs, args.limit, args.budget)
  emit(summary(records))
  # Out of memory is a finding, and cuDNN on a CPU is not a failure of the script.
  bad = [r for r in records if r.get("status") not in ("ok", "oom", "unsupported")]
  if bad:
    print(f"gpu_check: {len(bad)} measurement(s) failed: "
          + ", ".join(f"#{r['id']} {r['what']} {r['status']}" for r in bad), file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())

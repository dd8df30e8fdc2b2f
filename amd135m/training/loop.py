"""train_and_evaluate(config, workdir): the training loop that the CLI and notebooks call.

Resume order: the workdir's latest checkpoint -> config.init_from (weights only) -> random init.
Every checkpoint holds the train state, the data iterator state and the config, so a rerun of the
same command continues at exactly the next batch. SIGTERM (preemption) saves the current step on
every host and returns normally.
"""
import contextlib
import dataclasses
import math
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from amd135m import checkpoints, config_lib, metrics as metrics_lib, optim, provenance, sharding
from amd135m.checkpoints import orbax_io
from amd135m.errors import UserError, make_dir
from amd135m.paths import COMPLETE
from amd135m.training import data as data_lib, step as step_lib, workdir_lock


@dataclasses.dataclass(frozen=True)
class Hooks:
  """Test seams, triggered at a step rather than by timing; None never fires. Only tests pass
  them (tests/train_with_hooks.py runs the CLI with them)."""
  kill_after_step: int | None = None     # kill -9 after this step (and its save, if it has one)
  kill_during_save: int | None = None    # kill -9 while this step's checkpoint is being written
  sigterm_after_step: int | None = None  # SIGTERM after this step, as a scheduler preempts
  nan_at_step: int | None = None         # this step's loss and new weights come out NaN
  sigterm_before_handler: bool = False   # SIGTERM just before the loop installs its handler


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class Result:
  step: int
  last_metrics: dict
  eval_metrics: dict
  preempted: bool


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Derived settings: total_steps from total_tokens; checks that need no devices. Messages name
  the --config.KEY flags a user sets."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key in ("batch_size", "grad_accum", "data.seq_len", "log_every", "eval_every",
              "eval_batches", "checkpoint_every", "keep_checkpoints"):
    if _get(config, key) < 1:
      raise UserError(f"--config.{key} must be >= 1, got {_get(config, key)}")
  for key in ("devices", "data.num_epochs", "data.worker_count"):
    if _get(config, key) < 0:
      raise UserError(f"--config.{key} must be >= 0 (0 = {_ZERO_MEANS[key]}), "
                      f"got {_get(config, key)}")
  if not 0 <= config.seed < 2**32:
    raise UserError(f"--config.seed {config.seed} is out of range: seeds are 0 to 2**32 - 1")
  # A NaN or negative schedule value trains to "loss is nan" after a compile, or silently wrong.
  for key in _REAL_SETTINGS:
    if not math.isfinite(_get(config, key)):
      raise UserError(f"--config.{key} must be a finite number, got {_get(config, key)}")
  for key in ("lr", "end_lr", "warmup_steps", "total_tokens", "weight_decay", "grad_clip",
              "peak_flops"):
    if _get(config, key) < 0:
      raise UserError(f"--config.{key} must be >= 0, got {_get(config, key)}")
  for key in ("b1", "b2"):
    if not 0 <= config[key] < 1:
      raise UserError(f"--config.{key} must be in [0, 1), got {config[key]}")
  if not config.eps > 0:
    raise UserError(f"--config.eps must be > 0, got {config.eps}")
  tokens_per_step = config.batch_size * config.data.seq_len
  if config.total_tokens > 0:
    config.total_steps = max(1, math.ceil(config.total_tokens / tokens_per_step))
  if config.total_steps < 1:
    raise UserError(f"--config.total_steps must be >= 1 (or set --config.total_tokens), got "
                    f"{config.total_steps}")
  if config.batch_size % config.grad_accum:
    raise UserError(f"--config.batch_size {config.batch_size} does not divide into "
                    f"--config.grad_accum {config.grad_accum} micro-batches: make batch_size a "
                    "multiple of grad_accum")
  if config.data.seq_len > config.model.max_seq_len:
    raise UserError(f"--config.data.seq_len {config.data.seq_len} exceeds "
                    f"--config.model.max_seq_len {config.model.max_seq_len}")
  if not 0 <= config.distill.weight <= 1:
    raise UserError(f"--config.distill.weight must be in [0, 1], got {config.distill.weight}")
  if not config.distill.temperature > 0:
    raise UserError(f"--config.distill.temperature must be > 0, got "
                    f"{config.distill.temperature}")
  return config


_ZERO_MEANS = {"devices": "all of them", "data.num_epochs": "endless",
               "data.worker_count": "read in this process"}
_REAL_SETTINGS = ("lr", "end_lr", "b1", "b2", "eps", "weight_decay", "grad_clip", "peak_flops",
                  "distill.weight", "distill.temperature")


def _get(config: ml_collections.ConfigDict, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def check_same_model(workdir: pathlib.Path, model_config) -> None:
  """A workdir's checkpoints restore only into the model that wrote them: a changed architecture
  is one line naming the fields, not orbax's shape error."""
  differences = orbax_io.model_differences(workdir, model_config)
  if differences:
    listed = ", ".join(f"model.{name} {saved} there, {now} now"
                       for name, (saved, now) in differences.items())
    raise UserError(f"--workdir {workdir} holds a checkpoint of a different model ({listed}; "
                    f"see its {orbax_io.MODEL_CONFIG_FILE}): use a new --workdir or the same "
                    "model settings")


def _tokenizer(config):
  from amd135m.tokenizer import load_tokenizer
  path = config.tokenizer or config.init_from
  return load_tokenizer(path) if path else None


def _init_from(config, model_config):
  """A params function for fine-tuning from config.init_from, after checking the architecture."""
  source_config, params = checkpoints.load_params(pathlib.Path(config.init_from).expanduser())
  fields = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
            "tie_embeddings")
  mismatched = {f: (getattr(source_config, f), getattr(model_config, f)) for f in fields
                if getattr(source_config, f) != getattr(model_config, f)}
  if mismatched:
    raise UserError(f"--config.init_from {config.init_from} has another architecture "
                    f"(checkpoint, config): {mismatched}; make --config.model.* match it")
  return lambda rng: jax.tree.map(jnp.asarray, params)


def _teacher(config, model_config, data_config) -> tuple:
  """(step.Teacher, its params) for --config.distill.teacher, or (None, None)."""
  if not config.distill.teacher:
    return None, None
  path = pathlib.Path(config.distill.teacher).expanduser()
  teacher_config, params = checkpoints.load_params(path)
  if teacher_config.vocab_size < model_config.vocab_size:
    raise UserError(f"--config.distill.teacher {path} has a vocabulary of "
                    f"{teacher_config.vocab_size}, smaller than the model's "
                    f"{model_config.vocab_size}: the model's ids must be a prefix of the teacher's")
  if data_config.seq_len > teacher_config.max_seq_len:
    raise UserError(f"--config.data.seq_len {data_config.seq_len} exceeds the teacher's context "
                    f"of {teacher_config.max_seq_len}")
  # The teacher computes in the model's dtype (bf16 on accelerators), its weights as stored.
  teacher_config = dataclasses.replace(teacher_config, dtype=model_config.dtype)
  teacher = step_lib.Teacher(teacher_config, config.distill.weight, config.distill.temperature)
  return teacher, jax.tree.map(jnp.asarray, params)


def _devices(config) -> list:
  if config.devices and (jax.process_count() > 1 or config.devices > jax.device_count()):
    raise UserError(f"--config.devices={config.devices}: a subset of devices works in one "
                    f"process only, with at most {jax.device_count()}; use 0 (all)")
  devices = jax.devices()[:config.devices] if config.devices else jax.devices()
  platforms = {d.platform for d in devices}
  if config.model.attention == "cudnn" and platforms != {"gpu"}:
    raise UserError(f"--config.model.attention=cudnn needs NVIDIA GPUs (cuDNN flash attention); "
                    f"this run's devices are {', '.join(sorted(platforms))}: use einsum")
  return devices


def _global_batch(local: dict, batch_sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in local.items() if k in ("inputs", "targets")}


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       progress: bool = True, preempted: list | None = None,
                       hooks: Hooks | None = None) -> Result:
  """Trains per `config` in `workdir`, resuming whatever the workdir already holds. One trainer
  per workdir: a second one is refused in one line that names the first.

  preempted: the list that a SIGTERM handler installed before this call appends to (the CLI
  installs one first thing); a SIGTERM already in it stops the run before its first step.
  hooks: test seams (see Hooks); None runs as users do."""
  config = resolve(config)
  workdir = pathlib.Path(workdir).expanduser().absolute()
  with _hold(workdir):
    return _train(config, workdir, progress, [] if preempted is None else preempted,
                  hooks or Hooks())


@contextlib.contextmanager
def _hold(workdir: pathlib.Path):
  """Process 0 creates the workdir and holds its lock for the run; every process learns whether
  it could, so that a refused multi-process run stops everywhere instead of hanging."""
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        make_dir(workdir, "--workdir")
        stack.enter_context(workdir_lock.WorkdirLock(workdir, "amd135m.train"))
      except UserError as e:
        error = e
    if _any_process(error is not None):
      raise error or UserError(f"--workdir {workdir}: process 0 could not take it (its error "
                               "names the reason)")
    yield


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, progress: bool,
           preempted: list, hooks: Hooks) -> Result:
  lead = jax.process_index() == 0
  model_config = config_lib.model_config(config.model)
  tokenizer = _tokenizer(config)
  sources = data_lib.open_sources(config.data, tokenizer, model_config.vocab_size, config.seed)

  mesh = sharding.make_mesh(config.mesh.to_dict(), _devices(config))
  rules = sharding.parse_rules(config.sharding_rules)
  lr_schedule = optim.schedule(config.lr, config.end_lr, config.warmup_steps, config.total_steps)
  optimizer = optim.make_optimizer(config)
  if config.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise UserError(f"--config.batch_size {config.batch_size} does not split over the mesh's "
                    f"data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']} devices")
  if config.batch_size % jax.process_count():
    raise UserError(f"--config.batch_size {config.batch_size} does not split over "
                    f"{jax.process_count()} processes: use a multiple of {jax.process_count()}")

  ckpt = orbax_io.TrainCheckpoints(workdir, keep=config.keep_checkpoints,
                                   async_save=config.async_checkpoint, cleanup=True)
  latest = ckpt.latest_step()
  if latest is not None:
    try:
      check_same_model(workdir, model_config)
    except UserError:
      ckpt.close()
      raise
  init_params = _init_from(config, model_config) if config.init_from and latest is None else None
  teacher, teacher_params = _teacher(config, model_config, config.data)
  compiled = step_lib.compile_step(model_config, optimizer, lr_schedule, mesh, rules,
                                   config.grad_accum, init_params, teacher, teacher_params)
  loader = data_lib.train_loader(sources, config.data, config.batch_size, config.seed,
                                 jax.process_index(), jax.process_count())
  if latest is not None:
    abstract = jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            compiled.state_shardings,
                            jax.eval_shape(compiled.init, jax.random.key(config.seed)))
    try:  # the newest intact step; damaged ones are set aside with a warning each
      _, state, data_state, _ = ckpt.restore_newest(abstract, _non_finite, _warn, _any_process)
    except BaseException:
      ckpt.close()
      raise
    loader.set_state(data_state)
  else:
    state = compiled.init(jax.random.key(config.seed))
  start_step = int(state["step"])

  if lead:
    orbax_io.write_model_config(workdir, model_config)
    (workdir / "config.json").write_text(config.to_json(indent=1) + "\n")
    if tokenizer is not None and not (workdir / "tokenizer_config.json").exists():
      tokenizer.save_hf(workdir)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, enabled=lead)
  eval_data = [_global_batch(b, compiled.batch_sharding) for b in data_lib.eval_batches(
      sources, config.data, config.batch_size, config.eval_batches, jax.process_index(),
      jax.process_count())]
  if not eval_data:
    raise UserError(f"the held-out part ({config.data.eval_fraction:.0%} of the documents) is "
                    f"shorter than one batch of {config.batch_size} x {config.data.seq_len}: "
                    "raise --config.data.eval_fraction or lower --config.batch_size")

  flops_per_token = step_lib.flops_per_token(model_config, config.data.seq_len)
  peak = metrics_lib.peak_flops(config.peak_flops) * jax.device_count()
  meta = {"config": config.to_dict(), "provenance": provenance.provenance(),
          "sources": sources.names}

  if hooks.sigterm_before_handler:
    os.kill(os.getpid(), signal.SIGTERM)
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  # A SIGTERM during the start (loading, compiling, restoring): stop before the first step.
  last_step = start_step if _any_process(bool(preempted)) else config.total_steps
  if last_step == start_step and lead:
    print(f"preempted before step {start_step + 1}: nothing new to save, exiting")
  bar = metrics_lib.progress_bar(config.total_steps, start_step, enabled=lead and progress)
  last_metrics, eval_metrics = {}, {}
  pending = None  # (step, device metrics) of the previous step: checked one step late
  window_start, window_tokens = time.perf_counter(), 0

  def check(step, device_metrics) -> dict:
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    # param_norm is after the update: a step whose new weights are not finite is never saved.
    bad = [k for k in ("loss", "param_norm") if not math.isfinite(host[k])]
    if bad:
      ckpt.wait()
      good = ckpt.latest_step()
      kept = (f"the last good checkpoint is step {good} in {workdir / orbax_io.CHECKPOINT_DIR}"
              if good is not None else "no checkpoint was saved before it")
      raise TrainingDiverged(
          f"{bad[0]} is {host[bad[0]]} at step {step}; {kept}: lower --config.lr or raise "
          "--config.warmup_steps and rerun")
    return host

  def save(step):
    ckpt.save(step, state, loader.get_state(), meta)
    if hooks.kill_during_save == step:
      os.kill(os.getpid(), signal.SIGKILL)

  try:
    step = start_step
    for step in range(start_step + 1, last_step + 1):
      try:
        local = next(loader)
      except StopIteration:
        if lead:
          print(f"data ran out after {config.data.num_epochs} epoch(s) at step {step - 1}")
        step -= 1
        break
      if config.debug_batch_hashes:
        writer.batch_hashes(step, local["inputs"], jax.process_index())
      if hooks.nan_at_step == step:  # this step's loss and new weights come out NaN
        state = {**state, "params": jax.tree.map(lambda p: p * jnp.nan, state["params"])}
      state, device_metrics = compiled.step(state, _global_batch(local, compiled.batch_sharding))
      if pending is not None:
        last_metrics = check(*pending)
      pending = (step, device_metrics)
      window_tokens += config.batch_size * config.data.seq_len

      if step % config.log_every == 0 or step == config.total_steps:
        last_metrics = check(*pending)
        seconds = time.perf_counter() - window_start
        tokens_per_second = window_tokens / seconds
        record = {"train_loss": last_metrics["loss"], "lr": last_metrics["lr"],
                  "grad_norm": last_metrics["grad_norm"],
                  "param_norm": last_metrics["param_norm"],
                  "tokens_per_second": tokens_per_second,
                  "step_seconds": seconds / max(1, window_tokens // (
                      config.batch_size * config.data.seq_len)),
                  "mfu": flops_per_token * tokens_per_second / peak if peak else float("nan"),
                  "tokens_seen": loader.tokens_seen}
        writer.write(step, record)
        bar.set_postfix(loss=f"{last_metrics['loss']:.3f}", tok_s=f"{tokens_per_second:.0f}")
        window_start, window_tokens = time.perf_counter(), 0
      bar.update(1)

      if step % config.eval_every == 0 or step == config.total_steps:
        eval_metrics = evaluate(compiled, state["params"], eval_data)
        writer.write(step, eval_metrics)
      if hooks.sigterm_after_step == step:
        os.kill(os.getpid(), signal.SIGTERM)
      stop = _any_process(bool(preempted))
      if step % config.checkpoint_every == 0 or step == config.total_steps or stop:
        last_metrics = check(*pending)
        save(step)
      ckpt.poll()  # a finished async save gets its checksums
      if hooks.kill_after_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
      if stop:
        if lead:
          print(f"preempted: saved step {step}, exiting")
        break
    if pending is not None:
      last_metrics = check(*pending)
    if step > start_step and ckpt.latest_step() != step:
      save(step)
    ckpt.wait()
    if lead and not preempted:
      # Every step ran (or the data ended) and the final checkpoint is on disk: sweeps and
      # schedulers read this marker; a preempted run exits 0 without it.
      (workdir / COMPLETE).write_text(f"{step}\n")
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    bar.close()
    writer.close()
    ckpt.close()
  return Result(step=step, last_metrics=last_metrics, eval_metrics=eval_metrics,
                preempted=bool(preempted))


def _warn(line: str) -> None:
  print(f"amd135m.train: warning: {line}", file=sys.stderr, flush=True)


def _non_finite(state) -> str | None:
  """Names a restored leaf holding NaN or infinity: the loop never saves one, so in a step saved
  without checksums it means flipped bytes (else the run goes on to "loss is nan")."""
  floats = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  finite = jax.jit(lambda leaves: jnp.stack([jnp.isfinite(x).all() for x in leaves]))(
      [leaf for _, leaf in floats])
  bad = [jax.tree_util.keystr(path) for (path, _), ok in zip(floats, np.asarray(finite))
         if not ok]
  return f"{bad[0]} holds NaN or infinity" if bad else None


def evaluate(compiled, params, eval_data: list[dict]) -> dict:
  totals = [compiled.eval(params, batch) for batch in eval_data]
  nll = sum(float(t["nll_sum"]) for t in totals)
  tokens = sum(float(t["tokens"]) for t in totals)
  loss = nll / tokens
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
          "eval_tokens": int(tokens)}


def dry_run(config: ml_collections.ConfigDict) -> dict:
  """Compiles one train step for the config's mesh (no data, no weights) and returns XLA's
  per-device memory analysis with the shapes that produced it."""
  config = resolve(config)
  model_config = config_lib.model_config(config.model)
  mesh = sharding.make_mesh(config.mesh.to_dict(), _devices(config))
  rules = sharding.parse_rules(config.sharding_rules)
  lr_schedule = optim.schedule(config.lr, config.end_lr, config.warmup_steps, config.total_steps)
  optimizer = optim.make_optimizer(config)
  compiled = step_lib.compile_step(model_config, optimizer, lr_schedule, mesh, rules,
                                   config.grad_accum)
  abstract = jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          compiled.state_shardings,
                          jax.eval_shape(compiled.init, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((config.batch_size, config.data.seq_len), jnp.int32,
                                sharding=compiled.batch_sharding)
  start = time.perf_counter()
  executable = compiled.step.lower(abstract, {"inputs": tokens, "targets": tokens}).compile()
  seconds = time.perf_counter() - start
  memory = executable.memory_analysis()
  params = step_lib.count_params(model_config)
  param_bytes = sum(
      int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
      for a, s in zip(jax.tree.leaves(abstract["params"]),
                      jax.tree.leaves(compiled.state_shardings["params"])))
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  report = {"mesh": dict(mesh.shape), "devices": mesh.size, "params": params["total"],
            "batch": [config.batch_size, config.data.seq_len], "grad_accum": config.grad_accum,
            "remat": model_config.remat, "dtype": model_config.dtype,
            "param_bytes_per_device": param_bytes, "compile_seconds": seconds}
  report.update({f: int(getattr(memory, f, 0) or 0) for f in fields} if memory else {})
  return report


def format_dry_run(report: dict) -> str:
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  lines = [f"mesh {report['mesh']} on {report['devices']} fake devices; {report['params']:,} "
           f"params; batch {report['batch'][0]} x {report['batch'][1]} in {report['grad_accum']} "
           f"micro-batch(es); remat {report['remat']}; compute {report['dtype']}; compiled in "
           f"{report['compile_seconds']:.1f} s",
           f"per device: parameters {gib(report['param_bytes_per_device'])}"]
  if "argument_size_in_bytes" in report:
    peak = (report["argument_size_in_bytes"] + report["output_size_in_bytes"]
            - report["alias_size_in_bytes"] + report["temp_size_in_bytes"])
    lines.append(f"per device (XLA memory analysis): arguments "
                 f"{gib(report['argument_size_in_bytes'])}, outputs "
                 f"{gib(report['output_size_in_bytes'])} (aliased "
                 f"{gib(report['alias_size_in_bytes'])}), temporaries "
                 f"{gib(report['temp_size_in_bytes'])}; peak about {gib(peak)}")
  return "\n".join(lines)

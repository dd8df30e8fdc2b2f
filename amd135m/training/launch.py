"""What `python -m amd135m.train` does once its flags are parsed: record SIGTERM from the start,
check the flags, launch local processes or join the cluster, then train (or compile a dry run).

Light at import (no jax): the face installs the SIGTERM handler before jax, data or compiles load.
"""
import os
import signal
import socket
import subprocess
import sys

from amd135m import compilation_cache
from amd135m.errors import UserError

STOPPED_EARLY = ("amd135m.train: SIGTERM before training started: exiting; nothing was written "
                 "(rerun the same command to train)")


def record_sigterm() -> list:
  """From the first line of main: a SIGTERM (a scheduler's preemption) is recorded in the list,
  not a silent exit 143 while imports, data or compiles are still loading; the loop sees it."""
  preempted = []
  try:
    signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  except ValueError:
    pass  # main() called from a thread: signals stay as they are
  return preempted


def check_args(args) -> None:
  """Counts a user typed that cannot work: a UserError before anything starts."""
  if args.local_processes < 0:
    raise UserError(f"--local_processes must be >= 1 (0 or absent: run in this process), got "
                    f"{args.local_processes}")
  if args.devices < 0:
    raise UserError(f"--devices must be >= 1 (0 or absent: the real devices), got {args.devices}")
  if args.coordinator and (args.num_processes is None or args.process_id is None):
    raise UserError("--coordinator needs --num_processes and --process_id")
  if args.num_processes is not None and args.num_processes < 1:
    raise UserError(f"--num_processes must be >= 1, got {args.num_processes}")
  if args.process_id is not None and (args.process_id < 0 or args.num_processes is not None
                                      and args.process_id >= args.num_processes):
    raise UserError(f"--process_id must be in 0 .. --num_processes - 1, got {args.process_id}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _without(argv: list[str], flag: str) -> list[str]:
  """argv less `flag VALUE` / `flag=VALUE`."""
  out, skip = [], False
  for item in argv:
    if skip:
      skip = False
    elif item == flag:
      skip = True
    elif not item.startswith(flag + "="):
      out.append(item)
  return out


def launch_local(argv: list[str], processes: int) -> int:
  """Runs `python -m amd135m.train ARGV` as `processes` local processes; the first failure's code
  is returned. A SIGTERM to this launcher goes on to every process (each saves and exits)."""
  port = _free_port()
  children = []
  signal.signal(signal.SIGTERM, lambda *_: [child.terminate() for child in children])
  for index in range(processes):
    command = [sys.executable, "-m", "amd135m.train", *argv, "--coordinator",
               f"127.0.0.1:{port}", "--num_processes", str(processes), "--process_id", str(index)]
    children.append(subprocess.Popen(command, env={**os.environ, "JAX_PLATFORMS": "cpu"}))
  codes = [child.wait() for child in children]
  return next((code for code in codes if code), 0)


def init_distributed(args) -> None:
  import jax
  if args.coordinator:
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  elif any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")) and int(
      os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))) > 1:
    jax.distributed.initialize()  # reads the cluster from SLURM / Open MPI


def run(args, overrides: list[str], argv: list[str], preempted: list) -> tuple[int, str | None]:
  """The train command: (exit code, what this process prints) or a UserError.

  args: the face's parsed flags; overrides: `KEY=VALUE` of its --config.KEY=VALUE; argv: the
  command line as typed (each local process reruns it); preempted: from `record_sigterm`.
  """
  from amd135m import config_lib
  check_args(args)
  # Before any launch, so that a typo is one line, not one per local process.
  config = config_lib.load(args.config)
  config_lib.apply_overrides(config, overrides)
  if preempted:
    return 0, STOPPED_EARLY  # as a preempted run: a sweep or scheduler reruns it
  if args.local_processes:
    return launch_local(_without(argv, "--local_processes"), args.local_processes), None

  import jax
  compilation_cache.enable()  # resumes after preemption and sweep trials skip the step's compile
  devices = args.devices
  if args.dry_run and not devices:
    devices = max(1, abs(config.mesh.data * config.mesh.fsdp * config.mesh.tensor))
  if devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)
  init_distributed(args)

  from amd135m.training import loop
  if preempted and (args.dry_run or jax.process_count() == 1):  # else the loop stops them all
    return 0, STOPPED_EARLY
  if args.dry_run:
    return 0, loop.format_dry_run(loop.dry_run(config))
  result = loop.train_and_evaluate(config, args.workdir, progress=not args.no_progress,
                                   preempted=preempted)
  if jax.process_index() != 0:
    return 0, None
  summary = ", ".join(f"{k} {v:.4g}" for k, v in {**result.last_metrics,
                                                   **result.eval_metrics}.items()
                      if isinstance(v, float))
  return 0, (f"{'preempted' if result.preempted else 'finished'} at step {result.step}"
             + (f": {summary}" if summary else ""))

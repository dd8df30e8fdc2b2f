"""python -m amd135m.train --config configs/F.py[:arg] --workdir DIR [--config.KEY=VALUE ...]

Multi-host: under SLURM or Open MPI, `jax.distributed.initialize()` reads the cluster from the
environment; elsewhere pass --coordinator HOST:PORT --num_processes N --process_id I.
--local_processes N starts N CPU processes on this machine (gloo collectives) and waits for them.
--dry_run compiles the step for the config's mesh on fake CPU devices and prints per-device
memory from XLA's analysis, without data or training.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys

from amd135m import compilation_cache
from amd135m.errors import ArgumentParser


def parse_args(argv):
  parser = ArgumentParser(prog="amd135m.train", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/F.py[:arg]")
  parser.add_argument("--workdir", help="checkpoints, metrics and logs go here")
  parser.add_argument("--dry_run", action="store_true",
                      help="compile the step on fake CPU devices and report memory")
  parser.add_argument("--devices", type=int, default=0,
                      help="fake CPU devices (per process); dry runs default to the mesh's size")
  parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-host without SLURM)")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--local_processes", type=int, default=0,
                      help="run N processes on this machine (CPU, gloo) and wait for them")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item}: config overrides look like --config.KEY=VALUE")
    overrides.append(item[len("--config."):])
  if not args.dry_run and not args.workdir:
    parser.error("--workdir is required (unless --dry_run)")
  return args, overrides


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
  """Runs this command as `processes` local processes; the first failure's code is returned.
  A SIGTERM to this launcher goes on to every process (each saves and exits)."""
  port = _free_port()
  children = []
  signal.signal(signal.SIGTERM, lambda *_: [child.terminate() for child in children])
  for index in range(processes):
    command = [sys.executable, "-m", "amd135m.train", *argv, "--coordinator",
               f"127.0.0.1:{port}", "--num_processes", str(processes), "--process_id", str(index)]
    children.append(subprocess.Popen(command, env={**os.environ, "JAX_PLATFORMS": "cpu"}))
  codes = [child.wait() for child in children]
  return next((code for code in codes if code), 0)


# Test seam: SIGTERM right after main() installs its handler, before anything else is done.
_SIGTERM_AT_START = "AMD135M_TEST_SIGTERM_AT_START"


def _record_sigterm() -> list:
  """From the first line of main: a SIGTERM (a scheduler's preemption) is recorded in the list,
  not a silent exit 143 while imports, data or compiles are still loading; the loop sees it."""
  preempted = []
  try:
    signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  except ValueError:
    pass  # main() called from a thread: signals stay as they are
  if os.environ.get(_SIGTERM_AT_START):
    os.kill(os.getpid(), signal.SIGTERM)
  return preempted


def _stopped_early() -> int:
  print("amd135m.train: SIGTERM before training started: exiting; nothing was written (rerun "
        "the same command to train)")
  return 0  # as a preempted run: a sweep or scheduler reruns it


def check_args(args) -> None:
  """Counts a user typed that cannot work: a UserError before anything starts."""
  from amd135m.errors import UserError
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


def main(argv=None) -> int:
  preempted = _record_sigterm()
  argv = sys.argv[1:] if argv is None else list(argv)
  args, overrides = parse_args(argv)
  from amd135m import config_lib
  from amd135m.errors import UserError
  try:
    check_args(args)
    # Before any launch, so that a typo is one line, not one per local process.
    config = config_lib.load(args.config)
    config_lib.apply_overrides(config, overrides)
  except UserError as e:
    print(f"amd135m.train: error: {e}", file=sys.stderr)
    return 2
  if preempted:
    return _stopped_early()
  if args.local_processes:
    return launch_local(_without(argv, "--local_processes"), args.local_processes)

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
    return _stopped_early()
  try:
    if args.dry_run:
      report = loop.dry_run(config)
      print(loop.format_dry_run(report))
      return 0
    result = loop.train_and_evaluate(config, args.workdir, progress=not args.no_progress,
                                     preempted=preempted)
  except UserError as e:
    print(f"amd135m.train: error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    summary = ", ".join(f"{k} {v:.4g}" for k, v in {**result.last_metrics,
                                                     **result.eval_metrics}.items()
                        if isinstance(v, float))
    print(f"{'preempted' if result.preempted else 'finished'} at step {result.step}"
          + (f": {summary}" if summary else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())

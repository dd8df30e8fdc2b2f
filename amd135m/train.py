"""python -m amd135m.train --config configs/F.py[:arg] --workdir DIR [--config.KEY=VALUE ...]

Multi-host: under SLURM or Open MPI, `jax.distributed.initialize()` reads the cluster from the
environment; elsewhere pass --coordinator HOST:PORT --num_processes N --process_id I.
--local_processes N starts N CPU processes on this machine (gloo collectives) and waits for them.
--dry_run compiles the step for the config's mesh on fake CPU devices and prints per-device
memory from XLA's analysis, without data or training.
"""
import argparse
import sys

from amd135m.errors import ArgumentParser, UserError
from amd135m.training import launch


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


def main(argv=None) -> int:
  preempted = launch.record_sigterm()  # first: a SIGTERM while loading is recorded, not exit 143
  argv = sys.argv[1:] if argv is None else list(argv)
  args, overrides = parse_args(argv)
  try:
    code, report = launch.run(args, overrides, argv, preempted)
  except UserError as e:
    print(f"amd135m.train: error: {e}", file=sys.stderr)
    return 2
  if report:
    print(report)
  return code


if __name__ == "__main__":
  sys.exit(main())

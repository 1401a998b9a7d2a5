"""The one exception type of failures a user can act on.

`main` prints a RunError as its one-line message (what happened, what is safe, what to do) and
exits with status 1, instead of a traceback; anything else is a bug and keeps its traceback.
"""


class RunError(RuntimeError):
  """A run stopped for a reason its message explains in one line, with the fix."""

"""One exception type for user-facing failures.

Everything a user can get wrong (a path, a flag, an architecture) raises
:class:`LoaQError` with a one-line message that names the problem and the fix;
the CLI prints it as ``error: ...`` and exits with status 2, never a traceback.
"""


class LoaQError(Exception):
    """A user-facing error whose message is a single actionable line."""

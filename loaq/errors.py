"""One exception type for user-facing failures.

Everything a user can get wrong (a path, a flag, an architecture) raises
:class:`LoaQError` with a one-line message that names the problem and the fix;
the CLI prints it as ``error: ...`` and exits with status 2, never a traceback.
"""

import threading

# Set by the CLI's SIGINT/SIGTERM handler, which also raises KeyboardInterrupt. Python swallows that exception
# when the signal lands in a finalizer (a weakref callback run by the garbage collector, frequent while
# transformers loads a model), so long jobs call :func:`check_interrupted` before each step they keep.
INTERRUPTED = threading.Event()


def check_interrupted() -> None:
    """Raise :class:`KeyboardInterrupt` if an interruption was requested and not handled yet."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


class LoaQError(Exception):
    """A user-facing error whose message is a single actionable line."""

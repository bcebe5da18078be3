"""How the tools end on an error: one message a user can act on instead of a traceback.

Every tool's entry point is ``sys.exit(run_tool(main))``. A failure prints ``<tool>: error: <message>``
(the messages of the project's checks name the config key, file, image or annotation id) and exits
with status 1; ``DINO_DETR_DEBUG=1`` lets the exception through with its full traceback instead.
Training errors are also in ``OUTPUT_DIR/log.txt`` with their traceback (Detectron2's trainer logs them).
"""

import os
import sys
from typing import Callable

__all__ = ["DEBUG_ENV", "describe", "run_tool"]

DEBUG_ENV = "DINO_DETR_DEBUG"
# Errors of bad input (config, files, data): their message is the whole story. Detectron2 and fvcore
# check config keys and checkpoint paths with assertions.
_INPUT_ERRORS = (ValueError, KeyError, OSError, AssertionError)


def describe(error: BaseException) -> str:
    """The message of ``error``; prefixed by its type unless it is an input error (``ValueError``,
    ``KeyError``, ``OSError``, ``AssertionError`` and their subclasses), whose messages name the problem."""
    message = str(error.args[0]) if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    if isinstance(error, _INPUT_ERRORS) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def run_tool(function: Callable, *args, **kwargs) -> int:
    """Runs ``function(*args, **kwargs)``; returns the exit status: 0, or 1 after printing the
    error's message (:func:`describe`) to stderr. With ``DINO_DETR_DEBUG=1`` the error propagates.
    ``SystemExit`` (argparse) and ``KeyboardInterrupt`` pass through."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        function(*args, **kwargs)
        return 0
    try:
        function(*args, **kwargs)
    except Exception as error:
        tool = os.path.basename(sys.argv[0]) or "dino_detr"
        print(f"{tool}: error: {describe(error)}", file=sys.stderr)
        print(f"(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return 1
    return 0

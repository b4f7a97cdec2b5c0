"""MP_FAULT_INJECT=<point>: the process dies at that named point of our own code, as if killed there.

For tests that must kill a process at an exact moment (between two renames, say), which no timing-based kill
can hit reliably. Unset, each point costs one dictionary lookup.
"""

from __future__ import annotations

import os

FAULT_ENV = "MP_FAULT_INJECT"
# What a shell reports for a process killed by SIGKILL (128 + 9): the injected death looks like the real one.
KILLED_EXIT_STATUS = 137


def fault_point(name: str) -> None:
    """Exit at once (no cleanup, no finally blocks, no atexit) when MP_FAULT_INJECT names this point."""
    if os.environ.get(FAULT_ENV) == name:
        os._exit(KILLED_EXIT_STATUS)

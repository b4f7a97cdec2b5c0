"""MP_FAULT_INJECT=<point>: the process dies at that named point of our own code, as if killed there.
MP_FAULT_INJECT=<SIGNAL>@<point>: at that point the process's group gets SIGNAL, as a terminal's Ctrl-C
(SIGINT@...) or a scheduler (SIGTERM@...) would send it, and the process goes on to handle it.

For tests that must kill or stop a process at an exact moment (between two renames, say), which no timing-based
kill can hit reliably. Unset, each point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "MP_FAULT_INJECT"
# What a shell reports for a process killed by SIGKILL (128 + 9): the injected death looks like the real one.
KILLED_EXIT_STATUS = 137


def fault_point(name: str) -> None:
    """Exit at once (no cleanup, no finally blocks, no atexit) when MP_FAULT_INJECT names this point; signal this
    process's group when it says SIGNAL@this point."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted is None:
        return
    if wanted == name:
        os._exit(KILLED_EXIT_STATUS)
    sent, at, point = wanted.partition("@")
    if at and point == name:
        os.killpg(os.getpgrp(), signal.Signals[sent])

"""The one exception type for a user's mistake, how a command stops when asked to, and the helpers every
command-line entry shares.

Library code raises `UserError` (never SystemExit): the message says what is wrong, which input (file and line
where there is one) and how to fix it. Each command's `main` turns it into that message on stderr and exit 2.

A stop is not a crash: Ctrl-C (SIGINT), a scheduler's SIGTERM or a closed terminal's SIGHUP raise `Interrupted`
in the main thread, so `finally` blocks and staged outputs clean up on the way out, and the command ends with one
line (`stopped by SIGINT; ...`, saying what was or was not written) and exit status 128 + the signal, as shells
expect. Ctrl-C reaches every process of the terminal's foreground process group, so the processes a command
starts ignore SIGINT (`children_ignore_interrupts`) and leave the decision to it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class UserError(Exception):
    """A problem with what the user passed; `str(err)` is the whole message, written for the user."""


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived (a KeyboardInterrupt, so `except Exception` does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def stopped_status(signum: int) -> int:
    """The exit status of a command stopped by `signum`: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


# A stop signal this process started with ignored (nohup's SIGHUP, a non-interactive shell's `cmd &` SIGINT)
# stays ignored: whoever started it asked for that.
_IGNORED_FROM_THE_START = {signum for signum in STOP_SIGNALS if signal.getsignal(signum) is signal.SIG_IGN}


@contextlib.contextmanager
def stop_signals_handled_by(handler) -> Iterator[None]:
    """Inside: `handler` (a function of (signum, frame), or signal.SIG_IGN) takes SIGINT, SIGTERM and SIGHUP in
    the main thread; the previous handlers come back at the end. Elsewhere than the main thread: nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        if signum not in _IGNORED_FROM_THE_START:
            signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


def stop_signals_raise_interrupted():
    """Inside: a stop signal raises Interrupted in the main thread."""
    return stop_signals_handled_by(_raise_interrupted)


def stop_signals_ignored():
    """Inside: stop signals are ignored. For the renames that put a finished output in place (milliseconds): a
    stop that comes then is too late to stop anything and the command completes, where it would otherwise leave
    half of the old output and half of the new."""
    return stop_signals_handled_by(signal.SIG_IGN)


@contextlib.contextmanager
def children_ignore_interrupts() -> Iterator[None]:
    """Processes started inside ignore SIGINT from their first instruction (an ignored signal stays ignored
    through fork and exec): the terminal's Ctrl-C reaches them too, and a worker's KeyboardInterrupt traceback
    would bury the one line the command prints. Their parent stops them. (A SIGINT during the start itself, a
    few milliseconds, is lost.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def default_stop_signals_in_child() -> None:
    """In a forked child: SIGTERM and SIGHUP end it quietly (its parent's handler would raise Interrupted in it),
    SIGINT is its parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is _raise_interrupted:
            signal.signal(signum, signal.SIG_DFL)


def report_user_errors(main: Callable[..., int | None] | None = None, *,
                       stopped: str = "run the same command again") -> Callable[..., int]:
    """Wrap a command's main: a UserError becomes its message on stderr and exit status 2, a stop signal the line
    `stopped by SIGNAL; <stopped>` and exit status 128 + the signal; no traceback either way. `stopped` says
    what the stop left (e.g. that nothing was written). Use as `@report_user_errors` or
    `@report_user_errors(stopped=...)`."""
    if main is None:
        return functools.partial(report_user_errors, stopped=stopped)

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            with stop_signals_raise_interrupted():
                return main(*args, **kwargs) or 0
        except UserError as err:
            message = str(err)
            print(message if message.startswith("error:") else f"error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:
            signum = getattr(stop, "signum", signal.SIGINT)
            print(f"stopped by {signal_name(signum)}; {stopped}", file=sys.stderr, flush=True)
            return stopped_status(signum)

    return wrapped


TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off", "")


def parse_bool(name: str, value: str) -> bool:
    """A true/false setting as users type it (true/false, 1/0, yes/no), or a UserError naming the setting."""
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise UserError(f"error: {name} must be true or false, got '{value}'.")


def dry_run_requested(environ: Mapping[str, str] | None = None) -> bool:
    """MP_DRY_RUN=1 (every script's one dry-run switch): print what would run, run nothing."""
    environ = os.environ if environ is None else environ
    return parse_bool("MP_DRY_RUN", environ.get("MP_DRY_RUN", ""))

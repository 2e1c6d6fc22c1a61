"""What a test does when a component it needs is absent: skip with the reason, or fail where CI requires the
component (``OODGUARD_REQUIRE_<NAME>=1``, set by .ci/run), so that CI never passes by skipping."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(message: str, requirement: str) -> NoReturn:
    """Skip with ``message``; fail instead when the environment variable ``requirement`` is ``1``."""
    if os.environ.get(requirement) == "1":
        pytest.fail(f"{message} ({requirement}=1)", pytrace=False)
    pytest.skip(message)

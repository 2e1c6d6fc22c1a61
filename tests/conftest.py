"""Shared fixtures. Tests that need ../shared/data skip when it is absent, unless OODGUARD_REQUIRE_DATA=1
(set by .ci/run), where the absence is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        message = f"MNIST/Fashion-MNIST not found at {SHARED_DATA}"
        if os.environ.get("OODGUARD_REQUIRE_DATA") == "1":
            pytest.fail(message + " (OODGUARD_REQUIRE_DATA=1)")
        pytest.skip(message)
    return SHARED_DATA

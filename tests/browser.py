"""Headless Chromium for the report tests (a module, not a conftest: several conftest.py exist)."""

import os
import shutil

import pytest


def chromium() -> str:
    """Headless Chromium for report tests: required under CI=true (.ci/run installs it), else skipped when absent."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("headless Chromium is required in CI (.ci/run installs Debian's 'chromium')")
    pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")

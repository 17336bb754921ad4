"""Skips a browser test module when Playwright or chromium is missing. CI installs both (and fails when it cannot),
so a skip here happens only on a developer's machine without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def require_browser() -> None:
    """Call at a test module's top, before it imports Playwright."""
    pytest.importorskip("playwright.async_api", reason="playwright is not installed (pip install 'llmbus[test]')")
    chromium = Path(os.environ.get("LLMBUS_CHROMIUM", "/usr/bin/chromium"))
    if not chromium.exists():
        pytest.skip(f"no chromium at {chromium} (apt-get install chromium)", allow_module_level=True)

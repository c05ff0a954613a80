"""Shared test fixtures: project root on sys.path, the optional ../shared data directory."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when it is absent (users won't have it)."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED

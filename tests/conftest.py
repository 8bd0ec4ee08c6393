import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture(autouse=True)
def _quiet_threads():
    # Two cores: keep one intra-op pool per test process, predictable timings.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


def shared_data(name: str) -> Path:
    """A file or folder of ../shared/data; skips the test when it is missing (it never is in CI)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path

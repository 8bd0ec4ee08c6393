import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"


# train.amp=auto means bf16 on a CPU with native bf16 and fp32 elsewhere: the suite fixes fp32, so its numbers do not
# depend on the CPU it runs on (tests of the choice itself set the variable); subprocesses inherit it.
os.environ["DEEPRES_CPU_BF16"] = "0"

# Under pytest-xdist (`make test` runs two workers on two cores) each worker keeps one intra-op thread.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The processes a test starts (deepres train, the GPU pass's runs) keep one thread too: a second OpenMP thread
    # spin-waits against the other worker's core (the smoke GPU pass's CIFAR runs took 124 s instead of 20).
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _quiet_threads():
    # Two cores: keep one intra-op pool per test process, predictable timings.
    torch.set_num_threads(THREADS)
    yield


def shared_data(name: str) -> Path:
    """A file or folder of ../shared/data; skips the test when it is missing (it never is in CI)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path

"""Every speed benchmark runs end to end at a tiny size on the CPU and writes a complete result file.
(Speed itself is measured on the GPU machine and committed under benchmarks/results/, never asserted here.)"""

import json
import subprocess
import sys

import pytest

KEYS = {"benchmark", "device", "torch", "metric", "ours", "reference", "ratio", "target"}


@pytest.mark.parametrize("name", ["imagenet-throughput", "inference"])
def test_benchmark_smoke(name, tmp_path):
    out = subprocess.run([sys.executable, "-m", "deepres", "benchmark", name, "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert KEYS <= set(result)
    assert result["device"].startswith("cpu") and result["ours"] > 0 and result["reference"] > 0
    assert result["ratio"] == pytest.approx(result["ours"] / result["reference"])


def test_unknown_benchmark_exits_2():
    out = subprocess.run([sys.executable, "-m", "deepres", "benchmark", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "imagenet_throughput" in out.stderr

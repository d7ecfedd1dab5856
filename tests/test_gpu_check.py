"""benchmarks/gpu_check.py, the one check of every CUDA path, run on the tiny pipeline and the CPU so that it cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_passes_every_check_on_the_tiny_pipeline_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                             "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    lines = result.stdout.splitlines()
    checks = {line.split(" (")[0].split(": ")[0]: line for line in lines if line.startswith(("PASS ", "FAIL "))}
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert len(checks) == 13 and all(line.startswith("PASS") for line in checks.values()), lines
    benchmarks = {name.removeprefix("PASS benchmark "): line for name, line in checks.items() if "benchmark" in name}
    assert "speed-up:" in benchmarks["sd_throughput.py"]
    assert "ratio:" in benchmarks["inversion_throughput.py"]
    assert "limit_ratio:" in benchmarks["train_throughput.py"] and "; ratio:" in benchmarks["train_throughput.py"]
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # loaded as a folder
    assert lines[-1].startswith("checks: 13 PASS, 0 FAIL")

"""The exact CPU path: a process started on it computes on the pinned code path whatever its caller's environment
asks for, the runner starts the notebooks of an `exact_cpu` profile on it, and the tier names where it applies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from synthgap_helpers import exact, runner

# A caller's environment that asks every library for another code path than the exact one.
OTHER_PATH = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "AUTO",
              "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Zen",
              "NPY_DISABLE_CPU_FEATURES": ""}

# One SGD step of a narrow ResNet-18 (convolutions, batch norm, a linear layer), then the state a process computed on.
TRAIN_STEP = """
import hashlib, json, os, torch
from synthgap_helpers import config
from synthgap_helpers.train.models import resnet18_cifar
config.load("smoke", record=False)
torch.manual_seed(0)
model = resnet18_cifar(10, width=8).to(memory_format=torch.channels_last)
images = torch.randn(16, 3, 32, 32).to(memory_format=torch.channels_last)
labels = torch.randint(0, 10, (16,))
torch.nn.functional.cross_entropy(model(images), labels).backward()
torch.optim.SGD(model.parameters(), lr=0.1).step()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({"digest": digest, "capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.enabled,
                  "environment": {key: os.environ.get(key) for key in %r}}))
""" % sorted(exact.ENVIRONMENT)


def _train_step(*prefix: str, environment: dict[str, str]) -> dict:
    """Run TRAIN_STEP in a fresh process (behind `prefix`, e.g. the exact wrapper) and return what it printed."""
    done = subprocess.run([*prefix, sys.executable, "-c", TRAIN_STEP], env={**os.environ, **environment},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(exact.tier() != "exact", reason="the exact CPU path needs Linux on x86-64 with AVX2")
@pytest.mark.slow
def test_the_wrapper_overrides_a_callers_other_code_path_and_computes_the_same_bytes():
    wrapper = (sys.executable, "-m", "synthgap_helpers.exact")
    plain = _train_step(*wrapper, environment={})
    other = _train_step(*wrapper, environment=OTHER_PATH)
    assert plain["environment"] == other["environment"] == exact.ENVIRONMENT
    assert (plain["capability"], plain["threads"], plain["mkldnn"]) == ("AVX2", 1, False)
    assert plain["digest"] == other["digest"]
    unpinned = _train_step(environment=OTHER_PATH)  # the same caller without the wrapper: another code path
    assert (unpinned["capability"], unpinned["threads"], unpinned["mkldnn"]) == ("DEFAULT", 2, True)
    assert unpinned["digest"] != plain["digest"]


def test_the_wrapper_without_a_command_prints_its_usage_and_fails(capsys):
    assert exact.main([]) == 2
    assert "usage: python -m synthgap_helpers.exact COMMAND" in capsys.readouterr().err


def test_outside_linux_on_x86_64_with_avx2_the_tier_is_bands(monkeypatch):
    monkeypatch.setattr(exact.platform, "machine", lambda: "aarch64")
    assert exact.tier() == "bands"
    monkeypatch.setattr(exact.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(exact.sys, "platform", "darwin")
    assert exact.tier() == "bands"


def test_a_process_not_started_on_the_exact_path_keeps_onednn(monkeypatch):
    import torch

    monkeypatch.delenv(exact.MARKER, raising=False)
    exact.use_in_process()
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("pinned", [True, False])
def test_the_runner_starts_the_notebooks_on_the_exact_path_when_the_profile_asks(pinned, tmp_path, monkeypatch):
    # a copy: the runner sets the variables for its kernels, and this process must not keep them
    monkeypatch.setattr(os, "environ", {key: value for key, value in os.environ.items() if key not in exact.ENVIRONMENT})
    seen: dict[str, str | None] = {}

    def execute(notebooks, out_dir, parameters):
        seen.update({key: os.environ.get(key) for key in exact.ENVIRONMENT})
        return []

    monkeypatch.setattr(runner, "execute_notebooks", execute)
    monkeypatch.setattr(runner, "write_build_record", lambda *args: None)
    runner.run("smoke", run_dir=tmp_path / "run", only=["01"], overrides=[f"exact_cpu={str(pinned).lower()}"],
               build=False, root=tmp_path / "root")
    assert seen == (exact.ENVIRONMENT if pinned else dict.fromkeys(exact.ENVIRONMENT))

"""scripts/gpu_check.sh and benchmarks/run_all.py, run here without a GPU.

Nothing measures anything here: gpu_check.sh must refuse to run without CUDA, and with
SLOTSERVE_GPU_CHECK_ALLOW_CPU=1 and pytest's --collect-only its `tests` part shows which
tests a GPU run selects (every kernel test, then the other gpu-marked tests) and what it
writes beside them (env.txt naming the device and versions, summary.tsv); its budget skips
a part that no longer fits. run_all.py writes a report naming its environment.
On a machine with CUDA these are skipped: there the script runs for real.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/gpu_check.sh"
VENV = pathlib.Path(sys.prefix)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, gpu_check.sh would measure for real")


def _gpu_check(tmp_path, *args, **env):
    full = {**os.environ, "SLOTSERVE_VENV": str(VENV), **env}
    full.pop("VIRTUAL_ENV", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=300)


def test_refuses_without_cuda(tmp_path):
    proc = _gpu_check(tmp_path, str(tmp_path / "out-{device}"), "tests")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sees no CUDA device: nothing to check" in proc.stderr
    assert not list(tmp_path.glob("out-*")), "no results without a GPU"


def test_tests_part_selects_every_kernel_test_and_the_gpu_tests(tmp_path):
    proc = _gpu_check(tmp_path, str(tmp_path / "gpu-{device}"), "tests",
                      SLOTSERVE_GPU_CHECK_ALLOW_CPU="1", PYTEST_ADDOPTS="--collect-only -q")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "gpu-cpu"                     # {device}: no GPU here, and the name says so
    kernels = (out / "tests-kernels.txt").read_text()
    for f in sorted((REPO / "tests").glob("test_kernels_*.py")):
        assert f"tests/{f.name}" in kernels, f.name
    gpu = (out / "tests-gpu.txt").read_text()
    assert "tests/test_engine_gpu.py" in gpu and "test_kernels_" not in gpu   # no test runs twice
    assert "tests/test_rollout_guards.py" not in gpu   # -m gpu: only the gpu-marked ones
    env = (out / "env.txt").read_text()
    assert "device: none (CPU only: no GPU figures here)" in env
    assert f"torch: {torch.__version__}" in env and "triton: " in env and "driver: " in env
    assert f"venv: {VENV} | given (SLOTSERVE_VENV)" in env
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert [r[:2] for r in rows[1:]] == [["tests-kernels", "ok"], ["tests-gpu", "ok"]], rows
    assert (out / "tests-kernels.xml").exists() and (out / "tests-gpu.xml").exists()


def test_a_part_that_no_longer_fits_is_skipped(tmp_path):
    proc = _gpu_check(tmp_path, str(tmp_path / "out"), "engine", SLOTSERVE_GPU_CHECK_ALLOW_CPU="1",
                      SLOTSERVE_GPU_CHECK_SECONDS="20")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = (tmp_path / "out/summary.tsv").read_text().splitlines()
    assert rows[1].startswith("engine\tskipped (out of time)"), rows
    assert not (tmp_path / "out/engine.json").exists()


def test_run_all_names_its_environment(tmp_path):
    # bench_kernels on a machine without CUDA says so and exits 0: the cheapest real run
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/run_all.py"), "--out", str(tmp_path),
                           "--only", "bench_kernels", "--budget", "120"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = f"cpu-{os.cpu_count()}c"
    report = json.loads((tmp_path / f"{name}.json").read_text())
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["triton"]
    assert report["benchmarks"]["bench_kernels"]["status"] == "ok"
    assert report["benchmarks"]["bench_kernels"]["limit"] <= 120
    assert "needs a CUDA device" in report["benchmarks"]["bench_kernels"]["stdout"]
    assert f"torch {torch.__version__}" in (tmp_path / f"{name}.md").read_text()

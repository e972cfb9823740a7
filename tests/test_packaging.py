"""Dockerfile.cuda and the GPU workflow: lint both and check they name real steps."""

import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with the dev extra (bash scripts/setup.sh)")
    return path


def test_dockerfile_lints_clean():
    out = subprocess.run([_tool("hadolint"), "Dockerfile.cuda"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_is_a_slim_nonroot_wheel_install():
    text = (REPO / "Dockerfile.cuda").read_text()
    assert "nvidia/cuda:" in text and "runtime" in text
    assert "pip wheel" in text and "/wheels/*.whl" in text
    assert "\nUSER " in text and "USER root" not in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'ENTRYPOINT ["slotserve", "serve"]' in text
    # no source tree on the path: the runtime stage never copies the repository in
    runtime = text.split("AS runtime", 1)[1]
    assert "COPY . " not in runtime and "COPY serve" not in runtime


def test_workflow_lints_clean():
    out = subprocess.run([_tool("actionlint"), ".github/workflows/gpu.yml"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_workflow_runs_real_steps():
    wf = yaml.safe_load((REPO / ".github/workflows/gpu.yml").read_text())
    steps = wf["jobs"]["gpu"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "docker build -f Dockerfile.cuda" in runs
    assert "pytest" in runs and "-m gpu" in runs
    assert "benchmarks/run_all.py" in runs and (REPO / "benchmarks/run_all.py").exists()
    assert any("upload-artifact" in s.get("uses", "") for s in steps)
    assert "self-hosted" in wf["jobs"]["gpu"]["runs-on"]

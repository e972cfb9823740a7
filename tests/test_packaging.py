"""Dockerfile.cuda, the GPU workflow and scripts/gpu_check.sh, read without Docker or a GPU.

Nothing here can pull an image or reach a CUDA runner, so these parse the files and check
what issue 16 found broken: a C compiler and Python's headers in the runtime stage (Triton
builds a launcher at every kernel's first run), a writable results path, shared memory for
Ray, the kernel tests selected on CUDA, one torch version named once, the Triton that torch
pins, the fork guard, step limits that fit the job. The image's Python steps themselves run
in tests/test_packaging_install.py; gpu_check.sh and run_all.py in
tests/test_packaging_gpu_check.py.
"""

import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
DOCKERFILE = (REPO / "Dockerfile.cuda").read_text()
BUILD, RUNTIME = DOCKERFILE.split(" AS runtime", 1)
WORKFLOW_TEXT = (REPO / ".github/workflows/gpu.yml").read_text()
WORKFLOW = yaml.safe_load(WORKFLOW_TEXT)
JOB = WORKFLOW["jobs"]["gpu"]
STEPS = JOB["steps"]
RUNS = "\n".join(s.get("run", "") for s in STEPS)
GPU_CHECK = (REPO / "scripts/gpu_check.sh").read_text()
INSTALL = (REPO / "scripts/install.sh").read_text()
TORCH_VERSION = (REPO / "scripts/torch-version").read_text().strip()
LOCK_TEXT = (REPO / "requirements.lock").read_text()
LOCK = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", LOCK_TEXT, re.MULTILINE))

# The Triton each torch release's Linux x86_64 CUDA wheels pin: Requires-Dist of
# torch-<version>-cp311-cp311-manylinux_2_28_x86_64.whl on PyPI (a CUDA 13.0 build), read
# from the wheels' METADATA on 2026-12-04. A release's CUDA builds on download.pytorch.org
# (cu128, ...) have pinned the same Triton as its PyPI wheel; that index is unreachable
# from here, so scripts/install.sh checks it again when the image is built (the lock is a
# constraint while torch's CUDA build installs). Record the pin here when bumping torch.
TORCH_PINS_TRITON = {"2.11.0": "==3.6.0", "2.13.0": "==3.7.1", "2.14.0": "~=3.8.0", "2.14.1": "~=3.8.0",
                     "2.15.0": "~=3.9.0"}


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with the dev extra (bash scripts/setup.sh)")
    return path


def _step(name: str) -> dict:
    return next(s for s in STEPS if s.get("name", "").startswith(name))


# ------------------------------------------------------------------------ Dockerfile
def test_dockerfile_lints_clean():
    out = subprocess.run([_tool("hadolint"), "Dockerfile.cuda"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_is_a_slim_nonroot_wheel_install():
    assert "install.sh wheel /wheels" in BUILD and "install.sh app /wheels/*.whl" in RUNTIME
    assert "\nUSER 10001" in RUNTIME and "USER root" not in DOCKERFILE
    assert 'ENTRYPOINT ["slotserve", "serve"]' in RUNTIME
    # no source tree on the path: the runtime stage never copies the repository's code in
    assert not re.search(r"^COPY (\. |serve|kernels|bundles)", RUNTIME, re.MULTILINE)
    # the API port only (metrics are served on it too)
    assert re.findall(r"^EXPOSE (.+)$", DOCKERFILE, re.MULTILINE) == ["8000"]


def test_dockerfile_python_is_the_locks():
    locked = re.search(r"CPython (\d+\.\d+)", LOCK_TEXT).group(1)
    image = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)-slim", DOCKERFILE, re.MULTILINE)
    assert image and image.group(1) == locked, f"the lock is for CPython {locked}"
    assert re.findall(r"^FROM (\S+)", DOCKERFILE, re.MULTILINE) == ["${PYTHON_IMAGE}"] * 2


def test_runtime_stage_can_build_triton_launchers():
    # Triton compiles a C launcher against Python.h at every kernel's first launch: the
    # official python image carries the headers, the runtime stage installs the compiler
    # and libc headers, and the build stops unless `install.sh check` builds an extension
    # with Triton's own build function.
    apt = re.search(r"apt-get install[^\n]*", RUNTIME).group(0).split()
    assert "gcc" in apt and "libc6-dev" in apt
    assert RUNTIME.index("apt-get install") < RUNTIME.index("install.sh check")
    assert "from triton.runtime.build import _build" in INSTALL and "#include <Python.h>" in INSTALL


def test_image_steps_are_install_sh_in_order():
    # tests/test_packaging_install.py runs these same steps; nothing else installs Python packages
    assert re.findall(r"bash \S*install\.sh (\w+)", BUILD) == ["wheel"]
    assert re.findall(r"bash \S*install\.sh (\w+)", RUNTIME) == ["deps", "app", "check"]
    assert "pip install" not in DOCKERFILE


def test_one_torch_version_named_once():
    assert re.fullmatch(r"\d+\.\d+\.\d+", TORCH_VERSION)
    assert LOCK["torch"] == TORCH_VERSION
    # the image reads scripts/torch-version (through install.sh), with a CUDA build by default
    assert re.search(r"^COPY scripts/install\.sh scripts/torch-version ", RUNTIME, re.MULTILINE)
    assert re.search(r"^ARG SLOTSERVE_TORCH_BUILD=cu\d+$", RUNTIME, re.MULTILINE)
    assert '"$here/scripts/torch-version"' in INSTALL
    assert "scripts/torch-version" in (REPO / "scripts/setup.sh").read_text()
    # nobody else names a torch version
    version = re.compile(r"torch[=_ A-Z-]*(==|=)\s*\d|" + re.escape(TORCH_VERSION), re.IGNORECASE)
    for name, text in [("Dockerfile.cuda", DOCKERFILE), ("gpu.yml", WORKFLOW_TEXT), ("gpu_check.sh", GPU_CHECK),
                       ("install.sh", INSTALL)]:
        assert not version.search(text), f"{name} names a torch version: {version.search(text).group(0)!r}"


@pytest.mark.xfail((TORCH_VERSION, LOCK.get("triton")) == ("2.13.0", "3.9.0"), strict=True,
                   reason="known (issue 16): torch 2.13.0 pins triton==3.7.1 but requirements.lock has 3.9.0; "
                          "scripts/install.sh refuses to build the image until the lock is refreshed")
def test_locked_triton_is_the_one_torch_pins():
    assert TORCH_VERSION in TORCH_PINS_TRITON, (
        f"record which Triton torch {TORCH_VERSION}'s CUDA wheels pin in TORCH_PINS_TRITON (their METADATA)")
    pin = SpecifierSet(TORCH_PINS_TRITON[TORCH_VERSION])
    assert pin.contains(LOCK["triton"]), (
        f"torch {TORCH_VERSION} pins triton{pin}, requirements.lock has {LOCK['triton']}: CI would test the "
        "kernels with another Triton than the CUDA image runs")


def test_data_volume_holds_what_outlives_a_container():
    assert re.search(r'^VOLUME \["/data"\]', RUNTIME, re.MULTILINE)
    env = dict(re.findall(r"\b(SLOTSERVE_HOME|HF_HOME|XDG_CACHE_HOME|TRITON_CACHE_DIR)=(\S+)", RUNTIME))
    assert set(env) == {"SLOTSERVE_HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"}
    assert all(v.startswith("/data/") for v in env.values()), env
    assert "chown -R slotserve:slotserve /data" in RUNTIME


def test_health_check_is_liveness_not_readiness():
    check = re.search(r"^HEALTHCHECK .*\n.*CMD (.+)$", RUNTIME, re.MULTILINE).group(1)
    assert "http://127.0.0.1:8000/health\"" in check and "/healthz" not in check


# -------------------------------------------------------------------------- workflow
def test_workflow_lints_clean():
    out = subprocess.run([_tool("actionlint"), ".github/workflows/gpu.yml"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_workflow_runs_real_steps():
    assert "self-hosted" in JOB["runs-on"] and "gpu" in JOB["runs-on"]
    assert "docker build -f Dockerfile.cuda" in RUNS
    assert "/src/scripts/gpu_check.sh" in RUNS and "/src/benchmarks/run_all.py" in RUNS
    assert any("upload-artifact" in s.get("uses", "") for s in STEPS)
    # the image holds pytest and hypothesis (the lock's dev set): nothing installs at run time,
    # where /opt/venv belongs to root and the container runs as uid 10001
    assert "pip install" not in RUNS


def test_workflow_runs_for_forks_only_with_a_label():
    on = WORKFLOW.get("on", WORKFLOW.get(True))       # YAML 1.1 reads a bare `on` as true
    assert "pull_request_target" not in on
    assert "labeled" in on["pull_request"]["types"]
    guard = " ".join(JOB["if"].split())
    assert "github.event_name != 'pull_request'" in guard
    assert "github.event.pull_request.head.repo.full_name == github.repository" in guard
    assert "github.event.action == 'labeled' && github.event.label.name == 'gpu-ci'" in guard
    assert JOB.get("permissions", WORKFLOW.get("permissions")) == {"contents": "read"}
    assert _step("Check out")["with"]["persist-credentials"] is False


def test_workflow_container_has_gpus_shm_and_a_readonly_checkout():
    start = _step("Start the container")["run"]
    assert "--gpus all" in start
    assert re.search(r"--shm-size=\d+g|--ipc=host", start), "Ray's object store needs more than 64 MB of /dev/shm"
    mounts = re.findall(r"-v (\S+)", RUNS)
    assert mounts == ['"$PWD:/src:ro"'], mounts


def test_workflow_results_go_to_the_images_volume_and_come_back():
    # Written by the image's user under /data (its volume, chowned in the Dockerfile), then
    # copied out by the runner: no host folder is mounted for the container to write.
    assert "'/data/results/gpu-{device}'" in _step("GPU checks")["run"]
    assert "--out /data/results" in _step("Benchmarks")["run"]
    collect = _step("Collect the results")
    assert collect["if"] == "always()" and 'docker cp "$CTR:/data/results/." "$RESULTS/"' in collect["run"]
    assert JOB["env"]["RESULTS"].startswith("benchmarks/results/")
    upload = next(s for s in STEPS if "upload-artifact" in s.get("uses", ""))
    assert upload["if"] == "always()" and upload["with"]["path"].startswith("${{ env.RESULTS }}")


def test_workflow_runs_the_kernel_tests_on_the_gpu():
    run = _step("GPU checks")["run"]
    assert re.search(r"gpu_check\.sh \S+ kernels tests engine", run)
    assert '"$repo"/tests/test_kernels_*.py' in GPU_CHECK
    assert "-m gpu" in GPU_CHECK and '--ignore-glob="$repo/tests/test_kernels_*.py"' in GPU_CHECK


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", REPO / "benchmarks/run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_workflow_step_limits_fit_the_job():
    limits = {s.get("name", s.get("uses")): s.get("timeout-minutes") for s in STEPS}
    assert all(limits.values()), f"every step needs timeout-minutes: {limits}"
    assert sum(limits.values()) <= JOB["timeout-minutes"], limits
    # gpu_check.sh's own budget ends inside its step
    check = _step("GPU checks")
    seconds = int(re.search(r"SLOTSERVE_GPU_CHECK_SECONDS=(\d+)", check["run"]).group(1))
    assert seconds + 90 <= check["timeout-minutes"] * 60
    # run_all's benchmarks: their own limits inside its budget, the budget inside the step
    bench = _step("Benchmarks")
    only = re.search(r"--only ([\w ]+?) --budget", bench["run"]).group(1).split()
    budget = int(re.search(r"--budget (\d+)", bench["run"]).group(1))
    run_all = _run_all()
    assert set(only) | {"bench_kernels", "bench_engine"} == set(run_all.BENCHES)   # those two: gpu_check.sh
    assert sum(run_all.TIMEOUTS[b] for b in only) <= budget
    assert budget + 90 <= bench["timeout-minutes"] * 60


# ---------------------------------------------------------------------- gpu_check.sh
def test_gpu_check_fits_one_ten_minute_command():
    budget = int(re.search(r"SLOTSERVE_GPU_CHECK_SECONDS:-(\d+)", GPU_CHECK).group(1))
    assert budget <= 600 - 30
    # every part runs through run_part, i.e. under `timeout`, inside the budget
    parts = re.findall(r"^\s+run_part ([\w-]+) (\d+) ", GPU_CHECK, re.MULTILINE)
    assert [p for p, _ in parts] == ["kernels", "tests-kernels", "tests-gpu", "engine", "profile"]
    assert "|| parts=(kernels tests engine)" in GPU_CHECK  # the profile runs only when named
    assert "timeout --signal=INT" in GPU_CHECK and "deadline - SECONDS" in GPU_CHECK
    # the venv's console scripts or its interpreter with -P: never the repository root on sys.path
    assert not re.search(r"python3? -m pytest", GPU_CHECK)
    assert '"$py" -P -m pytest' in GPU_CHECK

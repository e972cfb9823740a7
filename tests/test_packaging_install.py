"""The image's Python steps, run as a non-root user in a fresh venv, without Docker.

Dockerfile.cuda installs Python packages only through scripts/install.sh (`wheel` in the
build stage; `deps`, `app`, `check` in the runtime stage: tests/test_packaging.py holds it
to that). This runs the same steps, in that order, on the same files the build stage
copies in, as a user who owns nothing of the repository: the wheel builds from those files
alone, the lock installs with --no-deps, the wheel installs into a venv the user owns, and
`check` finds the Triton torch pins and builds an extension with Triton's own build
function (a C compiler and Python's headers, what Triton needs at a kernel's first launch).

What it does not exercise: downloads (pip runs with no index; the venv sees this test's
own environment, which must match requirements.lock, through a .pth file, so every pin is
already satisfied), torch's CUDA build (the CPU build is installed here), the apt layer,
the python base image and Docker itself.
"""

import os
import pathlib
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
USER = "slotserve-test"


def _lock_mismatches() -> list[str]:
    out = []
    for line in (REPO / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line)
        if not m:
            continue
        name, want = m.groups()
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or have.split("+")[0] != want:
            out.append(f"{name} {have} (lock: {want})")
    return out


def _as_user() -> dict:
    """subprocess arguments that run a command as a user who is not root."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
        pw = pwd.getpwnam(USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _python_for(user: dict) -> str:
    """A Python of this minor version that the user can run (this venv's may sit under /root)."""
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for cand in [getattr(sys, "_base_executable", None), f"/usr/bin/python{minor}", f"/usr/local/bin/python{minor}",
                 shutil.which(f"python{minor}")]:
        if not cand or not os.path.exists(cand):
            continue
        try:
            probe = subprocess.run([cand, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                                   capture_output=True, text=True, cwd="/", **user)
        except PermissionError:                             # e.g. under /root
            continue
        if probe.returncode == 0 and probe.stdout.strip() == minor:
            return cand
    pytest.fail(f"no Python {minor} that a non-root user can run (looked for /usr/bin/python{minor} and on PATH)")


def _copy_build_context(dest: pathlib.Path) -> None:
    """What the Dockerfile's build stage COPYs, where it puts it (WORKDIR /src = dest)."""
    build = (REPO / "Dockerfile.cuda").read_text().split(" AS runtime", 1)[0]
    copies = re.findall(r"^COPY (?!--)(.+)$", build, re.MULTILINE)
    assert copies, "the build stage copies nothing?"
    for line in copies:
        *sources, target = line.split()
        for src in sources:
            to = dest / target / pathlib.Path(src).name if target.endswith("/") else dest / target
            to.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, to, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(REPO / src, to)


def test_image_python_steps_as_a_non_root_user():
    stale = _lock_mismatches()
    if stale:
        pytest.fail("this environment differs from requirements.lock, so the install cannot be checked offline: "
                    f"{', '.join(stale[:5])}; run scripts/setup.sh")
    user = _as_user()
    python = _python_for(user)
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="slotserve-install-"))
    try:
        _copy_build_context(tmp / "src")
        (tmp / "home").mkdir()
        if user:
            for p in [tmp, *tmp.rglob("*")]:
                os.lchown(p, user["user"], user["group"])
        tmp.chmod(0o755)
        steps = f"""
set -euo pipefail
{python} -m venv --without-pip venv
printf '%s\\n' {' '.join(sorted(site))} > "$(venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_test_env.pth"
export PATH=$PWD/venv/bin:$PATH
bash src/scripts/install.sh wheel "$PWD/wheels"      # the build stage
bash src/scripts/install.sh deps                     # the runtime stage, as Dockerfile.cuda orders them
bash src/scripts/install.sh app "$PWD"/wheels/*.whl
bash src/scripts/install.sh check
slotserve --help > /dev/null
python -P -c 'import slotserve, sys; sys.stdout.write(slotserve.__file__ + "\\n")'
ls wheels
"""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp / "home"), "LANG": "C.UTF-8",
               "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1", "SLOTSERVE_TORCH_BUILD": "cpu"}
        proc = subprocess.run(["bash", "-c", steps], cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
                              **user)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-6000:]
        venv_site = next(tmp.glob("venv/lib/python*/site-packages"))
        # slotserve came from the wheel into the user's venv, not from the source tree
        assert f"install: slotserve from {venv_site}/slotserve" in log, log[-3000:]
        assert str(venv_site / "slotserve" / "__init__.py") in proc.stdout
        assert re.search(r"^slotserve-[\w.]+-py3-none-any\.whl$", proc.stdout, re.MULTILINE)
        assert "Triton's launcher builds" in log
        if user:
            assert (venv_site / "slotserve").stat().st_uid == user["user"]
        # the wheel carries the three packages of pyproject's package-dir mapping
        for pkg in ["slotserve", "slotserve/kernels", "slotserve/bundles"]:
            assert (venv_site / pkg / "__init__.py").exists(), pkg
        # and `check` is a guard: without a C compiler (as in the old runtime stage) it fails
        no_cc = subprocess.run(["bash", "-c", "PATH=$PWD/venv/bin:$PATH bash src/scripts/install.sh check"], cwd=tmp,
                               env={**env, "CC": "/nonexistent/cc"}, capture_output=True, text=True, timeout=120,
                               **user)
        assert no_cc.returncode != 0 and "Triton cannot build its launcher here" in no_cc.stderr, no_cc.stderr[-2000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

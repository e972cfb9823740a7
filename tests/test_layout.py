"""The import layout DESIGN.md fixes: never resolve a bare `kernels` from the repo."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_package_names_map_to_directories():
    import slotserve
    import slotserve.bundles
    import slotserve.kernels

    assert pathlib.Path(slotserve.__file__).parent == REPO / "serve"
    assert pathlib.Path(slotserve.kernels.__file__).parent == REPO / "kernels"
    assert pathlib.Path(slotserve.bundles.__file__).parent == REPO / "bundles"


def _is_ours(origin) -> bool:
    """Whether a module file is the repository's ./kernels package (the shadow), compared
    file to file: a venv inside the clone holds the real `kernels` inside the repo too."""
    import slotserve.kernels
    return origin is not None and pathlib.Path(origin).resolve() == pathlib.Path(slotserve.kernels.__file__).resolve()


def test_bare_kernels_is_never_ours():
    # Hugging Face ships a `kernels` package; ./kernels must never shadow it.
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not _is_ours(spec.origin)


# Run by a Ray driver started from the repository root (cwd), the way `slotserve serve`,
# the tests and the benchmarks start Ray. Prints, per way of starting Ray, what a worker
# resolves `kernels` to and whether transformers' activations import there.
_RAY_PROBE = """
import importlib.util, json, os, sys
import ray
from slotserve.cli.local_ray import start_local_ray

@ray.remote
def probe():
    spec = importlib.util.find_spec("kernels")
    try:
        import transformers.activations  # imports `kernels` since transformers 5.25
        ok = True
    except Exception as exc:
        ok = repr(exc)
    return {"origin": spec.origin if spec else None, "transformers": ok}

out = {}
init = dict(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
ray.init(_node_ip_address="127.0.0.1", **init)      # plain Ray: the hazard itself
out["plain"] = ray.get(probe.remote()); ray.shutdown()
start_local_ray(sys.argv[1], **init)                 # how the project starts Ray
out["project"] = ray.get(probe.remote()); ray.shutdown()
assert os.getcwd() == sys.argv[2], os.getcwd()      # the driver is back where it was
print("RESULT" + json.dumps(out))
"""


def test_ray_worker_started_from_repo_root_imports_the_real_kernels(tmp_path):
    """The real hazard (DESIGN: Layout): Ray puts the driver's cwd on its workers'
    sys.path. A plain ray.init from the root shadows HF `kernels` (the control: this test
    can fail); slotserve's start_local_ray does not."""
    pytest.importorskip("ray")
    script = tmp_path / "probe.py"
    script.write_text(_RAY_PROBE)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(REPO)], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert out.returncode == 0 and line, out.stderr[-3000:]
    res = json.loads(line[0][len("RESULT"):])
    assert _is_ours(res["plain"]["origin"]), res          # plain Ray: ./kernels wins
    assert not _is_ours(res["project"]["origin"]), res    # ours: the real one, or none
    assert res["project"]["transformers"] is True, res


def test_transformers_imports_from_repo_root():
    # Run from the repo root the way a console script does (-P: the cwd is not put on
    # sys.path, as for `slotserve` and `pytest`): the editable install must not expose
    # ./kernels as a top-level package.
    out = subprocess.run(
        [sys.executable, "-P", "-c", "import transformers, importlib.util as u; s=u.find_spec('kernels'); print(s.origin if s else None)"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    origin = out.stdout.strip()
    assert origin == "None" or str(REPO / "kernels") not in origin


def test_no_root_conftest():
    assert not (REPO / "conftest.py").exists()

"""The import layout DESIGN.md fixes: never resolve a bare `kernels` from the repo."""

import importlib.util
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_package_names_map_to_directories():
    import slotserve
    import slotserve.bundles
    import slotserve.kernels

    assert pathlib.Path(slotserve.__file__).parent == REPO / "serve"
    assert pathlib.Path(slotserve.kernels.__file__).parent == REPO / "kernels"
    assert pathlib.Path(slotserve.bundles.__file__).parent == REPO / "bundles"


def test_bare_kernels_never_resolves_inside_repo():
    # Hugging Face ships a `kernels` package; ./kernels must never shadow it.
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin:
        assert REPO not in pathlib.Path(spec.origin).resolve().parents


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

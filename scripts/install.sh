#!/usr/bin/env bash
# The Python half of installing slotserve, in one place: Dockerfile.cuda runs these steps
# to build its image, and tests/test_packaging_install.py runs the same script in a fresh
# venv as a non-root user. Each step uses the active Python ($PYTHON, default python3:
# put the target venv first on PATH or name its interpreter).
#
#   scripts/install.sh wheel DIR    build slotserve's wheel into DIR from the source tree this
#                                   script sits in (the locked setuptools, no build isolation)
#   scripts/install.sh deps         torch == scripts/torch-version + $SLOTSERVE_TORCH_BUILD,
#                                   then every package of requirements.lock with --no-deps
#   scripts/install.sh app SPEC...  slotserve itself with --no-deps (a wheel file, or -e DIR)
#   scripts/install.sh check        what the first Triton kernel launch needs (see below)
#
# SLOTSERVE_TORCH_BUILD: cpu (the default, as in scripts/setup.sh) or a CUDA build such as
# cu128; its wheel comes from https://download.pytorch.org/whl/<build> unless
# SLOTSERVE_TORCH_INDEX names another index. A CUDA build brings its own CUDA libraries
# (nvidia-* wheels) and the Triton it was built with; it is installed with the lock as a
# constraint, so a torch whose Triton differs from the locked one (the one CI tests the
# kernels with) stops the install here instead of being overwritten by the lock.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
pip=("$PY" -m pip --disable-pip-version-check)
step=${1:?usage: scripts/install.sh wheel DIR | deps | app SPEC... | check}
shift

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The lock without slotserve itself: the project is installed by `app`, never from the lock.
lock=$tmp/requirements.txt
grep -vE '^slotserve( |=|@|$)' "$here/requirements.lock" > "$lock"

case $step in
wheel)
  dest=${1:?usage: scripts/install.sh wheel DIR}
  # setuptools alone: it has built wheels itself (bdist_wheel) since 70.1
  grep -E '^setuptools==' "$lock" > "$tmp/build.txt"
  "${pip[@]}" install -q -r "$tmp/build.txt"
  "${pip[@]}" wheel -q --no-deps --no-build-isolation --wheel-dir "$dest" "$here"
  ;;
deps)
  version=$(cat "$here/scripts/torch-version")
  build=${SLOTSERVE_TORCH_BUILD:-cpu}
  index=${SLOTSERVE_TORCH_INDEX:-https://download.pytorch.org/whl/$build}
  if [ "$build" = cpu ]; then
    # The CPU build's dependencies are all in the lock.
    "${pip[@]}" install -q --no-deps --retries 1 "torch==$version+cpu" --extra-index-url "$index"
  else
    "${pip[@]}" install -q "torch==$version+$build" --extra-index-url "$index" -c "$lock" || {
      echo "install: torch $version+$build from $index failed (above). If pip reports a conflict on" \
           "triton, this torch pins another Triton than requirements.lock: re-lock with scripts/lock.sh." >&2
      exit 1
    }
  fi
  "${pip[@]}" install -q --no-deps -r "$lock"
  ;;
app)
  [ $# -gt 0 ] || { echo "usage: scripts/install.sh app SPEC..." >&2; exit 2; }
  "${pip[@]}" install -q --no-deps "$@"
  ;;
check)
  # Run from an empty folder with -P: the repository root must never reach sys.path (its
  # ./kernels would shadow the `kernels` package transformers imports).
  cd "$tmp"
  "$PY" -P - <<'EOF'
"""The installed set is importable, its Triton is the one torch pins, and Triton can build
the C launcher it compiles at every kernel's first launch (a C compiler and Python's
headers), checked with Triton's own build function; only libcuda (the driver) is left out."""
import importlib.metadata as md
import importlib.util
import pathlib
import sys

from packaging.requirements import Requirement

import slotserve
import torch
import transformers  # noqa: F401
import ray  # noqa: F401
import triton
from triton.runtime.build import _build

triton_pin = [r for r in map(Requirement, md.requires("torch") or []) if r.name == "triton"
              and (r.marker is None or r.marker.evaluate({"extra": ""}))]
if triton_pin and not triton_pin[0].specifier.contains(triton.__version__, prereleases=True):
    sys.exit(f"install: torch {torch.__version__} pins {triton_pin[0]}, but triton {triton.__version__} is installed")

src = pathlib.Path("slotserve_cc_check.c")
src.write_text("""#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "slotserve_cc_check", NULL, -1, methods};
PyMODINIT_FUNC PyInit_slotserve_cc_check(void) { return PyModule_Create(&module); }
""")
try:
    so = _build("slotserve_cc_check", str(src), ".", [], [], [], [])
except Exception as e:  # no compiler, no Python.h, no libc headers: Triton would fail the same way
    sys.exit(f"install: Triton cannot build its launcher here ({type(e).__name__}: {e}); "
             "install a C compiler (gcc, libc6-dev) and Python's headers")
spec = importlib.util.spec_from_file_location("slotserve_cc_check", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert mod.answer() == 42
print(f"install: slotserve from {pathlib.Path(slotserve.__file__).parent}, torch {torch.__version__}, "
      f"triton {triton.__version__} ({'torch pins ' + str(triton_pin[0].specifier) if triton_pin else 'torch pins none'}), "
      "Triton's launcher builds")
EOF
  ;;
*)
  echo "usage: scripts/install.sh wheel DIR | deps | app SPEC... | check" >&2
  exit 2
  ;;
esac

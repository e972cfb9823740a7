"""Running the Triton kernels through Triton's CPU interpreter (tests on machines without a GPU).

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, i.e. at import:
both for our kernels and for Triton's own library functions (`tl.sum`, `tl.max`, ...).
If anything imported Triton before the variable was set, this process can no longer
interpret kernels; the tests then re-run themselves in a fresh process (`run_fresh`).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path



def _kernel_modules() -> list[str]:
    """Every module of this package (new kernel files are found without a list to keep)."""
    import pkgutil
    here = Path(__file__).resolve().parent
    return [m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in {"testing", "aot", "dispatch"}]


def interpreter_ready() -> bool:
    """Set TRITON_INTERPRET=1; True when this process can run our kernels in the interpreter."""
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(std.sum, InterpretedFunction):
        return False                              # Triton itself was imported for a GPU
    from triton.runtime.jit import JITFunction

    for name in _kernel_modules():                # ours may have been imported before the variable
        mod = importlib.import_module(f"{__package__}.{name}")
        if any(isinstance(v, JITFunction) for v in vars(mod).values()):
            importlib.reload(mod)                 # same module dict: earlier imports see new kernels
    return True


def run_fresh(test_files: list[str | Path], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run pytest on `test_files` in a new process that sets TRITON_INTERPRET=1 before any import."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(test_files[0]).resolve().parents[1]
    # the console script, not `python -m pytest`, which would put the repository root (and
    # its ./kernels, shadowing Hugging Face's `kernels`) on sys.path
    pytest = Path(sys.executable).with_name("pytest")
    return subprocess.run([str(pytest), "-q", "-p", "no:cacheprovider", *map(str, test_files)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)

"""Re-runs the Triton-vs-reference kernel tests in a fresh process when this one cannot.

Triton decides at import whether kernels are interpreted. When another test imported
Triton first (without TRITON_INTERPRET=1), the kernel test modules skip themselves and
this test runs them in a new process with the variable set from the start.
"""

import pathlib

import pytest
import torch

from slotserve.kernels.testing import interpreter_ready, run_fresh

HERE = pathlib.Path(__file__).resolve().parent
# test_kernels_sm90_compile.py compiles in its own subprocess, interpreter or not
FILES = sorted(p for p in HERE.glob("test_kernels_*.py") if p.name not in {"test_kernels_interpreter.py",
                                                                          "test_kernels_refs.py",
                                                                          "test_kernels_sm90_compile.py"})


@pytest.mark.skipif(torch.cuda.is_available() or interpreter_ready(),
                    reason="the kernel tests run in this process (CUDA, or Triton's interpreter is active)")
def test_kernel_modules_in_fresh_interpreter_process():
    out = run_fresh(FILES)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]

"""CPU serving processes get OpenMP settings before torch loads (slotserve.cli.openmp)."""

import os
import subprocess
import sys

from slotserve.cli import openmp

# the CLI's entry point (help only), then what it leaves in the environment
PROBE = ("import os, slotserve.cli as c; c.main([]); "
         "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in openmp.DEFAULTS}
    return {**env, **extra}


def test_the_cli_sets_the_defaults_before_torch():
    out = subprocess.run([sys.executable, "-P", "-c", PROBE], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-2:] == [openmp.DEFAULTS["OMP_WAIT_POLICY"], openmp.DEFAULTS["GOMP_SPINCOUNT"]]


def test_the_operators_values_win():
    out = subprocess.run([sys.executable, "-P", "-c", PROBE], env=_env(OMP_WAIT_POLICY="PASSIVE"),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-2:] == ["PASSIVE", openmp.DEFAULTS["GOMP_SPINCOUNT"]], out.stderr


def test_too_late_once_torch_is_loaded():
    import torch  # noqa: F401  (this process has torch: settings would no longer reach libgomp)

    env = {}
    assert openmp.configure(env) == {} and env == {}

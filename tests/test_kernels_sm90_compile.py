"""Every Triton kernel compiles for sm_90 (H100) ahead of time, without a GPU.

The interpreter tests run the kernels' semantics on CPU; this runs the real compiler
(Triton -> PTX -> Triton's bundled ptxas -> cubin) on what each launcher launches at
H100-sized shapes (`python -m slotserve.kernels.aot`, in a fresh process: Triton must be
imported without TRITON_INTERPRET), so code the interpreter accepts but the compiler
rejects fails here. It also checks: no register spills anywhere, and rope / store_kv move
their data with 16-byte vector accesses (`st.global.v4.b32` only). Registers, spills,
shared memory and PTX memory opcodes per kernel are printed (`pytest -s`) and in the JSON.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ptxas() -> pathlib.Path | None:
    # Found without importing Triton here (that would decide interpretation for this process).
    if os.environ.get("TRITON_PTXAS_PATH"):
        return pathlib.Path(os.environ["TRITON_PTXAS_PATH"])
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    ptxas = _ptxas()
    if ptxas is None or not ptxas.is_file() or not os.access(ptxas, os.X_OK):
        pytest.skip(f"no ptxas to compile for sm_90 with (looked at {ptxas}); Triton's NVIDIA backend is missing")
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")       # fresh: every kernel really goes through ptxas
    out = tmp / "aot.json"
    proc = subprocess.run([sys.executable, "-P", "-m", "slotserve.kernels.aot", "--arch", "90", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90(aot):
    proc, report = aot
    failed = [f"{k['case']} {k['kernel']}: {k['error']}" for k in report["kernels"] if not k["ok"]]
    assert not failed, "\n".join(failed)
    assert report["uncovered"] == [], f"kernels no AOT case launches: {report['uncovered']}"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for k in report["kernels"]:
        assert k["cubin_bytes"] > 0 and k["n_regs"] is not None, k


def test_no_register_spills(aot):
    _, report = aot
    spilled = [f"{k['case']} {k['kernel']}: regs={k['n_regs']} spill stores={k['spill_stores']} "
               f"loads={k['spill_loads']} {k['constexprs']}" for k in report["kernels"]
               if k["spill_stores"] or k["spill_loads"]]
    assert not spilled, "\n".join(spilled)


@pytest.mark.parametrize("kernel", ["_rope_kernel", "_store_kv_kernel"])
def test_bandwidth_kernels_use_16_byte_accesses(aot, kernel):
    # bf16 rows of D=64/128: every q/k/v/cache store a st.global.v4.b32, and most loads too
    _, report = aot
    rows = [k for k in report["kernels"] if k["kernel"] == kernel]
    assert rows
    for k in rows:
        stores = {op: n for op, n in k["ptx_mem"].items() if op.startswith("st.global")}
        assert set(stores) == {"st.global.v4.b32"}, (k["case"], k["ptx_mem"])
        wide = k["ptx_mem"].get("ld.global.v4.b32", 0)
        narrow = sum(n for op, n in k["ptx_mem"].items() if op.startswith("ld.global") and op != "ld.global.v4.b32")
        assert wide >= 2 and wide > narrow, (k["case"], k["ptx_mem"])

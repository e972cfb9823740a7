"""Run every benchmark and write benchmarks/results/<machine>.json plus a markdown table.

    benchmarks/run_all.py [--out DIR] [--quick] [--only NAME...] [--timeout S] [--budget S]

Each benchmark runs as its own process (so one crashing benchmark does not lose the
others), from an empty scratch folder, under its own time limit (TIMEOUTS, or --timeout
for all), and its JSON, written to a file or printed on stdout, is gathered under its
name; `drill` is the rollout benchmark (time to detect and revert a bad candidate), run
through the venv's `slotserve` console script. --budget caps the whole run: a benchmark
that no longer fits is skipped and says so. The report is rewritten after every
benchmark, so a run stopped from outside keeps what finished.
The machine name is the GPU's name when CUDA is present, else `cpu-<cores>c`; the report
names the device, driver, torch, CUDA and Triton it ran with. On CUDA, bench_kernels
checks every kernel against its reference first and bench_rollback runs on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
BIN = pathlib.Path(sys.executable).parent
# name -> (argv, how the JSON comes back, takes --quick, extra argv on CUDA)
# "file": we pass `--json FILE`; "stdout": the command prints one JSON object.
SPECS = {
    "bench_kernels": ([sys.executable, str(HERE / "bench_kernels.py"), "--check"], "file", False, []),
    "bench_engine": ([sys.executable, str(HERE / "bench_engine.py")], "file", True, []),
    "bench_rollback": ([sys.executable, str(HERE / "bench_rollback.py"), "--json"], "stdout", False,
                       ["--device", "cuda"]),
    "bench_serving": ([sys.executable, str(HERE / "bench_serving.py")], "file", True, []),
    "drill": ([str(BIN / "slotserve"), "drill", "--json"], "stdout", False, []),
}
BENCHES = list(SPECS)
# Seconds each may take: sized for a CUDA runner; .github/workflows/gpu.yml's step limits
# are checked against these (tests/test_packaging.py).
TIMEOUTS = {"bench_kernels": 600, "bench_engine": 600, "bench_rollback": 300, "bench_serving": 420, "drill": 300}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def machine_name() -> str:
    if _cuda():
        import torch

        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return f"cpu-{os.cpu_count()}c"


def environment() -> dict:
    """What the figures were measured with: device, driver, torch (and its CUDA), Triton."""
    env = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch

        env["torch"], env["cuda"] = torch.__version__, torch.version.cuda
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        env["torch"] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if env.get("device", "cpu") != "cpu":
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def run_one(name: str, quick: bool, timeout: float, cuda: bool) -> dict:
    argv, mode, takes_quick, on_cuda = SPECS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        cmd = [*argv, *(on_cuda if cuda else [])] + (["--json", str(out)] if mode == "file" else [])
        cmd += ["--quick"] if quick and takes_quick else []
        t0 = time.perf_counter()
        try:
            # cwd: an empty folder, never the repository root (./kernels would shadow a package)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired as e:
            partial = json.loads(out.read_text()) if mode == "file" and out.exists() else None
            return {"status": "timeout", "seconds": round(timeout, 1), "result": partial,
                    "stdout": (e.stdout or b"")[-4000:].decode(errors="replace")}   # bytes, even with text=True
        except OSError as e:                                 # e.g. no console script in this venv
            return {"status": "failed", "error": str(e)}
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"status": "failed", "rc": proc.returncode, "seconds": round(took, 1),
                    "stderr": proc.stderr[-2000:], "stdout": proc.stdout[-2000:]}
        if mode == "stdout":
            data, shown = json.loads(proc.stdout), proc.stderr[-4000:]
        else:
            data, shown = (json.loads(out.read_text()) if out.exists() else None), proc.stdout[-4000:]
        return {"status": "ok", "seconds": round(took, 1), "result": data, "stdout": shown}


def write(report: dict, out: pathlib.Path) -> None:
    machine = report["machine"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{machine}.json").write_text(json.dumps(report, indent=2) + "\n")
    env = report["environment"]
    lines = [f"# Benchmarks on {machine}", "",
             f"{env.get('device')}, driver {env.get('driver', '-')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
             f"triton {env.get('triton')}, Python {env.get('python')}; started {report['started']}.", "",
             "| benchmark | status | seconds | limit |", "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {r['status']} | {r.get('seconds', '')} | {r.get('limit', '')} |"
              for n, r in report["benchmarks"].items()]
    (out / f"{machine}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    ap.add_argument("--only", nargs="*", default=BENCHES, choices=BENCHES)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: TIMEOUTS)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run")
    args = ap.parse_args()

    start = time.monotonic()
    cuda = _cuda()
    machine = machine_name()
    out = pathlib.Path(args.out)
    report = {"machine": machine, "environment": environment(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "benchmarks": {}}
    for name in args.only:
        limit = args.timeout or TIMEOUTS[name]
        if args.budget is not None:
            limit = min(limit, args.budget - (time.monotonic() - start))
        if limit < 30:
            report["benchmarks"][name] = {"status": "skipped (out of time)", "limit": round(limit)}
            write(report, out)
            continue
        print(f"== {name} (at most {limit:.0f} s)", flush=True)
        report["benchmarks"][name] = res = run_one(name, args.quick, limit, cuda)
        res["limit"] = round(limit)
        print(res.get("stdout") or res.get("stderr") or res["status"], flush=True)
        write(report, out)
    write(report, out)
    print(f"wrote {out / (machine + '.json')}")
    return 0 if all(r["status"] == "ok" for r in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

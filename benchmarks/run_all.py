"""Run every benchmark and write benchmarks/results/<machine>.json plus a markdown table.

    python benchmarks/run_all.py [--out DIR] [--quick]

Each benchmark runs as its own process (so one crashing benchmark does not lose the
others) and its JSON, written to a file or printed on stdout, is gathered under its
name; `drill` is the rollout benchmark (time to detect and revert a bad candidate).
The machine name is the GPU's name when CUDA is present, else `cpu-<cores>c`.
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
# name -> (argv after the interpreter, how the JSON comes back, takes --quick)
# "file": we pass `--json FILE`; "stdout": the command prints one JSON object.
SPECS = {
    "bench_kernels": ([str(HERE / "bench_kernels.py")], "file", False),
    "bench_engine": ([str(HERE / "bench_engine.py")], "file", True),
    "bench_rollback": ([str(HERE / "bench_rollback.py"), "--json"], "stdout", False),
    "bench_serving": ([str(HERE / "bench_serving.py")], "file", True),
    "drill": (["-m", "slotserve.cli", "drill", "--json"], "stdout", False),
}
BENCHES = list(SPECS)


def machine_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    except ImportError:
        pass
    return f"cpu-{os.cpu_count()}c"


def run_one(name: str, quick: bool, timeout: float) -> dict:
    argv, mode, takes_quick = SPECS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        cmd = [sys.executable, *argv] + (["--json", str(out)] if mode == "file" else [])
        cmd += ["--quick"] if quick and takes_quick else []
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "seconds": timeout}
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"status": "failed", "rc": proc.returncode, "stderr": proc.stderr[-2000:]}
        if mode == "stdout":
            data, shown = json.loads(proc.stdout), proc.stderr[-4000:]
        else:
            data, shown = (json.loads(out.read_text()) if out.exists() else None), proc.stdout[-4000:]
        return {"status": "ok", "seconds": round(took, 1), "result": data, "stdout": shown}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    ap.add_argument("--only", nargs="*", default=BENCHES, choices=BENCHES)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark")
    args = ap.parse_args()

    machine = machine_name()
    report = {"machine": machine, "platform": platform.platform(), "python": platform.python_version(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "benchmarks": {}}
    for name in args.only:
        print(f"== {name}", flush=True)
        report["benchmarks"][name] = res = run_one(name, args.quick, args.timeout)
        print(res.get("stdout") or res.get("stderr") or res["status"], flush=True)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{machine}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Benchmarks on {machine}", "", "| benchmark | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {n} | {r['status']} | {r.get('seconds', '')} |" for n, r in report["benchmarks"].items()]
    (out / f"{machine}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (machine + '.json')}")
    return 0 if all(r["status"] == "ok" for r in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a batch-1 decode step's time goes on CUDA: a torch.profiler trace of the engine.

    python benchmarks/profile_decode.py [--model-size 1b] [--tokens 64] [--json OUT]

Decodes `--tokens` greedy tokens for one request (after a warm-up that captures the CUDA
graphs) under torch.profiler and reports, per decode step: wall time, the GPU time of
the kernels that ran (the sum of their durations), so the GPU's idle share, the number of
kernel launches, and the kernels that took the most GPU time. Kernel time well below wall
time means the step waits on the host (Python, launches, syncs), not on HBM; kernel time
near wall time with a low bandwidth fraction means the kernels themselves are slow.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for bench_engine's builder
from bench_engine import PEAK_BW, SIZES, build  # noqa: E402

from slotserve.engine import Engine, SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-size", default="1b", choices=list(SIZES))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu only checks this script (no kernels to see)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("needs CUDA")
    torch.set_grad_enabled(False)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        build(args.model_size, dev, dtype, tmp)
        eng = Engine.from_pretrained(tmp, device=dev, dtype=dtype, max_model_len=2048, max_batch=64,
                                     kv_cache_tokens=64 * 512)
        weight_bytes = eng.memory().weight_bytes
        prompt = list(range(1, 129))
        sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        eng.generate([prompt], sp)                                   # warm-up: graphs captured
        prompt2 = list(range(200, 328))
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            h = eng.submit(prompt2, sp)
            h.result()
            sync()
            wall = time.perf_counter() - t0
        decode_wall = h.finished_at - h.first_token_at
        steps = args.tokens - 1
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        by_name: dict[str, list[float]] = defaultdict(list)
        for e in kernels:
            by_name[e.name].append(e.time_range.elapsed_us())
        gpu_us = sum(sum(v) for v in by_name.values())
        # the kernels' busy span: first start to last end on the device, in the profiled window
        spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        busy = 0.0
        cur_s, cur_e = spans[0] if spans else (0, 0)
        for s, e in spans[1:]:
            if s > cur_e:
                busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy += cur_e - cur_s
        eng.close()
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    peak = next((bw for key, bw in PEAK_BW if key.lower() in name.lower()), None)
    per_step_ms = decode_wall / steps * 1e3
    report = {
        "device": name, "torch": torch.__version__, "model_size": args.model_size, "tokens": args.tokens,
        "weight_bytes": weight_bytes, "peak_bytes_s": peak,
        "decode_ms_per_token_wall": per_step_ms,
        "roofline_ms_per_token": weight_bytes / peak * 1e3 if peak else None,
        "profiled_window_s": wall,
        "kernel_time_ms_total": gpu_us / 1e3,
        "kernel_busy_ms_total": busy / 1e3,
        "kernel_launches": len(kernels),
        "kernels_per_token": len(kernels) / args.tokens,
        "gpu_busy_fraction_of_window": busy / 1e6 / wall,
        "gpu_busy_fraction_of_decode": min(1.0, busy / 1e6 / decode_wall),
        "top_kernels": [{"name": n[:120], "calls": len(v), "total_ms": sum(v) / 1e3,
                         "median_us": statistics.median(v)} for n, v in top],
    }
    print(f"{name}, {args.model_size}: decode {per_step_ms:.3f} ms/token wall"
          + (f" (roofline {report['roofline_ms_per_token']:.3f} ms)" if peak else ""))
    print(f"profiled {wall * 1e3:.1f} ms: kernels busy {busy / 1e3:.1f} ms "
          f"({report['gpu_busy_fraction_of_window']:.0%}), {len(kernels)} kernels "
          f"({report['kernels_per_token']:.1f} per token)")
    for k in report["top_kernels"]:
        print(f"  {k['total_ms']:8.2f} ms  {k['calls']:5d} x {k['median_us']:8.1f} us  {k['name']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Automatic prefix caching on vs off: the same engine config, the same requests, one process.

    python benchmarks/bench_prefix_cache.py [--device cpu|cuda] [--model-size 25m|1b] [--requests 16]
        [--rate 4] [--system-tokens 512] [--repeats 3] [--kv-cache-tokens 12288] [--json PATH] [--md PATH]

Workloads (requests arrive as a Poisson process with a fixed seed per repeat; greedy,
`ignore_eos`, a fixed number of new tokens each):
- shared: every request is one long system prompt (`--system-tokens`) plus a short
  distinct suffix, like chat requests of one deployment. Each repeat draws a new system
  prompt, so every "on" run starts cold for it and only its first request computes it.
- distinct: the same shapes with no shared tokens: what caching costs when nothing hits
  (hashing, registering, eviction). It runs second, and the default KV pool holds about
  1.3 runs, so its later repeats run in a pool full of cache (every admission evicts).
Throughput = output tokens / (last completion - first arrival): when an engine keeps up
with the arrivals it is bounded by their span, so at the default rate the on/off
throughput ratio says how much sooner the same work is done, TTFT says how much sooner
each answer starts.
Two engines (caching on / off) run each workload alternately (on, off, on, off, ...);
per repeat the on/off ratios of TTFT and throughput are taken on identical requests, and
the medians of those ratios are reported beside the medians of each side. The model is
the random Llama of bench_engine.py (imported, not copied). Results go to
benchmarks/results/prefix-cache-<device>.{json,md} unless --json/--md say otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from slotserve.cli import openmp

openmp.configure()   # before torch loads (see slotserve.cli.openmp), as bench_engine does

import torch  # noqa: E402

from bench_engine import SIZES, build, submit_on_arrival  # noqa: E402  (benchmarks/ is the script's directory)
from slotserve.engine import Engine, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def workload(n, rate, vocab, seed, system_tokens, suffix_range, new_tokens, shared):
    """[(arrival_s, prompt, new_tokens)]: system prompt (shared or per request) + a distinct suffix."""
    rng = random.Random(seed)
    system = [rng.randrange(1, vocab) for _ in range(system_tokens)]
    t, reqs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prefix = system if shared else [rng.randrange(1, vocab) for _ in range(system_tokens)]
        suffix = [rng.randrange(1, vocab) for _ in range(rng.randint(*suffix_range))]
        reqs.append((t, prefix + suffix, new_tokens))
    return reqs


def timed(eng, reqs):
    """Submit `reqs` at their arrival times -> (metrics as bench_engine's run_engine reports
    them + this run's prefix-cache counters, outputs)."""
    before, evicted = eng.stats(), eng.allocator.num_evicted
    t0, handles = submit_on_arrival(eng, reqs)
    end = max(h.finished_at for _, h in handles)
    ttft = sorted(h.first_token_at - at for at, h in handles)
    after = eng.stats()
    res = {"tok_s": sum(len(h.output_ids) for _, h in handles) / (end - t0 - reqs[0][0]),
           "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[int(0.9 * len(ttft))],
           "latency_median_s": statistics.median(h.finished_at - at for at, h in handles)}
    for k in ("prompt_tokens", "cached_prompt_tokens", "preemptions"):
        res[k] = after[k] - before[k]
    res["evicted_blocks"] = eng.allocator.num_evicted - evicted
    return res, [h.output_ids for _, h in handles]


def compare(on, off, name, reqs_for, repeats):
    runs = []
    for r in range(repeats):
        reqs = reqs_for(r)
        a, out_on = timed(on, reqs)
        b, out_off = timed(off, reqs)
        runs.append((a, b, sum(x == y for x, y in zip(out_on, out_off))))
        print(f"  {name} repeat {r}: on {a['tok_s']:.1f} tok/s, TTFT median {a['ttft_median_s'] * 1e3:.0f} ms "
              f"(hit {a['cached_prompt_tokens']}/{a['prompt_tokens']} prompt tokens) | off {b['tok_s']:.1f} tok/s, "
              f"TTFT median {b['ttft_median_s'] * 1e3:.0f} ms", flush=True)
    med = statistics.median
    keys = ("tok_s", "ttft_median_s", "ttft_p90_s", "latency_median_s", "prompt_tokens", "cached_prompt_tokens",
            "preemptions", "evicted_blocks")
    return {
        "on": {k: med(r[0][k] for r in runs) for k in keys},
        "off": {k: med(r[1][k] for r in runs) for k in keys},
        # each pair ran back to back on identical requests
        "throughput_ratio": med(r[0]["tok_s"] / r[1]["tok_s"] for r in runs),
        "ttft_speedup": med(r[1]["ttft_median_s"] / r[0]["ttft_median_s"] for r in runs),
        "per_repeat_throughput_ratio": [r[0]["tok_s"] / r[1]["tok_s"] for r in runs],
        "per_repeat_ttft_speedup": [r[1]["ttft_median_s"] / r[0]["ttft_median_s"] for r in runs],
        "hit_rate": med(r[0]["cached_prompt_tokens"] / r[0]["prompt_tokens"] for r in runs),
        "outputs_identical": f"{sum(r[2] for r in runs)}/{sum(len(reqs_for(i)) for i in range(repeats))}",
    }


def markdown(report: dict, command: str) -> str:
    c = report["config"]
    sfx = f"{c['suffix_tokens'][0]}-{c['suffix_tokens'][1]}"
    lines = [
        f"# Prefix caching on vs off — {report['device_kind']}", "",
        f"`{command}`", "",
        f"{report['date']}, {report['device']}, torch {report['torch']}, {report['threads']} intra-op threads, "
        f"{report['dtype']}; "
        f"load average {report['load_avg_at_start'][0]:.2f} at the start, {report['load_avg_at_end'][0]:.2f} at the "
        f"end (1-minute; the machine is shared, other work skews timings). Model: bench_engine's "
        f"{report['model_size']} random Llama ({report['parameters'] / 1e6:.1f}M parameters). "
        f"{c['requests']} requests per run, Poisson arrivals at {c['rate']}/s, prompt = {c['system_tokens']}-token "
        f"system prompt + {sfx}-token distinct suffix, {c['new_tokens']} new tokens each (greedy); "
        f"max_prefill_tokens {report['max_prefill_tokens']}, block size 16, KV pool {c['kv_cache_tokens']} tokens "
        f"(the distinct runs fill it with cache: later ones evict). {c['repeats']} repeats, on/off alternating; "
        "ratios are medians of the per-repeat on/off pairs.", "",
        "| workload | caching | output tok/s | TTFT median ms | TTFT p90 ms | latency median ms | prompt tokens "
        "from cache | blocks evicted |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("shared", "distinct"):
        w = report[name]
        for side in ("on", "off"):
            s = w[side]
            lines.append(f"| {name} | {side} | {s['tok_s']:.1f} | {s['ttft_median_s'] * 1e3:.0f} | "
                         f"{s['ttft_p90_s'] * 1e3:.0f} | {s['latency_median_s'] * 1e3:.0f} | "
                         f"{s['cached_prompt_tokens']:.0f} / {s['prompt_tokens']:.0f} | {s['evicted_blocks']:.0f} |")
    lines += ["", "| workload | throughput on/off | TTFT off/on (speed-up) | per-repeat throughput | per-repeat TTFT "
              "speed-up | greedy outputs on == off |", "| --- | --- | --- | --- | --- | --- |"]
    for name in ("shared", "distinct"):
        w = report[name]
        lines.append(f"| {name} | {w['throughput_ratio']:.2f}x | {w['ttft_speedup']:.2f}x | "
                     f"{' '.join(f'{x:.2f}' for x in w['per_repeat_throughput_ratio'])} | "
                     f"{' '.join(f'{x:.2f}' for x in w['per_repeat_ttft_speedup'])} | {w['outputs_identical']} |")
    lines += ["", "Throughput = output tokens / (last completion - first arrival); an engine that keeps up with "
              "the arrivals is bounded by their span, so the throughput ratio says how much sooner the same work "
              "is done. The 1-minute load average counts this benchmark's own threads once it runs (and decays "
              "from whatever ran in the minute before)."]
    if any(report[w]["outputs_identical"].split("/")[0] != report[w]["outputs_identical"].split("/")[1]
           for w in ("shared", "distinct")):
        lines += ["", "Greedy outputs may differ between on and off on this default-init random model (its logits "
                  "tie within fp32 noise; a cached prefix is attended through the chunked-prefill path, a fresh "
                  "one through plain causal attention): exactness is what tests/test_prefix_cache.py checks, on "
                  "models with spread logits."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model-size", default="auto", choices=["auto", *SIZES])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (cpu 4, cuda 40)")
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--suffix-tokens", default="16,48", help="min,max distinct suffix length")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-tokens", type=int, default=12288,
                    help="KV pool; the default holds ~1.3 runs, so later runs evict (a pool full of cache)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    kind = device.type
    size = args.model_size if args.model_size != "auto" else ("1b" if kind == "cuda" else "25m")
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    rate = args.rate or (40.0 if kind == "cuda" else 4.0)
    suffix = tuple(int(x) for x in args.suffix_tokens.split(","))
    json_path = Path(args.json) if args.json else RESULTS / f"prefix-cache-{kind}.json"
    md_path = Path(args.md) if args.md else RESULTS / f"prefix-cache-{kind}.md"
    torch.set_grad_enabled(False)

    report = {"device_kind": kind,
              "device": torch.cuda.get_device_name(device) if kind == "cuda" else
              f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "model_size": size,
              "dtype": str(dtype).removeprefix("torch."), "openmp": {k: os.environ.get(k) for k in openmp.DEFAULTS},
              "config": {"requests": args.requests, "rate": rate, "system_tokens": args.system_tokens,
                         "suffix_tokens": list(suffix), "new_tokens": args.new_tokens, "repeats": args.repeats,
                         "kv_cache_tokens": args.kv_cache_tokens},
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_at_start": os.getloadavg()}
    vocab = SIZES[size]["vocab_size"]
    kw = dict(device=device, dtype=dtype, max_model_len=2048, max_batch=64, kv_cache_tokens=args.kv_cache_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(size, device, dtype, tmp)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        del model
        with Engine.from_pretrained(tmp, **kw) as on, Engine.from_pretrained(tmp, enable_prefix_caching=False,
                                                                             **kw) as off:
            assert on.stats()["prefix_caching"] and not off.stats()["prefix_caching"]
            report["max_prefill_tokens"] = on.scheduler.max_prefill_tokens
            print(f"{size} Llama ({report['parameters'] / 1e6:.1f}M params, {report['dtype']}) on {report['device']}; "
                  f"load average {report['load_avg_at_start'][0]:.2f}", flush=True)
            warm = [1 + i for i in range(64)]
            for eng in (on, off):
                eng.generate([warm], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            for name, shared, seed in (("shared", True, 1000), ("distinct", False, 2000)):
                def reqs_for(r, shared=shared, seed=seed):
                    return workload(args.requests, rate, vocab, seed + r, args.system_tokens, suffix,
                                    args.new_tokens, shared)

                report[name] = w = compare(on, off, name, reqs_for, args.repeats)
                print(f"{name}: throughput on/off {w['throughput_ratio']:.2f}x, TTFT speed-up "
                      f"{w['ttft_speedup']:.2f}x, hit rate {w['hit_rate']:.2f}", flush=True)
    report["load_avg_at_end"] = os.getloadavg()
    command = "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])
    report["command"] = command
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report, command))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

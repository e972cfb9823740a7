"""HTTP load against slotserve: throughput, latency and TTFT, then the same load across a rollback.

    python benchmarks/bench_serving.py [--url URL --token T] [--replicas 2] [--json FILE] [--quick]

Without --url it starts its own local Ray + Serve on 127.0.0.1 (a temporary store with
two demo bundles), so the numbers are reproducible on any machine. Requests are
streamed chat completions (so time to first token is measured at the client).

Phase 1, for each concurrency (1, 8, 32): closed-loop clients for a fixed time;
requests/s, p50/p99 latency, p50/p99 TTFT, failures.
Phase 2, the swap: demo:2 is loaded and promoted, then under concurrency 8 a rollback
(POST /admin/rollback) is issued mid-run: failed requests, the worst latency of
requests in flight within 1 s of the swap against the steady-state p99, and the
convergence time across replicas reported by the controller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q * len(xs) + 0.5)) - 1))
    return xs[i]


async def one(c: httpx.AsyncClient, url: str, max_tokens: int) -> dict:
    body = {"model": "demo", "messages": [{"role": "user", "content": "Tell me something."}],
            "max_tokens": max_tokens, "stream": True, "temperature": 1.0}
    t0 = time.perf_counter()
    ttft, status, bundle, tokens = None, 0, None, 0
    try:
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            status = r.status_code
            bundle = r.headers.get("x-slotserve-bundle")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    status = 599
                    continue
                if d["choices"] and d["choices"][0]["delta"].get("content"):
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    except httpx.HTTPError:
        status = 598
    return {"t0": t0, "t1": time.perf_counter(), "ttft": ttft, "status": status, "bundle": bundle,
            "chunks": tokens}


async def load(url: str, concurrency: int, seconds: float, max_tokens: int, events=None,
               during=None) -> list[dict]:
    stop = time.perf_counter() + seconds
    out: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        async def worker():
            while time.perf_counter() < stop:
                out.append(await one(c, url, max_tokens))
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        if during is not None:
            await during()
        await asyncio.gather(*tasks)
    return out


def summarize(res: list[dict], seconds: float) -> dict:
    ok = [r for r in res if r["status"] == 200]
    lat = [(r["t1"] - r["t0"]) * 1e3 for r in ok]
    ttft = [r["ttft"] * 1e3 for r in ok if r["ttft"] is not None]
    return {"requests": len(res), "failed": len(res) - len(ok), "rps": round(len(ok) / seconds, 2),
            "p50_ms": _r(pct(lat, 0.5)), "p99_ms": _r(pct(lat, 0.99)),
            "ttft_p50_ms": _r(pct(ttft, 0.5)), "ttft_p99_ms": _r(pct(ttft, 0.99)),
            "mean_chunks": _r(statistics.mean([r["chunks"] for r in ok])) if ok else None}


def _r(x):
    return None if x is None else round(x, 2)


def start_local(replicas: int):
    import ray
    from ray import serve

    from slotserve.api.auth import digest
    from slotserve.app import build_app
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store

    root = Path(tempfile.mkdtemp(prefix="slotserve-bench-"))
    store = Store(root)
    publish_demo(store, "demo", seed=0)
    publish_demo(store, "demo", seed=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from slotserve.cli.local_ray import start_local_ray
    start_local_ray(root / "run", include_dashboard=False, namespace="slotserve-bench",
                    logging_level="ERROR", log_to_driver=False,
                    runtime_env={"env_vars": {"SLOTSERVE_HOME": str(root)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    token = "bench-token"
    serve.run(build_app({"store": str(root), "bundle": "demo:1", "app": "bench",
                         "admin_token_sha256": digest(token), "num_replicas": replicas}),
              name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}", token


async def admin(url, token, method, path, body=None, timeout=600):
    async with httpx.AsyncClient(timeout=timeout) as c:
        r = await c.request(method, url + path, json=body, headers={"authorization": f"Bearer {token}"})
        r.raise_for_status()
        return r.json()


async def main_async(args) -> dict:
    url, token = args.url, args.token
    started = False
    if url is None:
        url, token = start_local(args.replicas)
        started = True
    seconds = 4.0 if args.quick else args.seconds
    report = {"url": url if not started else "local", "replicas": args.replicas, "max_tokens": args.max_tokens,
              "seconds_per_level": seconds, "machine": platform.machine(), "cpus": os.cpu_count(),
              "load": {}}
    await load(url, 2, 1.0, args.max_tokens)  # warm up
    for conc in args.concurrency:
        res = await load(url, conc, seconds, args.max_tokens)
        report["load"][str(conc)] = s = summarize(res, seconds)
        print(f"concurrency {conc:3}: {s['rps']:7.2f} req/s  p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  "
              f"TTFT p50 {s['ttft_p50_ms']} ms p99 {s['ttft_p99_ms']} ms  failed {s['failed']}", flush=True)

    # Phase 2: rollback in the middle of steady load.
    st = await admin(url, token, "GET", "/admin/state")
    if not st["desired"].get("previous"):
        await admin(url, token, "POST", "/admin/load", {"bundle": "demo:2"})
        await admin(url, token, "POST", "/admin/rollout/promote", {"reason": "bench"})
    swap = {}

    async def during():
        await asyncio.sleep(seconds / 2)
        swap["t"] = time.perf_counter()
        res = await admin(url, token, "POST", "/admin/rollback", {"reason": "bench: rollback under load"})
        swap["t_done"] = time.perf_counter()
        swap["res"] = res

    conc = 8
    res = await load(url, conc, seconds, args.max_tokens, during=during)
    ok = [r for r in res if r["status"] == 200]
    t = swap["t"]
    near = [(r["t1"] - r["t0"]) * 1e3 for r in ok if r["t0"] <= t + 1.0 and r["t1"] >= t - 1.0]
    steady = [(r["t1"] - r["t0"]) * 1e3 for r in ok if r["t1"] < t - 1.0 or r["t0"] > t + 1.0]
    after = [r for r in ok if r["t0"] > swap["t_done"]]
    report["rollback"] = {
        "concurrency": conc, "requests": len(res), "failed": len(res) - len(ok),
        "converge_ms": swap["res"]["converge_ms"], "admin_call_ms": round((swap["t_done"] - t) * 1e3, 2),
        "replicas_converged": swap["res"]["replicas"],
        "worst_latency_near_swap_ms": _r(max(near) if near else None),
        "steady_p99_ms": _r(pct(steady, 0.99)),
        "requests_after_swap_on_new_live": sum(1 for r in after if r["bundle"] == swap["res"]["state"]["desired"]["live"]["ref"]),
        "requests_after_swap": len(after),
    }
    rb = report["rollback"]
    print(f"rollback under load (c={conc}): failed {rb['failed']}/{rb['requests']}, converged across "
          f"{rb['replicas_converged']} replica(s) in {rb['converge_ms']} ms (admin call {rb['admin_call_ms']} ms), "
          f"worst latency near swap {rb['worst_latency_near_swap_ms']} ms vs steady p99 {rb['steady_p99_ms']} ms",
          flush=True)
    if started:
        from ray import serve
        import ray
        serve.shutdown()
        ray.shutdown()
    return report


def to_markdown(rep: dict) -> str:
    lines = [f"# Serving benchmark ({rep.get('device', 'cpu')}, {rep['cpus']} CPUs, {rep['replicas']} replica(s), "
             f"demo bundle, {rep['max_tokens']} tokens per request, streamed)", "",
             "| concurrency | req/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms | failed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c, s in rep["load"].items():
        lines.append(f"| {c} | {s['rps']} | {s['p50_ms']} | {s['p99_ms']} | {s['ttft_p50_ms']} | "
                     f"{s['ttft_p99_ms']} | {s['failed']}/{s['requests']} |")
    rb = rep["rollback"]
    lines += ["", f"Rollback in the middle of concurrency-{rb['concurrency']} load:", "",
              "| failed requests | convergence across replicas | admin call | worst latency near swap | steady p99 |",
              "| --- | --- | --- | --- | --- |",
              f"| {rb['failed']}/{rb['requests']} | {rb['converge_ms']} ms ({rb['replicas_converged']} replicas) | "
              f"{rb['admin_call_ms']} ms | {rb['worst_latency_near_swap_ms']} ms | {rb['steady_p99_ms']} ms |"]
    lines += ["", f"All on one machine with {rep['cpus']} CPU cores: the replicas, Ray, the HTTP proxy, "
              "the controller and the load generator share them, so latency here is CPU contention, not "
              "the swap. `convergence` is the controller's time from the state change to every replica "
              "reporting it applied; `admin call` adds the HTTP round trip and the state write. "
              "Regenerate: `python benchmarks/bench_serving.py --replicas 2 --json ... --md ...`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server (default: start a local one)")
    ap.add_argument("--token", default=os.environ.get("SLOTSERVE_ADMIN_TOKEN"))
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--md", default=None, help="write a markdown table here")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rep = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(to_markdown(rep))


def render(json_path: str, md_path: str) -> None:
    """Rewrite the markdown table from a saved JSON result."""
    Path(md_path).write_text(to_markdown(json.loads(Path(json_path).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

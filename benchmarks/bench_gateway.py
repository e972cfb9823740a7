"""The Gateway's price and what it buys, against the direct ingress in the same run.

    python benchmarks/bench_gateway.py [--seconds 8] [--rounds 3] [--json FILE] [--md FILE]

It starts its own local Ray + Serve on 127.0.0.1 (a temporary store with the tiny demo
bundle) and measures two things, each for `gateway: true` (Serve's proxy -> Gateway ->
SlotServe replica) and `gateway: false` (Serve's proxy -> SlotServe replica, as before
issue 14 #4):

1. Overhead: both apps deployed side by side (one replica each, route prefixes /gw and
   /direct), streamed chat completions from closed-loop clients at each concurrency,
   in alternating rounds (gw, direct, direct, gw, ...) so drift hits both alike;
   medians over rounds of requests/s, p50 latency and p50 time to first token, and
   the gateway/direct ratios.
2. A replica crash: each app alone with 2 replicas, non-streamed chat completions at
   concurrency 8, one replica killed (ray.kill, no drain) mid-run; failed requests
   (non-200, or a dropped connection) out of all.
3. A burst: each app alone with 1 replica and max_inflight 8, serving the demo bundle with
   5 s of injected latency (slots/faults.py) so 8 requests fill it for 5 s,
   then `--burst` chat completions and as many GET /health arrive at once; the median
   time to each refused request's 429 against the median /health in the same burst (the
   price of any answer through the proxy, the gateway and this client's own event loop,
   all on the same cores), and whether any request was admitted instead (a 200: a slot
   freed before it arrived).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench_serving import load, summarize    # benchmarks/ is this script's own folder on sys.path

MODES = {"gw": True, "direct": False}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Tell me something."}], "temperature": 1.0}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(root: Path) -> str:
    from ray import serve

    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store
    from slotserve.cli.local_ray import start_local_ray

    publish_demo(Store(root), "demo", seed=0)
    start_local_ray(root / "run", include_dashboard=False, namespace="slotserve-bench-gateway",
                    logging_level="ERROR", log_to_driver=False,
                    runtime_env={"env_vars": {"SLOTSERVE_HOME": str(root)}})
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def deploy(root: Path, mode: str, replicas: int, prefix: str, **settings) -> None:
    from ray import serve

    from slotserve.app import build_app
    serve.run(build_app({"store": str(root), "bundle": "demo:1", "app": f"bench-{mode}",
                         "num_replicas": replicas, "gateway": MODES[mode]} | settings),
              name=f"bench-{mode}", route_prefix=prefix)


def overhead(base: str, concurrency: list[int], seconds: float, rounds: int, max_tokens: int) -> dict:
    out = {}
    for c in concurrency:
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(rounds):
            order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
            for mode in order:
                res = asyncio.run(load(f"{base}/{mode}", c, seconds, max_tokens))
                runs[mode].append(summarize(res, seconds))
        med = {m: {k: statistics.median(x[k] for x in runs[m] if x[k] is not None)
                   for k in ("rps", "p50_ms", "ttft_p50_ms")} for m in MODES}
        med["failed"] = {m: sum(x["failed"] for x in runs[m]) for m in MODES}
        med["requests"] = {m: sum(x["requests"] for x in runs[m]) for m in MODES}
        med["ratio_gw_over_direct"] = {k: round(med["gw"][k] / med["direct"][k], 3)
                                       for k in ("rps", "p50_ms", "ttft_p50_ms")}
        out[str(c)] = med
    return out


async def _crash_load(url: str, app: str, seconds: float, kill_at: float, concurrency: int) -> dict:
    import ray
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds
    killed_at = None
    async with httpx.AsyncClient(timeout=120) as c:
        async def worker():
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = await c.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 32})
                    status = r.status_code
                except httpx.HTTPError as exc:       # no HTTP answer at all: say what the client saw
                    status = 598
                    errors.append(f"{type(exc).__name__}: {exc}")
                results.append((t0, time.perf_counter(), status))

        async def killer():
            nonlocal killed_at
            await asyncio.sleep(kill_at)
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith(f"SERVE_REPLICA::{app}#SlotServe#")]
            ray.kill(ray.get_actor(sorted(names)[0], namespace="serve"), no_restart=True)
            killed_at = time.perf_counter()
        await asyncio.gather(killer(), *[worker() for _ in range(concurrency)])
    inflight = [s for t0, t1, s in results if t0 <= killed_at <= t1]
    return {"requests": len(results), "failed": sum(s != 200 for _, _, s in results),
            "in_flight_at_kill": len(inflight), "failed_in_flight": sum(s != 200 for s in inflight),
            "statuses": sorted({s for _, _, s in results}), "client_errors": errors}


async def _burst(url: str, fill: int, burst: int) -> dict:
    long = {**CHAT, "max_tokens": 4}      # each waits the bundle's injected 5 s, holding its place
    limits = httpx.Limits(max_connections=fill + 2 * burst + 8, max_keepalive_connections=fill + 2 * burst + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        running = [asyncio.create_task(c.post(url + "/v1/chat/completions", json=long)) for _ in range(fill)]
        await asyncio.sleep(1.0)                              # all `fill` admitted, waiting

        async def one(chat: bool):
            t0 = time.perf_counter()
            r = await (c.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 4}) if chat
                       else c.get(url + "/health"))
            return chat, r.status_code, (time.perf_counter() - t0) * 1e3, r.headers.get("retry-after")
        # the same number of GET /health in the same burst: what any answer costs through the
        # same proxy, gateway and client at that moment (the baseline the 429s compare to)
        res = await asyncio.gather(*[one(i % 2 == 0) for i in range(2 * burst)])
        filled = [r.status_code for r in await asyncio.gather(*running)]
    chats = [(st, ms, ra) for chat, st, ms, ra in res if chat]
    refused = [ms for st, ms, _ in chats if st == 429]
    health = [ms for chat, st, ms, _ in res if not chat and st == 200]
    med = (lambda xs: round(statistics.median(xs), 1) if xs else None)
    return {"burst": burst, "refused_429": len(refused), "answered_200": sum(st == 200 for st, _, _ in chats),
            "other": sorted({st for st, _, _ in chats} - {200, 429}), "p50_429_ms": med(refused),
            "max_429_ms": round(max(refused), 1) if refused else None, "p50_health_ms": med(health),
            "retry_after": sorted({ra for st, _, ra in chats if st == 429}), "fill_statuses": sorted(set(filled))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=8.0, help="per round and mode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--crash-seconds", type=float, default=14.0)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()

    import ray
    from ray import serve
    root = Path(tempfile.mkdtemp(prefix="slotserve-bench-gateway-"))
    base = start_ray(root)
    try:
        for mode in MODES:
            deploy(root, mode, 1, f"/{mode}")
        report = {"machine": f"cpu-{os.cpu_count()}c", "platform": platform.platform(),
                  "max_tokens": args.max_tokens, "seconds": args.seconds, "rounds": args.rounds,
                  "overhead": overhead(base, args.concurrency, args.seconds, args.rounds, args.max_tokens),
                  "crash": {}}
        for mode in MODES:
            serve.delete(f"bench-{mode}")
        for mode in MODES:
            deploy(root, mode, 2, "/")
            asyncio.run(load(base, 2, 2.0, 4))                      # warm both replicas
            report["crash"][mode] = asyncio.run(_crash_load(base, f"bench-{mode}", args.crash_seconds,
                                                            args.crash_seconds / 3, 8))
            serve.delete(f"bench-{mode}")
        from slotserve.bundles.store import Store
        from slotserve.drill.config import publish_faulty
        slow = publish_faulty(Store(root), "demo:1", {"latency_ms": 5000})
        report["burst"] = {}
        for mode in MODES:
            deploy(root, mode, 1, "/", max_inflight=8, bundle=slow, app=f"bench-{mode}-burst")
            report["burst"][mode] = asyncio.run(_burst(base, 8, args.burst))
            serve.delete(f"bench-{mode}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    if args.md:
        Path(args.md).write_text(to_markdown(report))
    return 0


def to_markdown(rep: dict) -> str:
    lines = [f"# Gateway vs direct ingress ({rep['machine']}, tiny demo bundle, {rep['max_tokens']} tokens, "
             f"streamed; medians of {rep['rounds']} alternating rounds of {rep['seconds']} s)", "",
             "| concurrency | req/s gw / direct | p50 ms gw / direct | TTFT p50 ms gw / direct | ratio req/s | ratio p50 | failed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c, m in rep["overhead"].items():
        r = m["ratio_gw_over_direct"]
        lines.append(f"| {c} | {m['gw']['rps']:.1f} / {m['direct']['rps']:.1f} | {m['gw']['p50_ms']:.1f} / "
                     f"{m['direct']['p50_ms']:.1f} | {m['gw']['ttft_p50_ms']:.1f} / {m['direct']['ttft_p50_ms']:.1f} "
                     f"| {r['rps']} | {r['p50_ms']} | {m['failed']['gw']}/{m['requests']['gw']} , "
                     f"{m['failed']['direct']}/{m['requests']['direct']} |")
    lines += ["", "A replica killed (no drain) during non-streamed load at concurrency 8, 2 replicas:", "",
              "| ingress | requests | failed | in flight at the kill | of which failed | statuses |",
              "| --- | --- | --- | --- | --- | --- |"]
    for mode, c in rep["crash"].items():
        lines.append(f"| {'Gateway' if mode == 'gw' else 'direct (Ray proxy)'} | {c['requests']} | {c['failed']} | "
                     f"{c['in_flight_at_kill']} | {c['failed_in_flight']} | {c['statuses']} |")
    lines += ["", "A burst against one full replica (max_inflight 8, 8 long requests running), with as many "
              "GET /health in the same burst:", "",
              "| ingress | chat requests | 429 | 200 (a slot had freed) | 429 median ms | 429 max ms | /health median ms | Retry-After |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, b in rep.get("burst", {}).items():
        lines.append(f"| {'Gateway' if mode == 'gw' else 'direct (Ray proxy)'} | {b['burst']} | {b['refused_429']} | "
                     f"{b['answered_200']} | {b['p50_429_ms']} | {b['max_429_ms']} | {b['p50_health_ms']} | "
                     f"{', '.join(b['retry_after'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

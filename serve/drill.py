"""`slotserve drill`: rehearse an automatic rollback, end to end, and measure it.

    slotserve drill                                   # self-contained: its own local server
    slotserve drill --fault latency_ms=300 --plot drill.png
    slotserve drill --url http://10.0.0.5:8000 --token $T --store /shared/slotserve

The drill publishes (or takes, `--candidate`) a candidate carrying an injected fault,
starts a rollout with guards, drives chat-completion load, and checks that a guard
rolls the candidate back, that every new request returns to live, and that no client
saw a failure. It prints a table (time to detect, time to revert, requests served by
the candidate, failed requests, p99 before/during/after), writes the JSON report
(`--out`, or `--json` on stdout) and draws the timeline (`--plot`). Exit status: 0 when
the drill passed, 1 when it ran and failed, 2 when it could not run. docs/drill.md is
the runbook.

Without `--url` it serves the demo bundles itself: the real app, controller and
replica in this process on 127.0.0.1 (no Ray), with a temporary store unless
`--store` is given; everything is stopped and removed at the end, also on failure or
Ctrl-C. Against a running deployment the candidate is published into `--store`
(default $SLOTSERVE_HOME), which must be the store the deployment reads.

This module is the orchestration and the CLI; the settings, faults, spec and candidate
are `slotserve.drill_config`, the local server `slotserve.drill_server`, the load and
polling `slotserve.drill_load`, the figures `slotserve.drill_report` (names used
elsewhere are re-exported here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from slotserve.drill_config import (FAULT_KEYS, SCENARIOS, DrillConfig, drill_spec, load_spec, parse_faults,
                                    publish_faulty, publish_prompt, quality_spec)
from slotserve.drill_load import Admin, DrillError, Poll, drive, monitor
from slotserve.drill_server import LocalServer

__all__ = ["ACTIVE", "FAULT_KEYS", "DrillConfig", "DrillError", "LocalServer", "cmd_drill", "drill",
           "drill_spec", "load_spec", "parse_faults", "publish_faulty", "register", "run"]

ACTIVE = ("pending_eval", "running")


# ---------------------------------------------------------------- the drill

def _stderr(msg: str) -> None:
    print(f"[drill] {msg}", file=sys.stderr, flush=True)


async def _served_name(url: str, live: str) -> str:
    import httpx
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            cards = (await c.get("/v1/models")).json().get("data", [])
        return next(m["id"] for m in cards if not m.get("slot"))
    except Exception:
        return live.rsplit(":", 1)[0]


async def _abort_if_ours(admin: Admin, candidate: str, log) -> None:
    try:
        st = await admin.call("GET", "/admin/rollout", timeout=10)
        if st.get("phase") in ACTIVE and st.get("bundle") == candidate:
            log(f"aborting the rollout of {candidate}")
            await admin.call("POST", "/admin/rollout/abort",
                             {"reason": "slotserve drill: clean-up (no automatic rollback)"}, timeout=60)
    except Exception as exc:
        log(f"could not abort the drill's rollout: {exc}  -> run `slotserve rollout abort`")


async def drill(cfg: DrillConfig, url: str, token: str | None, *, store_root: str | None,
                same_clock: bool, log: Callable[[str], None] = _stderr) -> dict:
    """Run one drill against `url`; returns the report (slotserve.drill_report.analyse)."""
    from slotserve.drill_report import analyse
    admin = Admin(url, token)
    samples: list = []
    polls: list[Poll] = []
    stop_load, stop_mon = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task] = []
    candidate = None
    started = False
    try:
        state = await admin.call("GET", "/admin/state", timeout=30)
        live = ((state.get("desired") or {}).get("live") or {}).get("ref")
        if not live:
            raise DrillError(f"{url} has no live bundle to drill against")
        if state.get("rollout_phase") in ACTIVE:
            raise DrillError(f"a rollout is in progress on {url} ({state['rollout_phase']}); a drill needs "
                             "the deployment quiet: wait for it, or `slotserve rollout abort`")
        spec = dict(cfg.spec) if cfg.spec else None
        candidate = cfg.candidate  # a spec's own `bundle` is replaced by the drill's candidate
        faults = dict(cfg.faults)
        if candidate is None:
            from slotserve.bundles.manifest import BundleError
            from slotserve.bundles.store import Store
            try:
                candidate = publish_faulty(Store(store_root), live, faults)
            except BundleError as exc:
                raise DrillError(f"cannot publish a faulty copy of {live} into the store "
                                 f"{store_root or '$SLOTSERVE_HOME'}: {exc}. Point --store at the "
                                 "deployment's store, or pass --candidate REF") from None
            log(f"published {candidate} = {live} + faults {faults}")
        else:
            faults = {}  # whatever the candidate carries: the drill does not know
            log(f"candidate {candidate} (taken as given)")
        spec = {**spec, "bundle": candidate} if spec else drill_spec(candidate, cfg.percent)
        model = cfg.model or await _served_name(url, live)

        log(f"load: {cfg.concurrency} workers" + (f" at {cfg.rps:g} req/s" if cfg.rps else "")
            + f" on model {model!r}; baseline {cfg.baseline_s:g}s on {live}")
        load_start = time.time()
        tasks = [asyncio.create_task(drive(url, model, concurrency=cfg.concurrency, rps=cfg.rps,
                                           stop=stop_load, samples=samples, max_tokens=cfg.max_tokens,
                                           stream=cfg.stream)),
                 asyncio.create_task(monitor(admin, polls, stop_mon, cfg.poll_s))]
        await asyncio.wait([tasks[0]], timeout=cfg.baseline_s)
        if tasks[0].done():
            tasks[0].result()  # the load driver died: say why

        log(f"rollout: {candidate} at {spec.get('steps')}% with {len(spec.get('guards', []))} guards")
        rollout_requested = time.time()
        started = True
        await admin.call("POST", "/admin/rollout", spec)
        deadline = load_start + cfg.duration_s
        outcome = None
        while time.time() < deadline:
            p = polls[-1] if polls else None
            if p is not None and p.candidate == candidate and p.started_at is not None \
                    and p.phase not in ACTIVE and p.received > rollout_requested:
                outcome = p.phase
                break
            await asyncio.sleep(0.02)
        if outcome is None:
            log(f"no rollback within --duration {cfg.duration_s:g}s")
            await _abort_if_ours(admin, candidate, log)
        else:
            log(f"rollout {outcome}: {polls[-1].reason}; {cfg.settle_s:g}s more load")
        await asyncio.sleep(cfg.settle_s)
        stop_load.set()
        load_end = time.time()
        await tasks[0]
        stop_mon.set()
        await tasks[1]
        try:
            polls.append(await admin.poll())  # the candidate's final counts
        except DrillError:
            pass
        ledger = (await admin.call("GET", f"/admin/ledger?limit=200&bundle={quote(candidate)}"))["entries"]
        final = await admin.call("GET", "/admin/state", timeout=30)
        final_live = ((final.get("desired") or {}).get("live") or {}).get("ref")
        rep = analyse(samples, polls, ledger, live=live, candidate=candidate, fault=faults,
                      load_start=load_start, load_end=load_end, rollout_requested=rollout_requested,
                      same_clock=same_clock, final_live=final_live)
        rep["spec"] = spec
        rep["settings"] = {k: v for k, v in asdict(cfg).items() if k not in ("token", "spec")}
        return rep
    finally:
        stop_load.set()
        stop_mon.set()
        for t in tasks:
            if not t.done():
                t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if started and candidate:
            await _abort_if_ours(admin, candidate, log)
        await admin.aclose()


# ---------------------------------------------------------------- the quality drill

async def quality_drill(cfg: DrillConfig, url: str, token: str | None, *, store_root: str | None,
                        log: Callable[[str], None] = _stderr) -> dict:
    """Rehearse a silent quality regression: live re-published with an honest and with a
    sabotaged system prompt, each rolled out behind an eval_score guard. The drill passes
    when the eval gate lets the honest one through (then aborted: live is untouched) and
    rolls the sabotaged one back before it takes any traffic. With --candidate, that bundle
    alone, expected to be rolled back."""
    from slotserve.bundles.demo import DEMO_PROMPTS
    from slotserve.bundles.manifest import BundleError
    from slotserve.bundles.store import Store
    admin = Admin(url, token)
    runs: list[dict] = []
    current = None
    try:
        state = await admin.call("GET", "/admin/state", timeout=30)
        live = ((state.get("desired") or {}).get("live") or {}).get("ref")
        if not live:
            raise DrillError(f"{url} has no live bundle to drill against")
        if state.get("rollout_phase") in ACTIVE:
            raise DrillError(f"a rollout is in progress on {url} ({state['rollout_phase']}); a drill needs "
                             "the deployment quiet: wait for it, or `slotserve rollout abort`")
        if cfg.candidate:
            cases = [("given", cfg.candidate, "rolled_back")]
        else:
            try:
                store = Store(store_root)
                if not (store.open(live).path / "eval" / "eval.jsonl").is_file():
                    raise DrillError(f"{live} has no eval set (eval/eval.jsonl): the quality drill compares "
                                     "candidate and live on one; publish live with --eval")
                cases = [(label, publish_prompt(store, live, DEMO_PROMPTS[prompt],
                                                f"drill: {label} system prompt on {live}"), expect)
                         for label, prompt, expect in (("honest", "concise", "passed"),
                                                       ("sabotaged", "sabotaged", "rolled_back"))]
            except BundleError as exc:
                raise DrillError(f"cannot publish the drill's candidates of {live} into the store "
                                 f"{store_root or '$SLOTSERVE_HOME'}: {exc}. Point --store at the "
                                 "deployment's store, or pass --candidate REF") from None
        for label, candidate, expect in cases:
            log(f"{label}: rolling out {candidate} behind the eval gate (expect: {expect.replace('_', ' ')})")
            t0 = time.time()
            current = candidate
            await admin.call("POST", "/admin/rollout", quality_spec(candidate, cfg.percent))
            st: dict = {}
            while time.time() - t0 < cfg.eval_timeout_s:
                st = await admin.call("GET", "/admin/rollout", timeout=30)
                if st.get("phase") != "pending_eval":
                    break
                await asyncio.sleep(0.25)
            gate = st.get("eval_gate") or {}
            outcome = ("passed" if gate.get("passed") else "rolled_back" if st.get("phase") == "rolled_back"
                       else st.get("phase") or "no answer")
            if st.get("phase") == "pending_eval":
                outcome = f"no verdict within {cfg.eval_timeout_s:g}s"
            runs.append({"case": label, "candidate": candidate, "expected": expect, "outcome": outcome,
                         "candidate_score": gate.get("candidate"), "live_score": gate.get("live"),
                         "gate_s": round(time.time() - t0, 2), "reason": st.get("reason") or gate.get("reason")})
            log(f"{label}: {outcome}" + (f" (eval_score {gate['candidate']:.3g} vs live {gate['live']:.3g})"
                                         if gate else ""))
            await _abort_if_ours(admin, candidate, lambda m: None)  # a passed gate leaves it at step 1
            current = None
        final = await admin.call("GET", "/admin/state", timeout=30)
        final_live = ((final.get("desired") or {}).get("live") or {}).get("ref")
        problems = [f"{r['case']} candidate {r['candidate']}: expected {r['expected']}, got {r['outcome']}"
                    for r in runs if r["outcome"] != r["expected"]]
        if final_live != live:
            problems.append(f"live is {final_live} after the drill, was {live}")
        return {"scenario": "quality", "live": live, "final_live": final_live, "runs": runs,
                "passed": not problems, "problems": problems,
                "settings": {k: v for k, v in asdict(cfg).items() if k not in ("token", "spec")}}
    finally:
        if current:
            await _abort_if_ours(admin, current, log)
        await admin.aclose()


def format_quality(rep: dict) -> str:
    lines = [f"slotserve drill (quality): against live {rep['live']}" + (f" at {rep['url']}" if rep.get("url") else ""),
             f"result: {'PASS' if rep['passed'] else 'FAIL'}"]
    for r in rep["runs"]:
        scores = (f"eval_score {r['candidate_score']:.3g} vs live {r['live_score']:.3g}"
                  if r["candidate_score"] is not None else "no eval score")
        lines.append(f"  {r['case']:<9} {r['candidate']:<14} {r['outcome']:<12} (expected {r['expected']}) "
                     f"{scores}, gate {r['gate_s']:.1f} s")
    lines += [f"PROBLEM: {p}" for p in rep["problems"]]
    return "\n".join(lines)


def run(cfg: DrillConfig, log: Callable[[str], None] = _stderr) -> dict:
    """A whole drill: against cfg.url, or against a local server started and stopped here."""
    one = quality_drill if cfg.scenario == "quality" else drill
    if cfg.url:
        from slotserve.auth import read_token
        token = cfg.token or read_token()
        kw = {} if one is quality_drill else {"same_clock": False}
        rep = asyncio.run(one(cfg, cfg.url.rstrip("/"), token, store_root=cfg.store, log=log, **kw))
        rep["url"] = cfg.url
        return rep
    with LocalServer(cfg.store, log=log, real=not cfg.tiny, need_real=cfg.scenario == "quality") as srv:
        kw = {} if one is quality_drill else {"same_clock": True}
        rep = asyncio.run(one(cfg, srv.url, srv.token, store_root=str(srv.root), log=log, **kw))
    rep["url"] = f"{srv.url} (self-contained, stopped)"
    return rep


# ---------------------------------------------------------------- CLI

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "drill", help="rehearse an automatic rollback (fault-injected candidate under load) and measure it",
        description=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Runbook: docs/drill.md.")
    t = p.add_argument_group("target")
    t.add_argument("--url", help="a running deployment (default: start a local one on the demo bundles)")
    t.add_argument("--token", help="admin token (default $SLOTSERVE_ADMIN_TOKEN or $SLOTSERVE_HOME/admin_token)")
    t.add_argument("--tiny", action="store_true",
                   help="self-contained: serve the random tiny demo model (fast, its text is noise) instead "
                        "of SmolLM2-135M-Instruct (fault scenario only)")
    t.add_argument("--store", help="bundle store to publish the candidate in (default $SLOTSERVE_HOME; "
                                   "self-contained: a temporary store)")
    c = p.add_argument_group("candidate and rollout")
    c.add_argument("--scenario", choices=SCENARIOS, default="fault",
                   help="fault (default): an injected fault under load, caught by a guard; quality: an honest "
                        "and a sabotaged system prompt behind the eval gate, which must stop only the second")
    c.add_argument("--fault", action="append", metavar="F",
                   help="injected fault: error_rate=0.5 (default), latency_ms=300, oom_after=3, nan_logits; "
                        "repeat or comma-separate to combine")
    c.add_argument("--candidate", metavar="REF", help="drill with this bundle instead of publishing one")
    c.add_argument("--spec", metavar="FILE", help="rollout spec (YAML/JSON); default: a built-in canary")
    c.add_argument("--percent", type=float, default=25.0, help="built-in canary step, %% of traffic (25)")
    ld = p.add_argument_group("load")
    ld.add_argument("--concurrency", type=int, default=4, help="parallel clients (4)")
    ld.add_argument("--duration", type=float, default=30.0,
                    help="longest wait, in seconds from the start of load, for the rollback (30)")
    ld.add_argument("--rps", type=float, default=0.0, help="request rate; 0: as fast as answered (0)")
    ld.add_argument("--baseline", type=float, default=3.0, help="seconds of load on live before the rollout (3)")
    ld.add_argument("--settle", type=float, default=3.0, help="seconds of load after the rollback (3)")
    ld.add_argument("--max-tokens", type=int, default=8, help="tokens per request (8)")
    ld.add_argument("--stream", action="store_true", help="stream responses (server-sent events)")
    ld.add_argument("--model", help="model name to request (default: the served name from /v1/models)")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="FILE.json", help="write the report as JSON")
    o.add_argument("--plot", metavar="FILE.png", help="draw latency and traffic share over time")
    o.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout only")
    p.set_defaults(func=cmd_drill)


def cmd_drill(args: argparse.Namespace) -> int:
    from slotserve.drill_report import format_table, plot
    try:
        faults = parse_faults(args.fault)
        if args.candidate and args.fault:
            raise DrillError("--candidate takes an existing bundle as it is; --fault only applies "
                             "to the candidate the drill publishes")
        cfg = DrillConfig(url=args.url, token=args.token, store=args.store, candidate=args.candidate,
                          faults=faults, spec=load_spec(args.spec) if args.spec else None,
                          percent=args.percent, concurrency=args.concurrency, duration_s=args.duration,
                          rps=args.rps, baseline_s=args.baseline, settle_s=args.settle,
                          max_tokens=args.max_tokens, stream=args.stream, model=args.model,
                          scenario=args.scenario, tiny=args.tiny)
        rep = run(cfg)
    except DrillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1, default=str) + "\n")
        _stderr(f"report written to {args.out}")
    if args.plot and cfg.scenario == "fault":
        try:
            plot(rep, args.plot)
            _stderr(f"plot written to {args.plot}")
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
    if args.json:
        print(json.dumps(rep, default=str))
    else:
        print(format_quality(rep) if cfg.scenario == "quality" else format_table(rep))
    return 0 if rep["passed"] else 1

"""The drills themselves: a fault under load caught by a guard (`drill`), a quality
regression caught by the eval gate (`quality_drill`), and `run`, which runs one against a
deployment or a self-contained local server.

Without a URL the drill serves the demo bundles itself: the real app, controller and
replica in this process on 127.0.0.1 (no Ray), with a temporary store unless a store is
given; everything is stopped and removed at the end, also on failure or Ctrl-C. Against
a running deployment the candidate is published into the given store (default
$SLOTSERVE_HOME), which must be the store the deployment reads.

The settings, faults, spec and candidate are `slotserve.drill.config`, the local server
`slotserve.drill.server`, the load and polling `slotserve.drill.load`, the figures
`slotserve.drill.report`; the command line is `slotserve.drill.command`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict
from typing import Callable
from urllib.parse import quote

from slotserve.drill.config import DrillConfig, drill_spec, publish_faulty, publish_prompt, quality_spec
from slotserve.drill.load import Admin, DrillError, Poll, drive, monitor
from slotserve.drill.server import LocalServer
from slotserve.rollout import ACTIVE


# ---------------------------------------------------------------- the drill

def log_to_stderr(msg: str) -> None:
    print(f"[drill] {msg}", file=sys.stderr, flush=True)


def _live_ref(state: dict) -> str | None:
    """The live bundle's ref in an /admin/state answer."""
    return ((state.get("desired") or {}).get("live") or {}).get("ref")


async def _quiet_live(admin: Admin, url: str) -> str:
    """The deployment's live ref, refused unless it has one and no rollout is running."""
    state = await admin.call("GET", "/admin/state", timeout=30)
    live = _live_ref(state)
    if not live:
        raise DrillError(f"{url} has no live bundle to drill against")
    if state.get("rollout_phase") in ACTIVE:
        raise DrillError(f"a rollout is in progress on {url} ({state['rollout_phase']}); a drill needs "
                         "the deployment quiet: wait for it, or `slotserve rollout abort`")
    return live


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
                same_clock: bool, log: Callable[[str], None] = log_to_stderr) -> dict:
    """Run one drill against `url`; returns the report (slotserve.drill.report.analyse)."""
    from slotserve.drill.report import analyse
    admin = Admin(url, token)
    samples: list = []
    polls: list[Poll] = []
    stop_load, stop_mon = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task] = []
    candidate = None
    started = False
    try:
        live = await _quiet_live(admin, url)
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
        # --duration bounds the wait for the candidate to take its share (its load can take a
        # while on a busy machine), then, from that moment, the wait for the guards: a slow
        # load must not eat the time the guards need to collect min_samples.
        deadline, running = rollout_requested + cfg.duration_s, False
        outcome = None
        while time.time() < deadline:
            p = polls[-1] if polls else None
            ours = p is not None and p.candidate == candidate and p.started_at is not None \
                and p.received > rollout_requested
            if ours and not running:
                running, deadline = True, max(deadline, time.time() + cfg.duration_s)
            if ours and p.phase not in ACTIVE:
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
        final_live = _live_ref(await admin.call("GET", "/admin/state", timeout=30))
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
                        log: Callable[[str], None] = log_to_stderr) -> dict:
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
        live = await _quiet_live(admin, url)
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
        final_live = _live_ref(await admin.call("GET", "/admin/state", timeout=30))
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




def run(cfg: DrillConfig, log: Callable[[str], None] = log_to_stderr) -> dict:
    """A whole drill: against cfg.url, or against a local server started and stopped here."""
    one = quality_drill if cfg.scenario == "quality" else drill
    if cfg.url:
        from slotserve.api.auth import read_token
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

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from slotserve.drill_load import Admin, DrillError, Poll, drive, monitor

ACTIVE = ("pending_eval", "running")
FAULT_KEYS = ("latency_ms", "error_rate", "oom_after", "nan_logits")
DEMO = "demo"


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class DrillConfig:
    url: str | None = None            # None: self-contained
    token: str | None = None
    store: str | None = None          # where to publish the candidate (self-contained: the server's store)
    candidate: str | None = None      # take this bundle instead of publishing one
    faults: dict = field(default_factory=lambda: {"error_rate": 0.5})
    spec: dict | None = None          # a rollout spec; its `bundle` is replaced by the candidate
    percent: float = 25.0             # the built-in spec's canary step
    concurrency: int = 4
    duration_s: float = 30.0          # longest wait for the rollback after load starts
    rps: float = 0.0                  # 0: closed loop (each worker sends as soon as answered)
    baseline_s: float = 3.0           # load on live alone before the rollout
    settle_s: float = 3.0             # load after the rollback
    max_tokens: int = 8
    stream: bool = False
    model: str | None = None          # served model name (default: what /v1/models serves)
    poll_s: float = 0.05

    def __post_init__(self):
        if self.concurrency < 1:
            raise DrillError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.duration_s <= self.baseline_s:
            raise DrillError(f"--duration ({self.duration_s}s) must be longer than --baseline "
                             f"({self.baseline_s}s): the rollout starts after the baseline")
        if self.rps < 0 or self.settle_s < 0 or self.baseline_s < 0:
            raise DrillError("--rps, --settle and --baseline must be >= 0")
        if not 0 < self.percent <= 100:
            raise DrillError(f"--percent must be in (0, 100], got {self.percent}")
        if self.max_tokens < 1:
            raise DrillError(f"--max-tokens must be >= 1, got {self.max_tokens}")


def parse_faults(items: list[str] | None) -> dict:
    """['error_rate=0.5', 'nan_logits'] -> {'error_rate': 0.5, 'nan_logits': True}, validated."""
    out: dict = {}
    for item in items or ["error_rate=0.5"]:
        for part in item.split(","):
            key, sep, raw = part.strip().partition("=")
            if key not in FAULT_KEYS:
                raise DrillError(f"unknown fault {key!r}: use error_rate=0.5, latency_ms=300, "
                                 "oom_after=3 or nan_logits")
            if key == "nan_logits":
                val: object = raw.strip().lower() not in ("0", "false", "no") if sep else True
            elif key == "oom_after":
                val = _number(raw, key, int)
            else:
                val = _number(raw, key, float)
            out[key] = val
    if out.get("oom_after") == 0:
        raise DrillError("oom_after=0 makes loading the candidate fail, so it never takes traffic; "
                         "drill an out-of-memory under load with oom_after=1 or more")
    from slotserve.faults import Faults
    try:
        Faults.from_dict(out)
    except ValueError as exc:
        raise DrillError(str(exc)) from None
    return out


def _number(raw: str, key: str, kind):
    try:
        return kind(raw)
    except ValueError:
        raise DrillError(f"fault {key} needs a {'whole ' if kind is int else ''}number, "
                         f"e.g. {key}={'3' if kind is int else '0.5'}; got {raw!r}") from None


def drill_spec(candidate: str, percent: float = 25.0) -> dict:
    """The built-in canary: one step at `percent`, held (never promotes by itself), with a
    hard guard for each fault a drill can inject. min_samples is low so a drill at a few
    requests per second is judged within seconds."""
    return {
        "bundle": candidate, "strategy": "canary", "steps": [float(percent)], "promote": "manual",
        "bake": "10m", "min_requests": 10, "sticky_key": "none",
        "guards": [
            {"metric": "error_rate", "op": ">", "value": 0.05, "min_samples": 10, "action": "rollback"},
            {"metric": "p99_latency_ms", "op": ">", "value": 2.0, "relative_to": "live",
             "min_samples": 10, "action": "rollback"},
            {"metric": "oom_events", "op": ">", "value": 0, "action": "rollback"},
            {"metric": "nan_rate", "op": ">", "value": 0.0, "min_samples": 5, "action": "rollback"},
        ],
    }


def load_spec(path: str) -> dict:
    import yaml
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)  # JSON is YAML
    except (OSError, yaml.YAMLError) as exc:
        raise DrillError(f"cannot read the spec {path}: {exc}") from None
    if not isinstance(spec, dict):
        raise DrillError(f"{path} must hold a rollout spec mapping (see docs/rollout.md)")
    return spec


def publish_faulty(store, live: str, faults: dict, actor: str = "slotserve-drill") -> str:
    """Publish `live` again with `faults` in its serving.json: same weights, tokenizer and
    prompt (the store shares the blobs), a new version. Returns its ref."""
    b = store.open(live)
    serving = json.loads((b.path / "serving.json").read_text())
    serving["faults"] = dict(faults)
    m = store.publish(b.path, b.manifest.name, actor=actor, serving=serving,
                      retrieval_index=b.manifest.retrieval_index, parent=live,
                      reason=f"drill candidate: {live} with faults {json.dumps(faults, sort_keys=True)}")
    return m.ref


# ---------------------------------------------------------------- a local server

class LocalServer:
    """The real app + controller + replica on 127.0.0.1, in a thread of this process
    (no Ray), serving the demo bundle. Context manager: stopped and cleaned up on exit."""

    def __init__(self, store: str | None = None, log: Callable[[str], None] = lambda m: None):
        self._tmp = None if store else tempfile.mkdtemp(prefix="slotserve-drill-")
        self.root = Path(store or self._tmp).expanduser().resolve()
        self.token = secrets.token_urlsafe(24)
        self.log = log
        self.url: str | None = None
        self.live: str | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> "LocalServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 300.0) -> None:
        from slotserve.bundles.demo import publish_demo
        from slotserve.bundles.store import Store
        self.log(f"self-contained: demo bundle in {self.root} ...")
        self.live = publish_demo(Store(self.root), DEMO).ref  # a no-op when it is there
        self._thread = threading.Thread(target=self._main, name="slotserve-drill-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) and self._error is None:
            raise DrillError(f"the local server did not start within {timeout_s:.0f}s")
        if self._error is not None:
            raise DrillError(f"the local server failed to start: {type(self._error).__name__}: "
                             f"{self._error}") from self._error
        self.log(f"self-contained: serving {self.live} at {self.url}")

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread just ends
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        import uvicorn

        from slotserve.app import create_app
        from slotserve.auth import digest
        from slotserve.controller import SlotController
        from slotserve.replica import LocalController, Replica, Settings

        ctl = SlotController(str(self.root), app="drill", bundle=self.live)
        settings = Settings(store=str(self.root), app="drill", admin_token_sha256=digest(self.token))
        rep = Replica(settings, LocalController(ctl), replica_id="drill-local")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await rep.start()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            self._server = uvicorn.Server(uvicorn.Config(
                create_app(rep), log_level="warning", access_log=False, lifespan="off",
                timeout_graceful_shutdown=5))
            serve = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
            while not self._server.started and not serve.done():
                await asyncio.sleep(0.02)
            self._ready.set()
            await serve
        finally:
            await rep.stop()
            if getattr(ctl, "_loop_task", None) is not None:
                ctl._loop_task.cancel()
            _close_slots(rep.mgr)
            sock.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _close_slots(mgr) -> None:
    """Free every slot's engine (threads, KV pools) of the local server."""
    if hasattr(mgr, "close"):
        try:
            mgr.close()
            return
        except Exception:
            pass
    for slot in ("candidate", "previous", "live"):
        try:
            mgr.release(slot)
        except Exception:
            pass


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


def run(cfg: DrillConfig, log: Callable[[str], None] = _stderr) -> dict:
    """A whole drill: against cfg.url, or against a local server started and stopped here."""
    if cfg.url:
        from slotserve.auth import read_token
        token = cfg.token or read_token()
        rep = asyncio.run(drill(cfg, cfg.url.rstrip("/"), token, store_root=cfg.store,
                                same_clock=False, log=log))
        rep["url"] = cfg.url
        return rep
    with LocalServer(cfg.store, log=log) as srv:
        rep = asyncio.run(drill(cfg, srv.url, srv.token, store_root=str(srv.root), same_clock=True, log=log))
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
    t.add_argument("--store", help="bundle store to publish the candidate in (default $SLOTSERVE_HOME; "
                                   "self-contained: a temporary store)")
    c = p.add_argument_group("candidate and rollout")
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
                          max_tokens=args.max_tokens, stream=args.stream, model=args.model)
        rep = run(cfg)
    except DrillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1, default=str) + "\n")
        _stderr(f"report written to {args.out}")
    if args.plot:
        try:
            plot(rep, args.plot)
            _stderr(f"plot written to {args.plot}")
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
    if args.json:
        print(json.dumps(rep, default=str))
    else:
        print(format_table(rep))
    return 0 if rep["passed"] else 1

"""One serving replica without Ray: converge the slots to the desired state, report back.

A `Replica` owns a SlotManager, the request `Handler` and two background loops:

* watch: long-polls the controller for the desired state and applies it — promote and
  rollback are O(1) swaps; only a bundle not yet in any slot is loaded (in a thread,
  so live keeps serving while a candidate loads);
* report: sends the applied version, the slots, and the request outcomes (for the
  controller's rollout windows) every `report_interval_s`.

Nothing here may block the event loop: it serves every request of the replica. Swaps
are serialized by an asyncio lock (two concurrent rollbacks would be a roll-forward),
and a rollback to a parked previous, which waits for the slot manager's memory lock,
runs in a thread (`SlotManager.rollback_async`); it aborts an in-flight candidate load,
which is not an error: the newer desired state is applied next (loading the candidate
again if it still names one).

The Ray deployment (slotserve.app) is a thin shell around this; tests drive it with
an in-process controller.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any

from slotserve.controller import HEARTBEAT_S, SLOTS, DesiredState
from slotserve.handler import BundleView, Handler, Outcome, Routing
from slotserve.load_abort import LoadAborted

log = logging.getLogger("slotserve.replica")
MAX_OUTBOX = 20_000


@dataclass(frozen=True)
class Settings:
    """What a replica needs to know; the deployment's init args (JSON-able)."""

    store: str | None = None             # store root (path shared by every node)
    bundle: str | None = None            # initial live bundle when no state is persisted
    device: str = "cpu"
    memory_budget: str | int | None = None
    app: str = "slotserve"
    deployment: str = "SlotServe"
    served_name: str | None = None       # logical model name; default: the live bundle's name
    admin_token_sha256: str | None = None
    max_inflight: int = 256              # per replica; more is a 429 with Retry-After
    report_interval_s: float = 0.1
    manager: str | None = None           # "module:Class" of a slot manager (default slotserve.slots)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Settings":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class LocalController:
    """Calls an in-process SlotController (tests, single process); same shape as RayController."""

    def __init__(self, controller):
        self.c = controller

    async def call(self, method: str, *args, **kwargs):
        return await getattr(self.c, method)(*args, **kwargs)


class RayController:
    def __init__(self, handle):
        self.h = handle

    async def call(self, method: str, *args, **kwargs):
        return await getattr(self.h, method).remote(*args, **kwargs)


class SlotsBackend:
    """The handler's view of a SlotManager: bundle views per slot, async generation."""

    def __init__(self, mgr):
        self.mgr = mgr
        self._views: dict[str, BundleView] = {}      # by digest; one per loaded bundle

    def view_of(self, slot_obj) -> BundleView:
        b = slot_obj.bundle
        v = self._views.get(b.manifest.digest)
        if v is None:
            v = BundleView.from_bundle(b, tokenizer=getattr(slot_obj, "tokenizer", None))
            eng = getattr(slot_obj, "engine", None)
            if eng is not None and getattr(eng, "max_model_len", None):
                v.max_model_len = int(eng.max_model_len)
            self._views[b.manifest.digest] = v
        return v

    def views(self) -> dict[str, BundleView]:
        out = {}
        for name in SLOTS:
            s = self.mgr.get(name) if hasattr(self.mgr, "get") else _slot_or_none(self.mgr, name)
            if s is not None:
                out[name] = self.view_of(s)
        return out

    def digests(self) -> dict[str, str]:
        return {s: v.digest for s, v in self.views().items()}

    def prune(self) -> None:
        keep = set(self.digests().values())
        for d in list(self._views):
            if d not in keep:
                del self._views[d]

    async def generate(self, slot: str, prompt_ids: list[int], params: dict):
        from slotserve.engine import SamplingParams
        return await self.mgr.generate(slot, prompt_ids, SamplingParams(**params))


def _slot_or_none(mgr, name):
    try:
        return mgr.slot(name)
    except (KeyError, LookupError, ValueError):
        return None


class Replica:
    def __init__(self, settings: Settings, controller, *, mgr=None, replica_id: str | None = None,
                 metrics=None):
        self.settings = settings
        self.controller = controller
        self.id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.node = _node_id()
        if mgr is None:
            mgr = _make_manager(settings, on_oom=self._on_oom)
        elif hasattr(mgr, "on_oom"):
            mgr.on_oom = self._on_oom
        self.mgr = mgr
        self.backend = SlotsBackend(mgr)
        self.metrics = metrics
        self.handler = Handler(self.backend, observe=self._observe, on_shadow=self.shadow)
        self.desired: DesiredState | None = None
        self._latest: DesiredState | None = None     # newest state seen (may be being applied)
        self._applying: asyncio.Task | None = None
        self._swap_lock = asyncio.Lock()             # one promote/rollback/release at a time
        self.applied = -1                            # fully applied (slots loaded as desired)
        self.routed = -1                             # live/previous/weights in effect
        self.error: dict | None = None
        self.loading: str | None = None
        self.outbox: list[dict] = []
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.safety = None

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Fetch the desired state and load live + previous before taking traffic."""
        self._loop = asyncio.get_running_loop()
        await self.controller.call("report", self.id, self.status(), [])
        state = DesiredState.from_dict(await self.controller.call("watch", -1, 0.0))
        self._latest = state
        await self.apply(state)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_loop()), loop.create_task(self._report_loop())]

    async def stop(self) -> None:
        self._stopped = True
        for t in self._tasks + ([self._applying] if self._applying else []):
            t.cancel()
        try:
            await self.controller.call("forget", self.id)
        except Exception:
            pass

    async def _watch_loop(self) -> None:
        while not self._stopped:
            try:
                known = self._latest.version if self._latest else -1
                d = DesiredState.from_dict(await self.controller.call("watch", known, HEARTBEAT_S))
                if d.version == known:
                    continue
                self._latest = d
                if self._applying is not None and not self._applying.done():
                    # A load is running (seconds for a big bundle): a rollback, promote or
                    # weight change must not wait for it.
                    await self._swap_now(d)
                    await self.report()
                else:
                    self._applying = asyncio.get_running_loop().create_task(self._apply_latest())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # controller restarting: retry, keep serving
                log.warning("watch failed: %s", exc)
                await asyncio.sleep(0.5)

    async def _apply_latest(self) -> None:
        while self._latest is not None and (self.desired is None
                                            or self._latest.version != self.desired.version):
            await self.apply(self._latest)

    async def _swap_now(self, d: DesiredState) -> None:
        """The swap part of `d` while a load is in progress: swaps and routing."""
        try:
            await self._swap(d)
        except Exception as exc:
            log.warning("swap for v%s deferred: %s", d.version, exc)
        self._route(d)
        if self._routes(d):
            self.routed = max(self.routed, d.version)

    async def _swap(self, d: DesiredState) -> None:
        """Promote or roll back if that is what makes live `d`'s live. Idempotent: the
        slots are read again under the swap lock, so a swap already done (by the watch
        loop while `apply` waited) is not done twice — a second rollback would roll
        forward."""
        async with self._swap_lock:
            cur = self.backend.digests()
            want_live = d.live.digest if d.live else None
            if not want_live or want_live == cur.get("live"):
                return
            if want_live == cur.get("candidate"):
                self.mgr.promote()                       # O(1), never waits for memory
            elif want_live == cur.get("previous"):
                reason = d.reason or "rollback"
                if hasattr(self.mgr, "rollback_async"):  # swap inline, copy-back in a thread
                    await self.mgr.rollback_async(reason)
                else:                                    # a custom manager: keep it off the loop
                    await asyncio.to_thread(self.mgr.rollback, reason)

    def _routes(self, d: DesiredState) -> bool:
        """Live and previous are those of `d` (so requests are routed as `d` says)."""
        cur = self.backend.digests()
        return all(cur.get(s) == (d.slot(s).digest if d.slot(s) else None) for s in ("live", "previous"))

    async def _report_loop(self) -> None:
        while not self._stopped:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.report_interval_s
                                       if self.outbox or self._rollout_active() else 1.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.report()

    async def report(self) -> None:
        events, self.outbox = self.outbox, []
        try:
            await self.controller.call("report", self.id, self.status(), events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("report failed: %s", exc)
            self.outbox = (events + self.outbox)[-MAX_OUTBOX:]

    def _rollout_active(self) -> bool:
        return bool(self.desired and self.desired.rollout_phase in ("pending_eval", "running"))

    # ------------------------------------------------------------ converging

    async def apply(self, d: DesiredState) -> None:
        """Make the slots match `d`; route by its weights. Idempotent.

        Routing changes first (restricted to slots that hold a bundle), then slot
        operations, then routing again: a candidate is never released while new
        requests are still being routed to it."""
        if self.error and self.error.get("version") == d.version:
            return
        self._route(d)
        superseded = False
        try:
            await self._reconcile(d)
            self.error = None
        except LoadAborted as exc:
            # A rollback (of a newer state) aborted this load to get the memory back: not
            # a failure of the bundle, so not reported as one (the controller would drop
            # the candidate as "load failed"). The newer state is applied next.
            superseded = self._latest is not None and self._latest.version > d.version
            log.warning("applying desired state v%s: %s%s", d.version, exc,
                        f"; applying v{self._latest.version} next" if superseded else "")
            if not superseded:
                self.error = {"version": d.version, "message": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:
            log.error("applying desired state v%s failed: %s", d.version, exc)
            self.error = {"version": d.version, "message": f"{type(exc).__name__}: {exc}"}
        finally:
            self.loading = None
        self.desired = d
        if self.error is None and not superseded:
            self.applied = d.version
            self.routed = max(self.routed, d.version)
        newest = self._latest if self._latest is not None and self._latest.version > d.version else d
        self._route(newest)
        if d.safety is not None or self.safety is None:
            from slotserve.safety import SafetyFilter
            self.safety = SafetyFilter.from_config(d.safety)
        self.backend.prune()
        if self.metrics is not None:
            try:
                self.metrics.slots(self.slot_state(), self.backend.views(), d.weights)
            except Exception:
                pass
        self._wake.set()
        await self.report()

    def _route(self, d: DesiredState) -> None:
        self.handler.routing = Routing(
            weights={s: w for s, w in d.weights.items() if w > 0} or {"live": 100.0},
            salt=d.salt, sticky_key=None if d.sticky_key == "none" else d.sticky_key,
            served_name=self.settings.served_name or d.served_name, shadow_fraction=d.mirror_fraction)

    async def _reconcile(self, d: DesiredState) -> None:
        mgr = self.mgr
        want = {s: (d.slot(s).digest if d.slot(s) else None) for s in SLOTS}
        cur = self.backend.digests()
        if want == {s: cur.get(s) for s in SLOTS}:
            return
        # O(1) swaps first: promote (candidate -> live, live -> previous) or rollback
        # (previous <-> live).
        await self._swap(d)
        cur = self.backend.digests()
        # A new live that is in no slot (e.g. `serve --bundle` changed it): stage it as the
        # candidate and promote, so live never goes empty while it loads.
        if want["live"] and cur.get("live") and cur["live"] != want["live"]:
            if cur.get("candidate"):
                mgr.release("candidate")
            await self._load(d.live, "candidate", d)
            async with self._swap_lock:
                mgr.promote()
        # Release what is no longer wanted (candidate first: it is what a revert drops).
        # Under the swap lock, reading the slots again: the watch loop may have swapped
        # them while we loaded, and a slot a rollback is bringing back must stay.
        async with self._swap_lock:
            cur = self.backend.digests()
            for s in ("candidate", "previous", "live"):
                if cur.get(s) and cur.get(s) != want[s]:
                    mgr.release(s)
            cur = self.backend.digests()
        # Load what is missing: live first, so a new replica can serve as early as possible.
        for s in ("live", "previous", "candidate"):
            ref = d.slot(s)
            if ref is not None and cur.get(s) != ref.digest:
                await self._load(ref, s, d)

    async def _load(self, ref, slot: str, d: DesiredState) -> None:
        self.loading = f"{slot}: {ref.ref}"
        await self.report()
        kw = {"evict_previous": True} if slot == "candidate" and d.evict_previous else {}
        await asyncio.to_thread(self.mgr.load, ref.ref, slot, **kw)
        got = self.backend.digests().get(slot)
        if got != ref.digest:
            raise RuntimeError(f"slot {slot} holds {got} after loading {ref.ref} ({ref.digest})")

    # ------------------------------------------------------------ health and status

    def ready(self) -> tuple[bool, str]:
        d = self.desired
        if d is None:
            return False, "waiting for the controller"
        cur = self.backend.digests()
        for s in ("live", "previous"):
            ref = d.slot(s)
            if ref is not None and cur.get(s) != ref.digest:
                why = f"loading {s} {ref.ref}" if self.loading else f"{s} {ref.ref} not loaded"
                if self.error:
                    why += f" (last error: {self.error['message']})"
                return False, why
        if "live" not in cur:
            return False, "no live bundle"
        return True, "ok"

    def slot_state(self) -> dict:
        try:
            st = self.mgr.state()
        except Exception as exc:
            return {"error": str(exc)}
        return _jsonable(st)

    def status(self) -> dict:
        ok, why = self.ready()
        return {"node": self.node, "applied": self.applied, "routed": self.routed, "ready": ok, "why": why,
                "slots": self.slot_state(), "error": self.error,
                "inflight": self.handler.inflight, "loading": self.loading}

    # ------------------------------------------------------------ outcomes

    def _observe(self, o: Outcome) -> None:
        if o.kind == "eval":
            return  # eval-gate traffic is judged by its score, not by the windows
        oom = o.error_kind in ("OutOfMemoryError", "InjectedOOM") if o.error_kind else False
        nan = o.error_kind == "FloatingPointError" or "non-finite" in (o.error or "")
        safety_hit = bool(o.ok and self.safety is not None and o.text and self.safety(o.text))
        rec = {"slot": o.slot, "bundle": o.view.ref, "latency_ms": o.latency_s * 1e3,
               "ttft_ms": None if o.ttft_s is None else o.ttft_s * 1e3,
               "ok": o.ok or o.cancelled, "oom": oom, "nan": nan, "safety_hit": safety_hit,
               "tokens": o.completion_tokens}
        if not o.cancelled:  # a client that went away says nothing about the bundle
            self._push({"kind": "request", "outcome": rec})
        if self.metrics is not None:
            self.metrics.observe(o, safety_hit)

    async def run_eval(self, max_tokens: int = 32) -> dict:
        """The candidate's eval set (eval/eval.jsonl), greedy, on candidate and on live."""
        from slotserve.evals import load_eval, run_eval
        from slotserve.protocol import ChatCompletionRequest, CompletionRequest
        views = self.backend.views()
        if "candidate" not in views or "live" not in views:
            raise RuntimeError("the eval gate needs a candidate and a live bundle loaded")
        items = load_eval(views["candidate"].path)
        loop = asyncio.get_running_loop()

        async def one(slot: str, prompt) -> str:
            view = self.backend.views()[slot]
            if isinstance(prompt, str):
                req = CompletionRequest(model=view.ref, prompt=prompt, max_tokens=max_tokens, temperature=0)
                kind = "completion"
            else:
                req = ChatCompletionRequest(model=view.ref, messages=prompt, temperature=0,
                                            max_tokens=max_tokens)
                kind = "chat"
            prep = self.handler.prepare(kind, req, slot, True)
            prep.kind = "eval"
            run = await self.handler._start(prep)
            return "".join([p async for p in run.deltas()])

        def gen(slot):
            return lambda prompt: asyncio.run_coroutine_threadsafe(one(slot, prompt), loop).result(300)

        cand = await asyncio.to_thread(run_eval, items, gen("candidate"))
        live = await asyncio.to_thread(run_eval, items, gen("live"))
        return {"candidate": cand.score, "live": live.score,
                "detail": {"items": len(items), "candidate.passed": cand.passed,
                           "live.passed": live.passed}}

    def _on_oom(self, ev) -> None:
        """The slot manager released a candidate after out of memory: tell the controller
        now (it reverts traffic everywhere and records the figures in the ledger)."""
        self._push({"kind": "oom", "released": ev.slot == "candidate", **_jsonable(ev)})
        self._poke()

    def _poke(self) -> None:
        """Wake the report loop; safe from the loader thread too."""
        loop = self._loop
        if loop is None:
            return
        try:
            if asyncio.get_running_loop() is loop:
                self._wake.set()
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(self._wake.set)

    def start_eval_gate(self) -> None:
        """Run the eval gate in the background and hand the scores to the controller."""
        async def gate():
            try:
                res = await self.run_eval()
            except Exception as exc:
                log.error("eval gate failed: %s", exc)
                await self.controller.call("eval_failed", f"{type(exc).__name__}: {exc}")
                return
            await self.controller.call("eval_result", res["candidate"], res["live"], res["detail"])

        task = asyncio.get_running_loop().create_task(gate())
        self._tasks.append(task)

    def feedback(self, slot: str | None, view: BundleView, positive: bool) -> None:
        self._push({"kind": "feedback", "slot": slot, "bundle": view.ref, "positive": positive})

    def shadow(self, diff, view: BundleView) -> None:
        self._push({"kind": "shadow", "bundle": view.ref, "diff": asdict(diff)})

    def _push(self, ev: dict) -> None:
        self.outbox.append(ev)
        if len(self.outbox) > MAX_OUTBOX:
            del self.outbox[: len(self.outbox) - MAX_OUTBOX]


def _node_id() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:12]
    except Exception:
        pass
    return socket.gethostname()


def _make_manager(settings: Settings, on_oom=None):
    from slotserve.bundles.store import Store
    from slotserve.memory import parse_size
    if settings.manager:
        import importlib
        mod, _, cls = settings.manager.partition(":")
        SlotManager = getattr(importlib.import_module(mod), cls)
    else:
        from slotserve.slots import SlotManager
    budget = parse_size(settings.memory_budget) if settings.memory_budget not in (None, "") else None
    return SlotManager(Store(settings.store), device=settings.device, memory_budget_bytes=budget,
                       on_oom=on_oom)


def _jsonable(x: Any):
    import json
    return json.loads(json.dumps(x, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                                 else str(o)))

"""The controller: one named Ray actor owning the desired state of every replica.

Desired state = which bundle sits in live / previous / candidate, the traffic weights,
and the rollout (`slotserve.control.state`). The logic lives in the plain-Python
`slotserve.control.core.ControllerCore`; `SlotController` here is the thin async
actor around it that

* hands the state to replicas: each replica long-polls `watch(version)`, which returns
  the moment the state changes (a push) or after a timeout (a heartbeat), so a new or
  restarted replica converges to the current state by itself;
* waits for convergence after each admin change, reporting how long it took;
* ticks the rollout every `TICK_S`, posts alert webhooks and flushes registry writes
  off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from slotserve.control.core import ControllerCore
from slotserve.control.state import HEARTBEAT_S
from slotserve.control.transitions import ControlError, load_failure
from slotserve.rollout.spec import RolloutSpec, SpecError


log = logging.getLogger("slotserve.controller")

TICK_S = 0.1

ACTOR = "slotserve-controller"
NAMESPACE = "slotserve"


class SlotController:
    """Async actor shell: long-poll watch, convergence waits, the tick loop, webhooks."""

    def __init__(self, store_root: str | None = None, app: str = "slotserve",
                 bundle: str | None = None, force_bundle: bool = False):
        from slotserve.bundles.store import Store
        self._webhooks: list[tuple[str, dict]] = []
        self.core = ControllerCore(Store(store_root), app=app, bundle=bundle, force_bundle=force_bundle,
                                   post=lambda url, body: self._webhooks.append((url, body)),
                                   defer_writes=True)
        self.core.flush()  # what the restore wrote
        from slotserve.metrics import ControllerMetrics
        self.app_metrics = ControllerMetrics(self.core.rollout_status)
        self.core.on_rollback = self.app_metrics.rollback
        self._snapshots: dict[str, list] = {}   # replica id -> its latest metric families
        self._changed: asyncio.Event | None = None
        # ref -> (state version that released it, the error): concurrent waiters on one
        # failed load all answer load_failed, not "superseded" by the release it caused
        self._load_failures: dict[str, tuple[int, ControlError]] = {}
        self._loop_task = None
        self._flush_lock: asyncio.Lock | None = None

    # -- plumbing

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._changed = asyncio.Event()
            self._flush_lock = asyncio.Lock()
            self._loop_task = asyncio.get_running_loop().create_task(self._ticker())
            self._seen_version = self.core.state.version

    def _notify(self) -> None:
        if self.core.state.version != self._seen_version:
            self._seen_version = self.core.state.version
            ev, self._changed = self._changed, asyncio.Event()
            ev.set()
        if self._webhooks:
            hooks, self._webhooks = self._webhooks, []
            for url, body in hooks:
                asyncio.get_running_loop().create_task(_post(url, body))
        if self.core.pending_writes:
            asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        async with self._flush_lock:  # one writer at a time keeps the ledger in order
            await asyncio.to_thread(self.core.flush)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.core.tick()
            except Exception:
                log.exception("rollout tick failed")
            self._notify()

    def stop(self) -> None:
        """Stop the tick loop (a controller running in-process, shutting down; the actor
        just ends with its process)."""
        if self._loop_task is not None:
            self._loop_task.cancel()

    async def ping(self) -> str:
        self._ensure_loop()
        return "ok"

    # -- replicas

    async def watch(self, known_version: int, timeout: float = HEARTBEAT_S) -> dict:
        """The desired state once it is newer than `known_version` (or after `timeout`)."""
        self._ensure_loop()
        if self.core.state.version <= known_version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.core.state.to_dict()

    async def report(self, replica_id: str, status: dict, events: list | None = None,
                     metrics: list | None = None) -> int:
        """A replica's status and queued events; `metrics`, its registry's families
        (slotserve.metrics), when it sends a new snapshot."""
        self._ensure_loop()
        self.core.report(replica_id, status, events)
        if metrics is not None:
            self._snapshots[replica_id] = metrics
        self._notify()
        return self.core.state.version

    async def forget(self, replica_id: str) -> None:
        self.core.forget(replica_id)
        self._snapshots.pop(replica_id, None)

    async def metrics(self) -> dict:
        """For a scrape of /metrics on any replica: the latest families of every replica
        still reporting, and the app's own (rollbacks, the rollout and its guards)."""
        alive = {r.id for r in self.core.replicas.active()}
        for rid in set(self._snapshots) - alive:
            del self._snapshots[rid]
        return {"replicas": dict(self._snapshots), "app": self.app_metrics.families()}

    async def state(self) -> dict:
        self._ensure_loop()
        return self.core.state.to_dict()

    # -- admin

    async def admin(self, op: str, args: dict, wait_s: float = 30.0) -> dict:
        """Run an admin operation, then wait until every replica has applied it."""
        self._ensure_loop()
        fn = {"load": self.core.load, "promote": self.core.promote, "rollback": self.core.rollback,
              "rollout": self.core.start_rollout, "abort": self.core.abort,
              "resume": self.core.resume}[op]
        t0 = time.perf_counter()
        try:
            if op == "rollout":
                spec = dict(args["spec"])
                try:
                    RolloutSpec.parse(spec)  # refuse a bad spec (no bundle, too) before loading anything
                except SpecError as exc:
                    raise ControlError(400, str(exc), "invalid_spec") from None
                rec = self.core.resolve(spec["bundle"])
                self.core.check_eval_gate(spec, rec)
                cand = self.core.state.candidate
                if cand is None or cand.digest != rec.digest:
                    if self.core.rollout is not None and self.core.rollout.active:
                        raise ControlError(409, "a rollout is already in progress", "rollout_in_progress")
                    self.core.load(rec.ref, actor=args["actor"])
                    self._notify()
                    await self._converge(self.core.state.version, wait_s, load_ref=rec.ref)
                state = self.core.start_rollout(spec, actor=args["actor"])
            else:
                state = fn(**args)
        except ControlError as exc:
            return {"error": {"status": exc.status, "message": exc.message, "code": exc.code}}
        self._notify()
        load_ref = state.candidate.ref if op == "load" and state.candidate else None
        try:
            conv = await self._converge(state.version, wait_s, load_ref=load_ref,
                                        loaded=op in ("load", "rollout"))
        except ControlError as exc:
            return {"error": {"status": exc.status, "message": exc.message, "code": exc.code}}
        return {"state": self.core.admin_state(), "version": state.version,
                "converged": conv["converged"], "converge_ms": conv["converge_ms"],
                "total_ms": round((time.perf_counter() - t0) * 1e3, 2),
                "replicas": conv["replicas"], "errors": conv["errors"]}

    async def _converge(self, version: int, wait_s: float, load_ref: str | None = None,
                        loaded: bool = True) -> dict:
        t0 = time.perf_counter()
        deadline = t0 + wait_s
        cand = self.core.state.candidate
        watch = cand.digest if load_ref and cand is not None else None
        while True:
            st = self.core.state
            if watch and (st.candidate is None or st.candidate.digest != watch) \
                    and (st.live is None or st.live.digest != watch):        # promoted meanwhile: not lost
                failed = self._load_failures.get(load_ref)
                if failed and failed[0] == st.version:  # another waiter saw this load fail: same answer
                    raise failed[1]
                # A later change (a rollback, a release) dropped what this load staged: saying
                # "converged" would report a bundle staged that no replica holds.
                raise ControlError(409, f"loading {load_ref} was superseded by desired state v{st.version} "
                                        f"({st.reason or 'a later change'}), which no longer stages it; nothing is "
                                        f"staged: load it again if you still want it", "superseded")
            done, errors = self.core.convergence(version, loaded)
            if errors and load_ref:
                released = self.core.unload_failed(load_ref, errors)
                self._notify()
                failure = load_failure(load_ref, errors)
                self._load_failures[load_ref] = (released.version, failure)
                raise failure
            if done or errors or time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.005)
        # A replica that failed to apply the change has not converged, whatever the others did.
        return {"converged": done and not errors, "converge_ms": round((time.perf_counter() - t0) * 1e3, 2),
                "replicas": len(self.core.active_replicas()), "errors": errors}

    async def eval_result(self, candidate_score: float, live_score: float, detail: dict) -> dict:
        """Scores of the eval gate, run by the replica that started the rollout."""
        self._ensure_loop()
        self.core.eval_result(candidate_score, live_score, detail)
        self._notify()
        return self.core.rollout_status()

    async def eval_failed(self, message: str) -> None:
        self._ensure_loop()
        self.core.eval_failed(message)
        self._notify()

    async def rollout_status(self) -> dict:
        return self.core.rollout_status()

    async def admin_state(self) -> dict:
        return self.core.admin_state()

    async def ledger(self, limit: int = 50, bundle: str | None = None) -> list[dict]:
        self._ensure_loop()
        await self._flush()
        return self.core.ledger(limit, bundle)


async def _post(url: str, body: dict) -> None:
    import httpx
    try:
        async with httpx.AsyncClient(timeout=5.0) as c:
            await c.post(url, json=body)
    except Exception as exc:
        log.error("alert webhook %s failed: %s", url, exc)


def get_or_create(store_root: str | None, app: str = "slotserve", bundle: str | None = None,
                  force_bundle: bool = False):
    """The app's controller actor (created detached on first use; later calls get it and
    their arguments are ignored)."""
    import ray
    actor_cls = ray.remote(SlotController)
    return actor_cls.options(name=f"{ACTOR}:{app}", namespace=NAMESPACE, lifetime="detached",
                             get_if_exists=True, num_cpus=0, max_restarts=-1,
                             max_concurrency=1000).remote(store_root, app, bundle, force_bundle)

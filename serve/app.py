"""The Ray Serve deployments and the application builder.

`SlotServe` is the serving deployment: a thin shell that makes a Replica
(slotserve.replica), connects it to the controller actor, and runs the replica's FastAPI
app (slotserve.api.routes.create_app). `Gateway` is the app's HTTP ingress: it forwards
each request to a SlotServe replica through a deployment handle and retries it once on
another replica when the first one dies before answering (slotserve.api.relay), which
Ray Serve's proxy does not do. `build_app(args)` is the application builder that
`slotserve serve` and `serve deploy` (import_path: slotserve.app:build_app) use.
"""

from __future__ import annotations

import uuid
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from slotserve.api import relay
from slotserve.api.routes import MAX_BODY_BYTES, create_app
from slotserve.control.controller import get_or_create
from slotserve.replica import RayController, Replica, Settings


def _replica_id() -> str:
    try:
        rid = serve.get_replica_context().replica_id
        return getattr(rid, "unique_id", None) or str(rid)
    except Exception:
        return uuid.uuid4().hex[:8]


# Serve's own limit far above Settings.max_inflight (256): Serve then queues nothing in
# its proxy, every request reaches our admission check, and past our limit a client gets a
# 429 with Retry-After at once (with Serve at 384, requests past it waited in Serve's queue
# for a running one to finish: 429s after 16 s under an 800-request burst).
MAX_ONGOING_REQUESTS = 16384


@serve.deployment(name="SlotServe", max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=5,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=20,
                  ray_actor_options={"num_cpus": 0})
class SlotServe:
    """One replica: slots + handler; converges to the controller's desired state
    (live and previous loaded) before Serve routes any request to it."""

    async def __init__(self, settings: dict | None = None):
        s = Settings.from_dict(settings)
        rid = _replica_id()
        handle = get_or_create(s.store, s.app, s.bundle)
        self.replica = Replica(s, RayController(handle), replica_id=rid)
        await self.replica.start()
        self.http_app = create_app(self.replica)

    def __serve_build_asgi_app__(self):
        return self.http_app     # as the ingress itself (DirectSlotServe, no Gateway)

    async def http(self, req: dict):
        """One HTTP request forwarded by the Gateway: the app's ASGI messages, streamed."""
        async for batch in relay.serve_asgi(self.http_app, req):
            yield batch

    async def check_health(self):
        ok, why = self.replica.ready()
        if not ok and self.replica.desired is None:
            raise RuntimeError(f"replica lost its state: {why}")

    async def __del__(self):
        await self.replica.stop()


# The same replica as the app's ingress, for `gateway: false` (one hop less; Ray's proxy
# then answers a replica crash with its plain-text 500). Serve allows one ingress per app.
DirectSlotServe = SlotServe.options(func_or_class=serve.ingress()(SlotServe.func_or_class))


def _classify(exc: BaseException) -> str:
    """What an exception from a SlotServe handle means, for relay.failure_answer."""
    if isinstance(exc, RayActorError):        # ActorDiedError, ActorUnavailableError
        return "lost"
    if isinstance(exc, DeploymentUnavailableError):
        return "unavailable"
    if isinstance(exc, BackPressureError):
        return "overloaded"
    return "error"


@serve.deployment(name="Gateway", max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Gateway:
    """The app's HTTP ingress: every request goes to a SlotServe replica through a
    handle; a replica lost before answering gets the request retried once elsewhere."""

    def __init__(self, replicas):
        self.replicas = replicas.options(stream=True)

    async def _forward(self, req: dict):
        stream = self.replicas.http.remote(req)
        try:
            async for batch in stream:
                yield batch
        finally:
            stream.cancel()      # the client left mid-answer: the replica stops decoding for it

    def __serve_build_asgi_app__(self):
        return relay.Forwarder(self._forward, _classify, MAX_BODY_BYTES)



def build_app(args: dict | None = None):
    """Application builder: `serve.run(build_app({...}))` or `serve deploy` with
    import_path slotserve.app:build_app. `args` are Settings fields plus optional
    num_replicas / autoscaling_config / max_replicas_per_node / num_gpus / num_cpus
    (all of the SlotServe deployment) and `gateway` (default true: the Gateway is the
    ingress; false serves SlotServe as the ingress directly, behind Ray's proxy only)."""
    args = dict(args or {})
    gateway = bool(args.pop("gateway", True))
    opts: dict[str, Any] = {}
    if "num_replicas" in args:
        opts["num_replicas"] = args.pop("num_replicas")
    if "autoscaling_config" in args:
        opts["autoscaling_config"] = args.pop("autoscaling_config")
    if "max_replicas_per_node" in args:
        opts["max_replicas_per_node"] = args.pop("max_replicas_per_node")
    actor_opts = {"num_cpus": args.pop("num_cpus", 0)}
    if (gpus := args.pop("num_gpus", None)) is not None:
        actor_opts["num_gpus"] = gpus
    if args.get("device", "cpu") == "cuda" and "num_gpus" not in actor_opts:
        actor_opts["num_gpus"] = 1
    opts["ray_actor_options"] = actor_opts
    settings = Settings.from_dict(args)
    if settings.deployment != "SlotServe":
        opts["name"] = settings.deployment
    if not gateway:
        return DirectSlotServe.options(**opts).bind(settings.to_dict())
    return Gateway.bind(SlotServe.options(**opts).bind(settings.to_dict()))

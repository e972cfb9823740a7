"""The HTTP surface: the FastAPI app of one replica (OpenAI-compatible API + admin API).

`create_app(replica)` builds the FastAPI app and is usable without Ray (tests drive it
with httpx's ASGI transport); the Ray Serve deployment (slotserve.app) serves it as its
ingress.

Every error is an OpenAI error object with a 4xx/5xx status; a stack trace never
reaches a client.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slotserve import SLOT_NAMES, __version__
from slotserve.api import choices
from slotserve.api.auth import TokenCheck
from slotserve.bundles.manifest import BundleError
from slotserve.bundles.ref import parse_ref
from slotserve.api.errors import APIError, describe_validation_error
from slotserve.api.handler import Handler, retry_after_s
from slotserve.api.requests import ChatCompletionRequest, CompletionRequest, FeedbackRequest, LoadRequest, ReasonRequest
from slotserve.api.requests import DetokenizeRequest, TokenizeRequest
from slotserve.api.response_ids import ResponseIds
from slotserve.api.responses import ModelCard, ModelList, now
from slotserve.api.responses import DetokenizeResponse, TokenizeResponse, VersionResponse
from slotserve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from slotserve.replica import BundleView, Replica
from slotserve.replica.bundle_view import PromptError
from slotserve.replica.controller_link import ControllerUnavailable

log = logging.getLogger("slotserve.app")
MAX_BODY_BYTES = 8 << 20
MAX_JSON_DEPTH = 64      # no request shape nests deeper than a few levels; far deeper is an attack
LOAD_WAIT_S = 600.0      # loading a candidate on every replica
SWAP_WAIT_S = 30.0       # promote / rollback / abort: pointer swaps


def _err(status: int, message: str, type_: str | None = None, param=None, code=None,
         headers: dict | None = None) -> JSONResponse:
    e = APIError(status, message, type=type_, param=param, code=code)
    return JSONResponse(e.body(), status_code=status, headers=headers)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _json_body(request: Request) -> Any:
    ctype = request.headers.get("content-type")
    if ctype is not None and not _is_json(ctype):
        # e.g. curl -d without -H 'content-type: application/json' sends a form
        raise APIError(415, f"request body must be JSON (content-type: application/json), got "
                            f"content-type {ctype.split(';')[0]!r}", code="unsupported_media_type")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    if not raw.strip():
        raise APIError(400, "request body is empty: send a JSON object")
    too_deep = APIError(400, f"request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:   # the parser's own limit: nested far deeper than MAX_JSON_DEPTH
        raise too_deep from None
    if _depth_over(body, MAX_JSON_DEPTH):
        raise too_deep
    return body


def _depth_over(value: Any, limit: int) -> bool:
    """Whether `value` nests lists/objects more than `limit` deep (iterative: a deep body
    must not exhaust the stack of whatever walks it next, validation included)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _parse(model, body: Any):
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return model.model_validate(body)


class _SSE(StreamingResponse):
    """Streams a Run as server-sent events; whatever happens, the engine request ends."""

    def __init__(self, run, headers: dict, events=None, runs=None):
        super().__init__(events if events is not None else run.sse(), media_type="text/event-stream",
                         headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
        self._runs = runs or [run]

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for run in self._runs:
                run.close()  # a client that disconnected frees its KV blocks now


def create_app(replica: Replica) -> FastAPI:
    """The FastAPI app serving `replica`: the OpenAI-compatible API through a request
    Handler built here and attached to the replica, and the admin API, which forwards to
    the controller."""
    check = TokenCheck(replica.settings.admin_token_sha256, replica.settings.store)
    # every replica of the app derives the same id-signing key from the admin token
    handler = Handler(replica.backend, observe=replica.outbox.observe, on_shadow=replica.outbox.shadow,
                      ids=ResponseIds(check.expected_sha))
    replica.attach(handler)
    app = FastAPI(title="slotserve", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)
    for exc, answer in ((APIError, _api_error), (ValidationError, _validation_error),
                        (RequestValidationError, _validation_error), (StarletteHTTPException, _http_error),
                        (Exception, _internal_error)):
        app.add_exception_handler(exc, answer)
    OpenAIRoutes(replica, handler).install(app)
    AdminRoutes(replica, check).install(app)
    ServiceRoutes(replica, handler).install(app)
    app.add_middleware(ReplicaHeader, replica_id=replica.id)
    return app


class ReplicaHeader:
    """Names the replica that answered in every response (`x-slotserve-replica`): with
    several replicas behind one port, the first thing an operator chasing a bad answer or
    a crash needs. A plain ASGI middleware, so streams pass through untouched."""

    def __init__(self, app, replica_id: str):
        self.app, self.header = app, (b"x-slotserve-replica", replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), self.header]}
            await send(msg)
        await self.app(scope, receive, tagged)


# ---------------------------------------------------------------- errors

async def _api_error(_, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


async def _validation_error(_, exc: ValidationError | RequestValidationError):
    msg, param = describe_validation_error(exc)
    return _err(400, msg, param=param)


async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        return _err(404, f"no route {request.method} {request.url.path}; see docs/serving.md",
                    code="unknown_url")
    if exc.status_code == 405:
        return _err(405, f"method {request.method} not allowed on {request.url.path}",
                    code="method_not_allowed")
    return _err(exc.status_code, str(exc.detail))


async def _internal_error(_, exc: Exception):
    log.exception("unhandled error")
    return _err(500, f"internal error ({type(exc).__name__}); the server logged the details",
                "server_error")


# ---------------------------------------------------------------- OpenAI surface

class OpenAIRoutes:
    """POST /v1/chat/completions, /v1/completions, /v1/feedback; GET /v1/models[/{id}], /healthz."""

    def __init__(self, replica: Replica, handler: Handler):
        self.replica, self.handler = replica, handler

    def install(self, app: FastAPI) -> None:
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"])
        app.add_api_route("/v1/feedback", self.feedback, methods=["POST"])
        app.add_api_route("/healthz", self.healthz, methods=["GET"])

    async def _generate(self, kind: str, model, request: Request):
        handler, replica = self.handler, self.replica
        cap = replica.settings.max_inflight
        if handler.inflight >= cap:   # refused before parsing: an overloaded replica answers at once
            wait = retry_after_s(handler.inflight, cap, handler.latency_s)
            raise APIError(429, f"replica at capacity ({handler.inflight} requests in flight, about "
                                f"{handler.latency_s:.1f} s each); retry in {wait} s", code="overloaded",
                           headers={"Retry-After": str(wait)})
        req = _parse(model, await _json_body(request))
        ok, why = replica.ready()
        if not ok and not handler.backend.views():
            raise APIError(503, f"not ready: {why}", code="not_ready", headers={"Retry-After": "2"})
        if req.n > 1:
            runs = await choices.start_choices(handler, kind, req, request.headers)
            if req.stream:
                return _SSE(runs[0], runs[0].headers(), choices.sse(runs), runs)
            try:
                body = await choices.whole(runs)
            finally:
                for r in runs:
                    r.close()
            return JSONResponse(body, headers=runs[0].headers())
        run = await handler.start(kind, req, request.headers)
        if req.stream:
            return _SSE(run, run.headers())
        try:
            body = await run.response()
        finally:
            run.close()
        return JSONResponse(body, headers=run.headers())

    async def chat_completions(self, request: Request):
        return await self._generate("chat", ChatCompletionRequest, request)

    async def completions(self, request: Request):
        return await self._generate("completion", CompletionRequest, request)

    def _model_cards(self) -> list[ModelCard]:
        handler = self.handler
        views = handler.backend.views()
        cards = []
        if (name := handler.served_name(views)) is not None:
            cards.append(ModelCard(id=name, created=now()))
        seen = {c.id for c in cards}
        for s in SLOT_NAMES:  # each id once: one bundle may sit in two slots
            if (v := views.get(s)) is not None and v.ref not in seen:
                seen.add(v.ref)
                cards.append(ModelCard(id=v.ref, created=now(), slot=s, digest=v.digest))
        return cards

    async def models(self):
        return JSONResponse(ModelList(data=self._model_cards()).model_dump(mode="json"))

    async def model(self, model_id: str):
        cards = self._model_cards()
        for card in cards:
            if card.id == model_id:
                return JSONResponse(card.model_dump(mode="json"))
        raise APIError(404, f"model {model_id!r} is not served here; served: "
                            + ", ".join(c.id for c in cards), param="model", code="model_not_found")

    async def feedback(self, request: Request):
        req = _parse(FeedbackRequest, await _json_body(request))
        slot, view = self.handler.feedback(req)
        if view is None:
            return JSONResponse({"ok": True, "recorded": False, "id": req.id,
                                 "note": "the bundle that answered is no longer in a slot"})
        self.replica.outbox.feedback(slot, view, positive=not req.thumbs_down, rid=req.id)
        return JSONResponse({"ok": True, "recorded": True, "id": req.id, "bundle": view.ref,
                             "slot": slot}, headers=view.headers())

    async def healthz(self):
        body = self.replica.health()     # ready while live serves (docs/serving.md, health)
        return JSONResponse(body, status_code=200 if body["ready"] else 503)


# ---------------------------------------------------------------- admin surface

class AdminRoutes:
    """The admin API (bearer token): state, load, rollout start/status/promote/abort/resume,
    rollback, ledger. Every change is the controller's; this replica forwards it and
    answers once the replicas have converged (or the wait ran out)."""

    def __init__(self, replica: Replica, check: TokenCheck):
        self.replica, self.check = replica, check

    def install(self, app: FastAPI) -> None:
        app.add_api_route("/admin/state", self.state, methods=["GET"])
        app.add_api_route("/admin/load", self.load, methods=["POST"])
        app.add_api_route("/admin/rollout", self.rollout_start, methods=["POST"])
        app.add_api_route("/admin/rollout", self.rollout_status, methods=["GET"])
        app.add_api_route("/admin/rollout/promote", self.promote, methods=["POST"])
        app.add_api_route("/admin/rollout/abort", self.abort, methods=["POST"])
        app.add_api_route("/admin/rollout/resume", self.resume, methods=["POST"])
        app.add_api_route("/admin/rollback", self.rollback, methods=["POST"])
        app.add_api_route("/admin/ledger", self.ledger, methods=["GET"])

    def _actor(self, request: Request) -> str:
        """Who is asking (for the ledger), once the bearer token checks out; else a 401."""
        why = self.check.check(request.headers.get("authorization"))
        if why is not None:
            raise APIError(401, why, code="unauthorized", headers={"WWW-Authenticate": "Bearer"})
        return request.headers.get("x-slotserve-actor") or "admin-api"

    async def _call(self, method: str, *args):
        """Call the controller; a restarting one is waited for briefly, then a 503."""
        ctl = self.replica.controller
        try:
            await ctl.wait_ready()
        except ControllerUnavailable as exc:
            raise APIError(503, str(exc), code="controller_unavailable", headers={"Retry-After": "2"}) from None
        try:
            return await ctl.call(method, *args)
        except ControllerUnavailable as exc:
            maybe = "; the change may or may not have been applied: check `slotserve state`" \
                if method == "admin" else ""
            raise APIError(503, str(exc) + maybe, code="controller_unavailable",
                           headers={"Retry-After": "2"}) from None

    async def _control(self, op: str, args: dict, wait_s: float):
        res = await self._call("admin", op, args, wait_s)
        if "error" in res:
            e = res["error"]
            raise APIError(e["status"], e["message"], code=e.get("code"))
        return JSONResponse(res)

    @staticmethod
    async def _reason(request: Request) -> str:
        raw = await request.body()
        if not raw.strip():
            return ""
        return _parse(ReasonRequest, await _json_body(request)).reason

    async def state(self, request: Request):
        self._actor(request)
        state = await self._call("admin_state")
        state["answered_by"] = self.replica.id
        return JSONResponse(state)

    async def load(self, request: Request):
        actor = self._actor(request)
        req = _parse(LoadRequest, await _json_body(request))
        try:
            parse_ref(req.bundle)
        except BundleError as exc:
            raise APIError(400, str(exc), param="bundle", code="invalid_ref") from None
        return await self._control("load", {"ref": req.bundle, "actor": actor,
                                            "evict_previous": req.evict_previous}, LOAD_WAIT_S)

    async def rollout_start(self, request: Request):
        actor = self._actor(request)
        spec = await _json_body(request)
        if not isinstance(spec, dict):
            raise APIError(400, "the rollout spec must be a JSON object (see docs/rollout.md)")
        resp = await self._control("rollout", {"spec": spec, "actor": actor}, LOAD_WAIT_S)
        if json.loads(resp.body)["state"].get("rollout_phase") == "pending_eval":
            self.replica.start_eval_gate()  # this replica holds both slots: it runs the eval set
        return resp

    async def rollout_status(self, request: Request):
        self._actor(request)
        return JSONResponse(await self._call("rollout_status"))

    async def promote(self, request: Request):
        actor = self._actor(request)
        return await self._control("promote", {"actor": actor, "reason": await self._reason(request)},
                                   SWAP_WAIT_S)

    async def abort(self, request: Request):
        actor = self._actor(request)
        return await self._control("abort", {"actor": actor, "reason": await self._reason(request)},
                                   SWAP_WAIT_S)

    async def resume(self, request: Request):
        actor = self._actor(request)
        return await self._control("resume", {"actor": actor}, SWAP_WAIT_S)

    async def rollback(self, request: Request):
        actor = self._actor(request)
        return await self._control("rollback", {"actor": actor, "reason": await self._reason(request)},
                                   SWAP_WAIT_S)

    async def ledger(self, request: Request, limit: int = 50, bundle: str | None = None):
        self._actor(request)
        if not 1 <= limit <= 10_000:
            raise APIError(400, "limit must be between 1 and 10000", param="limit")
        return JSONResponse({"entries": await self._call("ledger", limit, bundle)})


# ---------------------------------------------------------------- liveness, version, tokenizer, metrics

class ServiceRoutes:
    """GET /health (liveness), /version, /metrics (Prometheus, the whole app); POST
    /tokenize and /detokenize, shaped as vLLM's. None needs the admin token (as in vLLM):
    they change nothing and show no more than /v1/models does."""

    def __init__(self, replica: Replica, handler: Handler):
        self.replica, self.handler = replica, handler

    def install(self, app: FastAPI) -> None:
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/version", self.version, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"])

    async def health(self):
        """Liveness: the process answers. Touches no model, no controller, no lock, so a
        replica busy loading a bundle is alive (readiness is /healthz)."""
        return JSONResponse({"status": "ok", "replica": self.replica.id})

    async def version(self):
        live = self.handler.backend.views().get("live")
        body = VersionResponse(version=__version__, live=live.ref if live else None,
                               digest=live.digest if live else None)
        return JSONResponse(body.model_dump(mode="json"))

    async def metrics(self):
        # x-slotserve-replica (every response has it) says which replica rendered the scrape
        return Response(await self.replica.metrics_text(), media_type=METRICS_CONTENT_TYPE)

    def _view(self, model: str) -> BundleView:
        """The bundle `model` names, as chat completions resolve it; the logical name is
        live's (a tokenizer answer must not depend on the rollout's dice)."""
        slot, pinned = self.handler.resolve(model, None)
        views = self.handler.backend.views()
        view = views.get(slot if pinned else "live")
        if view is None:
            raise APIError(503, "no bundle is loaded yet", code="not_ready", headers={"Retry-After": "2"})
        return view

    async def tokenize(self, request: Request):
        req = _parse(TokenizeRequest, await _json_body(request))
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of prompt (a string) or messages (chat messages)",
                           param="prompt" if req.prompt is None else "messages")
        view = self._view(req.model)
        if req.messages is not None:
            if req.add_special_tokens:
                raise APIError(400, "add_special_tokens applies to prompt only; messages are rendered with "
                                    "the chat template, which places special tokens itself",
                               param="add_special_tokens")
            try:
                ids = view.render_chat([{"role": m.role, "content": m.text()} for m in req.messages],
                                       add_generation_prompt=req.add_generation_prompt)
            except PromptError as exc:
                raise APIError(400, str(exc), param=exc.param) from None
        else:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = list(view.tokenizer(req.prompt, add_special_tokens=add_special)["input_ids"])
        body = TokenizeResponse(tokens=ids, count=len(ids), max_model_len=view.max_model_len, model=view.ref)
        return JSONResponse(body.model_dump(mode="json"), headers=view.headers())

    async def detokenize(self, request: Request):
        req = _parse(DetokenizeRequest, await _json_body(request))
        view = self._view(req.model)
        vocab = len(view.tokenizer)
        if bad := [t for t in req.tokens if t >= vocab]:
            raise APIError(400, f"token ids must be below {view.ref}'s vocabulary size {vocab}; got {bad[:5]}",
                           param="tokens")
        body = DetokenizeResponse(prompt=view.tokenizer.decode(req.tokens), model=view.ref)
        return JSONResponse(body.model_dump(mode="json"), headers=view.headers())

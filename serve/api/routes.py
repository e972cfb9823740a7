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
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slotserve import SLOT_NAMES
from slotserve.api.auth import TokenCheck
from slotserve.api.errors import APIError, describe_validation_error
from slotserve.api.handler import Handler
from slotserve.api.requests import ChatCompletionRequest, CompletionRequest, FeedbackRequest, LoadRequest, ReasonRequest
from slotserve.api.response_ids import ResponseIds
from slotserve.api.responses import ModelCard, ModelList, now

log = logging.getLogger("slotserve.app")
MAX_BODY_BYTES = 8 << 20
LOAD_WAIT_S = 600.0      # loading a candidate on every replica
SWAP_WAIT_S = 30.0       # promote / rollback / abort: pointer swaps


def _err(status: int, message: str, type_: str | None = None, param=None, code=None,
         headers: dict | None = None) -> JSONResponse:
    e = APIError(status, message, type=type_, param=param, code=code)
    return JSONResponse(e.body(), status_code=status, headers=headers)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    if not raw.strip():
        raise APIError(400, "request body is empty: send a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None


def _parse(model, body: Any):
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return model.model_validate(body)


class _SSE(StreamingResponse):
    """Streams a Run as server-sent events; whatever happens, the engine request ends."""

    def __init__(self, run, headers: dict):
        super().__init__(run.sse(), media_type="text/event-stream",
                         headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
        self._run = run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.close()  # a client that disconnected frees its KV blocks now


def create_app(replica) -> FastAPI:
    app = FastAPI(title="slotserve", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)
    check = TokenCheck(replica.settings.admin_token_sha256, replica.settings.store)
    # every replica of the app derives the same id-signing key from the admin token
    handler = Handler(replica.backend, observe=replica.outbox.observe, on_shadow=replica.outbox.shadow,
                      ids=ResponseIds(check.expected_sha))
    replica.attach(handler)

    # ---------------------------------------------------------------- errors

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)

    @app.exception_handler(ValidationError)
    async def _validation(_, exc: ValidationError):
        msg, param = describe_validation_error(exc)
        return _err(400, msg, param=param)

    @app.exception_handler(RequestValidationError)
    async def _req_validation(_, exc: RequestValidationError):
        msg, param = describe_validation_error(exc)
        return _err(400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _err(404, f"no route {request.method} {request.url.path}; see docs/serving.md",
                        code="unknown_url")
        if exc.status_code == 405:
            return _err(405, f"method {request.method} not allowed on {request.url.path}",
                        code="method_not_allowed")
        return _err(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("unhandled error")
        return _err(500, f"internal error ({type(exc).__name__}); the server logged the details",
                    "server_error")

    # ---------------------------------------------------------------- OpenAI surface

    async def _generate(kind: str, model, request: Request):
        req = _parse(model, await _json_body(request))
        if handler.inflight >= replica.settings.max_inflight:
            raise APIError(429, f"replica at capacity ({handler.inflight} requests in flight); "
                                "retry shortly", code="overloaded", headers={"Retry-After": "1"})
        ok, why = replica.ready()
        if not ok and not handler.backend.views():
            raise APIError(503, f"not ready: {why}", code="not_ready", headers={"Retry-After": "2"})
        run = await handler.start(kind, req, request.headers)
        if req.stream:
            return _SSE(run, run.headers())
        try:
            body = await run.response()
        finally:
            run.close()
        return JSONResponse(body, headers=run.headers())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate("chat", ChatCompletionRequest, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate("completion", CompletionRequest, request)

    def model_cards() -> list[ModelCard]:
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

    @app.get("/v1/models")
    async def models():
        return JSONResponse(ModelList(data=model_cards()).model_dump(mode="json"))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        cards = model_cards()
        for card in cards:
            if card.id == model_id:
                return JSONResponse(card.model_dump(mode="json"))
        raise APIError(404, f"model {model_id!r} is not served here; served: "
                            + ", ".join(c.id for c in cards), param="model", code="model_not_found")

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        req = _parse(FeedbackRequest, await _json_body(request))
        slot, view = handler.feedback(req)
        if view is None:
            return JSONResponse({"ok": True, "recorded": False, "id": req.id,
                                 "note": "the bundle that answered is no longer in a slot"})
        replica.outbox.feedback(slot, view, positive=not req.thumbs_down, rid=req.id)
        return JSONResponse({"ok": True, "recorded": True, "id": req.id, "bundle": view.ref,
                             "slot": slot}, headers=view.headers())

    @app.get("/healthz")
    async def healthz():
        ok, why = replica.ready()
        body = {"ready": ok, "status": why, "replica": replica.id,
                "desired_version": replica.desired.version if replica.desired else None,
                "applied_version": replica.applied,
                "slots": {s: v.ref for s, v in handler.backend.views().items()}}
        return JSONResponse(body, status_code=200 if ok else 503)

    # ---------------------------------------------------------------- admin surface

    def _admin(request: Request) -> str:
        why = check.check(request.headers.get("authorization"))
        if why is not None:
            raise APIError(401, why, code="unauthorized", headers={"WWW-Authenticate": "Bearer"})
        return request.headers.get("x-slotserve-actor") or "admin-api"

    async def _control(op: str, args: dict, wait_s: float):
        res = await replica.controller.call("admin", op, args, wait_s)
        if "error" in res:
            e = res["error"]
            raise APIError(e["status"], e["message"], code=e.get("code"))
        return JSONResponse(res)

    async def _reason(request: Request) -> str:
        raw = await request.body()
        if not raw.strip():
            return ""
        return _parse(ReasonRequest, await _json_body(request)).reason

    @app.get("/admin/state")
    async def admin_state(request: Request):
        _admin(request)
        state = await replica.controller.call("admin_state")
        state["answered_by"] = replica.id
        return JSONResponse(state)

    @app.post("/admin/load")
    async def admin_load(request: Request):
        actor = _admin(request)
        req = _parse(LoadRequest, await _json_body(request))
        return await _control("load", {"ref": req.bundle, "actor": actor,
                                       "evict_previous": req.evict_previous}, LOAD_WAIT_S)

    @app.post("/admin/rollout")
    async def admin_rollout_start(request: Request):
        actor = _admin(request)
        spec = await _json_body(request)
        if not isinstance(spec, dict):
            raise APIError(400, "the rollout spec must be a JSON object (see docs/rollout.md)")
        resp = await _control("rollout", {"spec": spec, "actor": actor}, LOAD_WAIT_S)
        if json.loads(resp.body)["state"].get("rollout_phase") == "pending_eval":
            replica.start_eval_gate()  # this replica holds both slots: it runs the eval set
        return resp

    @app.get("/admin/rollout")
    async def admin_rollout_status(request: Request):
        _admin(request)
        return JSONResponse(await replica.controller.call("rollout_status"))

    @app.post("/admin/rollout/promote")
    async def admin_promote(request: Request):
        actor = _admin(request)
        return await _control("promote", {"actor": actor, "reason": await _reason(request)}, SWAP_WAIT_S)

    @app.post("/admin/rollout/abort")
    async def admin_abort(request: Request):
        actor = _admin(request)
        return await _control("abort", {"actor": actor, "reason": await _reason(request)}, SWAP_WAIT_S)

    @app.post("/admin/rollout/resume")
    async def admin_resume(request: Request):
        actor = _admin(request)
        return await _control("resume", {"actor": actor}, SWAP_WAIT_S)

    @app.post("/admin/rollback")
    async def admin_rollback(request: Request):
        actor = _admin(request)
        return await _control("rollback", {"actor": actor, "reason": await _reason(request)}, SWAP_WAIT_S)

    @app.get("/admin/ledger")
    async def admin_ledger(request: Request, limit: int = 50, bundle: str | None = None):
        _admin(request)
        if not 1 <= limit <= 10_000:
            raise APIError(400, "limit must be between 1 and 10000", param="limit")
        return JSONResponse({"entries": await replica.controller.call("ledger", limit, bundle)})

    return app

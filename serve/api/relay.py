"""Carrying one HTTP exchange across a hop: the gateway's side and the replica's side.

Ray Serve's proxy answers a request whose replica dies with a plain-text 500 and never
retries it. So the app's ingress is a gateway (slotserve.app.Gateway) that forwards each
request to a serving replica through a deployment handle, and owns what a crash looks
like to the client:
- `read_request` turns the ASGI request into a plain dict (picklable, body included);
- `serve_asgi` runs it through the replica's own FastAPI app and yields the ASGI messages
  it sends, so the replica's behaviour is exactly that of a direct ingress;
- `relay` sends them on, and when the replica is lost before anything reached the client
  retries once (a handle never routes twice to a replica it saw die) where `may_retry`
  allows; otherwise the client gets an OpenAI error object, or an SSE error event when a
  stream had already begun.

Nothing here imports Ray: the gateway passes in how to open a stream and which
exceptions mean "the replica is gone".
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from slotserve.api.errors import APIError

log = logging.getLogger("slotserve.relay")

# Generation and tokenizer calls change nothing but metrics, so running one again on
# another replica is safe. Admin POSTs are not (a rollback applied twice swaps back) and
# neither is feedback (it would count twice).
RETRYABLE_POSTS = frozenset({"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"})
RETRIED_HEADER = "x-slotserve-retried"

Message = dict[str, Any]
OpenStream = Callable[[dict], AsyncIterator[list[Message]]]


def _safe_twice(method: str, path: str) -> bool:
    """Whether running the request twice cannot change anything."""
    return method in ("GET", "HEAD") or (method == "POST" and path in RETRYABLE_POSTS)


def may_retry(method: str, path: str, sent_anything: bool, attempt: int) -> bool:
    """Whether a request whose replica was lost may run again on another replica: only
    once, only if no byte of the answer reached the client, and only if running it twice
    cannot change anything."""
    return not sent_anything and attempt == 0 and _safe_twice(method, path)


async def read_request(scope: dict, receive: Callable[[], Awaitable[Message]], limit: int) -> dict:
    """The request as a plain dict: what the replica's app needs to rebuild its scope.
    A body over `limit` bytes is refused here, before it crosses the hop."""
    chunks, size, more = [], 0, True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise asyncio.CancelledError("client disconnected before sending its body")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over {limit} bytes, the limit")
        chunks.append(chunk)
        more = msg.get("more_body", False)
    return {"method": scope["method"], "path": scope["path"], "raw_path": scope.get("raw_path"),
            "root_path": scope.get("root_path", ""), "query_string": scope.get("query_string", b""),
            "headers": [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])],
            "client": tuple(scope["client"]) if scope.get("client") else None,
            "scheme": scope.get("scheme", "http"), "http_version": scope.get("http_version", "1.1"),
            "body": b"".join(chunks)}


async def serve_asgi(app, req: dict) -> AsyncIterator[list[Message]]:
    """Run `req` through the ASGI `app` and yield what it sends, in batches (one hop per
    batch, not per message). Closing the generator (the gateway cancelled: its client
    left) tells the app the client disconnected and cancels it, so a stream's finally
    frees its engine request."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": req["http_version"], "method": req["method"], "scheme": req["scheme"],
             "path": req["path"], "raw_path": req["raw_path"] or req["path"].encode(),
             "root_path": req["root_path"], "query_string": req["query_string"],
             "headers": req["headers"], "client": req["client"], "server": None}
    out: asyncio.Queue = asyncio.Queue()
    end = object()                  # run() puts it last, once the app has returned
    gone = asyncio.Event()
    body = [req["body"]]

    async def receive() -> Message:
        if body:
            return {"type": "http.request", "body": body.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run():
        try:
            await app(scope, receive, out.put)
        except Exception:      # the app has already answered with its error object
            log.debug("app raised after answering", exc_info=True)
        finally:
            out.put_nowait(end)

    task = asyncio.create_task(run())
    try:
        while True:
            batch = [await out.get()]
            while not out.empty():
                batch.append(out.get_nowait())
            finished = batch[-1] is end
            if finished:
                batch.pop()
            if batch:
                yield batch
            if finished:
                return
    finally:
        gone.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def error_messages(err: APIError) -> list[Message]:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in (err.headers or {}).items()]
    return [{"type": "http.response.start", "status": err.status, "headers": headers},
            {"type": "http.response.body", "body": json.dumps(err.body()).encode(), "more_body": False}]


def _sse_error(err: APIError) -> Message:
    """The end of a stream whose replica was lost mid-answer: the status has gone out
    already, so the error travels as an event (as OpenAI's streams carry errors)."""
    data = json.dumps(err.body()).encode()
    return {"type": "http.response.body", "body": b"data: " + data + b"\n\ndata: [DONE]\n\n", "more_body": False}


def failure_answer(kind: str, exc: BaseException, retried: bool, may_have_applied: bool) -> APIError:
    """The error object for a request the gateway could not get answered. `kind` is how
    the gateway classified `exc`: "lost" (the replica died or became unreachable),
    "unavailable" (no replica to send it to), "overloaded" (every replica refused it),
    or anything else."""
    name = type(exc).__name__
    if kind == "lost":
        what = f"the replica handling this request stopped ({name}) before it finished answering"
        if retried:
            what += ", and so did the one it was retried on"
        elif may_have_applied:
            what += "; the change may or may not have been applied: check `slotserve state` before repeating it"
        return APIError(503, what + "; retry shortly", code="replica_unavailable",
                        headers={"Retry-After": "1"})
    if kind == "unavailable":
        return APIError(503, f"no serving replica is up yet ({name}); retry shortly",
                        code="not_ready", headers={"Retry-After": "2"})
    if kind == "overloaded":
        return APIError(429, f"every replica is at capacity ({name}); retry shortly", code="overloaded",
                        headers={"Retry-After": "1"})
    return APIError(500, f"internal error ({name}); the server logged the details")


async def relay(open_stream: OpenStream, req: dict, send: Callable[[Message], Awaitable[None]],
                classify: Callable[[BaseException], str]) -> int:
    """Forward `req` through `open_stream` and send its answer with `send`; `classify`
    names what an exception from the stream means (see failure_answer). Returns how many
    times the request ran again after a lost replica (0 or 1)."""
    root = req["root_path"]
    path = (req["path"][len(root):] or "/") if root and req["path"].startswith(root) else req["path"]
    attempt = 0
    while True:
        start: Message | None = None        # held back until the first body message
        sent = streaming = complete = False
        try:
            async for batch in open_stream(req):
                for msg in batch:
                    if msg["type"] == "http.response.start" and not sent:
                        headers = list(msg.get("headers", []))
                        if attempt:
                            headers.append((RETRIED_HEADER.encode(), str(attempt).encode()))
                        start = {**msg, "headers": headers}
                        streaming = any(bytes(k).lower() == b"content-type" and bytes(v).startswith(b"text/event-stream")
                                        for k, v in headers)
                        continue
                    if start is not None:
                        await send(start)
                        start, sent = None, True
                    await send(msg)
                    complete = complete or msg["type"] == "http.response.body" and not msg.get("more_body", False)
            if start is not None:           # a start with no body message: send it alone
                await send(start)
            return attempt
        except Exception as exc:
            kind = classify(exc)
            if complete:      # the answer was whole; only the stream's end was lost with the replica
                log.info("%s %s: replica lost after answering (%s)", req["method"], path, type(exc).__name__)
                return attempt
            if kind == "lost" and may_retry(req["method"], path, sent, attempt):
                log.warning("replica lost before answering %s %s (%s); retrying on another replica",
                            req["method"], path, type(exc).__name__)
                attempt += 1
                continue
            log.warning("%s %s failed (%s: %s)", req["method"], path, kind, exc)
            err = failure_answer(kind, exc, retried=attempt > 0, may_have_applied=not _safe_twice(req["method"], path))
            if not sent:
                for m in error_messages(err):
                    await send(m)
            elif streaming:
                await send(_sse_error(err))
            else:                           # a body half sent: all that is left is to end it
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return attempt


class Forwarder:
    """The gateway's ASGI app: each HTTP request read whole (up to `limit` bytes) and
    relayed through `open_stream`; `classify` as in relay()."""

    def __init__(self, open_stream: OpenStream, classify: Callable[[BaseException], str], limit: int):
        self.open_stream, self.classify, self.limit = open_stream, classify, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":             # nothing to set up or tear down
            while True:
                kind = (await receive())["type"].rpartition(".")[2]     # startup | shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            raise ValueError(f"slotserve serves HTTP only, not {scope['type']}")
        try:
            req = await read_request(scope, receive, self.limit)
        except APIError as err:
            for msg in error_messages(err):
                await send(msg)
            return
        await relay(self.open_stream, req, send, self.classify)

"""n > 1: one request answered with several choices.

Each choice is its own engine sequence (its own `Run`; seed + index when the request has a
seed, so seeded choices differ but stay reproducible). They are started one after another:
`Handler.start` returns once a run's first token is in hand, so the prompt's KV blocks are
in the prefix cache before the next choice is admitted, and every later choice prefills
only what the cache does not hold. They then decode together in the engine's batches.
The whole answer lists the choices by index; a stream sends each choice's chunks in turn
(every chunk carries its choice's `index`, as OpenAI's clients expect), then one usage
chunk and one [DONE]. Each choice is an outcome of its own for the slot's metric windows.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Mapping

from slotserve.api.response import Run
from slotserve.api.responses import Usage


async def start_choices(handler, kind: str, req, headers: Mapping[str, str]) -> list[Run]:
    runs: list[Run] = []
    try:
        for i in range(req.n):
            r = req if i == 0 or req.seed is None else req.model_copy(update={"seed": req.seed + i})
            run = await handler.start(kind, r, headers)
            run.index = i
            if runs:
                run.id = runs[0].id          # one response, one id
            runs.append(run)
    except BaseException:
        for run in runs:
            run.close()
        raise
    return runs


def usage_of(runs: list[Run]) -> Usage:
    first = runs[0]
    return Usage.of(len(first.prep.prompt_ids), sum(len(r.stream.ids) for r in runs),
                    getattr(first.handle, "cached_tokens", 0))


async def whole(runs: list[Run]) -> dict:
    body = await runs[0].response()
    for run in runs[1:]:
        body["choices"] += (await run.response())["choices"]
    body["usage"] = usage_of(runs).model_dump(mode="json")
    return body


async def sse(runs: list[Run]) -> AsyncIterator[str]:
    try:
        for run in runs:
            async for event in run.sse(last=False):
                if event.startswith('data: {"error"'):
                    yield event
                    yield "data: [DONE]\n\n"
                    return
                yield event
        first = runs[0]
        if first.prep.request.include_usage:
            data = {"id": first.id, "object": "chat.completion.chunk" if first.prep.kind == "chat"
                    else "text_completion", "created": first.created, "model": first.view.ref,
                    "system_fingerprint": first.view.digest, "choices": [],
                    "usage": usage_of(runs).model_dump(mode="json")}
            yield f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for run in runs:
            run.close()

"""The eval gate of a rollout, on one replica.

A rollout whose spec has an eval_score guard starts in phase pending_eval, with no
traffic on the candidate; the replica that received the rollout request (it holds both
slots) runs the candidate bundle's eval set (eval/eval.jsonl) greedily on candidate
*and* on live, through the request path (prompt rendering, stop strings: the caller's
`answer`), and hands both scores to the controller, which decides. The items run in a
thread (slotserve.rollout.evals is synchronous); each generation is scheduled back on
the event loop that serves the replica.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from slotserve.rollout.evals import load_eval, run_eval

log = logging.getLogger("slotserve.replica")
EVAL_BATCH = 8  # eval items in flight per slot

# answer(slot, prompt, max_tokens) -> the greedy text of `prompt` (a string or chat messages)
Answer = Callable[[str, object, int], Awaitable[str]]


class EvalGate:
    """Runs the candidate's eval set on candidate and live; the gate task it started."""

    def __init__(self, backend, controller):
        self.backend = backend           # the replica's SlotsBackend: which bundle is in which slot
        self.controller = controller
        self._tasks: list[asyncio.Task] = []

    async def run(self, answer: Answer, max_tokens: int = 32) -> dict:
        """The candidate's eval set (eval/eval.jsonl), greedy, on candidate and on live."""
        views = self.backend.views()
        if "candidate" not in views or "live" not in views:
            raise RuntimeError("the eval gate needs a candidate and a live bundle loaded")
        items = load_eval(views["candidate"].path)
        loop = asyncio.get_running_loop()

        def gen(slot):
            return lambda prompt: asyncio.run_coroutine_threadsafe(answer(slot, prompt, max_tokens),
                                                                   loop).result(300)

        # both slots at once, EVAL_BATCH items each in flight: the engines batch them
        cand, live = await asyncio.gather(asyncio.to_thread(run_eval, items, gen("candidate"), EVAL_BATCH),
                                          asyncio.to_thread(run_eval, items, gen("live"), EVAL_BATCH))
        return {"candidate": cand.score, "live": live.score,
                "detail": {"items": len(items), "candidate.passed": cand.passed,
                           "live.passed": live.passed}}

    def start(self, answer: Answer) -> None:
        """Run the gate in the background and hand the scores to the controller."""
        async def gate():
            try:
                res = await self.run(answer)
            except Exception as exc:
                log.error("eval gate failed: %s", exc)
                await self.controller.call("eval_failed", f"{type(exc).__name__}: {exc}")
                return
            await self.controller.call("eval_result", res["candidate"], res["live"], res["detail"])

        self._tasks.append(asyncio.get_running_loop().create_task(gate()))

    def cancel(self) -> None:
        for t in self._tasks:
            t.cancel()

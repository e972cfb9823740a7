"""The eval gate of a rollout, on one replica: the eval half of `Replica`.

`EvalGate` is mixed into `Replica` (serve/replica.py). A rollout whose spec has an
eval_score guard starts in phase pending_eval, with no traffic on the candidate; the
replica that received the rollout request (it holds both slots) runs the candidate
bundle's eval set (eval/eval.jsonl) greedily on candidate *and* on live, through its
own request path (prompt rendering, stop strings), and hands both scores to the
controller, which decides. The items run in a thread (slotserve.rollout.evals is synchronous);
each generation is scheduled back on the event loop that serves the replica.

Uses the replica's `backend`, `handler`, `controller` and `_tasks`.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("slotserve.replica")
EVAL_BATCH = 8  # eval items in flight per slot


class EvalGate:
    """The eval half of `Replica`: run_eval, start_eval_gate."""

    async def run_eval(self, max_tokens: int = 32) -> dict:
        """The candidate's eval set (eval/eval.jsonl), greedy, on candidate and on live."""
        from slotserve.api.requests import ChatCompletionRequest, CompletionRequest
        from slotserve.rollout.evals import load_eval, run_eval
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

        # both slots at once, EVAL_BATCH items each in flight: the engines batch them
        cand, live = await asyncio.gather(asyncio.to_thread(run_eval, items, gen("candidate"), EVAL_BATCH),
                                          asyncio.to_thread(run_eval, items, gen("live"), EVAL_BATCH))
        return {"candidate": cand.score, "live": live.score,
                "detail": {"items": len(items), "candidate.passed": cand.passed,
                           "live.passed": live.passed}}

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

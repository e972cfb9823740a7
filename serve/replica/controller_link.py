"""How a replica calls the controller: in-process or through a Ray actor handle.

Both expose one coroutine, `call(method, *args, **kwargs)`, so the replica does not
know whether Ray is there: tests and `slotserve drill` run a `SlotController` in the
same process (`LocalController`); the Ray deployment holds the named actor's handle
(`RayController`).

The controller actor restarts by itself (it persists its state); while it does, a call
fails with `ControllerUnavailable` and `wait_ready` waits for it a little, so the first
admin call after a restart waits briefly or answers 503 rather than 500.
"""

from __future__ import annotations

import asyncio

CONTROLLER_WAIT_S = 10.0     # how long an admin call waits for a restarting controller


class ControllerUnavailable(Exception):
    """The controller cannot be reached now (restarting, or gone)."""


class LocalController:
    """Calls an in-process SlotController (tests, single process); same shape as RayController."""

    def __init__(self, controller):
        self.c = controller

    async def call(self, method: str, *args, **kwargs):
        return await getattr(self.c, method)(*args, **kwargs)

    async def wait_ready(self, wait_s: float = CONTROLLER_WAIT_S) -> None:
        return None


class RayController:
    def __init__(self, handle):
        self.h = handle

    async def call(self, method: str, *args, **kwargs):
        from ray.exceptions import RayActorError
        try:
            return await getattr(self.h, method).remote(*args, **kwargs)
        except RayActorError as exc:      # ActorUnavailableError (restarting) and ActorDiedError
            raise ControllerUnavailable(f"the controller is unavailable ({type(exc).__name__}); it restarts "
                                        f"by itself with its state: retry shortly") from exc

    async def wait_ready(self, wait_s: float = CONTROLLER_WAIT_S) -> None:
        """Return once the controller answers a ping; ControllerUnavailable after `wait_s`."""
        from ray.exceptions import RayActorError
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            left = deadline - loop.time()
            try:
                await asyncio.wait_for(self.h.ping.remote(), max(0.2, left))
                return
            except (RayActorError, asyncio.TimeoutError) as exc:
                if loop.time() >= deadline:
                    raise ControllerUnavailable(f"the controller did not answer within {wait_s:.0f} s "
                                                f"({type(exc).__name__}); it restarts by itself: retry "
                                                f"shortly") from exc
            await asyncio.sleep(0.2)

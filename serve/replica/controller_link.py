"""How a replica calls the controller: in-process or through a Ray actor handle.

Both expose one coroutine, `call(method, *args, **kwargs)`, so the replica does not
know whether Ray is there: tests and `slotserve drill` run a `SlotController` in the
same process (`LocalController`); the Ray deployment holds the named actor's handle
(`RayController`).
"""

from __future__ import annotations


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

"""Feedback counts once: the response ids rated most recently, so a repeated rating of one
response never reaches a guard window twice (`thumbs_down_rate` can roll a rollout back).

Each replica's request handler answers a repeat with 409; the controller, where every
replica's feedback meets, drops repeats that went to different replicas.
"""

from __future__ import annotations

from collections import OrderedDict


class RatedOnce:
    """The ids rated most recently (at most `capacity`): `first(id)` is True once per id."""

    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first(self, rid: str) -> bool:
        if rid in self._seen:
            return False
        self._seen[rid] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True

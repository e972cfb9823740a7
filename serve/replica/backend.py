"""What the request path sees of a replica: its slots as bundle views (`SlotsBackend`) and
how requests are routed among them now (`Routing`).

The request handler (slotserve.api.handler) needs, per slot, a `BundleView` (prompting,
chat template, detokeniser, context length) and an async `generate`; it never sees
engines or the manager's locks. Views are cached by bundle digest — one per loaded
bundle, so a promote or rollback reuses them — and pruned once no slot holds their
bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from slotserve import SLOT_NAMES
from slotserve.engine import SamplingParams
from slotserve.replica.bundle_view import BundleView


@dataclass(frozen=True)
class Routing:
    """The part of the controller's desired state that routes requests on a replica."""

    weights: Mapping[str, float] = field(default_factory=lambda: {"live": 100.0})
    salt: str = ""
    sticky_key: str | None = None        # "header:x-session-id" | "user" | None
    served_name: str | None = None       # logical model name; None: the live bundle's name
    shadow_fraction: float = 0.0         # fraction of live requests mirrored to candidate


class SlotsBackend:
    """The request path's view of a SlotManager: bundle views per slot, async generation."""

    def __init__(self, mgr):
        self.mgr = mgr
        self._views: dict[str, BundleView] = {}      # by digest; one per loaded bundle

    def view_of(self, slot_obj) -> BundleView:
        b = slot_obj.bundle
        v = self._views.get(b.manifest.digest)
        if v is None:
            v = BundleView.from_bundle(b, tokenizer=slot_obj.tokenizer)
            v.max_model_len = int(slot_obj.engine.max_model_len)   # what the engine really serves
            self._views[b.manifest.digest] = v
        return v

    def views(self) -> dict[str, BundleView]:
        out = {}
        for name in SLOT_NAMES:
            s = self.mgr.get(name)
            if s is not None:
                out[name] = self.view_of(s)
        return out

    def digests(self) -> dict[str, str]:
        return {s: v.digest for s, v in self.views().items()}

    def prune(self) -> None:
        keep = set(self.digests().values())
        for d in list(self._views):
            if d not in keep:
                del self._views[d]

    async def generate(self, slot: str, prompt_ids: list[int], params: dict):
        return await self.mgr.generate(slot, prompt_ids, SamplingParams(**params))

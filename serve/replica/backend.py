"""The request handler's view of a slot manager (the handler's `Backend`).

The handler (slotserve.api.handler) needs, per slot, a `BundleView` (prompting, chat
template, detokeniser, context length) and an async `generate`; it never sees engines
or the manager's locks. Views are cached by bundle digest — one per loaded bundle, so a
promote or rollback reuses them — and pruned once no slot holds their bundle.
"""

from __future__ import annotations

from slotserve.api.bundle_view import BundleView
from slotserve.control.state import SLOTS


class SlotsBackend:
    """The handler's view of a SlotManager: bundle views per slot, async generation."""

    def __init__(self, mgr):
        self.mgr = mgr
        self._views: dict[str, BundleView] = {}      # by digest; one per loaded bundle

    def view_of(self, slot_obj) -> BundleView:
        b = slot_obj.bundle
        v = self._views.get(b.manifest.digest)
        if v is None:
            v = BundleView.from_bundle(b, tokenizer=getattr(slot_obj, "tokenizer", None))
            eng = getattr(slot_obj, "engine", None)
            if eng is not None and getattr(eng, "max_model_len", None):
                v.max_model_len = int(eng.max_model_len)
            self._views[b.manifest.digest] = v
        return v

    def views(self) -> dict[str, BundleView]:
        out = {}
        for name in SLOTS:
            s = self.mgr.get(name) if hasattr(self.mgr, "get") else _slot_or_none(self.mgr, name)
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
        from slotserve.engine import SamplingParams
        return await self.mgr.generate(slot, prompt_ids, SamplingParams(**params))


def _slot_or_none(mgr, name):
    try:
        return mgr.slot(name)
    except (KeyError, LookupError, ValueError):
        return None

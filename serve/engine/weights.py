"""Loading a model's parameters (`WeightSpec`s, slotserve.models.checkpoint) from its
safetensors files onto a device, with an optional content-keyed pool. Only
`*.safetensors` files are read (never pickle).

`TensorPool` lets several engines (slots) hold one copy of identical tensors. A fused
tensor's key is derived from its *sources*:
- when the caller passes the weight files' sha256 (a bundle manifest has them), the key
  is (file sha256, tensor name) per source: nothing has to be read on a pool hit, and two
  bundles with identical weight files share every tensor;
- otherwise the key is the sha256 of the source tensors' bytes (plus dtype and shape),
  so identical content shares even when files differ in metadata.
Both also include the target dtype, device and the fusion, so a bf16 copy never aliases
an fp32 one.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Callable, Hashable

import torch
from safetensors import safe_open

from slotserve.models.checkpoint import WeightSpec, WeightsError, safetensors_files


class TensorPool:
    """Content-keyed tensors shared between engines. Thread-safe.

    Each entry remembers its holders (opaque owner tokens); `release(owner)` drops an
    engine's claims and frees entries nobody holds any more.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[Hashable, tuple[torch.Tensor, set]] = {}

    def acquire(self, key: Hashable, owner: object, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                hit[1].add(owner)
                return hit[0]
        t = make()  # outside the lock: loading may be slow
        with self._lock:
            hit = self._entries.setdefault(key, (t, set()))
            hit[1].add(owner)
            return hit[0]

    def release(self, owner: object) -> None:
        with self._lock:
            for key in [k for k, (_, holders) in self._entries.items() if owner in holders]:
                holders = self._entries[key][1]
                holders.discard(owner)
                if not holders:
                    del self._entries[key]

    def release_key(self, key: Hashable, owner: object) -> None:
        """Drop `owner`'s claim on one entry (freed when nobody holds it any more)."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                hit[1].discard(owner)
                if not hit[1]:
                    del self._entries[key]

    def claims(self, owner: object) -> dict[Hashable, tuple[torch.Tensor, int]]:
        """{key: (tensor, number of holders)} for every entry `owner` holds."""
        with self._lock:
            return {k: (t, len(h)) for k, (t, h) in self._entries.items() if owner in h}

    def refcounts(self) -> dict[Hashable, int]:
        """{key: number of holders} (tests, debugging)."""
        with self._lock:
            return {k: len(h) for k, (_, h) in self._entries.items()}

    def shared_bytes(self, owner: object) -> int:
        """Bytes of tensors `owner` holds that at least one other holder also holds."""
        with self._lock:
            return sum(t.nbytes for t, h in self._entries.values() if owner in h and len(h) > 1)

    def held_bytes(self, owner: object | None = None) -> int:
        with self._lock:
            return sum(t.nbytes for t, h in self._entries.values() if owner is None or owner in h)

    def __len__(self) -> int:
        return len(self._entries)


class _Index:
    """HF tensor name -> the safetensors file that holds it (sharded checkpoints too)."""

    def __init__(self, model_dir: Path):
        self.where: dict[str, Path] = {}
        for f in safetensors_files(model_dir):
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for name in fh.keys():
                    self.where[name] = f
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        fh = self._open.get(f)
        if fh is None:
            fh = self._open[f] = safe_open(str(f), framework="pt", device="cpu")
        return fh.get_tensor(name)


def _content_digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.contiguous().view(torch.uint8).reshape(-1).numpy().data)
    return h.hexdigest()


def load_weights(
    model_dir: str | Path,
    specs: list[WeightSpec],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    pool: TensorPool | None = None,
    owner: object = None,
    file_sha256: dict[str, str] | None = None,
) -> dict[str, torch.Tensor | None]:
    """Load `specs` from the safetensors in `model_dir` -> {name: tensor on device/dtype}.

    `file_sha256` maps weight file names (e.g. "model.safetensors") to their sha256; when
    every source's file is in it, pool keys come from it instead of hashing bytes.
    Parameters with identical sources (tied embeddings) get the same tensor object.
    """
    idx = _Index(Path(model_dir))
    device = torch.device(device)
    out: dict[str, torch.Tensor | None] = {}
    by_sources: dict[tuple[str, ...], torch.Tensor] = {}
    missing = []
    for spec in specs:
        if not all(s in idx.where for s in spec.sources):
            if spec.optional and not any(s in idx.where for s in spec.sources):
                out[spec.name] = None
                continue
            missing += [s for s in spec.sources if s not in idx.where]
            continue
        if spec.sources in by_sources:
            out[spec.name] = by_sources[spec.sources]
            continue

        def make(spec=spec, raw=None):
            raw = raw if raw is not None else [idx.get(s) for s in spec.sources]
            t = raw[0] if len(raw) == 1 else torch.cat(raw, dim=0)
            return t.to(device=device).to(dtype).contiguous()

        if pool is None:
            t = make()
        else:
            files = [idx.where[s].name for s in spec.sources]
            tail = (str(dtype), str(device), len(spec.sources))
            if file_sha256 and all(f in file_sha256 for f in files):
                key = ("file", tuple(zip((file_sha256[f] for f in files), spec.sources))) + tail
                t = pool.acquire(key, owner, make)
            else:
                raw = [idx.get(s) for s in spec.sources]
                key = ("content", _content_digest(raw)) + tail
                t = pool.acquire(key, owner, lambda spec=spec, raw=raw: make(spec, raw))
        by_sources[spec.sources] = out[spec.name] = t
    if missing:
        raise WeightsError(f"{model_dir}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return out


def unique_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (tied weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total

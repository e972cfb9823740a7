"""The read side of the bundle store: `open` / `verify` and the `OpenedBundle` they return.

`BundleVerification` is mixed into `Store` (bundles/store.py). Every open checks each
file of the bundle directory against the manifest — nothing missing, nothing extra,
sizes and sha256 equal — because a bundle is immutable once published and a replica
must never serve bytes that differ from what was published. `open` answers hashes from
the per-inode cache (bundles/file_hash.py); `verify` rehashes every byte.

Uses the store's `resolve`, `_disk_manifest` and `path_of`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slotserve.bundles.file_hash import cached_hash, hash_file
from slotserve.bundles.manifest import BundleError, Manifest
from slotserve.bundles.ref import Ref


@dataclass(frozen=True)
class OpenedBundle:
    """A verified bundle directory in the store (read-only)."""

    path: Path
    manifest: Manifest

    @property
    def ref(self) -> str:
        return self.manifest.ref

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def serving(self) -> dict[str, Any]:
        return json.loads((self.path / "serving.json").read_text())

    @property
    def system_prompt(self) -> str | None:
        p = self.path / "prompt" / "system.txt"
        return p.read_text(encoding="utf-8") if p.exists() else None

    @property
    def prompt_template(self) -> str | None:
        p = self.path / "prompt" / "template.jinja"
        return p.read_text(encoding="utf-8") if p.exists() else None


class BundleVerification:
    """The read half of `Store`: open (cached hashes) and verify (every byte)."""

    def open(self, ref: str | Ref, *, verify: bool = True) -> OpenedBundle:
        """Resolve, then check every file's size and sha256 (hashes cached per inode in
        this process). Raises BundleError naming each file that does not match."""
        rec = self.resolve(ref)
        m = self._disk_manifest(rec)
        path = self.path_of(rec.name, rec.version)
        if verify:
            self._raise_problems(m, self.check_files(path, m, cached=True))
        return OpenedBundle(path, m)

    def verify(self, ref: str | Ref) -> OpenedBundle:
        """Like open, but always rehashes every byte."""
        rec = self.resolve(ref)
        m = self._disk_manifest(rec)
        path = self.path_of(rec.name, rec.version)
        self._raise_problems(m, self.check_files(path, m, cached=False))
        return OpenedBundle(path, m)

    @staticmethod
    def _raise_problems(m: Manifest, problems: list[str]) -> None:
        if problems:
            raise BundleError(f"{m.ref} failed verification: " + "; ".join(problems)
                              + " (bundles are immutable: publish a new version instead of editing files)")

    @staticmethod
    def check_files(path: Path, m: Manifest, *, cached: bool = True) -> list[str]:
        problems = []
        present = {p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir()}
        present.discard("manifest.json")
        for rel in sorted(present - set(m.files)):
            problems.append(f"unexpected file {rel}")
        for rel, entry in m.files.items():
            f = path / rel
            if rel not in present:
                problems.append(f"missing file {rel}")
                continue
            size = f.stat().st_size
            if size != entry.size:
                problems.append(f"{rel}: size {size} != {entry.size} in the manifest")
                continue
            actual = cached_hash(f) if cached else hash_file(f)
            if actual != entry.sha256:
                problems.append(f"{rel}: sha256 {actual[:12]}… != {entry.sha256[:12]}… in the manifest")
        return problems

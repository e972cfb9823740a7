"""The read side of the bundle store: checking a bundle directory against its manifest, and
the `OpenedBundle` that `Store.open` / `Store.verify` return once it passed.

Every open checks each file of the bundle directory against the manifest — nothing
missing, nothing extra, sizes and sha256 equal — because a bundle is immutable once
published and a replica must never serve bytes that differ from what was published.
`Store.open` answers hashes from the per-inode cache (bundles/file_hash.py);
`Store.verify` rehashes every byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slotserve.bundles.file_hash import cached_hash, hash_file
from slotserve.bundles.manifest import BundleError, Manifest


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


def raise_problems(m: Manifest, problems: list[str]) -> None:
    """Raise BundleError naming each file of `problems` (from `check_files`), if any."""
    if problems:
        raise BundleError(f"{m.ref} failed verification: " + "; ".join(problems)
                          + " (bundles are immutable: publish a new version instead of editing files)")


def check_files(path: Path, m: Manifest, *, cached: bool = True) -> list[str]:
    """What differs between the bundle directory `path` and its manifest, one line per file
    (missing, unexpected, size, sha256); `cached` answers hashes from the per-inode cache."""
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

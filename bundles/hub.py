"""Checkpoints from the Hugging Face hub: `hub:ORG/REPO[@REVISION]` -> a local snapshot.

`slotserve bundle publish hub:ORG/REPO@REV` and `Engine.from_pretrained("hub:ORG/REPO")`
go through `fetch`: it downloads (or finds in the hub cache) only the files serving reads
— configs, tokenizer files, and the safetensors the checkpoint's index names (else
model.safetensors) — so pickle weights never reach the disk, and it pins the revision to the commit it resolved, so a bundle's provenance names
exactly what was served even when the user said `@main`.

The hub client's own settings apply: `HF_TOKEN` for gated models, `HF_HUB_CACHE` /
`HF_HOME` for the cache, `HF_HUB_OFFLINE=1` to use only what the cache already holds
(read when `fetch` runs, not when the client was imported).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from slotserve.bundles.manifest import BundleError, ModelSource
from slotserve.bundles.source import MODEL_FILES, TOKENIZER_FILES, index_shards, model_weight_files

PREFIX = "hub:"
# What serving reads, by exact top-level name (a pattern like "*.safetensors" would also
# match subfolders: original/, onnx/ ...); then the weights: the shards the index names, or
# model.safetensors. Everything else (pickle weights, other layouts of the same weights
# such as consolidated.safetensors, exports, training state) stays on the hub.
FILES = tuple(dict.fromkeys((*MODEL_FILES, *TOKENIZER_FILES, "model.safetensors")))
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Snapshot:
    path: Path          # the local directory holding the fetched files
    repo: str           # ORG/REPO
    commit: str         # the revision, resolved to a commit hash

    @property
    def source(self) -> ModelSource:
        return ModelSource("hub", self.repo, self.commit)


def is_hub(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse(spec: str) -> tuple[str, str | None]:
    """`hub:ORG/REPO[@REVISION]` -> (repo, revision or None)."""
    body = spec[len(PREFIX):] if is_hub(spec) else spec
    repo, _, rev = body.partition("@")
    if not _REPO.match(repo) or "@" in rev:
        raise BundleError(f"invalid hub reference {spec!r}: use hub:ORG/REPO or hub:ORG/REPO@REVISION "
                          f"(REVISION: a branch, tag or commit)")
    return repo, rev or None


def fetch(spec: str, *, cache_dir: str | Path | None = None, offline: bool | None = None) -> Snapshot:
    """Download (or find in the cache) what serving needs of `spec`; -> its local snapshot."""
    repo, rev = parse(spec)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    def download(names) -> Path:
        return Path(snapshot_download(repo, revision=rev, cache_dir=cache_dir, local_files_only=offline,
                                      allow_patterns=list(names)))

    try:
        path = download(FILES)
        shards = index_shards(path)
        if shards is not None:   # a sharded checkpoint: exactly the shards the index names
            path = download(sorted(shards))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        where = "in the local hub cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        raise BundleError(
            f"cannot fetch {PREFIX}{repo}{'@' + rev if rev else ''} {where}: {type(e).__name__}: {e}. "
            f"Check the name and revision, set HF_TOKEN for a gated model, or download it where the hub "
            f"is reachable (`hf download {repo} --local-dir DIR`) and publish DIR with "
            f"--source {PREFIX}{repo}@COMMIT") from e
    # The snapshot directory is named after the commit the revision resolved to.
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else (rev or "unknown")
    if not model_weight_files(path):
        raise BundleError(f"{PREFIX}{repo}@{commit} has no safetensors weights (model.safetensors or the "
                          f"shards of model.safetensors.index.json); pickle weights are never downloaded. "
                          f"Convert them where you trust the code, e.g. model.save_pretrained(dir, "
                          f"safe_serialization=True), and publish that directory")
    return Snapshot(path, repo, commit)

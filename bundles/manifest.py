"""The bundle manifest: what a bundle is, in one canonical, digestible JSON document.

The digest is `sha256:` over the canonical JSON of the manifest without its own
`digest` field (sorted keys, no whitespace, UTF-8), so any hand edit of
`manifest.json` — even reformatting a value — is detected on open.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

FORMAT = 1  # manifest schema version; bump on incompatible changes
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
NAME_RULE = "lowercase letters, digits, '.', '_' or '-', starting with a letter or digit (at most 128)"


class BundleError(ValueError):
    """A bundle, ref, store or registry problem; the message says what is valid."""


def check_name(name: str, what: str = "bundle name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BundleError(f"invalid {what} {name!r}: use {NAME_RULE}")
    return name


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # hex, no prefix
    size: int

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights came from: a local directory, a hub repo at a revision, or the
    demo generator."""

    kind: str  # "local" | "hub" | "demo"
    location: str  # absolute path, "org/repo", or "ARCH/seed=N"
    revision: str | None = None  # hub commit / tag; None for local

    @classmethod
    def parse(cls, text: str) -> "ModelSource":
        """`hub:org/repo@revision` or a local path."""
        if text.startswith("hub:"):
            repo, sep, rev = text[4:].partition("@")
            if not repo or not sep or not rev:
                raise BundleError(f"invalid model source {text!r}: use hub:ORG/REPO@REVISION or a local path")
            return cls("hub", repo, rev)
        return cls("local", text)

    def __str__(self) -> str:
        if self.kind == "hub":
            return f"hub:{self.location}@{self.revision}"
        return f"demo:{self.location}" if self.kind == "demo" else self.location


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # e.g. "LlamaForCausalLM" (config.json `architectures[0]`)
    model_type: str  # e.g. "llama"
    source: ModelSource


@dataclass(frozen=True)
class RetrievalIndexRef:
    """A pointer to a retrieval index that lives outside the store."""

    id: str
    version: str
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "RetrievalIndexRef":
        """`ID@VERSION` or `ID@VERSION#DIGEST`."""
        head, _, digest = text.partition("#")
        index_id, sep, version = head.partition("@")
        if not index_id or not sep or not version or ("#" in text and not digest):
            raise BundleError(f"invalid retrieval index {text!r}: use ID@VERSION or ID@VERSION#DIGEST")
        return cls(index_id, version, digest or None)

    def __str__(self) -> str:
        return f"{self.id}@{self.version}" + (f"#{self.digest}" if self.digest else "")


@dataclass(frozen=True)
class Lineage:
    code_commit: str | None = None  # commit of the code that produced the weights
    data_version: str | None = None  # training/eval data version, free text
    parent: str | None = None  # digest of the bundle this one derives from


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter version: the base bundle it runs on (by digest; the ref is what the
    publisher named, for people) and what the engine needs to apply it."""

    base: str  # "sha256:<hex>" of the base bundle
    base_ref: str  # e.g. "llama-base:3" at publish time
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """PEFT's: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "base_ref": self.base_ref, "rank": self.rank, "alpha": self.alpha,
                "target_modules": list(self.target_modules), "use_rslora": self.use_rslora}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdapterInfo":
        return cls(str(d["base"]), str(d["base_ref"]), int(d["rank"]), float(d["alpha"]),
                   tuple(str(t) for t in d["target_modules"]), bool(d.get("use_rslora", False)))


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    created_at: str  # ISO 8601 UTC
    created_by: str
    files: Mapping[str, FileEntry]  # relpath (posix) -> entry; read-only view
    model: ModelInfo
    retrieval_index: RetrievalIndexRef | None = None
    lineage: Lineage = field(default_factory=Lineage)
    has_faults: bool = False  # serving.json declares `faults` (a drill bundle)
    adapter: AdapterInfo | None = None  # a LoRA version of another bundle (files under adapter/)
    digest: str = ""  # "sha256:<hex>"; empty only while building

    def __post_init__(self):
        object.__setattr__(self, "files", MappingProxyType(dict(sorted(self.files.items()))))

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def weight_files(self) -> dict[str, FileEntry]:
        return {p: e for p, e in self.files.items()
                if p.startswith(("model/", "adapter/")) and p.endswith(".safetensors")}

    def to_dict(self, with_digest: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "files": {p: e.to_dict() for p, e in self.files.items()},
            "model": {
                "architecture": self.model.architecture,
                "model_type": self.model.model_type,
                "source": {
                    "kind": self.model.source.kind,
                    "location": self.model.source.location,
                    "revision": self.model.source.revision,
                },
            },
            "retrieval_index": None if self.retrieval_index is None else {
                "id": self.retrieval_index.id,
                "version": self.retrieval_index.version,
                "digest": self.retrieval_index.digest,
            },
            "lineage": {
                "code_commit": self.lineage.code_commit,
                "data_version": self.lineage.data_version,
                "parent": self.lineage.parent,
            },
            "has_faults": self.has_faults,
        }
        if self.adapter is not None:  # only then: every earlier bundle keeps its digest
            d["adapter"] = self.adapter.to_dict()
        if with_digest:
            d["digest"] = self.digest
        return d

    def compute_digest(self) -> str:
        return digest_of(self.to_dict(with_digest=False))

    def with_digest(self) -> "Manifest":
        from dataclasses import replace

        return replace(self, digest=self.compute_digest())

    def to_json(self) -> str:
        """The on-disk form: readable, but the digest is over `canonical_json`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, check_digest: bool = True, where: str = "manifest") -> "Manifest":
        try:
            if d.get("format") != FORMAT:
                raise BundleError(f"{where}: unsupported manifest format {d.get('format')!r} (this slotserve reads {FORMAT})")
            src = d["model"]["source"]
            ri = d.get("retrieval_index")
            lin = d.get("lineage") or {}
            m = cls(
                name=d["name"],
                version=int(d["version"]),
                created_at=d["created_at"],
                created_by=d["created_by"],
                files={p: FileEntry(str(e["sha256"]), int(e["size"])) for p, e in d["files"].items()},
                model=ModelInfo(d["model"]["architecture"], d["model"]["model_type"],
                                ModelSource(src["kind"], src["location"], src.get("revision"))),
                retrieval_index=None if ri is None else RetrievalIndexRef(ri["id"], ri["version"], ri.get("digest")),
                lineage=Lineage(lin.get("code_commit"), lin.get("data_version"), lin.get("parent")),
                has_faults=bool(d.get("has_faults", False)),
                adapter=None if d.get("adapter") is None else AdapterInfo.from_dict(d["adapter"]),
                digest=d.get("digest", ""),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None
        if check_digest:
            actual = digest_of({k: v for k, v in d.items() if k != "digest"})
            if m.digest != actual:
                raise BundleError(
                    f"{where}: digest mismatch (recorded {m.digest or 'none'}, content hashes to {actual}); "
                    "manifests are immutable, publish a new version instead of editing one")
        return m

    @classmethod
    def from_json(cls, text: str, *, where: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object")
        return cls.from_dict(d, where=where)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def digest_of(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(obj)).hexdigest()


def diff(a: Manifest, b: Manifest) -> dict[str, Any]:
    """What differs between two bundles: files (by path and hash) and manifest fields.
    `weights_identical` is True when every safetensors file matches byte for byte."""
    fa, fb = a.files, b.files
    fields = {}
    for key in ("name", "version", "created_at", "created_by", "model", "retrieval_index", "lineage", "has_faults",
                "adapter"):
        va, vb = a.to_dict().get(key), b.to_dict().get(key)
        if va != vb:
            fields[key] = [va, vb]
    return {
        "a": a.ref, "b": b.ref, "identical": a.digest == b.digest,
        "weights_identical": a.weight_files() == b.weight_files(),
        "files": {
            "added": sorted(set(fb) - set(fa)),
            "removed": sorted(set(fa) - set(fb)),
            "changed": sorted(p for p in set(fa) & set(fb) if fa[p] != fb[p]),
            "same": sorted(p for p in set(fa) & set(fb) if fa[p] == fb[p]),
        },
        "fields": fields,
    }

"""The bundle store: content-addressed, append-only, atomic publish, verified open.

Layout under the root ($SLOTSERVE_HOME, default ~/.slotserve):

    registry.db                     SQLite (WAL): bundles, aliases, ledger
    blobs/sha256/<hex>              every file ever published, once, read-only
    bundles/<name>/<version>/       manifest.json + hard links to the blobs
    tmp/<host>-<pid>-<rand>         staging; never visible as a bundle

`Store` resolves a ref to a registry row, lists, reads the on-disk manifest checked
against the registry, and opens a bundle verified against its manifest
(bundles/verification.py). It owns a `Publisher` (bundles/publishing.py) for the write
side: atomic, crash-safe publishing and `recover()` of a crashed publish's debris. File
hashing and its per-inode cache are bundles/file_hash.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from slotserve.bundles.manifest import BundleError, Manifest
from slotserve.bundles.publishing import Published, Publisher
from slotserve.bundles.ref import Ref, parse_ref
from slotserve.bundles.registry import BundleRecord, Registry
from slotserve.bundles.verification import OpenedBundle, check_files, raise_problems



def default_root() -> Path:
    return Path(os.environ.get("SLOTSERVE_HOME") or "~/.slotserve").expanduser()


class Store:
    """A bundle store at `root`; `create=False` refuses a directory that holds none yet."""

    def __init__(self, root: str | Path | None = None, *, create: bool = True):
        # absolute: Ray starts from another directory (slotserve.cli.local_ray.neutral_cwd)
        self.root = (Path(root).expanduser() if root is not None else default_root()).absolute()
        try:
            self._prepare(create)
        except PermissionError as exc:
            raise BundleError(f"bundle store {self.root} is not readable and writable by this user "
                              f"({exc.strerror}: {exc.filename})") from None
        except OSError as exc:
            raise BundleError(f"cannot use the bundle store at {self.root}: {exc.strerror or exc}") from None
        self.registry = Registry(self.root / "registry.db")
        self._publisher = Publisher(self)

    def _prepare(self, create: bool) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise BundleError(f"store root {self.root} is not a directory; --store / $SLOTSERVE_HOME must name a directory")
        if not create and not (self.root / "registry.db").exists():
            raise BundleError(f"no bundle store at {self.root}: publish a bundle first, or point --store "
                              "(or $SLOTSERVE_HOME) at an existing store")
        for sub in ("blobs/sha256", "bundles", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied", str(self.root))

    # ---- resolving -------------------------------------------------------------------
    def resolve(self, ref: str | Ref) -> BundleRecord:
        r = parse_ref(ref)
        reg = self.registry
        if r.kind == "digest":
            hits = reg.by_digest_prefix(r.digest_prefix)
            if not hits:
                raise BundleError(f"no bundle has a digest starting with sha256:{r.digest_prefix}")
            if len(hits) > 1:
                listing = ", ".join(f"{h.ref} ({h.digest[:19]})" for h in hits)
                raise BundleError(f"ambiguous digest prefix sha256:{r.digest_prefix} matches {listing}; give more digits")
            return hits[0]
        if r.kind == "version":
            rec = reg.get(r.name, r.version)
        elif r.kind == "alias" and r.alias != "latest":
            v = reg.get_alias(r.name, r.alias)
            if v is None:
                have = sorted(reg.aliases(r.name).get(r.name, {}))
                raise BundleError(f"{r.name} has no alias @{r.alias}; its aliases are: "
                                  + (", ".join("@" + a for a in have) or "none") + " (and @latest)")
            rec = reg.get(r.name, v)
        else:
            rec = reg.latest(r.name)
        if rec is None:
            versions = [b.version for b in reg.list_bundles(r.name)]
            if not versions:
                raise BundleError(f"no bundle named {r.name!r} in the store at {self.root}")
            raise BundleError(f"no bundle {r}; published versions of {r.name}: {', '.join(map(str, versions))}")
        return rec

    def path_of(self, name: str, version: int) -> Path:
        return self.root / "bundles" / name / str(version)

    def list(self, name: str | None = None) -> list[Manifest]:
        return [Manifest.from_json(b.manifest_json, where=f"registry entry {b.ref}")
                for b in self.registry.list_bundles(name)]

    def aliases_of(self, name: str, version: int) -> list[str]:
        return sorted(a for a, v in self.registry.aliases(name).get(name, {}).items() if v == version)

    def manifest(self, ref: str | Ref) -> Manifest:
        """The manifest on disk, checked against its own digest and the registry's."""
        return self.manifest_of(self.resolve(ref))

    def manifest_of(self, rec: BundleRecord) -> Manifest:
        """The on-disk manifest of a registry row, checked against its own digest and the row."""
        path = self.path_of(rec.name, rec.version) / "manifest.json"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BundleError(f"{rec.ref}: cannot read {path}: {exc.strerror or exc}") from None
        m = Manifest.from_json(text, where=f"{rec.ref} manifest.json")
        if m.digest != rec.digest or m.name != rec.name or m.version != rec.version:
            raise BundleError(f"{rec.ref}: manifest.json (digest {m.digest}) does not match the registry "
                              f"({rec.digest}); the bundle was altered after publishing")
        return m

    # ---- reading ---------------------------------------------------------------------
    def open(self, ref: str | Ref, *, verify: bool = True) -> OpenedBundle:
        """Resolve, then check every file's size and sha256 (hashes cached per inode in
        this process). Raises BundleError naming each file that does not match."""
        rec = self.resolve(ref)
        m = self.manifest_of(rec)
        path = self.path_of(rec.name, rec.version)
        if verify:
            raise_problems(m, check_files(path, m, cached=True))
        return OpenedBundle(path, m)

    def verify(self, ref: str | Ref) -> OpenedBundle:
        """Like open, but always rehashes every byte."""
        rec = self.resolve(ref)
        m = self.manifest_of(rec)
        path = self.path_of(rec.name, rec.version)
        raise_problems(m, check_files(path, m, cached=False))
        return OpenedBundle(path, m)

    # ---- writing ---------------------------------------------------------------------
    def publish(self, src_dir: str | Path, name: str, actor: str | None = None, prompt_template=None,
                retrieval_index=None, serving=None, eval_file=None, reason: str = "", **kw) -> Manifest:
        """Publish `src_dir` as the next version of `name`; identical content is a no-op
        returning the existing manifest. See `publish_detailed` for the keywords."""
        return self.publish_detailed(src_dir, name, actor, prompt_template, retrieval_index, serving,
                                     eval_file, reason, **kw).manifest

    def publish_detailed(self, src_dir: str | Path, name: str, *args, **kw) -> Published:
        """`publish`, also saying whether it created a version (`Publisher.publish` has the
        keywords: prompt, serving config, eval set, version, source, lineage)."""
        return self._publisher.publish(src_dir, name, *args, **kw)

    def recover(self) -> list[Path]:
        """Remove debris of crashed publishes: unregistered bundle dirs and stale staging.
        Returns what was removed. Safe to run at any time (takes the write lock)."""
        return self._publisher.recover()

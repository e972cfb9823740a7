"""The write side of the bundle store: atomic publish, and removing what a crashed one left.

Each `Store` (slotserve.bundles.store) owns a `Publisher`, which writes into its root:
blobs, staging directories, bundle directories, registry rows. Publish order, so that a
crash at any point leaves nothing half-written visible:
hash the source -> copy blobs (tmp + fsync + rename) -> assemble a staging dir ->
BEGIN IMMEDIATE (allocates the version) -> write manifest.json -> rename the staging
dir into bundles/ -> insert the registry row + ledger entry -> COMMIT. A bundle
exists only once its row is committed; a directory without a row is the debris of
a crashed publish and `recover()` (run by every publish under the write lock)
removes it. Staging and blob temp names start `<host>-<pid>-` so that `recover()`
can tell a dead publisher's leftovers from a live one's.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from slotserve.bundles.file_hash import CHUNK, cached_hash
from slotserve.bundles.adapter import read_adapter
from slotserve.bundles.manifest import (BundleError, FileEntry, Lineage, Manifest, ModelInfo, ModelSource,
                                        RetrievalIndexRef, check_name, digest_of)
from slotserve.bundles.registry import BundleRecord, Txn, utc_now
from slotserve.bundles.source import read_source
from slotserve.bundles.verification import check_files, raise_problems

if TYPE_CHECKING:
    from slotserve.bundles.store import Store

CRASH_ENV = "SLOTSERVE_TEST_CRASH_AT"  # test hook: SIGKILL ourselves at a named publish stage
CRASH_POINTS = ("mid_copy", "after_copy", "before_rename", "after_rename", "after_commit")


def default_actor() -> str:
    if os.environ.get("SLOTSERVE_ACTOR"):
        return os.environ["SLOTSERVE_ACTOR"]
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        return f"uid:{os.getuid()}"


@dataclass(frozen=True)
class Published:
    manifest: Manifest
    created: bool  # False: identical content was already published (a no-op)


def _crash_point(stage: str) -> None:
    if os.environ.get(CRASH_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _force_rmtree(path: Path) -> None:
    """Remove a tree whose directories were sealed read-only."""
    for d, _, _ in os.walk(path):
        os.chmod(d, 0o755)
    shutil.rmtree(path)


class Publisher:
    """Publishes into one store (atomic, idempotent) and removes a crashed publish's debris;
    the store resolves refs and reads manifests for it."""

    def __init__(self, store: "Store"):
        self.store = store
        self.root, self.registry = store.root, store.registry

    def publish(self, src_dir: str | Path, name: str, actor: str | None = None,
                prompt_template: str | Path | None = None,
                retrieval_index: str | RetrievalIndexRef | None = None,
                serving: str | Path | Mapping[str, Any] | None = None,
                eval_file: str | Path | None = None, reason: str = "", *,
                system_prompt: str | Path | None = None, version: int | None = None,
                source: str | ModelSource | None = None, code_commit: str | None = None,
                data_version: str | None = None, parent: str | None = None,
                base: str | None = None, contain: str | Path | None = None) -> Published:
        """Publish `src_dir` as `name`'s next version (or `version`, if above the latest);
        content already published under `name` is a no-op (`created` False). Lineage comes
        from the arguments, else from the bundle `src_dir` was published as, else from git.
        Symlinks in `src_dir` may point only inside it (or inside `contain`, a hub cache's
        repo directory); a re-publish re-verifies the stored copy it would answer with.

        With `base` (a ref of a bundle in this store), `src_dir` is a PEFT LoRA adapter
        directory: the version holds the base's files (the same blobs: no bytes copied)
        with the options given here replacing their parts, plus adapter/, and its manifest
        names the base by digest (bundles/adapter.py checks the adapter against it)."""
        check_name(name)
        actor = actor or default_actor()
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise BundleError(f"invalid version {version!r}: a version is an integer >= 1")
        ri = RetrievalIndexRef.parse(retrieval_index) if isinstance(retrieval_index, str) else retrieval_index
        adapter = None
        if base is not None:
            base_rec = self._base(base)
            base_path = self.store.path_of(base_rec.name, base_rec.version)
            src = read_source(base_path, prompt_template=prompt_template, system_prompt=system_prompt,
                              serving=serving, eval_file=eval_file)
            adapter, adapter_files = read_adapter(Path(src_dir), src.config, base_rec.digest, base_rec.ref)
            src = replace(src, files={**{k: v for k, v in src.files.items() if not k.startswith("adapter/")},
                                      **adapter_files})
            ri = ri or self.store.manifest_of(base_rec).retrieval_index  # inherited unless given
        else:
            src = read_source(Path(src_dir), prompt_template=prompt_template, system_prompt=system_prompt,
                              serving=serving, eval_file=eval_file,
                              contain=Path(contain) if contain is not None else None)
            if src.origin is not None and src.origin.adapter is not None:
                adapter = src.origin.adapter  # re-publishing an adapter version: its base must be here too
                if not any(m.digest == adapter.base for m in self.store.list()):
                    raise BundleError(f"{src_dir} is a LoRA adapter version on base {adapter.base} (published as "
                                      f"{adapter.base_ref}), which is not in the store at {self.root}; publish "
                                      f"its adapter directory ({Path(src_dir) / 'adapter'}) with --base NAME:VERSION "
                                      "of a base in this store")
        files = {rel: FileEntry(*src.hash(rel)) for rel in src.files}
        content_key = digest_of({"files": {p: e.to_dict() for p, e in sorted(files.items())},
                                 "retrieval_index": None if ri is None else ri.__dict__,
                                 **({"adapter": adapter.to_dict()} if adapter is not None else {})})
        # re-publishing a bundle: its weights keep their provenance (an adapter's is its own dir)
        origin = src.origin if base is None else None
        if code_commit is None:
            code_commit = origin.lineage.code_commit if origin else _git_head(Path(src_dir))
        if data_version is None and origin:
            data_version = origin.lineage.data_version
        if isinstance(source, str):
            source = ModelSource.parse(source)
        if source is None:
            source = origin.model.source if origin else ModelSource("local", str(Path(src_dir).resolve()))
        model = ModelInfo(src.architecture, src.model_type, source)
        parent_digest = self.store.resolve(parent).digest if parent else (origin.digest if origin else None)

        early = self.registry.find_content(name, content_key)  # skip the copy for a re-publish
        if early is not None and version in (None, early.version):
            return Published(self._intact(early), False)

        staging = self.root / "tmp" / f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}"
        staging.mkdir()
        final: Path | None = None
        try:
            for i, rel in enumerate(sorted(files)):
                blob = self._put_blob(src, rel, files[rel])
                dst = staging / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(blob, dst)
                except OSError:  # filesystem without hard links: copy (still read-only)
                    shutil.copyfile(blob, dst)
                    os.chmod(dst, 0o444)
                if i == 0:
                    _crash_point("mid_copy")
            _crash_point("after_copy")
            with self.registry.transaction() as t:
                again = t.find_content(name, content_key)
                if again is not None:
                    if version in (None, again.version):
                        return Published(self._intact(again), False)
                    raise BundleError(f"identical content is already published as {again.ref}; "
                                      f"it cannot also be {name}:{version}")
                latest = t.latest(name)
                if version is None:
                    version = latest.version + 1 if latest else 1
                elif t.get(name, version) is not None:
                    raise BundleError(f"{name}:{version} already exists with different content; bundles are "
                                      f"immutable: publish without a version to get {name}:{latest.version + 1}")
                elif latest is not None and version <= latest.version:
                    raise BundleError(f"versions of {name} are monotonic: {version} is not above the latest "
                                      f"({latest.version}); use {latest.version + 1} or leave the version out")
                m = Manifest(name=name, version=version, created_at=utc_now(), created_by=actor, files=files,
                             model=model, retrieval_index=ri,
                             lineage=Lineage(code_commit, data_version,
                                             parent_digest or (latest.digest if latest else None)),
                             has_faults=src.has_faults, adapter=adapter).with_digest()
                self._write_manifest(staging, m)
                _crash_point("before_rename")
                self._recover(t)
                final = self.store.path_of(name, version)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging, final)
                os.chmod(final, 0o555)
                _fsync_dir(final.parent)
                _crash_point("after_rename")
                t.insert_bundle(BundleRecord(name, version, m.digest, content_key, m.created_at, actor,
                                             m.to_json()))
                t.record("publish", actor, m.ref, latest.ref if latest else None, m.ref, reason)
            final = None  # committed: the directory now belongs to the store
            _crash_point("after_commit")
            return Published(m, True)
        finally:
            for leftover in (staging, final):
                if leftover is not None and leftover.exists():
                    _force_rmtree(leftover)

    def _base(self, base: str):
        """The registry row of an adapter's base: in this store, and not itself an adapter."""
        try:
            rec = self.store.resolve(base)
        except BundleError as exc:
            raise BundleError(f"base {base} is not in the store at {self.root} ({exc}); publish the base model "
                              "first, then the adapter with --base NAME:VERSION") from None
        if self.store.manifest_of(rec).adapter is not None:
            raise BundleError(f"base {rec.ref} is itself an adapter version; an adapter's base must be a full "
                              f"model bundle (its base is {self.store.manifest_of(rec).adapter.base_ref})")
        return rec

    def _intact(self, rec) -> Manifest:
        """The manifest of `rec`, the identical content already published, once its stored
        copy hashed clean: "already published" must not vouch for a corrupted copy."""
        try:
            m = self.store.manifest_of(rec)
            raise_problems(m, check_files(self.store.path_of(rec.name, rec.version), m, cached=False))
            return m
        except BundleError as exc:
            raise BundleError(f"identical content is already published as {rec.ref}, but its stored copy is "
                              f"damaged: {exc}") from None

    def _put_blob(self, src, rel: str, entry: FileEntry) -> Path:
        blob = self.root / "blobs" / "sha256" / entry.sha256
        if blob.exists() and blob.stat().st_size == entry.size and cached_hash(blob) == entry.sha256:
            return blob
        tmp = self.root / "tmp" / f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}.blob"
        h = hashlib.sha256()
        try:
            with src.reader(rel) as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            if h.hexdigest() != entry.sha256:
                raise BundleError(f"{rel} changed while it was being published; publish again from a stable copy")
            os.chmod(tmp, 0o444)
            os.replace(tmp, blob)  # atomic: a blob is whole or absent
            _fsync_dir(blob.parent)
        finally:
            if tmp.exists():
                tmp.unlink()
        return blob

    @staticmethod
    def _write_manifest(staging: Path, m: Manifest) -> None:
        p = staging / "manifest.json"
        with open(p, "w", encoding="utf-8") as f:
            f.write(m.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(p, 0o444)
        for d, _, _ in os.walk(staging, topdown=False):
            if Path(d) != staging:  # the top stays writable until renamed (moving a dir rewrites its `..`)
                _fsync_dir(Path(d))
                os.chmod(d, 0o555)
        _fsync_dir(staging)

    # ---- crash debris ------------------------------------------------------------------
    def recover(self) -> list[Path]:
        """Remove debris of crashed publishes: unregistered bundle dirs and stale staging.
        Returns what was removed. Safe to run at any time (takes the write lock)."""
        with self.registry.transaction() as t:
            return self._recover(t)

    def _recover(self, t: Txn) -> list[Path]:
        removed = []
        known = {(b.name, b.version) for b in t.list_bundles()}
        for name_dir in sorted((self.root / "bundles").iterdir()):
            if not name_dir.is_dir():
                continue
            for vdir in sorted(name_dir.iterdir()):
                if not (vdir.name.isdigit() and (name_dir.name, int(vdir.name)) in known):
                    _force_rmtree(vdir) if vdir.is_dir() else vdir.unlink()
                    removed.append(vdir)
        host = socket.gethostname()
        for entry in sorted((self.root / "tmp").iterdir()):
            owner, _, rest = entry.name.rpartition("-")[0].rpartition("-")
            if owner == host and rest.isdigit() and not _pid_alive(int(rest)):
                _force_rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry)
        return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _git_head(path: Path) -> str | None:
    """The commit of the code beside the weights, when they live in a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    head = out.stdout.strip()
    return head if out.returncode == 0 and len(head) in (40, 64) else None

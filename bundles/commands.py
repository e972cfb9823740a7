"""CLI for bundles: `bundle publish|list|show|verify|diff`, `demo-bundle`, `ledger`.

Every command takes `--json` (one JSON document on stdout) and `--store`; a failure
prints one line `slotserve: error: ...` on stderr and exits 1 (usage errors exit 2,
from argparse). Heavy imports (torch, transformers) happen only in the commands
that need them.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any, Callable

from slotserve.bundles import hub
from slotserve.bundles.manifest import BundleError, Manifest, diff

EXIT_FAILURE = 1


def _fail(msg: str) -> int:
    print(f"slotserve: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return EXIT_FAILURE


def _guard(fn: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    """Turn the errors a user can cause into one line and a non-zero exit (no traceback)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args) or 0
        except BundleError as exc:
            return _fail(str(exc))
        except BrokenPipeError:  # output piped into `head`: not an error worth a message
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILURE
        except sqlite3.Error as exc:
            return _fail(f"registry: {exc}")
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            return _fail(f"{exc.strerror or exc}{where}")
    return run


def _store(args: argparse.Namespace, create: bool = False):
    from slotserve.bundles.store import Store

    return Store(args.store, create=create)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str) if args.json else text)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _summary(store, m: Manifest) -> dict[str, Any]:
    return {"ref": m.ref, "name": m.name, "version": m.version, "digest": m.digest,
            "created_at": m.created_at, "created_by": m.created_by, "architecture": m.model.architecture,
            "files": len(m.files), "bytes": m.total_bytes, "has_faults": m.has_faults,
            "base": m.adapter.base if m.adapter else None,
            "aliases": store.aliases_of(m.name, m.version), "path": str(store.path_of(m.name, m.version))}


# ---- bundle publish ---------------------------------------------------------------------
def cmd_publish(args: argparse.Namespace) -> int:
    store = _store(args, create=True)
    src_dir, source, parent, index = args.dir, args.source, args.parent, args.retrieval_index
    contain = None
    if args.base is not None:  # src_dir is a LoRA adapter directory; the base supplies the rest
        if not Path(src_dir).is_dir():
            raise BundleError(f"{src_dir} is not a directory; with --base, publish a PEFT adapter directory "
                              "(adapter_config.json + adapter_model.safetensors)")
    elif hub.is_hub(src_dir):   # fetch what serving needs; provenance pinned to the resolved commit
        snap = hub.fetch(src_dir)
        src_dir, source = snap.path, source or snap.source
        contain = snap.path.parent.parent   # the cache's repo dir: snapshots link to its blobs
    elif not Path(src_dir).exists():
        # a published bundle as the base: everything it holds, with the options given here
        # replacing their parts (e.g. --system-prompt: a prompt-only change, same weight blobs)
        try:
            rec = store.resolve(src_dir)
        except BundleError as exc:
            raise BundleError(f"{src_dir} is neither a directory nor a bundle in the store: {exc}") from None
        src_dir, parent = store.path_of(rec.name, rec.version), parent or rec.ref
        index = index or store.manifest(rec.ref).retrieval_index
    res = store.publish_detailed(
        src_dir, args.name, actor=args.actor, prompt_template=args.prompt_template,
        retrieval_index=index, serving=args.serving, eval_file=args.eval, reason=args.reason,
        system_prompt=args.system_prompt, version=args.version, source=source,
        code_commit=args.code_commit, data_version=args.data_version, parent=parent, base=args.base,
        contain=contain)
    m = res.manifest
    verb = "published" if res.created else "unchanged (identical content already published as)"
    _emit(args, {"created": res.created, **_summary(store, m), "manifest": m.to_dict()},
          f"{verb} {m.ref} {m.digest} ({len(m.files)} files, {_size(m.total_bytes)})")
    return 0


# ---- bundle list / show / verify / diff ---------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = [_summary(store, m) for m in store.list(args.name)]
    lines = [f"{'REF':<28} {'DIGEST':<19} {'CREATED':<20} {'BY':<12} ALIASES"]
    lines += [f"{r['ref']:<28} {r['digest'][:19]:<19} {r['created_at'][:19]:<20} {r['created_by'][:12]:<12} "
              + " ".join("@" + a for a in r["aliases"]) for r in rows]
    _emit(args, rows, "\n".join(lines) if rows else "no bundles")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    rec = store.resolve(args.ref)
    m = store.manifest(rec.ref)
    path = store.path_of(m.name, m.version)
    serving = json.loads((path / "serving.json").read_text())
    faults = serving.get("faults")
    data = {**_summary(store, m), "manifest": m.to_dict(), "serving": serving, "faults": faults}
    src = m.model.source
    ad = m.adapter
    lines = [
        f"bundle      {m.ref}", f"digest      {m.digest}", f"path        {path}",
        f"created     {m.created_at} by {m.created_by}",
        f"model       {m.model.architecture} ({m.model.model_type}) from {src}",
        f"adapter     " + (f"LoRA r={ad.rank} alpha={ad.alpha:g} on {', '.join(ad.target_modules)}, base "
                             f"{ad.base_ref} {ad.base}" if ad else "-"),
        f"retrieval   {m.retrieval_index or '-'}",
        f"lineage     code {m.lineage.code_commit or '-'}, data {m.lineage.data_version or '-'}, "
        f"parent {m.lineage.parent or '-'}",
        f"aliases     {' '.join('@' + a for a in data['aliases']) or '-'}",
        f"serving     dtype {serving['dtype']}, max_model_len {serving['max_model_len']}, "
        f"max_batch {serving['max_batch']}, sampling {json.dumps(serving['sampling'], sort_keys=True)}",
        f"faults      {'DECLARED (drill bundle): ' + json.dumps(faults, sort_keys=True) if faults else 'none'}",
        f"files       {len(m.files)}, {_size(m.total_bytes)}",
    ]
    lines += [f"  {e.sha256[:12]}  {e.size:>12}  {p}" for p, e in m.files.items()]
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    rec = store.resolve(args.ref)
    try:
        b = store.verify(rec.ref)
    except BundleError as exc:
        if args.json:
            print(json.dumps({"ok": False, "ref": rec.ref, "error": str(exc)}, indent=2, sort_keys=True))
        return _fail(str(exc))
    m = b.manifest
    _emit(args, {"ok": True, "ref": m.ref, "digest": m.digest, "files": len(m.files), "bytes": m.total_bytes,
                 "path": str(b.path)},
          f"ok {m.ref} {m.digest}: {len(m.files)} files, {_size(m.total_bytes)} hashed and match the manifest")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    store = _store(args)
    a, b = store.manifest(args.a), store.manifest(args.b)
    d = diff(a, b)
    sa = json.loads((store.path_of(a.name, a.version) / "serving.json").read_text())
    sb = json.loads((store.path_of(b.name, b.version) / "serving.json").read_text())
    d["serving"] = {k: [sa.get(k), sb.get(k)] for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)}
    f = d["files"]
    lines = [f"{a.ref} -> {b.ref}" + ("  (identical)" if d["identical"] else ""),
             f"weights     {'identical' if d['weights_identical'] else 'DIFFERENT'}"]
    lines += [f"  + {p}" for p in f["added"]] + [f"  - {p}" for p in f["removed"]]
    lines += [f"  ~ {p}" for p in f["changed"]]
    lines += [f"  {k}: {json.dumps(va, sort_keys=True)} -> {json.dumps(vb, sort_keys=True)}"
              for k, (va, vb) in {**d["fields"], **{"serving." + k: v for k, v in d["serving"].items()}}.items()]
    _emit(args, d, "\n".join(lines))
    return 0


# ---- ledger ---------------------------------------------------------------------------------
def cmd_ledger(args: argparse.Namespace) -> int:
    store = _store(args)
    bundle = None
    if args.bundle:
        from slotserve.bundles.ref import parse_ref

        r = parse_ref(args.bundle)
        bundle = r.name if r.kind == "latest" else store.resolve(r).ref  # a bare name: every version
    if args.limit < 1:
        raise BundleError(f"--limit must be >= 1, got {args.limit}")
    rows = store.registry.ledger(args.limit, bundle)
    lines = []
    for e in rows:
        move = f"{e.from_ref or '-'} -> {e.to_ref or '-'}"
        alias = f" @{e.alias}" if e.alias else ""
        metrics = f" {json.dumps(e.metrics, sort_keys=True)}" if e.metrics else ""
        lines.append(f"{e.id:>5} {e.ts[:19]} {e.actor:<12} {e.action:<13} {move}{alias}"
                     + (f"  {e.reason}" if e.reason else "") + metrics)
    _emit(args, [e.to_dict() for e in rows], "\n".join(lines) if rows else "ledger is empty")
    return 0


# ---- demo-bundle ----------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from slotserve.bundles.demo import build_demo_model, demo_source
    from slotserve.bundles.file_hash import hash_file
    from slotserve.bundles.source import read_source

    store = _store(args, create=True) if args.publish else None  # fail on a bad store before building
    out = build_demo_model(args.arch, args.seed, Path(args.out))
    data: dict[str, Any] = {"out": str(out), "arch": args.arch, "seed": args.seed, "published": None}
    read_source(out)  # proves the directory is publishable
    data["files"] = {p.relative_to(out).as_posix(): hash_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    text = f"wrote {args.arch} demo model (seed {args.seed}) to {out}"
    if store is not None:
        res = store.publish_detailed(out, args.publish, actor=args.actor, reason=args.reason,
                                     source=demo_source(args.arch, args.seed),
                                     data_version=f"demo:{args.arch}:seed={args.seed}")
        m = res.manifest
        data["published"] = {"created": res.created, **_summary(store, m)}
        text += f"\n{'published' if res.created else 'already published as'} {m.ref} {m.digest}"
    _emit(args, data, text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--store", metavar="PATH", help="bundle store (default $SLOTSERVE_HOME or ~/.slotserve)")

    bundle = subparsers.add_parser("bundle", help="publish and inspect immutable bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    p = bsub.add_parser("publish", parents=[common], help="publish a model directory as the next version")
    p.add_argument("dir", help="a published bundle to start from (NAME:VERSION, ...), or a "
                               "Hugging Face model dir (config.json, *.safetensors, tokenizer files), "
                               "or hub:ORG/REPO[@REVISION] to fetch one from the hub")
    p.add_argument("--name", required=True, help="bundle name: lowercase letters, digits, '.', '_', '-'")
    p.add_argument("--prompt-template", metavar="F", help="jinja prompt template -> prompt/template.jinja")
    p.add_argument("--system-prompt", metavar="F", help="system prompt text file -> prompt/system.txt")
    p.add_argument("--retrieval-index", metavar="ID@VERSION[#DIGEST]", help="retrieval index this bundle uses")
    p.add_argument("--serving", metavar="F", help="serving.json (defaults fill what it leaves out)")
    p.add_argument("--eval", metavar="F", help="eval set, JSON lines -> eval/eval.jsonl")
    p.add_argument("--version", type=int, help="explicit version (must be above the latest)")
    p.add_argument("--source", help="where the weights came from: hub:ORG/REPO@REVISION or a path")
    p.add_argument("--code-commit", help="commit of the code that produced the weights (default: git HEAD of DIR)")
    p.add_argument("--data-version", help="version of the data the weights were trained on")
    p.add_argument("--parent", metavar="REF", help="bundle this one derives from (default: the latest of NAME)")
    p.add_argument("--base", metavar="REF", help="DIR is a PEFT LoRA adapter (adapter_config.json + "
                   "adapter_model.safetensors) for this base bundle; tokenizer, prompt, serving config, eval set "
                   "and retrieval index come from the base unless given")
    p.add_argument("--actor", help="who publishes (default $SLOTSERVE_ACTOR or the OS user)")
    p.add_argument("--reason", default="", help="why, for the ledger")
    p.set_defaults(func=_guard(cmd_publish))

    p = bsub.add_parser("list", parents=[common], help="list published bundles")
    p.add_argument("--name", help="only this bundle name")
    p.set_defaults(func=_guard(cmd_list))

    p = bsub.add_parser("show", parents=[common], help="show a bundle's manifest, path, serving config, faults")
    p.add_argument("ref", help="NAME:VERSION, NAME@ALIAS, NAME or sha256:PREFIX")
    p.set_defaults(func=_guard(cmd_show))

    p = bsub.add_parser("verify", parents=[common], help="rehash every file against the manifest")
    p.add_argument("ref", help="NAME:VERSION, NAME@ALIAS, NAME or sha256:PREFIX")
    p.set_defaults(func=_guard(cmd_verify))

    p = bsub.add_parser("diff", parents=[common], help="which files and fields differ between two bundles")
    p.add_argument("a", metavar="REF")
    p.add_argument("b", metavar="REF")
    p.set_defaults(func=_guard(cmd_diff))

    p = subparsers.add_parser("demo-bundle", parents=[common], help="write a tiny random-init demo model")
    p.add_argument("--arch", choices=("llama", "qwen3"), default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory to write (created; same-named files overwritten)")
    p.add_argument("--publish", metavar="NAME", help="also publish it under NAME")
    p.add_argument("--actor", help="who publishes (default $SLOTSERVE_ACTOR or the OS user)")
    p.add_argument("--reason", default="demo bundle", help="why, for the ledger")
    p.set_defaults(func=_guard(cmd_demo))

    p = subparsers.add_parser("ledger", parents=[common], help="the append-only record of changes, newest first")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--bundle", metavar="REF", help="only entries about this bundle (a bare NAME: all versions)")
    p.set_defaults(func=_guard(cmd_ledger))

"""CLI commands that talk to a running server's admin API.

    slotserve load REF                    stage REF in the candidate slot on every replica
    slotserve rollout start SPEC.yaml [--bundle REF]
                                          start a rollout (strategies and guards: docs/rollout.md)
    slotserve rollout status|promote|abort|resume
    slotserve rollback [--reason TEXT]    previous -> live on every replica
    slotserve state                       slots, tiers and weights on each replica

Each takes --url (default http://127.0.0.1:8000), --token (default
$SLOTSERVE_ADMIN_TOKEN, else $SLOTSERVE_HOME/admin_token) and --json. A failure exits
non-zero with one line on stderr. (`slotserve ledger` reads the registry directly.)
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
from typing import TYPE_CHECKING

from slotserve import SLOT_NAMES

if TYPE_CHECKING:  # httpx is imported lazily so `slotserve --help` stays fast
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class AdminError(Exception):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    p.add_argument("--token", default=None, help="admin token (default: $SLOTSERVE_ADMIN_TOKEN "
                                                 "or $SLOTSERVE_HOME/admin_token)")
    p.add_argument("--json", action="store_true", help="print the raw JSON response")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the server")


def register(subparsers) -> None:
    p = subparsers.add_parser("load", help="stage a bundle in the candidate slot on every replica")
    p.add_argument("ref", help="name:version, name@alias or sha256:prefix")
    p.add_argument("--evict-previous", action="store_true",
                   help="drop the previous slot if the candidate does not fit otherwise")
    _common(p)
    p.set_defaults(func=cmd_load)

    r = subparsers.add_parser("rollout", help="start, watch, promote or abort a rollout")
    rs = r.add_subparsers(dest="rollout_cmd", metavar="ACTION", required=True)
    s = rs.add_parser("start", help="start a rollout from a spec file (YAML or JSON)")
    s.add_argument("spec", help="SPEC.yaml")
    s.add_argument("--bundle", metavar="REF", help="roll out REF instead of the spec's `bundle` "
                                                  "(one spec file for every version)")
    _common(s)
    s.set_defaults(func=cmd_rollout_start)
    for name, fn, helptext in (("status", cmd_rollout_status, "current step, weights, guard values"),
                               ("promote", cmd_promote, "make the candidate live now"),
                               ("abort", cmd_abort, "send all traffic back to live, release the candidate"),
                               ("resume", cmd_resume, "acknowledge alerts and let the rollout advance")):
        q = rs.add_parser(name, help=helptext)
        if name in ("promote", "abort"):
            q.add_argument("--reason", default="")
        _common(q)
        q.set_defaults(func=fn)

    b = subparsers.add_parser("rollback", help="previous -> live on every replica (O(1), no reload)")
    b.add_argument("--reason", default="", help="why (recorded in the ledger)")
    _common(b)
    b.set_defaults(func=cmd_rollback)

    st = subparsers.add_parser("state", help="which bundle is in which slot on each replica")
    _common(st)
    st.set_defaults(func=cmd_state)


def _token(args) -> str | None:
    if args.token:
        return args.token
    from slotserve.api.auth import read_token
    return read_token()


def call(args, method: str, path: str, body=None) -> dict:
    import httpx
    headers = {"x-slotserve-actor": f"{getpass.getuser()}@{socket.gethostname()}"}
    tok = _token(args)
    if tok:
        headers["authorization"] = f"Bearer {tok}"
    try:
        r = httpx.request(method, args.url.rstrip("/") + path, json=body, headers=headers,
                          timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise AdminError(f"cannot reach {args.url}: {exc} (is `slotserve serve` running?)") from None
    return admin_result(r, method, path)


def admin_result(r: "httpx.Response", method: str, path: str, error: type[Exception] | None = None) -> dict:
    """The JSON body of an admin API answer, or `error` with the server's message in it."""
    error = error or AdminError
    try:
        data = r.json()
    except ValueError:
        raise error(f"{method} {path}: HTTP {r.status_code}: {r.text[:200]}") from None
    if r.status_code >= 400:
        msg = data.get("error", {}).get("message") if isinstance(data, dict) else None
        hint = " (check --token / $SLOTSERVE_ADMIN_TOKEN)" if r.status_code == 401 else ""
        raise error(f"{method} {path}: HTTP {r.status_code}: {msg or r.text[:200]}{hint}")
    return data


def _run(args, fn) -> int:
    try:
        data = fn()
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    return 0


def _summary(data: dict) -> str:
    st = data.get("state", {})
    d = st.get("desired", {})
    slots = ", ".join(f"{s}={(d.get(s) or {}).get('ref', '-')}" for s in SLOT_NAMES)
    conv = "converged" if data.get("converged") else "NOT converged"
    return (f"{slots}; weights {st.get('weights')}; {conv} on {data.get('replicas')} replica(s) "
            f"in {data.get('converge_ms')} ms")


def cmd_load(args) -> int:
    def go():
        data = call(args, "POST", "/admin/load", {"bundle": args.ref, "evict_previous": args.evict_previous})
        if not args.json:
            print(f"staged {args.ref}: {_summary(data)}")
        return data
    return _run(args, go)


def cmd_rollout_start(args) -> int:
    def go():
        import yaml
        try:
            with open(args.spec) as f:
                spec = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as exc:
            raise AdminError(f"cannot read {args.spec}: {exc}") from None
        if not isinstance(spec, dict):
            raise AdminError(f"{args.spec} must hold a rollout spec (a mapping with `bundle`, "
                             f"`strategy`, ...; see docs/rollout.md)")
        if args.bundle:
            spec = {**spec, "bundle": args.bundle}
        data = call(args, "POST", "/admin/rollout", spec)
        if not args.json:
            print(f"rollout started: {_summary(data)}")
        return data
    return _run(args, go)


def cmd_rollout_status(args) -> int:
    def go():
        data = call(args, "GET", "/admin/rollout")
        if not args.json:
            if not data.get("phase"):
                print(f"no rollout; candidate {data.get('candidate') or '-'}; weights {data.get('weights')}")
                return data
            print(f"{data['strategy']} rollout of {data['bundle']} (live {data.get('live')}): "
                  f"{data['phase']}, step {data['step'] + 1}/{len(data['steps'])} {data['weights']}"
                  + (" PAUSED" if data.get("paused") else ""))
            if "time_to_next_step_s" in data:
                ran = (f"step running {data['now'] - data['step_started_at']:.1f}s, "
                       if data.get("now") is not None and data.get("step_started_at") is not None else "")
                print(f"  {ran}candidate requests {data.get('requests')}/{data.get('min_requests')}, "
                      f"next step in {data['time_to_next_step_s']:.1f}s ({data['next']['action']})")
            gate = data.get("eval_gate")
            if gate:
                print(f"  eval gate {'passed' if gate['passed'] else 'FAILED'}: eval_score {gate['candidate']:.3g} "
                      f"vs live {gate['live']:.3g}")
            for g in data.get("guards", []):
                if gate and g["guard"].startswith("eval_score"):
                    continue  # judged once, by the gate, before the first step
                flag = "BREACHED" if g["breached"] else ("ok" if g["enough_samples"] else "waiting")
                print(f"  {g['guard']}: value {g['value']} threshold {g['threshold']} "
                      f"[{g['samples']}/{g['min_samples']} samples] {flag}")
            if data.get("reason"):
                print(f"  reason: {data['reason']}")
        return data
    return _run(args, go)


def _swap(path: str, verb: str):
    def cmd(args) -> int:
        def go():
            data = call(args, "POST", path, {"reason": getattr(args, "reason", "")} if hasattr(args, "reason") else None)
            if not args.json:
                # a rollback with no previous warm aborts a rollout to its baseline: say so
                why = data.get("state", {}).get("reason", "")
                print(f"{why if 'baseline' in why else verb}: {_summary(data)}")
            return data
        return _run(args, go)
    return cmd


cmd_promote = _swap("/admin/rollout/promote", "promoted")
cmd_abort = _swap("/admin/rollout/abort", "aborted")
cmd_resume = _swap("/admin/rollout/resume", "resumed")
cmd_rollback = _swap("/admin/rollback", "rolled back")


def _mb(n) -> str:
    return f"{(n or 0) / 2**20:.0f} MB"


def _slot_memory(info: dict) -> str:
    """What a slot costs: its own weights and KV pool, and the weights it shares."""
    own_weights = max(0, (info.get("weight_bytes") or 0) - (info.get("shared_bytes") or 0))
    text = f"weights {_mb(own_weights)}, KV {_mb(info.get('kv_bytes'))}"
    if info.get("shared_bytes"):
        text += f" (+{_mb(info['shared_bytes'])} of weights shared with another slot)"
    if info.get("adapter_of"):
        text += f"; LoRA adapter of {info['adapter_of']}"
    if info.get("engine_shared_with"):
        text += f"; one base engine with {', '.join(info['engine_shared_with'])} (same batches, same KV pool)"
    return text


def cmd_state(args) -> int:
    def go():
        data = call(args, "GET", "/admin/state")
        if not args.json:
            d = data["desired"]
            print(f"app {data['app']} (state v{data['version']}): weights {data['weights']}, "
                  f"rollout {data.get('rollout_phase') or '-'}")
            for s in SLOT_NAMES:
                print(f"  {s:9} {(d.get(s) or {}).get('ref', '-')}")
            for r in data.get("replicas", []):
                slots = (r.get("slots") or {}).get("slots") or {}
                print(f"  replica {r['id']}: applied v{r['applied']} {'ready' if r['ready'] else 'NOT ready'}")
                for s in SLOT_NAMES:
                    if isinstance(info := slots.get(s), dict):
                        print(f"    {s:9} {info.get('ref')} on {info.get('tier', '?')}: {_slot_memory(info)}")
        return data
    return _run(args, go)

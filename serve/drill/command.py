"""`slotserve drill`'s command line: the flags, the run, the report on stdout or in files.

    slotserve drill                                   # self-contained: its own local server
    slotserve drill --fault latency_ms=300 --plot drill.png
    slotserve drill --url http://10.0.0.5:8000 --token $T --store /shared/slotserve

The drill publishes (or takes, `--candidate`) a candidate carrying an injected fault,
starts a rollout with guards, drives chat-completion load, and checks that a guard
rolls the candidate back, that every new request returns to live, and that no client
saw a failure. It prints a table (time to detect, time to revert, requests served by
the candidate, failed requests, p99 before/during/after), writes the JSON report
(`--out`, or `--json` on stdout) and draws the timeline (`--plot`). Exit status: 0 when
the drill passed, 1 when it ran and failed, 2 when it could not run. docs/drill.md is
the runbook.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slotserve.drill.config import SCENARIOS, DrillConfig, load_spec, parse_faults
from slotserve.drill.load import DrillError
from slotserve.drill.report import format_quality
from slotserve.drill.scenarios import log_to_stderr, run


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "drill", help="rehearse an automatic rollback (fault-injected candidate under load) and measure it",
        description=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Runbook: docs/drill.md.")
    t = p.add_argument_group("target")
    t.add_argument("--url", help="a running deployment (default: start a local one on the demo bundles)")
    t.add_argument("--token", help="admin token (default $SLOTSERVE_ADMIN_TOKEN or $SLOTSERVE_HOME/admin_token)")
    t.add_argument("--tiny", action="store_true",
                   help="self-contained: serve the random tiny demo model (fast, its text is noise) instead "
                        "of SmolLM2-135M-Instruct (fault scenario only)")
    t.add_argument("--store", help="bundle store to publish the candidate in (default $SLOTSERVE_HOME; "
                                   "self-contained: a temporary store)")
    c = p.add_argument_group("candidate and rollout")
    c.add_argument("--scenario", choices=SCENARIOS, default="fault",
                   help="fault (default): an injected fault under load, caught by a guard; quality: an honest "
                        "and a sabotaged system prompt behind the eval gate, which must stop only the second")
    c.add_argument("--fault", action="append", metavar="F",
                   help="injected fault: error_rate=0.5 (default), latency_ms=300, oom_after=3, nan_logits; "
                        "repeat or comma-separate to combine")
    c.add_argument("--candidate", metavar="REF", help="drill with this bundle instead of publishing one")
    c.add_argument("--spec", metavar="FILE", help="rollout spec (YAML/JSON); default: a built-in canary")
    c.add_argument("--percent", type=float, default=25.0, help="built-in canary step, %% of traffic (25)")
    ld = p.add_argument_group("load")
    ld.add_argument("--concurrency", type=int, default=4, help="parallel clients (4)")
    ld.add_argument("--duration", type=float, default=30.0,
                    help="longest wait, in seconds, for the candidate to take traffic, then for the rollback (30)")
    ld.add_argument("--rps", type=float, default=0.0, help="request rate; 0: as fast as answered (0)")
    ld.add_argument("--baseline", type=float, default=3.0, help="seconds of load on live before the rollout (3)")
    ld.add_argument("--settle", type=float, default=3.0, help="seconds of load after the rollback (3)")
    ld.add_argument("--max-tokens", type=int, default=8, help="tokens per request (8)")
    ld.add_argument("--stream", action="store_true", help="stream responses (server-sent events)")
    ld.add_argument("--model", help="model name to request (default: the served name from /v1/models)")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="FILE.json", help="write the report as JSON")
    o.add_argument("--plot", metavar="FILE.png", help="draw latency and traffic share over time")
    o.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout only")
    p.set_defaults(func=cmd_drill)


def cmd_drill(args: argparse.Namespace) -> int:
    from slotserve.drill.plot import plot
    from slotserve.drill.report import format_table
    try:
        faults = parse_faults(args.fault)
        if args.candidate and args.fault:
            raise DrillError("--candidate takes an existing bundle as it is; --fault only applies "
                             "to the candidate the drill publishes")
        cfg = DrillConfig(url=args.url, token=args.token, store=args.store, candidate=args.candidate,
                          faults=faults, spec=load_spec(args.spec) if args.spec else None,
                          percent=args.percent, concurrency=args.concurrency, duration_s=args.duration,
                          rps=args.rps, baseline_s=args.baseline, settle_s=args.settle,
                          max_tokens=args.max_tokens, stream=args.stream, model=args.model,
                          scenario=args.scenario, tiny=args.tiny)
        rep = run(cfg)
    except DrillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1, default=str) + "\n")
        log_to_stderr(f"report written to {args.out}")
    if args.plot and cfg.scenario == "fault":
        try:
            plot(rep, args.plot)
            log_to_stderr(f"plot written to {args.plot}")
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
    if args.json:
        print(json.dumps(rep, default=str))
    else:
        print(format_quality(rep) if cfg.scenario == "quality" else format_table(rep))
    return 0 if rep["passed"] else 1

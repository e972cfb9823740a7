"""What a drill measured: figures from the client's samples and the server's polls,
and the printed tables. The plot is drawn by slotserve.drill.plot.

Definitions (docs/drill.md explains them for on-call):

* **first bad** — the first request that reached the faulty candidate: the earliest
  start of a request answered by it (or marked retried from it), or, for failures the
  server retried on live without telling the client, the last rollout poll that still
  showed an empty candidate window. Never before the rollout started. This is a lower
  bound, so time to detect is never flattered.
* **rollback** — the rollout's `ended_at` once its phase is `rolled_back` (the guard's
  decision, server clock), else the ledger's `rollback` row.
* **reverted** — the start of the first request answered by live after both the
  rollback and the last request that reached the candidate: from then on every new
  request went to live. An upper bound; `revert_resolution_ms` says how much earlier
  it may have been (the gap to the request before it, or to the rollback).
* **before / during / after** — requests started before the rollout was requested,
  between that and the revert, and after the revert.

Server times are moved onto this machine's clock with the offset estimated from the
polls (the server's window clock against each poll's midpoint, the fastest poll wins);
a self-contained drill shares one clock and uses 0.
"""

from __future__ import annotations

from datetime import datetime
from typing import Iterable, Sequence

from slotserve.drill.load import Poll, Sample
from slotserve.rollout.window import percentile


# Which guard metric each injected fault should trip.
EXPECTED_GUARD = {"error_rate": ("error_rate",), "latency_ms": ("p99_latency_ms", "p50_latency_ms"),
                  "oom_after": ("oom_events", "out of memory"), "nan_logits": ("nan_rate",)}
FIGURES = ("time_to_detect_ms", "time_to_revert_ms", "served_by_candidate", "candidate_requests",
           "retried_on_live", "failed_requests", "requests", "p99_ms", "p50_ms", "phase_requests")
PHASES = ("before", "during", "after")


def parse_ts(ts: str | None) -> float | None:
    """Ledger timestamps ('2025-01-02T03:04:05.123456Z') -> epoch seconds."""
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def clock_offset(polls: Iterable[Poll]) -> tuple[float, float | None]:
    """(server - client seconds, uncertainty) from the poll with the smallest round trip."""
    timed = [p for p in polls if p.server_now is not None]
    if not timed:
        return 0.0, None
    best = min(timed, key=lambda p: p.rtt)
    return best.server_now - (best.sent + best.received) / 2, best.rtt / 2


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def analyse(samples: Sequence[Sample], polls: Sequence[Poll], ledger: Sequence[dict], *,
            live: str, candidate: str, fault: dict, load_start: float, load_end: float,
            rollout_requested: float, same_clock: bool, final_live: str | None = None) -> dict:
    """The drill's verdict and figures (JSON-ready). Times in `events` are seconds after
    `load_start`; every figure in FIGURES is present (None where it could not be measured)."""
    offset, offset_err = (0.0, 0.0) if same_clock else clock_offset(polls)

    def client(t_server: float | None) -> float | None:
        return None if t_server is None else t_server - offset

    samples = sorted(samples, key=lambda s: s.start)
    # this drill's rollout (a rollout of the same candidate by an earlier drill is ignored)
    ours = [p for p in polls if p.candidate == candidate and p.started_at is not None
            and client(p.started_at) >= rollout_requested - 0.5]
    last = ours[-1] if ours else None
    phase = last.phase if last else None
    started = client(last.started_at) if last else None
    rb_row, rollback, reason, guard = _rollback(last, ledger, candidate, client, offset, rollout_requested)

    # -- who answered
    cand_hits = [s for s in samples if s.bundle == candidate or s.retried_from == candidate]
    served_by_candidate = sum(1 for s in samples if s.bundle == candidate)
    failed = [s for s in samples if not s.ok]
    first_bad, source = _first_bad(cand_hits, ours, polls, client, started)
    reverted, resolution = _reverted(samples, cand_hits, live, rollback)
    candidate_requests, retried = _candidate_counts(ours)

    # -- latency by phase (successful requests)
    def phase_of(s: Sample) -> str:
        if s.start < rollout_requested:
            return "before"
        if reverted is None or s.start < reverted:
            return "during"
        return "after"

    lat = {ph: [s.latency_ms for s in samples if s.ok and phase_of(s) == ph] for ph in PHASES}
    problems, warnings = _verdict(phase, samples, failed, live, final_live, fault, guard, rollback, reverted,
                                  same_clock, offset_err)

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - load_start, 4)

    figures = {
        "time_to_detect_ms": _r((rollback - first_bad) * 1e3 if rollback is not None and first_bad is not None
                                else None),
        "time_to_revert_ms": _r((reverted - rollback) * 1e3 if reverted is not None and rollback is not None
                                else None),
        "served_by_candidate": served_by_candidate,
        "candidate_requests": candidate_requests,
        "retried_on_live": retried,
        "failed_requests": len(failed),
        "requests": len(samples),
        "p99_ms": {ph: _r(percentile(sorted(lat[ph]), 0.99)) for ph in PHASES},
        "p50_ms": {ph: _r(percentile(sorted(lat[ph]), 0.50)) for ph in PHASES},
        "phase_requests": {ph: len(lat[ph]) for ph in PHASES},
    }
    assert set(figures) == set(FIGURES)
    duration = max(1e-9, load_end - load_start)
    return {
        "passed": not problems, "problems": problems, "warnings": warnings,
        "live": live, "candidate": candidate, "fault": fault, "outcome": phase, "reason": reason,
        "guard": guard,
        "figures": figures,
        "events": {"rollout_requested": rel(rollout_requested), "rollout_started": rel(started),
                   "first_bad": rel(first_bad), "rollback": rel(rollback), "reverted": rel(reverted),
                   "load_end": rel(load_end)},
        "first_bad_source": source,
        "revert_resolution_ms": _r(resolution * 1e3 if resolution is not None else None, 2),
        "rollback_ledger": rb_row,
        "clock": {"offset_s": round(offset, 6), "uncertainty_s": None if offset_err is None
                  else round(offset_err, 6), "same_clock": same_clock},
        "load": {"started_at": load_start, "duration_s": round(duration, 3), "requests": len(samples),
                 "achieved_rps": round(len(samples) / duration, 2)},
        "timeline": _timeline(samples, polls, rel, live, candidate),
        "errors": sorted({s.error for s in failed if s.error})[:20],
    }


def _rollback(last: Poll | None, ledger: Sequence[dict], candidate: str, client, offset: float,
              rollout_requested: float):
    """(the ledger's rollback row, when the rollback was decided, why, which guard): the
    rollout's end once it is rolled_back, else the ledger row's time."""
    phase = last.phase if last else None
    rows = [e for e in ledger if candidate in (e.get("bundle"), e.get("from_ref"), e.get("to_ref"))
            and (parse_ts(e.get("ts")) or 0) - offset >= rollout_requested - 1.0]
    rb_row = next((e for e in sorted(rows, key=lambda e: e.get("id", 0))
                   if e.get("action") == "rollback"), None)
    ended = client(last.ended_at) if last and last.ended_at else None
    rollback = ended if phase == "rolled_back" else None
    if rollback is None and rb_row is not None:
        rollback = client(parse_ts(rb_row.get("ts")))
    reason = (last.reason if last and phase == "rolled_back" else None) or \
        (rb_row.get("reason") if rb_row else None)
    guard = ((rb_row or {}).get("metrics") or {}).get("guard") or reason
    return rb_row, rollback, reason, guard


def _first_bad(cand_hits: Sequence[Sample], ours: Sequence[Poll], polls: Sequence[Poll], client,
               started: float | None) -> tuple[float | None, str | None]:
    """(when the first request reached the candidate, which evidence says so): the client's
    first answer by it, or the server's last poll before its window filled, if earlier;
    never before the rollout started."""
    first_bad, source = None, None
    if cand_hits:
        first_bad, source = cand_hits[0].start, "client: first request answered by the candidate"
    seen = [p for p in ours if p.cand_requests]
    if seen:
        i = polls.index(seen[0])
        prev = next((q for q in reversed(polls[:i]) if q.phase == "running" and not q.cand_requests), None)
        bound = client(prev.server_now) if prev is not None and prev.server_now is not None else started
        if bound is not None and (first_bad is None or bound < first_bad):
            first_bad, source = bound, "server: last poll before the candidate window filled"
    if first_bad is not None and started is not None and first_bad < started:
        first_bad = started
    return first_bad, source


def _reverted(samples: Sequence[Sample], cand_hits: Sequence[Sample], live: str,
              rollback: float | None) -> tuple[float | None, float | None]:
    """(the start of the first request live answered after the rollback and the last
    request that reached the candidate, how much earlier the revert may have been)."""
    if rollback is None:
        return None, None
    anchor = max([rollback] + [s.start for s in cand_hits])
    nxt = next((s for s in samples if s.start > anchor and s.ok and s.bundle == live), None)
    if nxt is None:
        return None, None
    # the revert happened after the request before nxt started
    before_nxt = [s.start for s in samples if s.start < nxt.start]
    return nxt.start, nxt.start - max([rollback] + before_nxt)


def _candidate_counts(ours: Sequence[Poll]) -> tuple[int | None, int | None]:
    """(requests that reached the candidate, of which retried on live) from the server's
    windows, which restart each step: each step's last count, summed."""
    per_step: dict[int, tuple[int, int]] = {}
    for p in ours:
        if p.cand_requests is not None:
            r0, e0 = per_step.get(p.step or 0, (0, 0))
            per_step[p.step or 0] = (max(r0, p.cand_requests), max(e0, p.cand_errors or 0))
    if not per_step:
        return None, None
    return sum(r for r, _ in per_step.values()), sum(e for _, e in per_step.values())


def _verdict(phase: str | None, samples: Sequence[Sample], failed: Sequence[Sample], live: str,
             final_live: str | None, fault: dict, guard: str | None, rollback: float | None,
             reverted: float | None, same_clock: bool, offset_err: float | None) -> tuple[list[str], list[str]]:
    """(problems that fail the drill, warnings)."""
    problems, warnings = [], []
    if phase != "rolled_back":
        what = {None: "no rollout status was read", "running": "the rollout was still running",
                "pending_eval": "the rollout was still waiting for its eval gate",
                "promoted": "the faulty candidate was PROMOTED to live",
                "aborted": "the rollout ended aborted (by the drill's clean-up or a human), "
                           "not by a guard"}.get(phase, f"the rollout ended {phase}")
        problems.append(f"no automatic rollback: {what}")
    if failed:
        kinds = sorted({(s.error or "")[:80] for s in failed})
        problems.append(f"{len(failed)} request(s) failed at the client: " + "; ".join(kinds[:3]))
    if rollback is not None and reverted is None:
        problems.append("traffic did not return to live: no request answered by "
                        f"{live} after the rollback and the last candidate answer")
    if final_live is not None and final_live != live:
        problems.append(f"live changed during the drill: {live} -> {final_live}")
    if not samples:
        problems.append("no request completed")
    if guard and fault:
        want = [m for k in fault for m in EXPECTED_GUARD.get(k, ())]
        if want and not any(m in guard for m in want):
            warnings.append(f"rolled back by '{guard}', not by the guard the fault "
                            f"targets ({', '.join(want)})")
    if reverted is not None and rollback is not None and reverted - rollback > 1.0:
        warnings.append(f"revert took {(reverted - rollback) * 1e3:.0f} ms (target: under 1 s)")
    if not same_clock and offset_err is not None and offset_err > 0.05:
        warnings.append(f"clock offset to the server is uncertain by {offset_err * 1e3:.0f} ms; "
                        "detect/revert times carry that error")
    return problems, warnings


def _timeline(samples: Sequence[Sample], polls: Sequence[Poll], rel, live: str, candidate: str) -> dict:
    """Every request (start, latency, who answered, ok) and every poll's candidate share."""
    def who(s: Sample) -> str:
        if s.retried_from == candidate:
            return "retried"
        return "candidate" if s.bundle == candidate else ("live" if s.bundle == live else "other")

    return {
        "columns": ["start_s", "latency_ms", "answered_by", "ok"],
        "requests": [[rel(s.start), round(s.latency_ms, 2), who(s), s.ok] for s in samples],
        "weights_columns": ["t_s", "candidate_pct", "phase"],
        "weights": [[rel((p.sent + p.received) / 2), float(p.weights.get("candidate", 0.0)), p.phase]
                    for p in polls],
    }


# ---------------------------------------------------------------- the table

def format_ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:.0f} ms" if x >= 100 else f"{x:.1f} ms")


def format_table(rep: dict) -> str:
    f, ev = rep["figures"], rep["events"]
    fault = ", ".join(f"{k}={v}" for k, v in (rep.get("fault") or {}).items()) or "none declared"
    verdict = "PASS" if rep["passed"] else "FAIL"
    rows = [
        ("result", verdict, rep.get("reason") or "; ".join(rep["problems"]) or ""),
        ("time to detect", format_ms(f["time_to_detect_ms"]), "first request on the candidate -> rollback decision"),
        ("time to revert", format_ms(f["time_to_revert_ms"]),
         "rollback decision -> every new request on live"
         + (f" (resolution {rep['revert_resolution_ms']:.1f} ms)" if rep.get("revert_resolution_ms") else "")),
        ("served by candidate", str(f["served_by_candidate"]), f"answered by {rep['candidate']} (client-visible)"),
        ("candidate requests", "-" if f["candidate_requests"] is None else str(f["candidate_requests"]),
         "reached the candidate (server windows)"),
        ("retried on live", "-" if f["retried_on_live"] is None else str(f["retried_on_live"]),
         "failed on the candidate, answered by live"),
        ("failed requests", f"{f['failed_requests']} / {f['requests']}", "client-visible failures (must be 0)"),
    ]
    for ph in PHASES:
        rows.append((f"p99 latency {ph}", format_ms(f["p99_ms"][ph]),
                     f"n={f['phase_requests'][ph]}, p50 {format_ms(f['p50_ms'][ph])}"))
    load = rep.get("load", {})
    rows.append(("load", f"{load.get('requests', 0)} req",
                 f"{load.get('duration_s', 0):.1f} s, {load.get('achieved_rps', 0):.1f} req/s"
                 + (f", {rep['settings']['concurrency']} workers" if rep.get("settings") else "")))
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    head = (f"slotserve drill: {rep['candidate']} (faults: {fault}) against live {rep['live']}"
            + (f" at {rep['url']}" if rep.get("url") else ""))
    lines = [head, "-" * min(100, max(len(head), w1 + w2 + 40))]
    lines += [f"{a:<{w1}}  {b:>{w2}}  {c}" for a, b, c in rows]
    times = ", ".join(f"{k} {v:.2f}s" for k, v in ev.items() if v is not None)
    lines.append(f"{'events':<{w1}}  {'':>{w2}}  {times}")
    for w in rep.get("warnings", []):
        lines.append(f"warning: {w}")
    for p in rep["problems"]:
        lines.append(f"PROBLEM: {p}")
    return "\n".join(lines)

def format_quality(rep: dict) -> str:
    lines = [f"slotserve drill (quality): against live {rep['live']}" + (f" at {rep['url']}" if rep.get("url") else ""),
             f"result: {'PASS' if rep['passed'] else 'FAIL'}"]
    for r in rep["runs"]:
        scores = (f"eval_score {r['candidate_score']:.3g} vs live {r['live_score']:.3g}"
                  if r["candidate_score"] is not None else "no eval score")
        lines.append(f"  {r['case']:<9} {r['candidate']:<14} {r['outcome']:<12} (expected {r['expected']}) "
                     f"{scores}, gate {r['gate_s']:.1f} s")
    lines += [f"PROBLEM: {p}" for p in rep["problems"]]
    return "\n".join(lines)

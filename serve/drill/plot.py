"""The drill's plot: latency and the candidate's traffic share over time, events marked.

Draws a finished report (slotserve.drill.report.analyse) and nothing else, so a saved
report JSON can be re-plotted. matplotlib is imported on use: it is only in the dev
extra, and the drill runs without it unless `--plot` is asked for.
"""

from __future__ import annotations

import math

from slotserve.drill.report import format_ms
from slotserve.rollout.window import percentile

_COLORS = {"live": "#1f77b4", "candidate": "#ff7f0e", "retried": "#9467bd", "other": "#7f7f7f"}
_EVENTS = (("rollout_requested", "rollout requested", "#7f7f7f", ":"),
           ("rollout_started", "candidate gets traffic", "#2ca02c", "--"),
           ("first_bad", "first bad", "#ff7f0e", "-"),
           ("rollback", "rollback decision", "#d62728", "-"),
           ("reverted", "all new traffic on live", "#17becf", "--"))


def plot(rep: dict, path: str, bin_s: float = 0.5) -> str:
    """Latency (top) and traffic share (bottom) over time, events marked; writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reqs = rep["timeline"]["requests"]
    ev = rep["events"]
    end = max([r[0] + r[1] / 1e3 for r in reqs] + [ev.get("load_end") or 0, 1.0])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 7), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    for kind in ("live", "other", "candidate", "retried"):
        pts = [(r[0], r[1]) for r in reqs if r[2] == kind and r[3]]
        if pts:
            ax1.scatter(*zip(*pts), s=9, alpha=0.6, color=_COLORS[kind], label=f"answered by {kind}"
                        if kind != "retried" else "retried on live", linewidths=0)
    bad = [(r[0], max(r[1], 0.1)) for r in reqs if not r[3]]
    if bad:
        ax1.scatter(*zip(*bad), s=40, marker="x", color="#d62728", label=f"failed ({len(bad)})")
    # rolling p99 per bin (successful requests)
    nb = int(math.ceil(end / bin_s)) + 1
    bins: list[list[float]] = [[] for _ in range(nb)]
    share: list[list[int]] = [[0, 0] for _ in range(nb)]
    for t, ms, kind, ok in reqs:
        b = min(nb - 1, max(0, int(t // bin_s)))
        if ok:
            bins[b].append(ms)
        share[b][0] += 1
        share[b][1] += kind in ("candidate", "retried")
    xs = [i * bin_s + bin_s / 2 for i in range(nb)]
    p99 = [percentile(sorted(v), 0.99) if v else float("nan") for v in bins]
    ax1.plot(xs, p99, color="black", lw=1.2, label=f"p99 per {bin_s:g} s")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms, log)")
    ax1.grid(True, which="both", alpha=0.25)

    pct = [100.0 * c / n if n else float("nan") for n, c in share]
    ax2.bar(xs, pct, width=bin_s * 0.9, color=_COLORS["candidate"], alpha=0.7,
            label="share answered by the candidate (client view)")
    w = rep["timeline"]["weights"]
    if w:
        ax2.step([p[0] for p in w], [p[1] for p in w], where="post", color="black", lw=1.2,
                 ls="--", label="candidate weight (server)")
    ax2.set_ylim(0, 105)
    ax2.set_ylabel("candidate share (%)")
    ax2.set_xlabel("seconds since load started")
    ax2.grid(True, alpha=0.25)

    if ev.get("first_bad") is not None:
        stop = ev.get("reverted") or ev.get("rollback") or end
        for ax in (ax1, ax2):
            ax.axvspan(ev["first_bad"], stop, color="#d62728", alpha=0.08, lw=0)
    for key, label, color, ls in _EVENTS:
        t = ev.get(key)
        if t is None:
            continue
        for ax in (ax1, ax2):
            ax.axvline(t, color=color, ls=ls, lw=1.3, label=label if ax is ax1 else None)
    ax1.set_xlim(0, end)
    # legends beside the axes, never over the data
    ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    f = rep["figures"]
    fault = ", ".join(f"{k}={v}" for k, v in (rep.get("fault") or {}).items()) or "no fault"
    fig.suptitle(f"slotserve drill: {rep['candidate']} ({fault}) vs live {rep['live']} — "
                 f"{'PASS' if rep['passed'] else 'FAIL'}\n{rep.get('reason') or '; '.join(rep['problems'])}\n"
                 f"detect {format_ms(f['time_to_detect_ms'])} · revert {format_ms(f['time_to_revert_ms'])} · "
                 f"{f['served_by_candidate']} served by candidate · {f['retried_on_live'] or 0} retried on live · "
                 f"{f['failed_requests']} failed of {f['requests']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Compare a live response with its shadow (the candidate's answer to the same request).

The shadow is mirrored in the background and never reaches the client; the diff goes
into the candidate's metric window (`MetricWindow.record_shadow`), where it becomes
`shadow_disagreement` and `shadow_length_ratio`.

Token agreement only means something for greedy requests (temperature 0): a sampled
answer differs by design. Sequences are compared position by position, so one swapped
token costs one position rather than everything after it. Pass token ids when both
bundles share a tokenizer; when the candidate changes its tokenizer, pass words
(`text.split()`) instead — any sequences of comparable items work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence


@dataclass(frozen=True)
class ShadowDiff:
    greedy: bool
    token_agreement: float | None  # [0,1], greedy and both answered; else None
    length_ratio: float | None  # len(shadow) / len(live); None when either failed or live is empty
    live_error: bool = False
    shadow_error: bool = False
    live_safety_hit: bool = False
    shadow_safety_hit: bool = False

    @property
    def disagreement(self) -> float | None:
        """1.0 when exactly one side failed or hit the safety filter; 1 - agreement for
        greedy answers; None (not counted) for sampled answers that both succeeded."""
        if self.live_error != self.shadow_error or self.live_safety_hit != self.shadow_safety_hit:
            return 1.0
        if self.live_error:  # both failed the same way: the request, not the candidate
            return 0.0
        if self.token_agreement is None:
            return None
        return 1.0 - self.token_agreement


def token_agreement(live: Sequence[Hashable], shadow: Sequence[Hashable]) -> float:
    """Fraction of positions (over the longer sequence) where both hold the same item."""
    n = max(len(live), len(shadow))
    if n == 0:
        return 1.0
    same = sum(1 for a, b in zip(live, shadow) if a == b)
    return same / n


def compare(
    live: Sequence[Hashable] | None,
    shadow: Sequence[Hashable] | None,
    *,
    greedy: bool,
    live_error: bool = False,
    shadow_error: bool = False,
    live_safety_hit: bool = False,
    shadow_safety_hit: bool = False,
) -> ShadowDiff:
    """Diff two answers; a side that errored passes None (or sets its *_error flag)."""
    live_error = live_error or live is None
    shadow_error = shadow_error or shadow is None
    answered = not live_error and not shadow_error
    agreement = token_agreement(live, shadow) if answered and greedy else None
    ratio = len(shadow) / len(live) if answered and len(live) > 0 else None
    return ShadowDiff(
        greedy=greedy,
        token_agreement=agreement,
        length_ratio=ratio,
        live_error=live_error,
        shadow_error=shadow_error,
        live_safety_hit=live_safety_hit,
        shadow_safety_hit=shadow_safety_hit,
    )

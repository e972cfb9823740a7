"""Built-in safety filter: a small, configurable, case-insensitive blocklist.

It is a tripwire for the rollout guards (`safety_hit_rate`), not a content-moderation
system: the default list is deliberately short and catches only unambiguous output a
served model should never produce (step-by-step weapon/drug synthesis phrases, leaked
private-key blocks, US-SSN-shaped numbers). Extend or replace it per deployment:

    safety:                       # in a rollout spec, or the "safety" key of serving.json
      terms: ["internal-only", "acme secret"]   # literal phrases, whole-word, any case
      patterns: ["\\bpassword\\s*[:=]"]        # Python regexes, searched case-insensitively
      include_defaults: true                    # false: use only the terms/patterns above

During a rollout the same filter is applied to live and candidate, so their hit rates
compare like with like. Anything callable as `check(text) -> bool` (the `SafetyCheck`
protocol) can replace it, e.g. a call to an external classifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

# Literal phrases, matched case-insensitively and not inside a longer word.
DEFAULT_TERMS: tuple[str, ...] = (
    "how to make a bomb",
    "build a pipe bomb",
    "synthesize nerve agent",
    "synthesize sarin",
    "cook methamphetamine",
    "-----BEGIN RSA PRIVATE KEY-----",
    "-----BEGIN OPENSSH PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----",
)
# Regexes, searched case-insensitively.
DEFAULT_PATTERNS: tuple[str, ...] = (
    r"\b\d{3}-\d{2}-\d{4}\b",  # US social security number shape
)

_KEYS = ("terms", "patterns", "include_defaults")


class SafetyCheck(Protocol):
    """What the serving layer calls on every generated text: True means a hit."""

    def __call__(self, text: str) -> bool: ...


@dataclass(frozen=True)
class SafetyConfig:
    terms: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    include_defaults: bool = True

    def __post_init__(self) -> None:
        for t in self.terms:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"safety.terms must be non-empty strings; got {t!r}")
        for p in self.patterns:
            if not isinstance(p, str) or not p:
                raise ValueError(f"safety.patterns must be non-empty regex strings; got {p!r}")
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"safety.patterns: {p!r} is not a valid Python regex ({e})") from None
        if not isinstance(self.include_defaults, bool):
            raise ValueError(f"safety.include_defaults must be true or false; got {self.include_defaults!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SafetyConfig":
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"safety must be a mapping with keys {', '.join(_KEYS)}; got {type(d).__name__}")
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise ValueError(f"safety: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(_KEYS)}")
        lists = {}
        for k in ("terms", "patterns"):
            v = d.get(k, ())
            if isinstance(v, str) or not isinstance(v, (list, tuple)):
                raise ValueError(f"safety.{k} must be a list of strings; got {v!r}")
            lists[k] = tuple(v)
        return cls(include_defaults=d.get("include_defaults", True), **lists)

    def to_dict(self) -> dict[str, Any]:
        return {"terms": list(self.terms), "patterns": list(self.patterns),
                "include_defaults": self.include_defaults}


class SafetyFilter:
    """`check(text) -> bool` over a compiled blocklist; `hits(text)` names what matched."""

    def __init__(self, config: SafetyConfig | None = None) -> None:
        self.config = config or SafetyConfig()
        terms = (DEFAULT_TERMS if self.config.include_defaults else ()) + self.config.terms
        patterns = (DEFAULT_PATTERNS if self.config.include_defaults else ()) + self.config.patterns
        # (label, compiled): terms are escaped and bounded so "bomb" does not hit "bombastic".
        self._rules: list[tuple[str, re.Pattern[str]]] = [
            (t, re.compile(r"(?<!\w)" + re.escape(t.strip()) + r"(?!\w)", re.IGNORECASE)) for t in terms
        ] + [(p, re.compile(p, re.IGNORECASE)) for p in patterns]

    @classmethod
    def from_config(cls, d: Mapping[str, Any] | None) -> "SafetyFilter":
        """Build from the `safety` mapping of a spec or serving.json (None: defaults)."""
        return cls(SafetyConfig.from_dict(d))

    def hits(self, text: str) -> list[str]:
        return [label for label, rx in self._rules if rx.search(text)]

    def check(self, text: str) -> bool:
        return any(rx.search(text) for _, rx in self._rules)

    __call__ = check

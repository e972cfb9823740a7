"""Bundle references: the ways a user names a bundle.

`name:version`   one published version              support-bot:3
`name@alias`     whatever an alias points at         support-bot@live
`name`           the newest version of that name     support-bot
`sha256:<hex>`   a digest or a prefix (>= 6 hex)     sha256:ab12cd

Parsing is pure; resolving a ref against the registry lives in the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slotserve.bundles.manifest import NAME_RE, BundleError

MIN_DIGEST_PREFIX = 6
MAX_VERSION = 2 ** 63 - 1     # the registry's SQLite INTEGER: a larger one cannot exist
VALID_FORMS = "NAME:VERSION, NAME@ALIAS, NAME (latest version) or sha256:HEX (at least 6 hex digits)"
_DIGEST_RE = re.compile(r"sha256:([0-9a-fA-F]{%d,64})" % MIN_DIGEST_PREFIX)


@dataclass(frozen=True)
class Ref:
    """Exactly one of the forms; `name` is None only for a digest ref."""

    name: str | None = None
    version: int | None = None
    alias: str | None = None
    digest_prefix: str | None = None  # lowercase hex, no "sha256:"

    @property
    def kind(self) -> str:
        if self.digest_prefix is not None:
            return "digest"
        if self.version is not None:
            return "version"
        if self.alias is not None:
            return "alias"
        return "latest"

    def __str__(self) -> str:
        if self.digest_prefix is not None:
            return f"sha256:{self.digest_prefix}"
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return str(self.name)


def parse_ref(text: str | Ref) -> Ref:
    """Parse a user-supplied reference; raises BundleError naming the valid forms."""
    if isinstance(text, Ref):
        return text
    if not isinstance(text, str):
        raise BundleError(f"invalid bundle reference {text!r}: use {VALID_FORMS}")
    s = text.strip()
    if s.startswith("sha256:"):
        m = _DIGEST_RE.fullmatch(s)
        if not m:
            raise BundleError(f"invalid bundle reference {text!r}: a digest ref is sha256: followed by "
                              f"{MIN_DIGEST_PREFIX} to 64 hex digits")
        return Ref(digest_prefix=m.group(1).lower())
    if "@" in s:
        name, _, alias = s.partition("@")
        if NAME_RE.fullmatch(name) and NAME_RE.fullmatch(alias):
            return Ref(name=name, alias=alias)
    elif ":" in s:
        name, _, version = s.partition(":")
        if NAME_RE.fullmatch(name) and version.isascii() and version.isdigit():
            if len(version) > len(str(MAX_VERSION)) or not 1 <= int(version) <= MAX_VERSION:
                raise BundleError(f"invalid bundle reference {text!r}: a version is between 1 and "
                                  f"{MAX_VERSION}; use {VALID_FORMS}")
            return Ref(name=name, version=int(version))
    elif NAME_RE.fullmatch(s):
        return Ref(name=s)
    raise BundleError(f"invalid bundle reference {text!r}: use {VALID_FORMS}")

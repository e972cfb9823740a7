"""Response ids that feedback can trust: signed by the app, naming who answered, rated once.

A thumbs-down rate can roll a candidate back, so `POST /v1/feedback` (a client endpoint,
no admin token) must count only responses this app actually gave, each at most once:

    chatcmpl-<24 hex random>-<16 hex of the bundle digest>-<slot>-<16 hex HMAC>

The HMAC covers everything before it, under a key every replica of an app derives from
the same secret (the admin token's sha256, which the replicas are given), so any replica
can check an id another one issued, with no shared state. The secret is read at every
use, so a rotated token re-keys at once (ids issued before then are refused, like the old
token). Without an admin token the key is random per process: ids then check only on the
replica that issued them.

Each replica answers a repeated rating with 409, and the controller, where every
replica's feedback meets, drops repeats that went to different replicas before they
reach a guard window (both with slotserve.rollout.feedback.RatedOnce).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from typing import Callable

# matched whole (fullmatch): a trailing newline or space would make a second spelling of
# one id, and ids are deduplicated by their text
_ID = re.compile(r"(?P<body>[a-z]+-[0-9a-f]{24}-(?P<digest>[0-9a-f]{16})-(?P<slot>[a-z_]{1,32}))-(?P<mac>[0-9a-f]{16})")


def key_for(admin_token_sha256: str) -> bytes:
    """The app's id-signing key, derived from the admin token's digest."""
    return hmac.new(admin_token_sha256.encode(), b"slotserve response ids v1", hashlib.sha256).digest()


class ResponseIds:
    """`secret()` -> the admin token's sha256 or None, asked at every use."""

    def __init__(self, secret: Callable[[], str | None] | None = None):
        self._secret = secret or (lambda: None)
        self._random = secrets.token_bytes(32)        # the key while no secret is configured
        self._cached: tuple[str | None, bytes] = (None, self._random)

    def _key(self) -> bytes:
        s = self._secret()
        if s != self._cached[0]:
            self._cached = (s, key_for(s) if s else self._random)
        return self._cached[1]

    def _mac(self, body: str) -> str:
        return hmac.new(self._key(), body.encode(), hashlib.sha256).hexdigest()[:16]

    def issue(self, prefix: str, digest: str, slot: str) -> str:
        """A new id for a response of the bundle with `digest` ("sha256:…") answered from `slot`."""
        body = f"{prefix}-{uuid.uuid4().hex[:24]}-{digest.split(':')[-1][:16]}-{slot}"
        return f"{body}-{self._mac(body)}"

    def check(self, rid: str) -> tuple[str, str] | None:
        """(16-hex digest prefix, slot) of an id this app issued; None for anything else."""
        m = _ID.fullmatch(rid)
        if m is None or not hmac.compare_digest(m["mac"], self._mac(m["body"])):
            return None
        return m["digest"], m["slot"]

"""The admin bearer token: where it is kept, how it is made, how a request is checked.

`SLOTSERVE_ADMIN_TOKEN` wins when set. Otherwise `slotserve serve` generates one and
keeps it at `$SLOTSERVE_HOME/admin_token` (mode 0600), where the admin CLI finds it.
Replicas are told only the token's sha256, so the secret never travels in the Serve
config (which the dashboard shows).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from slotserve.bundles.store import default_root

ENV = "SLOTSERVE_ADMIN_TOKEN"


def token_path(root: Path | None = None) -> Path:
    """Where the token file is: in the store's root ($SLOTSERVE_HOME by default)."""
    return (Path(root) if root else default_root()) / "admin_token"


def read_token(root: Path | None = None) -> str | None:
    """The token a client should send: the env var, else the token file, else None."""
    env = os.environ.get(ENV)
    if env:
        return env.strip()
    path = token_path(root)
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, PermissionError):
        return None
    return text or None


def ensure_token(root: Path | None = None) -> tuple[str, str]:
    """(token, where it comes from). Creates the token file (0600) when neither exists."""
    env = os.environ.get(ENV)
    if env:
        return env.strip(), f"${ENV}"
    path = token_path(root)
    existing = read_token(root)
    if existing:
        return existing, str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # O_EXCL + 0600 from the start: never a moment where the file is world-readable.
    tmp = path.with_name(f".admin_token.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token, str(path)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenCheck:
    """Compares a presented bearer token against the configured one, in constant time."""

    def __init__(self, sha256: str | None = None, root: Path | None = None):
        self._sha = sha256
        self._root = root

    def expected_sha(self) -> str | None:
        if self._sha:
            return self._sha
        token = read_token(self._root)  # read each time: rotating the file takes effect
        return digest(token) if token else None

    def check(self, authorization: str | None) -> str | None:
        """None when accepted, else the reason for a 401."""
        expected = self.expected_sha()
        if expected is None:
            return (f"admin API disabled: no admin token configured (set {ENV} or create "
                    f"{token_path(self._root)})")
        if not authorization:
            return "missing admin token: send 'Authorization: Bearer <token>'"
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return "malformed Authorization header: expected 'Bearer <token>'"
        if not hmac.compare_digest(digest(value.strip()), expected):
            return "invalid admin token"
        return None

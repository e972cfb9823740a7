"""The registry: SQLite (WAL) tables of published bundles, aliases and the ledger.

The ledger and the bundles table are append-only *in the database*: triggers abort
any UPDATE or DELETE, so no code path (ours or a hand-run sqlite3 shell) can
rewrite history short of dropping the table. Every method opens its own short-lived
connection, so a Registry can be shared between threads; writers serialise on
`BEGIN IMMEDIATE` (busy-wait up to `timeout` seconds).
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from slotserve.bundles.manifest import BundleError, check_name

# Actions other parts record; the column accepts any lowercase identifier.
KNOWN_ACTIONS = ("publish", "alias", "load", "evict", "promote", "rollback", "rollout_start",
                 "rollout_step", "breach", "alert", "abort", "drill")
RESERVED_ALIASES = ("latest",)  # resolved from the bundles table, never stored
_ACTION_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
SCHEMA_VERSION = 2  # 2: the state table

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 1),
    digest      TEXT NOT NULL UNIQUE,
    content_key TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    manifest    TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS bundles_by_content ON bundles (name, content_key);
CREATE TABLE IF NOT EXISTS aliases (
    name       TEXT NOT NULL,
    alias      TEXT NOT NULL,
    version    INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES bundles (name, version)
);
CREATE TABLE IF NOT EXISTS ledger (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    ts       TEXT NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    bundle   TEXT,
    from_ref TEXT,
    to_ref   TEXT,
    alias    TEXT,
    reason   TEXT NOT NULL DEFAULT '',
    metrics  TEXT
);
-- Small mutable documents owned by the serving controller (its desired state, the
-- rollout in progress), keyed by name; history lives in the ledger, not here.
CREATE TABLE IF NOT EXISTS state (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: rows cannot be updated'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: rows cannot be deleted'); END;
CREATE TRIGGER IF NOT EXISTS bundles_no_update BEFORE UPDATE ON bundles
BEGIN SELECT RAISE(ABORT, 'bundles are immutable: publish a new version'); END;
CREATE TRIGGER IF NOT EXISTS bundles_no_delete BEFORE DELETE ON bundles
BEGIN SELECT RAISE(ABORT, 'bundles are immutable: publish a new version'); END;
"""


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class BundleRecord:
    name: str
    version: int
    digest: str
    content_key: str
    created_at: str
    created_by: str
    manifest_json: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    ts: str
    actor: str
    action: str
    bundle: str | None
    from_ref: str | None
    to_ref: str | None
    alias: str | None
    reason: str
    metrics: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _bundle(row: sqlite3.Row) -> BundleRecord:
    return BundleRecord(row["name"], row["version"], row["digest"], row["content_key"],
                        row["created_at"], row["created_by"], row["manifest"])


class Txn:
    """Queries bound to one connection inside `BEGIN IMMEDIATE` (see Registry.transaction)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def get(self, name: str, version: int) -> BundleRecord | None:
        row = self.conn.execute("SELECT * FROM bundles WHERE name=? AND version=?", (name, version)).fetchone()
        return _bundle(row) if row else None

    def latest(self, name: str) -> BundleRecord | None:
        row = self.conn.execute("SELECT * FROM bundles WHERE name=? ORDER BY version DESC LIMIT 1",
                                (name,)).fetchone()
        return _bundle(row) if row else None

    def find_content(self, name: str, content_key: str) -> BundleRecord | None:
        row = self.conn.execute("SELECT * FROM bundles WHERE name=? AND content_key=? ORDER BY version LIMIT 1",
                                (name, content_key)).fetchone()
        return _bundle(row) if row else None

    def by_digest_prefix(self, hex_prefix: str) -> list[BundleRecord]:
        p = "sha256:" + hex_prefix
        rows = self.conn.execute("SELECT * FROM bundles WHERE substr(digest, 1, ?) = ? ORDER BY name, version",
                                 (len(p), p)).fetchall()
        return [_bundle(r) for r in rows]

    def list_bundles(self, name: str | None = None) -> list[BundleRecord]:
        if name is None:
            rows = self.conn.execute("SELECT * FROM bundles ORDER BY name, version").fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM bundles WHERE name=? ORDER BY version", (name,)).fetchall()
        return [_bundle(r) for r in rows]

    def get_alias(self, name: str, alias: str) -> int | None:
        row = self.conn.execute("SELECT version FROM aliases WHERE name=? AND alias=?", (name, alias)).fetchone()
        return row[0] if row else None

    def aliases(self, name: str | None = None) -> dict[str, dict[str, int]]:
        q, args = "SELECT name, alias, version FROM aliases", ()
        if name is not None:
            q, args = q + " WHERE name=?", (name,)
        out: dict[str, dict[str, int]] = {}
        for n, a, v in self.conn.execute(q + " ORDER BY name, alias", args):
            out.setdefault(n, {})[a] = v
        return out

    def insert_bundle(self, rec: BundleRecord) -> None:
        self.conn.execute(
            "INSERT INTO bundles (name, version, digest, content_key, created_at, created_by, manifest) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rec.name, rec.version, rec.digest, rec.content_key, rec.created_at, rec.created_by, rec.manifest_json))

    def record(self, action: str, actor: str, bundle: str | None = None, from_: str | None = None,
               to: str | None = None, reason: str = "", metrics: dict[str, Any] | None = None,
               alias: str | None = None) -> int:
        if not isinstance(action, str) or not _ACTION_RE.fullmatch(action):
            raise BundleError(f"invalid ledger action {action!r}: use a lowercase identifier such as "
                              + ", ".join(KNOWN_ACTIONS))
        if not isinstance(actor, str) or not actor.strip():
            raise BundleError("a ledger entry needs a non-empty actor (who made the change)")
        if metrics is not None and not isinstance(metrics, dict):
            raise BundleError(f"ledger metrics must be a dict of name -> value, got {type(metrics).__name__}")
        cur = self.conn.execute(
            "INSERT INTO ledger (ts, actor, action, bundle, from_ref, to_ref, alias, reason, metrics) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (utc_now(), actor, action, bundle, from_, to, alias, reason or "",
             None if metrics is None else json.dumps(metrics, sort_keys=True, default=str)))
        return int(cur.lastrowid)

    def set_alias(self, name: str, alias: str, version: int, actor: str, reason: str = "",
                  action: str = "alias", metrics: dict[str, Any] | None = None) -> int:
        check_name(name)
        check_name(alias, "alias")
        if alias in RESERVED_ALIASES:
            raise BundleError(f"alias {alias!r} is reserved (it always means the newest version)")
        if self.get(name, version) is None:
            raise BundleError(f"cannot point {name}@{alias} at {name}:{version}: no such bundle is published")
        old = self.get_alias(name, alias)
        self.conn.execute(
            "INSERT INTO aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, alias) DO UPDATE SET version=excluded.version, updated_at=excluded.updated_at",
            (name, alias, version, utc_now()))
        return self.record(action, actor, f"{name}:{version}", None if old is None else f"{name}:{old}",
                           f"{name}:{version}", reason, metrics, alias=alias)

    def clear_alias(self, name: str, alias: str, actor: str, reason: str = "", action: str = "alias") -> int | None:
        old = self.get_alias(name, alias)
        if old is None:
            return None
        self.conn.execute("DELETE FROM aliases WHERE name=? AND alias=?", (name, alias))
        return self.record(action, actor, f"{name}:{old}", f"{name}:{old}", None, reason, alias=alias)

    def ledger(self, limit: int = 50, bundle: str | None = None) -> list[LedgerEntry]:
        """Newest first. `bundle` is `name:version` (exact) or `name` (every version);
        it matches the bundle, from or to column."""
        q, args = "SELECT * FROM ledger", []
        if bundle is not None:
            if ":" in bundle:
                q += " WHERE ? IN (bundle, from_ref, to_ref)"
                args.append(bundle)
            else:
                prefix = bundle + ":"
                q += " WHERE " + " OR ".join(f"substr({c}, 1, ?) = ?" for c in ("bundle", "from_ref", "to_ref"))
                args += [len(prefix), prefix] * 3
        q += " ORDER BY id DESC LIMIT ?"
        args.append(int(limit))
        return [LedgerEntry(r["id"], r["ts"], r["actor"], r["action"], r["bundle"], r["from_ref"], r["to_ref"],
                            r["alias"], r["reason"], None if r["metrics"] is None else json.loads(r["metrics"]))
                for r in self.conn.execute(q, args)]


class Registry:
    def __init__(self, path: str | Path, timeout: float = 60.0):
        self.path = Path(path)
        self.timeout = timeout
        try:
            with closing(self._connect()) as conn:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    # One transaction; IF NOT EXISTS keeps a concurrent first open harmless.
                    conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
        except sqlite3.Error as exc:
            raise BundleError(f"cannot open the registry at {self.path}: {exc} "
                              "(the store directory must be readable and writable)") from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=FULL")  # a committed publish survives power loss
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        """One write transaction (BEGIN IMMEDIATE): commits on success, rolls back on error."""
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield Txn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[Txn]:
        with closing(self._connect()) as conn:
            yield Txn(conn)

    # Read helpers (each its own connection).
    def get(self, name: str, version: int) -> BundleRecord | None:
        with self._read() as t:
            return t.get(name, version)

    def latest(self, name: str) -> BundleRecord | None:
        with self._read() as t:
            return t.latest(name)

    def by_digest_prefix(self, hex_prefix: str) -> list[BundleRecord]:
        with self._read() as t:
            return t.by_digest_prefix(hex_prefix)

    def find_content(self, name: str, content_key: str) -> BundleRecord | None:
        with self._read() as t:
            return t.find_content(name, content_key)

    def list_bundles(self, name: str | None = None) -> list[BundleRecord]:
        with self._read() as t:
            return t.list_bundles(name)

    def get_alias(self, name: str, alias: str) -> int | None:
        with self._read() as t:
            return t.get_alias(name, alias)

    def aliases(self, name: str | None = None) -> dict[str, dict[str, int]]:
        with self._read() as t:
            return t.aliases(name)

    def ledger(self, limit: int = 50, bundle: str | None = None) -> list[LedgerEntry]:
        with self._read() as t:
            return t.ledger(limit, bundle)

    # Controller state: one JSON document per key.
    def get_state(self, key: str) -> dict[str, Any] | None:
        with self._read() as t:
            row = t.conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row["value"])

    def put_state(self, key: str, value: dict[str, Any]) -> None:
        """Replace the document under `key` in one transaction.

        synchronous=NORMAL here: in WAL mode the commit survives a crash of the process
        without an fsync, so a rollback is not held up by the disk (publishes keep FULL)."""
        text = json.dumps(value, sort_keys=True, default=str)
        with closing(self._connect()) as conn:
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("INSERT INTO state (key, value, updated_at) VALUES (?, ?, ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                         "updated_at = excluded.updated_at", (key, text, utc_now()))

    # Writes (each one transaction).
    def record(self, action: str, actor: str, bundle: str | None = None, from_: str | None = None,
               to: str | None = None, reason: str = "", metrics: dict[str, Any] | None = None) -> int:
        """Append one ledger row; returns its id."""
        with self.transaction() as t:
            return t.record(action, actor, bundle, from_, to, reason, metrics)

    def set_alias(self, name: str, alias: str, version: int, actor: str, reason: str = "",
                  action: str = "alias", metrics: dict[str, Any] | None = None) -> int:
        """Point `name@alias` at `name:version` and record it (as `action`) in the ledger."""
        with self.transaction() as t:
            return t.set_alias(name, alias, version, actor, reason, action, metrics)

    def clear_alias(self, name: str, alias: str, actor: str, reason: str = "", action: str = "alias") -> int | None:
        with self.transaction() as t:
            return t.clear_alias(name, alias, actor, reason, action)

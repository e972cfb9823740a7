"""Registry: WAL, aliases, and a ledger that the database itself keeps append-only."""

import sqlite3

import pytest

from slotserve.bundles.manifest import BundleError
from slotserve.bundles.registry import BundleRecord, Registry


def add(reg: Registry, name: str, version: int) -> None:
    with reg.transaction() as t:
        t.insert_bundle(BundleRecord(name, version, f"sha256:{name}{version:0>60}", "k" + str(version),
                                     "2026-01-01T00:00:00Z", "alice", "{}"))


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "registry.db")
    add(r, "bot", 1)
    add(r, "bot", 2)
    add(r, "other", 1)
    return r


def test_wal_and_tables(reg):
    with sqlite3.connect(reg.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"bundles", "aliases", "ledger"} <= tables
    Registry(reg.path)  # re-opening an existing registry is harmless


def test_record_and_ledger_newest_first(reg):
    i1 = reg.record("publish", "alice", "bot:1", None, "bot:1", "first")
    i2 = reg.record("breach", "controller", "bot:2", "bot:2", "bot:1", "p99 too high",
                    {"p99_latency_ms": 812.5, "window": 50})
    rows = reg.ledger(limit=10)
    assert [r.id for r in rows] == [i2, i1]
    assert rows[0].metrics == {"p99_latency_ms": 812.5, "window": 50}
    assert rows[0].to_dict()["reason"] == "p99 too high" and rows[0].ts.endswith("Z")
    assert len(reg.ledger(limit=1)) == 1


def test_ledger_filter_by_bundle(reg):
    reg.record("publish", "a", "bot:1", None, "bot:1")
    reg.record("rollback", "a", "bot:1", "bot:2", "bot:1")
    reg.record("publish", "a", "other:1", None, "other:1")
    reg.record("alert", "a", None, None, None, "no bundle")
    assert [e.action for e in reg.ledger(bundle="bot")] == ["rollback", "publish"]
    assert [e.action for e in reg.ledger(bundle="bot:2")] == ["rollback"]
    assert [e.action for e in reg.ledger(bundle="other")] == ["publish"]
    assert reg.ledger(bundle="bo") == []  # a name is not a prefix match


@pytest.mark.parametrize("sql", [
    "UPDATE ledger SET actor = 'mallory'",
    "UPDATE ledger SET reason = '' WHERE id = 1",
    "DELETE FROM ledger",
    "DELETE FROM ledger WHERE id = 1",
    "UPDATE bundles SET digest = 'sha256:0'",
    "DELETE FROM bundles WHERE name = 'bot'",
])
def test_history_is_append_only_in_the_database(reg, sql):
    reg.record("publish", "alice", "bot:1", None, "bot:1", "first")
    with sqlite3.connect(reg.path) as conn:
        with pytest.raises(sqlite3.DatabaseError, match="append-only|immutable"):
            conn.execute(sql)
    assert len(reg.ledger()) == 1 and len(reg.list_bundles()) == 3


def test_aliases_are_recorded(reg):
    assert reg.get_alias("bot", "live") is None
    reg.set_alias("bot", "live", 1, "alice", "first deploy")
    reg.set_alias("bot", "live", 2, "ctrl", "promote", action="promote", metrics={"eval_score": 0.97})
    reg.set_alias("bot", "my-tag", 1, "alice")
    assert reg.get_alias("bot", "live") == 2
    assert reg.aliases() == {"bot": {"live": 2, "my-tag": 1}}
    e = reg.ledger(limit=3)
    assert (e[1].action, e[1].alias, e[1].from_ref, e[1].to_ref, e[1].metrics) == \
        ("promote", "live", "bot:1", "bot:2", {"eval_score": 0.97})
    assert (e[2].from_ref, e[2].to_ref, e[2].reason) == (None, "bot:1", "first deploy")
    assert reg.clear_alias("bot", "my-tag", "alice") is not None
    assert reg.get_alias("bot", "my-tag") is None and reg.ledger(limit=1)[0].to_ref is None
    assert reg.clear_alias("bot", "my-tag", "alice") is None


def test_bad_alias_writes_are_refused_and_leave_no_trace(reg):
    with pytest.raises(BundleError, match="no such bundle"):
        reg.set_alias("bot", "live", 9, "alice")
    with pytest.raises(BundleError, match="reserved"):
        reg.set_alias("bot", "latest", 1, "alice")
    with pytest.raises(BundleError, match="lowercase"):
        reg.set_alias("bot", "Live", 1, "alice")
    with pytest.raises(BundleError, match="action"):
        reg.record("Bad Action", "alice")
    with pytest.raises(BundleError, match="actor"):
        reg.record("publish", "")
    with pytest.raises(BundleError, match="metrics"):
        reg.record("breach", "a", metrics=[1, 2])
    assert reg.ledger() == [] and reg.aliases() == {}


def test_lookup_helpers(reg):
    assert reg.latest("bot").version == 2
    assert reg.latest("nope") is None
    assert reg.get("bot", 1).ref == "bot:1"
    assert [b.ref for b in reg.by_digest_prefix("bot")] == ["bot:1", "bot:2"]
    assert reg.find_content("bot", "k2").version == 2
    assert [b.ref for b in reg.list_bundles("bot")] == ["bot:1", "bot:2"]


def test_unopenable_registry_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="cannot open the registry"):
        Registry(tmp_path / "missing-dir" / "registry.db")


def test_corrupt_registry_is_a_clear_error(tmp_path):
    (tmp_path / "registry.db").write_bytes(b"not a database" * 100)
    with pytest.raises(BundleError, match="cannot open the registry .*not a database"):
        Registry(tmp_path / "registry.db")


def test_state_rows_replace_and_survive_reopen(tmp_path):
    from slotserve.bundles.registry import Registry

    reg = Registry(tmp_path / "registry.db")
    assert reg.get_state("serve:app") is None
    reg.put_state("serve:app", {"version": 1, "live": "demo:1"})
    reg.put_state("serve:app", {"version": 2, "live": "demo:2"})
    again = Registry(tmp_path / "registry.db")
    assert again.get_state("serve:app") == {"version": 2, "live": "demo:2"}

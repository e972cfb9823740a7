"""The `slotserve` bundle commands as a user runs them: real subprocesses of the
console script, --json output, one-line errors and non-zero exits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SLOTSERVE = Path(sys.executable).parent / "slotserve"


def run(*args, store: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [str(SLOTSERVE), *map(str, args)] + (["--store", str(store)] if store else [])
    e = {k: v for k, v in os.environ.items() if k != "SLOTSERVE_HOME"}  # never the user's store
    e.update({"SLOTSERVE_ACTOR": "ci-bot", **(env or {})})
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=e)


def ok_json(*args, store: Path) -> object:
    r = run(*args, "--json", store=store)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slotserve: error: "), r.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """demo-bundle --publish, then a second version via `bundle publish` with a drill config."""
    tmp = tmp_path_factory.mktemp("cli")
    store, out = tmp / "store", tmp / "demo"
    first = ok_json("demo-bundle", "--arch", "llama", "--seed", "3", "--out", out, "--publish", "bot", store=store)
    (tmp / "serving.json").write_text(json.dumps({"max_batch": 4, "faults": {"error_rate": 0.5}}))
    (tmp / "sys.txt").write_text("Answer in French.\n")
    second = ok_json("bundle", "publish", out, "--name", "bot", "--serving", tmp / "serving.json",
                     "--system-prompt", tmp / "sys.txt", "--retrieval-index", "kb@7", "--reason", "drill",
                     "--data-version", "d2", store=store)
    return {"store": store, "out": out, "tmp": tmp, "first": first, "second": second}


def test_demo_bundle_and_publish_json(published):
    first, second = published["first"], published["second"]
    assert first["out"] == str(published["out"]) and first["arch"] == "llama" and first["seed"] == 3
    assert first["published"]["created"] and first["published"]["ref"] == "bot:1"
    assert "model.safetensors" in first["files"]
    assert second["created"] and second["ref"] == "bot:2" and second["has_faults"]
    assert second["manifest"]["retrieval_index"]["id"] == "kb"
    assert second["manifest"]["created_by"] == "ci-bot"


def test_list_show_verify(published):
    store = published["store"]
    rows = ok_json("bundle", "list", store=store)
    assert [r["ref"] for r in rows] == ["bot:1", "bot:2"]
    show = ok_json("bundle", "show", "bot:2", store=store)
    assert show["path"] == str(store / "bundles" / "bot" / "2")
    assert Path(show["path"], "manifest.json").exists()
    assert show["faults"] == {"error_rate": 0.5} and show["serving"]["max_batch"] == 4
    assert show["manifest"]["lineage"]["data_version"] == "d2"
    text = run("bundle", "show", "bot", store=store).stdout
    assert "DECLARED (drill bundle)" in text and str(store / "bundles" / "bot" / "2") in text
    digest = rows[0]["digest"]
    assert ok_json("bundle", "show", digest[:15], store=store)["ref"] == "bot:1"
    v = ok_json("bundle", "verify", "bot:1", store=store)
    assert v["ok"] and v["ref"] == "bot:1" and v["files"] == 8
    assert run("bundle", "verify", "bot", store=store).stdout.startswith("ok bot:2")


def test_diff_and_ledger(published):
    store = published["store"]
    d = ok_json("bundle", "diff", "bot:1", "bot:2", store=store)
    assert d["weights_identical"] is True and not d["identical"]
    assert d["files"]["changed"] == ["prompt/system.txt", "serving.json"]
    assert d["serving"]["max_batch"] == [16, 4] and "retrieval_index" in d["fields"]
    assert "weights     identical" in run("bundle", "diff", "bot:1", "bot@latest", store=store).stdout
    ledger = ok_json("ledger", store=store)
    assert [(e["action"], e["to_ref"], e["actor"]) for e in ledger] == \
        [("publish", "bot:2", "ci-bot"), ("publish", "bot:1", "ci-bot")]
    assert ledger[0]["reason"] == "drill" and ledger[0]["from_ref"] == "bot:1"
    assert len(ok_json("ledger", "--limit", "1", "--bundle", "bot", store=store)) == 1
    assert [e["to_ref"] for e in ok_json("ledger", "--bundle", "bot:1", store=store)] == ["bot:2", "bot:1"]


def test_republish_is_reported_unchanged(published):
    r = ok_json("bundle", "publish", published["out"], "--name", "bot", "--serving",
                published["tmp"] / "serving.json", "--system-prompt", published["tmp"] / "sys.txt",
                "--retrieval-index", "kb@7", store=published["store"])
    assert r["created"] is False and r["ref"] == "bot:2"


def test_errors_are_one_line_and_non_zero(published, tmp_path):
    store = published["store"]
    assert_error(run("bundle", "show", "Bot!", store=store), "invalid bundle reference 'Bot!': use NAME:VERSION")
    assert_error(run("bundle", "show", "bot:9", store=store), "published versions of bot: 1, 2")
    assert_error(run("bundle", "verify", "nope", store=store), "no bundle named 'nope'")
    assert_error(run("ledger", "--bundle", "x@", store=store), "invalid bundle reference")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(run("bundle", "publish", empty, "--name", "x", store=store), "has no config.json")
    assert_error(run("bundle", "publish", published["out"], "--name", "Bad Name", store=store), "invalid bundle name")
    assert_error(run("bundle", "publish", published["out"], "--name", "x", "--retrieval-index", "kb",
                     store=store), "ID@VERSION")
    (tmp_path / "afile").write_text("x")
    assert_error(run("bundle", "list", store=tmp_path / "afile"), "not a directory")
    assert_error(run("bundle", "list", store=tmp_path / "nowhere"), "no bundle store at")
    assert_error(run("demo-bundle", "--out", tmp_path / "afile"), "not a directory")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "registry.db").write_bytes(b"this is not a database" * 100)
    assert_error(run("ledger", store=corrupt), "cannot open the registry")
    usage = run("bundle", store=None)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_tampered_bundle_fails_verify(published, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(published["store"], store)
    for d, _, _ in os.walk(store):
        os.chmod(d, 0o755)
    f = store / "bundles" / "bot" / "1" / "model" / "model.safetensors"
    os.chmod(f, 0o644)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    r = run("bundle", "verify", "bot:1", "--json", store=store)
    assert_error(r, "model/model.safetensors: sha256")
    assert json.loads(r.stdout)["ok"] is False
    m = store / "bundles" / "bot" / "2" / "manifest.json"
    os.chmod(m, 0o644)
    m.write_text(m.read_text().replace('"created_by": "ci-bot"', '"created_by": "mallory"'))
    assert_error(run("bundle", "show", "bot:2", store=store), "digest mismatch")


def test_unknown_architecture_refused(published, tmp_path):
    import shutil

    src = Path(shutil.copytree(published["out"], tmp_path / "src"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["NopeForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert_error(run("bundle", "publish", src, "--name", "x", store=tmp_path / "s"), "unknown architecture 'NopeForCausalLM'")


def test_store_defaults_to_slotserve_home(published):
    rows = json.loads(run("bundle", "list", "--json", env={"SLOTSERVE_HOME": str(published["store"])}).stdout)
    assert [r["ref"] for r in rows] == ["bot:1", "bot:2"]


def test_publish_from_a_bundle_is_a_prompt_only_change(published, tmp_path):
    """`bundle publish bot:1 --system-prompt F`: a new version that shares every weight
    blob (no extra weight bytes in the store) and names bot:1 as its parent."""
    store = published["store"]
    prompt = tmp_path / "system.txt"
    prompt.write_text("Answer in one short sentence.\n")
    before = sum(f.stat().st_size for f in (store / "blobs").rglob("*") if f.is_file())
    out = ok_json("bundle", "publish", "bot:1", "--name", "bot", "--system-prompt", prompt,
                  "--reason", "shorter answers", store=store)
    assert out["created"] and out["manifest"]["lineage"]["parent"] == published["first"]["published"]["digest"]
    after = sum(f.stat().st_size for f in (store / "blobs").rglob("*") if f.is_file())
    assert after - before < 1024  # only the new prompt's blob
    diff = ok_json("bundle", "diff", "bot:1", out["ref"], store=store)
    assert diff["files"]["changed"] + diff["files"]["added"] == ["prompt/system.txt"], diff
    assert_error(run("bundle", "publish", "bot:99", "--name", "bot", store=store),
                 "neither a directory nor a bundle in the store")

"""Hub checkpoints (`hub:ORG/REPO[@REVISION]`) as a user fetches them, without a network:
the hub client resolves them from a local hub cache laid out as a download leaves it
(blobs by hash, a snapshot per commit of links to them, refs/main naming the commit)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slotserve.bundles import hub
from slotserve.bundles.demo import build_demo_model
from slotserve.bundles.manifest import BundleError

SLOTSERVE = Path(sys.executable).parent / "slotserve"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, repo: str, model_dir: Path, extra: dict[str, bytes]) -> Path:
    """A hub cache holding `model_dir`'s files (+ `extra`) as commit COMMIT of `repo`, main -> COMMIT."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    files = {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    for rel, data in {**files, **extra}.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    model = build_demo_model("llama", 0, tmp / "model")
    weights = (model / "model.safetensors").read_bytes()
    index = json.dumps({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}})
    # what real repos carry beside the HF checkpoint: pickles, and the same weights in another layout
    _hub_cache(tmp / "cache", "acme/tiny-llama", model, {
        "pytorch_model.bin": b"pickle, never loaded", "consolidated.safetensors": weights,
        "model.safetensors.index.json": index.encode()})
    pickled = tmp / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((model / "config.json").read_bytes())
    _hub_cache(tmp / "cache", "acme/pickled", pickled, {"pytorch_model.bin": b"pickle"})
    return tmp / "cache"


def test_a_pickle_only_repo_is_refused_by_name(cache):
    with pytest.raises(BundleError, match=r"hub:acme/pickled@0123456789abcdef.* has no safetensors weights"):
        hub.fetch("hub:acme/pickled", cache_dir=cache, offline=True)


def test_parse_and_refuse_malformed_references():
    assert hub.parse("hub:acme/tiny@v1.0") == ("acme/tiny", "v1.0")
    assert hub.parse("hub:acme/tiny") == ("acme/tiny", None)
    for bad in ("hub:tiny", "hub:acme/tiny@a@b", "hub:/x", "hub:acme/ti ny"):
        with pytest.raises(BundleError, match="hub:ORG/REPO@REVISION"):
            hub.parse(bad)


def test_fetch_resolves_the_revision_to_its_commit(cache):
    snap = hub.fetch("hub:acme/tiny-llama@main", cache_dir=cache, offline=True)
    assert snap.commit == COMMIT and snap.repo == "acme/tiny-llama"
    assert (snap.path / "config.json").exists() and str(snap.source) == f"hub:acme/tiny-llama@{COMMIT}"


def test_missing_repo_is_a_clear_error(cache):
    with pytest.raises(BundleError, match=r"cannot fetch hub:acme/nope@main in the local hub cache.*hf download"):
        hub.fetch("hub:acme/nope@main", cache_dir=cache, offline=True)


def test_publish_from_the_hub_pins_the_commit_and_skips_pickles(cache, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SLOTSERVE_HOME"}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", SLOTSERVE_ACTOR="ci-bot")
    r = subprocess.run([str(SLOTSERVE), "bundle", "publish", "hub:acme/tiny-llama", "--name", "tiny", "--json",
                        "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["manifest"]
    assert m["model"]["source"] == {"kind": "hub", "location": "acme/tiny-llama", "revision": COMMIT}
    assert not any(p.endswith(".bin") for p in m["files"]) and "model/config.json" in m["files"]
    # the index names model.safetensors: the other layout of the same weights is not published
    assert [p for p in m["files"] if p.endswith(".safetensors")] == ["model/model.safetensors"]

    bad = subprocess.run([str(SLOTSERVE), "bundle", "publish", "hub:acme/missing", "--name", "x",
                          "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=180, env=env)
    assert bad.returncode == 1 and "cannot fetch hub:acme/missing" in bad.stderr and "Traceback" not in bad.stderr


def test_engine_loads_a_hub_checkpoint(cache, monkeypatch):
    from slotserve.engine import Engine, SamplingParams

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with Engine.from_pretrained("hub:acme/tiny-llama") as eng, \
            Engine.from_pretrained(cache / "models--acme--tiny-llama" / "snapshots" / COMMIT) as ref:
        assert eng.path == "lean"
        assert eng.generate([[5, 6, 7]], sp) == ref.generate([[5, 6, 7]], sp)

"""Publishing never leaves the source tree, and "already published" vouches only for an
intact stored copy (issue 14 #9): real files, a tiny real model, the `slotserve bundle` CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slotserve.bundles.demo import build_demo_model
from slotserve.bundles.manifest import BundleError
from slotserve.bundles.store import Store


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory) -> Path:
    return build_demo_model("llama", 0, tmp_path_factory.mktemp("src") / "demo")


@pytest.fixture
def src(demo_src, tmp_path) -> Path:
    return Path(shutil.copytree(demo_src, tmp_path / "src"))


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


def _outside(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / "elsewhere" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text(text)
    return p


@pytest.mark.parametrize("rel", ["prompt/system.txt", "serving.json", "tokenizer_config.json",
                                 "generation_config.json", "model.safetensors"])
def test_a_symlink_out_of_the_source_tree_is_refused(store, src, tmp_path, rel):
    target = src / rel
    if target.exists():                              # the real file, moved out of the tree
        outside = tmp_path / "elsewhere" / target.name
        outside.parent.mkdir(exist_ok=True)
        shutil.move(target, outside)
    else:
        outside = _outside(tmp_path, target.name, "{}" if rel.endswith(".json") else "secret host name\n")
    target.parent.mkdir(exist_ok=True)
    os.symlink(outside, target)
    with pytest.raises(BundleError, match="outside the source directory") as ei:
        store.publish(src, "bot")
    assert str(outside) in str(ei.value)
    assert store.list() == [] and not (store.root / "bundles" / "bot").exists()


def test_a_symlink_inside_the_tree_is_followed(store, src):
    (src / "prompts").mkdir()
    (src / "prompt" / "system.txt").unlink(missing_ok=True)
    (src / "prompts" / "v1.txt").write_text("You are terse.\n")
    (src / "prompt").mkdir(exist_ok=True)
    os.symlink("../prompts/v1.txt", src / "prompt" / "system.txt")
    m = store.publish(src, "bot")
    assert (store.path_of("bot", m.version) / "prompt" / "system.txt").read_text() == "You are terse.\n"


def test_a_named_file_may_live_anywhere(store, src, tmp_path):
    prompt = _outside(tmp_path, "p.txt", "Be kind.\n")
    m = store.publish(src, "bot", system_prompt=prompt)
    assert (store.path_of("bot", m.version) / "prompt" / "system.txt").read_text() == "Be kind.\n"


def test_a_hub_style_snapshot_may_link_to_its_cache(store, src, tmp_path):
    """A hub cache snapshot links its files to ../../blobs: allowed inside `contain`."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, blobs / f.name)
            os.symlink(f"../../blobs/{f.name}", snap / f.name)
    with pytest.raises(BundleError, match="outside the source directory"):
        store.publish(snap, "bot")
    assert store.publish_detailed(snap, "bot", contain=repo).created


def test_republish_reverifies_the_stored_copy(store, src):
    m = store.publish(src, "bot")
    assert not store.publish_detailed(src, "bot").created         # intact: a no-op, as before
    f = store.path_of("bot", m.version) / "model" / "model.safetensors"
    os.chmod(f, 0o644)
    with open(f, "r+b") as fh:
        fh.seek(1000)
        b = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([b[0] ^ 1]))
    with pytest.raises(BundleError, match=r"already published as bot:1, but its stored copy is damaged: "
                                          r".*model/model\.safetensors"):
        store.publish(src, "bot")


def test_cli_republish_of_a_damaged_copy_is_an_error(store, src):
    store.publish(src, "bot")
    f = store.path_of("bot", 1) / "model" / "config.json"
    os.chmod(f, 0o644)
    f.write_text(f.read_text() + " ")
    env = {**os.environ, "SLOTSERVE_HOME": str(store.root)}
    out = subprocess.run([sys.executable, "-m", "slotserve.cli", "bundle", "publish", str(src), "--name", "bot"],
                         capture_output=True, text=True, env=env, cwd=str(src.parent))
    assert out.returncode != 0, out.stdout
    assert "damaged" in out.stderr + out.stdout and "already published" not in out.stdout

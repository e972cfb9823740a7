"""Real processes: concurrent publishers get distinct versions; a publisher killed with
SIGKILL at any stage leaves no partial bundle visible and a store that still works."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slotserve.bundles.demo import build_demo_model
from slotserve.bundles.file_hash import hash_file
from slotserve.bundles.publishing import CRASH_ENV, CRASH_POINTS
from slotserve.bundles.store import Store

# Child: open the store, signal readiness, wait for the start file, publish, print the result.
CHILD = r"""
import sys, time
from pathlib import Path
import transformers  # warm the import the publish needs, so the racers start together
from slotserve.bundles.store import Store
root, src, name, ready, go = sys.argv[1:6]
store = Store(root)
Path(ready).touch()
while go != "-" and not Path(go).exists():
    time.sleep(0.002)
m = store.publish(src, name, actor="child", reason="race")
print(m.version, m.digest)
"""


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory) -> Path:
    return build_demo_model("qwen3", 1, tmp_path_factory.mktemp("src") / "demo")


def variant(demo_src: Path, dst: Path, prompt: str) -> Path:
    shutil.copytree(demo_src, dst)
    (dst / "prompt" / "system.txt").write_text(prompt)
    return dst


def spawn(root, src, name, ready, go="-", env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-P", "-c", CHILD, str(root), str(src), name, str(ready), str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_concurrent_publishers_get_distinct_versions(demo_src, tmp_path):
    root, go, n = tmp_path / "store", tmp_path / "go", 3
    srcs = [variant(demo_src, tmp_path / f"src{i}", f"prompt {i}\n") for i in range(n)]
    procs = [spawn(root, s, "bot", tmp_path / f"ready{i}", go) for i, s in enumerate(srcs)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    go.touch()  # all at once: they race for BEGIN IMMEDIATE
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [o[1][-2000:] for o in outs]
    versions = sorted(int(o[0].split()[0]) for o in outs)
    assert versions == list(range(1, n + 1))
    store = Store(root)
    assert [m.version for m in store.list("bot")] == versions
    for v in versions:
        store.verify(f"bot:{v}")
    assert sorted(e.to_ref for e in store.registry.ledger()) == [f"bot:{v}" for v in versions]
    assert os.listdir(root / "tmp") == []


def assert_no_partial_state(store: Store, expect_refs: list[str]) -> None:
    assert [m.ref for m in store.list()] == expect_refs
    for ref in expect_refs:
        store.verify(ref)
    for blob in (store.root / "blobs" / "sha256").iterdir():  # a blob is whole or absent
        assert hash_file(blob) == blob.name


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_mid_publish_leaves_nothing_half_written(demo_src, tmp_path, point):
    root = tmp_path / "store"
    src = variant(demo_src, tmp_path / "src", "crash test\n")
    p = spawn(root, src, "bot", tmp_path / "ready", env={CRASH_ENV: point})
    out, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, err[-2000:]

    store = Store(root)
    committed = point == "after_commit"
    assert_no_partial_state(store, ["bot:1"] if committed else [])
    assert [e.action for e in store.registry.ledger()] == (["publish"] if committed else [])
    if not committed:
        with pytest.raises(Exception, match="no bundle named 'bot'"):
            store.open("bot")

    removed = store.recover()  # debris of the dead publisher: staging dirs, unregistered dirs
    assert os.listdir(root / "tmp") == []
    on_disk = sorted(f"{d.parent.name}:{d.name}" for d in (root / "bundles").glob("*/*"))
    assert on_disk == (["bot:1"] if committed else [])
    if point == "after_rename":
        assert root / "bundles" / "bot" / "1" in removed

    # The store keeps working: the same publish now completes (or is a no-op).
    res = store.publish_detailed(src, "bot")
    assert res.manifest.version == 1 and res.created == (not committed)
    assert_no_partial_state(store, ["bot:1"])


def test_publish_cleans_up_debris_itself(demo_src, tmp_path):
    root = tmp_path / "store"
    src = variant(demo_src, tmp_path / "src", "debris\n")
    p = spawn(root, src, "bot", tmp_path / "ready", env={CRASH_ENV: "after_rename"})
    p.communicate(timeout=120)
    assert (root / "bundles" / "bot" / "1").is_dir()  # unregistered leftover of the dead publisher
    (src / "prompt" / "system.txt").write_text("another\n")
    m = Store(root).publish(src, "bot")  # no explicit recover(): publish does it under the lock
    assert m.version == 1
    assert Store(root).open("bot:1").system_prompt == "another\n"
    assert os.listdir(root / "tmp") == []

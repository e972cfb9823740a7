"""Store: publish, open+verify, immutability, refusals — on real files and a tiny real model."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from slotserve.bundles.demo import build_demo_model
from slotserve.bundles.manifest import BundleError, Lineage, Manifest
from slotserve.bundles.source import SERVING_DEFAULTS
from slotserve.bundles.store import Store


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory) -> Path:
    return build_demo_model("llama", 0, tmp_path_factory.mktemp("src") / "demo")


@pytest.fixture
def src(demo_src, tmp_path) -> Path:
    """A private, editable copy of the demo model dir."""
    return Path(shutil.copytree(demo_src, tmp_path / "src"))


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


def writable(path: Path) -> None:
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)


# ---- publish and layout ---------------------------------------------------------------------
def test_publish_layout_and_manifest(store, src):
    m = store.publish(src, "bot", actor="alice", reason="first", retrieval_index="kb@3#sha256:ab")
    assert (m.name, m.version, m.created_by) == ("bot", 1, "alice")
    assert m.digest.startswith("sha256:") and m.digest == m.compute_digest()
    assert set(m.files) == {
        "model/config.json", "model/generation_config.json", "model/model.safetensors",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
        "prompt/system.txt", "serving.json"}
    assert (m.model.architecture, m.model.model_type) == ("LlamaForCausalLM", "llama")
    assert m.model.source.kind == "local" and m.model.source.location == str(src.resolve())
    assert str(m.retrieval_index) == "kb@3#sha256:ab"
    assert m.lineage.parent is None and not m.has_faults
    b = store.open("bot:1")
    assert b.path == store.root / "bundles" / "bot" / "1"
    assert json.loads((b.path / "manifest.json").read_text())["digest"] == m.digest
    assert (b.model_dir / "config.json").exists() and (b.tokenizer_dir / "tokenizer.json").exists()
    assert b.system_prompt.startswith("You are a tiny demo model") and b.prompt_template is None
    e = store.registry.ledger()
    assert [(x.action, x.actor, x.bundle, x.to_ref, x.reason) for x in e] == \
        [("publish", "alice", "bot:1", "bot:1", "first")]


def test_serving_defaults_filled(store, src):
    b = store.open(store.publish(src, "bot").ref)
    s = b.serving
    assert s == {"dtype": "auto", "max_model_len": 512, "max_batch": 16, "kv_cache_tokens": 4096,
                 "sampling": dict(SERVING_DEFAULTS["sampling"])}


def test_serving_file_prompt_template_eval(store, src, tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"dtype": "bfloat16", "max_model_len": 256,
                                                 "sampling": {"temperature": 0.7}, "faults": {"latency_ms": 5}}))
    (tmp_path / "t.jinja").write_text("Context: {{ context }}\n{{ question }}")
    (tmp_path / "eval.jsonl").write_text('{"prompt": "hi", "expected": "hello"}\n\n{"prompt": "x"}\n')
    m = store.publish(src, "bot", serving=tmp_path / "s.json", prompt_template=tmp_path / "t.jinja",
                      eval_file=tmp_path / "eval.jsonl", system_prompt=tmp_path / "t.jinja")
    b = store.open(m.ref)
    assert b.serving["sampling"] == {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_tokens": 256}
    assert b.serving["faults"] == {"latency_ms": 5} and m.has_faults
    assert (b.path / "eval" / "eval.jsonl").exists() and "{{ question }}" in b.prompt_template


@pytest.mark.parametrize("serving, match", [
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"max_batch": True}, "max_batch"),
    ({"max_model_len": 100000}, r"max_model_len must be an integer in \[1, 512\]"),
    ({"kv_cache_tokens": 10, "kv_cache_bytes": 10}, "not both"),
    ({"sampling": {"top_p": 0}}, "top_p"),
    ({"sampling": {"temprature": 1}}, "unknown sampling key 'temprature'"),
    ({"max_btach": 1}, "unknown key 'max_btach'; valid keys: dtype"),
    ({"faults": [1]}, "faults must be an object"),
    ({"faults": {"error_rate": 3}}, "error_rate"),
])
def test_bad_serving_refused(store, src, serving, match):
    with pytest.raises(BundleError, match=match):
        store.publish(src, "bot", serving=serving)
    assert store.list() == []


def test_versions_monotonic_and_parent(store, src):
    m1 = store.publish(src, "bot")
    (src / "prompt" / "system.txt").write_text("Be brief.\n")
    m2 = store.publish(src, "bot")
    assert (m1.version, m2.version) == (1, 2)
    assert m2.lineage.parent == m1.digest
    assert store.resolve("bot").version == 2
    assert [m.ref for m in store.list()] == ["bot:1", "bot:2"]
    other = store.publish(src, "other-bot")
    assert other.version == 1  # versions are per name


def test_republish_identical_is_a_noop(store, src):
    m1 = store.publish(src, "bot", actor="alice")
    res = store.publish_detailed(src, "bot", actor="bob")
    assert not res.created and res.manifest == m1
    assert store.publish(src, "bot", version=1) == m1
    assert [e.action for e in store.registry.ledger()] == ["publish"]
    assert sorted(os.listdir(store.root / "bundles" / "bot")) == ["1"]


def test_overwrite_refused(store, src):
    store.publish(src, "bot")
    (src / "prompt" / "system.txt").write_text("different\n")
    with pytest.raises(BundleError, match="bot:1 already exists with different content"):
        store.publish(src, "bot", version=1)
    store.publish(src, "bot", version=5)
    (src / "prompt" / "system.txt").write_text("more different\n")
    with pytest.raises(BundleError, match="monotonic"):
        store.publish(src, "bot", version=3)
    with pytest.raises(BundleError, match="version is an integer >= 1"):
        store.publish(src, "bot", version=0)
    assert [m.version for m in store.list()] == [1, 5]


def test_published_files_are_read_only(store, src):
    b = store.open(store.publish(src, "bot").ref)
    for p in [b.path, *b.path.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o555 if p.is_dir() else 0o444), (p, oct(mode))


def test_blobs_are_content_addressed_and_shared(store, src):
    m1 = store.publish(src, "bot")
    (src / "prompt" / "system.txt").write_text("Be brief.\n")
    m2 = store.publish(src, "bot")
    w = "model/model.safetensors"
    assert m1.files[w] == m2.files[w]
    blob = store.root / "blobs" / "sha256" / m1.files[w].sha256
    assert blob.exists()
    a, b = (store.path_of("bot", v) / w for v in (1, 2))
    if a.stat().st_ino == blob.stat().st_ino:  # hard links where the filesystem has them
        assert b.stat().st_ino == blob.stat().st_ino


# ---- verification ---------------------------------------------------------------------------
def test_tampered_weight_is_refused_naming_the_file(store, src):
    m = store.publish(src, "bot")
    store.open(m.ref)  # a cached verification must not hide a later edit
    f = store.path_of("bot", 1) / "model" / "model.safetensors"
    writable(f)
    with open(f, "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 1]))
    for check in (store.open, store.verify):
        with pytest.raises(BundleError, match=r"bot:1 failed verification: model/model\.safetensors: sha256"):
            check("bot:1")


def test_truncated_missing_and_extra_files(store, src):
    store.publish(src, "bot")
    d = store.path_of("bot", 1)
    writable(d / "serving.json")
    (d / "serving.json").write_text("{}")
    os.chmod(d / "prompt", 0o755)
    (d / "prompt" / "system.txt").unlink()
    (d / "prompt" / "extra.txt").write_text("x")
    with pytest.raises(BundleError) as err:
        store.open("bot")
    msg = str(err.value)
    assert "serving.json: size 2" in msg and "missing file prompt/system.txt" in msg
    assert "unexpected file prompt/extra.txt" in msg


def test_hand_edited_manifest_is_refused(store, src):
    store.publish(src, "bot")
    f = store.path_of("bot", 1) / "manifest.json"
    writable(f)
    d = json.loads(f.read_text())
    d["created_by"] = "mallory"
    f.write_text(json.dumps(d))
    with pytest.raises(BundleError, match="digest mismatch"):
        store.open("bot:1")
    # Re-digesting the edit does not help: the registry remembers the published digest.
    m = Manifest.from_dict(d, check_digest=False).with_digest()
    f.write_text(m.to_json())
    with pytest.raises(BundleError, match="does not match the registry"):
        store.open("bot:1")


# ---- refs -----------------------------------------------------------------------------------
def test_resolve_all_ref_forms(store, src):
    m1 = store.publish(src, "bot")
    (src / "prompt" / "system.txt").write_text("Be brief.\n")
    m2 = store.publish(src, "bot")
    store.registry.set_alias("bot", "live", 1, "alice", "first deploy")
    assert store.open("bot@live").manifest == m1
    assert store.open("bot@latest").manifest == m2
    assert store.open("bot").manifest == m2
    assert store.open(m1.digest).manifest == m1
    assert store.open(m2.digest[:13]).manifest == m2
    assert store.aliases_of("bot", 1) == ["live"]
    with pytest.raises(BundleError, match="bot has no alias @previous; its aliases are: @live"):
        store.open("bot@previous")
    with pytest.raises(BundleError, match="published versions of bot: 1, 2"):
        store.open("bot:3")
    with pytest.raises(BundleError, match="no bundle named 'nope'"):
        store.open("nope")
    with pytest.raises(BundleError, match="invalid bundle reference"):
        store.open("Bot!")


def test_ambiguous_digest_prefix_lists_matches(store, src):
    m = store.publish(src, "bot")
    hexd = m.digest.removeprefix("sha256:")
    other = "0" if hexd[0] != "0" else "1"
    with pytest.raises(BundleError, match="no bundle has a digest starting with"):
        store.open("sha256:" + other + hexd[1:6])
    # Two real digests sharing 6 hex digits would take ~16M publishes: add registry rows
    # whose digests collide on purpose (resolution only consults the registry).
    from slotserve.bundles.registry import BundleRecord

    with store.registry.transaction() as t:
        for v, tail in ((7, "0" * 58), (8, "1" * 58)):
            t.insert_bundle(BundleRecord("fake", v, "sha256:abcdef" + tail, f"k{v}", "t", "x", "{}"))
    with pytest.raises(BundleError, match=r"ambiguous digest prefix sha256:abcdef matches fake:7 "
                                          r"\(sha256:abcdef000000\), fake:8 .*give more digits"):
        store.resolve("sha256:abcdef")
    assert store.resolve("sha256:abcdef1").ref == "fake:8"


# ---- refusals -------------------------------------------------------------------------------
def test_pickle_weights_refused(store, src):
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(BundleError, match=r"pickle weights \(pytorch_model\.bin\).*safetensors\.torch\.save_file"):
        store.publish(src, "bot")


def test_pickle_beside_safetensors_is_never_copied(store, src):
    (src / "training_args.bin").write_bytes(b"\x80\x04pickle")
    m = store.publish(src, "bot")
    assert not any(p.endswith(".bin") for p in m.files)


def test_missing_config_refused(store, src):
    (src / "config.json").unlink()
    with pytest.raises(BundleError, match="has no config.json"):
        store.publish(src, "bot")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(architectures=["FrobnicatorForCausalLM"]), "unknown architecture 'FrobnicatorForCausalLM'"),
    (lambda c: c.pop("architectures"), "must list the model class"),
    (lambda c: c.update(architectures=[]), "must list the model class"),
    (lambda c: c.pop("model_type"), "must set \"model_type\""),
    (lambda c: c.update(auto_map={"AutoModelForCausalLM": "x.Y"}), "trust_remote_code"),
])
def test_bad_architecture_refused(store, src, edit, match):
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=match):
        store.publish(src, "bot")


def test_other_source_problems(store, src, tmp_path):
    with pytest.raises(BundleError, match="is not a directory"):
        store.publish(tmp_path / "nope", "bot")
    with pytest.raises(BundleError, match="invalid bundle name 'Bot'"):
        store.publish(src, "Bot")
    (src / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="has no tokenizer"):
        store.publish(src, "bot")
    shutil.copy(src / "config.json", src / "tokenizer.json")
    (src / "model.safetensors").write_bytes(b"garbage!garbage!")
    with pytest.raises(BundleError, match="not a valid safetensors file"):
        store.publish(src, "bot")
    (src / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="no \\*.safetensors weights"):
        store.publish(src, "bot")
    (src / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        store.publish(src, "bot")
    assert store.list() == [] and os.listdir(store.root / "tmp") == []


def test_bad_eval_and_retrieval(store, src, tmp_path):
    (tmp_path / "e.jsonl").write_text('{"ok": 1}\n[1, 2]\n')
    with pytest.raises(BundleError, match="line 2: each line must be one JSON object"):
        store.publish(src, "bot", eval_file=tmp_path / "e.jsonl")
    with pytest.raises(BundleError, match="ID@VERSION"):
        store.publish(src, "bot", retrieval_index="kb")


def test_republish_from_a_bundle_dir(store, src, tmp_path):
    """A bundle's own layout is a valid source: change only the prompt, keep the weights."""
    m1 = store.publish(src, "bot", serving={"max_batch": 4}, data_version="d1", code_commit="c1")
    store.publish(src, "bot", serving={"max_batch": 8})
    (tmp_path / "sys.txt").write_text("New prompt.\n")
    m3 = store.publish(store.path_of("bot", 1), "bot", system_prompt=tmp_path / "sys.txt")
    assert m3.version == 3 and m3.weight_files() == m1.weight_files()
    assert store.open(m3.ref).serving["max_batch"] == 4
    # provenance follows the weights: source, code, data, and the bundle it came from
    assert m3.model.source == m1.model.source and m3.lineage == Lineage("c1", "d1", m1.digest)


def test_store_root_problems(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        Store(tmp_path / "file")
    with pytest.raises(BundleError, match="no bundle store at"):
        Store(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


def test_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTSERVE_HOME", str(tmp_path / "home"))
    assert Store().root == tmp_path / "home"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any directory")
def test_unreadable_store_is_a_clear_error(tmp_path):
    Store(tmp_path / "s")
    os.chmod(tmp_path / "s", 0)
    try:
        with pytest.raises(BundleError, match="store"):
            Store(tmp_path / "s")
    finally:
        os.chmod(tmp_path / "s", 0o755)


def test_store_without_access_is_a_clear_error(tmp_path, monkeypatch):
    Store(tmp_path / "s")
    # root bypasses permission bits, so simulate what an unprivileged user would see
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(BundleError, match="is not readable and writable by this user"):
        Store(tmp_path / "s")

"""Manifest: canonical JSON, digest over everything but the digest, hand edits detected."""

import json

import pytest

from slotserve.bundles.manifest import (BundleError, FileEntry, Lineage, Manifest, ModelInfo, ModelSource,
                                        RetrievalIndexRef, canonical_json, check_name, diff)

H1, H2 = "1" * 64, "2" * 64


def make(**kw) -> Manifest:
    base = dict(name="bot", version=1, created_at="2026-01-01T00:00:00.000000Z", created_by="alice",
                files={"model/model.safetensors": FileEntry(H1, 10), "serving.json": FileEntry(H2, 5)},
                model=ModelInfo("LlamaForCausalLM", "llama", ModelSource("hub", "org/repo", "abc123")),
                retrieval_index=RetrievalIndexRef("docs", "7", "sha256:ff"),
                lineage=Lineage("deadbeef", "data-v3", None), has_faults=False)
    base.update(kw)
    return Manifest(**base).with_digest()


def test_every_design_field_is_in_the_manifest():
    d = make().to_dict()
    for key in ("name", "version", "digest", "created_at", "created_by", "files", "model", "retrieval_index",
                "lineage", "has_faults"):
        assert key in d
    assert set(d["model"]) == {"architecture", "model_type", "source"}
    assert set(d["lineage"]) == {"code_commit", "data_version", "parent"}
    assert set(d["retrieval_index"]) == {"id", "version", "digest"}
    assert d["files"]["serving.json"] == {"sha256": H2, "size": 5}


def test_digest_is_over_canonical_json_without_digest():
    import hashlib

    m = make()
    body = {k: v for k, v in m.to_dict().items() if k != "digest"}
    assert m.digest == "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == b'{"a":[1,{"c":3,"d":2}],"b":1}'


def test_json_round_trip_and_file_order_independent():
    m = make()
    assert Manifest.from_json(m.to_json()) == m
    files = dict(reversed(list(m.files.items())))
    assert make(files=files).digest == m.digest


@pytest.mark.parametrize("field, value", [
    ("version", 2), ("created_by", "mallory"), ("has_faults", True), ("name", "bot2"),
])
def test_any_hand_edit_breaks_the_digest(field, value):
    d = json.loads(make().to_json())
    d[field] = value
    with pytest.raises(BundleError, match="digest mismatch"):
        Manifest.from_dict(d)


def test_nested_and_added_fields_break_the_digest():
    d = json.loads(make().to_json())
    d["files"]["serving.json"]["size"] = 6
    with pytest.raises(BundleError, match="digest mismatch"):
        Manifest.from_dict(d)
    d = json.loads(make().to_json())
    d["extra"] = 1
    with pytest.raises(BundleError, match="digest mismatch"):
        Manifest.from_dict(d)


def test_malformed_manifests():
    with pytest.raises(BundleError, match="not valid JSON"):
        Manifest.from_json("{nope")
    with pytest.raises(BundleError, match="malformed"):
        Manifest.from_dict({"format": 1, "name": "x"})
    with pytest.raises(BundleError, match="unsupported manifest format"):
        Manifest.from_dict({"format": 99})


def test_files_are_read_only():
    m = make()
    with pytest.raises(TypeError):
        m.files["x"] = FileEntry(H1, 1)


def test_sources_and_retrieval_refs_parse():
    assert ModelSource.parse("hub:Qwen/Qwen3-0.6B@c1899de") == ModelSource("hub", "Qwen/Qwen3-0.6B", "c1899de")
    assert str(ModelSource.parse("/models/x")) == "/models/x"
    assert RetrievalIndexRef.parse("kb@12") == RetrievalIndexRef("kb", "12", None)
    assert RetrievalIndexRef.parse("kb@12#sha256:ab") == RetrievalIndexRef("kb", "12", "sha256:ab")
    for bad in ("kb", "@1", "kb@", "kb@1#"):
        with pytest.raises(BundleError, match="ID@VERSION"):
            RetrievalIndexRef.parse(bad)
    with pytest.raises(BundleError, match="hub:ORG/REPO@REVISION"):
        ModelSource.parse("hub:org/repo")


def test_name_rule():
    assert check_name("a.b_c-1") == "a.b_c-1"
    for bad in ("", "A", "-a", "a b", "a/b", "a:b", "a@b"):
        with pytest.raises(BundleError, match="lowercase letters"):
            check_name(bad)


def test_diff_reports_files_fields_and_weights():
    a = make()
    b = make(version=2, files={**a.files, "serving.json": FileEntry("3" * 64, 5), "prompt/system.txt": FileEntry(H1, 1)})
    d = diff(a, b)
    assert d["weights_identical"] and not d["identical"]
    assert d["files"] == {"added": ["prompt/system.txt"], "removed": [], "changed": ["serving.json"],
                          "same": ["model/model.safetensors"]}
    assert d["fields"]["version"] == [1, 2]
    c = make(version=3, files={"model/model.safetensors": FileEntry(H2, 10), "serving.json": FileEntry(H2, 5)})
    assert not diff(a, c)["weights_identical"]
    assert diff(a, a)["identical"]

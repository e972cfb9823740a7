"""Publishing a PEFT LoRA adapter as a version of a base bundle: `slotserve bundle publish
ADAPTER_DIR --name NAME --base REF`, as a user runs it, and every refusal with its reason."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slotserve.bundles.demo import build_demo_adapter, build_demo_model
from slotserve.bundles.manifest import BundleError
from slotserve.bundles.store import Store

SLOTSERVE = Path(sys.executable).parent / "slotserve"


def cli(*args, store: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SLOTSERVE_HOME"}
    env["SLOTSERVE_ACTOR"] = "ci-bot"
    return subprocess.run([str(SLOTSERVE), *map(str, args), "--store", str(store)], capture_output=True,
                          text=True, timeout=180, env=env)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter")
    store = Store(tmp / "store")
    model = build_demo_model("llama", 0, tmp / "model")
    m = store.publish(model, "llama-base", reason="base")
    (tmp / "index").write_text("")
    return store, m, model, tmp


def test_cli_publishes_an_adapter_naming_its_base_by_digest(base):
    store, bm, model, tmp = base
    ad = build_demo_adapter(model, tmp / "ad1", seed=1, rank=4)
    r = cli("bundle", "publish", ad, "--name", "support-bot", "--base", "llama-base:1", "--json", store=store.root)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    man = out["manifest"]
    assert man["adapter"]["base"] == bm.digest and man["adapter"]["base_ref"] == "llama-base:1"
    assert man["adapter"]["rank"] == 4 and man["adapter"]["alpha"] == 8.0
    assert out["base"] == bm.digest
    # inherited from the base: the very same blobs (tokenizer, prompt, serving config, eval set, weights)
    for rel, e in bm.files.items():
        assert man["files"][rel] == e.to_dict(), rel
    assert set(man["files"]) - set(bm.files) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    path = store.path_of("support-bot", 1)
    assert os.stat(path / "model/model.safetensors").st_ino == os.stat(
        store.path_of("llama-base", 1) / "model/model.safetensors").st_ino
    assert cli("bundle", "verify", "support-bot:1", store=store.root).returncode == 0
    show = cli("bundle", "show", "support-bot:1", store=store.root)
    assert "LoRA r=4" in show.stdout and bm.digest in show.stdout
    # a prompt given at publish replaces the base's; diff says the weights differ (adapter)
    (tmp / "sys.txt").write_text("Be brief.\n")
    m2 = store.publish(ad, "support-bot", system_prompt=tmp / "sys.txt", base="llama-base:1")
    assert m2.version == 2 and (store.path_of("support-bot", 2) / "prompt/system.txt").read_text() == "Be brief.\n"
    d = cli("bundle", "diff", "llama-base:1", "support-bot:1", "--json", store=store.root)
    assert json.loads(d.stdout)["weights_identical"] is False
    # re-publishing the adapter version (a bundle as source) keeps the adapter and its base
    m3 = store.publish(store.path_of("support-bot", 2), "support-bot", serving={"max_batch": 4})
    assert m3.adapter == m2.adapter and "adapter/adapter_model.safetensors" in m3.files
    # publishing the same adapter again is a no-op
    again = cli("bundle", "publish", ad, "--name", "support-bot", "--base", "llama-base:1", store=store.root)
    assert again.returncode == 0 and "unchanged" in again.stdout


def _refused(store, ad, fragment, base="llama-base:1"):
    with pytest.raises(BundleError) as e:
        store.publish(ad, "bad-bot", base=base)
    assert fragment in str(e.value), str(e.value)
    assert not store.list("bad-bot")


def test_bad_adapters_are_refused_with_the_reason(base):
    store, bm, model, tmp = base
    good = build_demo_adapter(model, tmp / "good", seed=2, rank=4, targets=("q_proj", "v_proj"))
    _refused(store, good, "is not in the store", base="nope:1")

    def variant(name, cfg=None, drop=None, tensors=None):
        d = tmp / name
        shutil.copytree(good, d)
        if cfg:
            c = json.loads((d / "adapter_config.json").read_text())
            c.update(cfg)
            (d / "adapter_config.json").write_text(json.dumps(c))
        if drop:
            (d / drop).unlink()
        if tensors:
            t = load_file(d / "adapter_model.safetensors")
            tensors(t)
            save_file(t, d / "adapter_model.safetensors")
        return d

    _refused(store, variant("r", cfg={"r": 8}), "needs [8, 64]")
    _refused(store, variant("dora", cfg={"use_dora": True}), "DoRA")
    _refused(store, variant("tm", cfg={"target_modules": ["lm_head"]}), "'lm_head' is not a projection")
    _refused(store, variant("rx", cfg={"target_modules": ".*proj"}), "a regex is not accepted")
    pk = variant("pickle", drop="adapter_model.safetensors")
    torch.save({}, pk / "adapter_model.bin")
    _refused(store, pk, "safetensors only")
    _refused(store, variant("nocfg", drop="adapter_config.json"), "has no adapter_config.json")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _refused(store, variant("shape", tensors=lambda t: t.__setitem__(key, torch.zeros(32, 4))),
             "has shape [32, 4]")
    _refused(store, variant("half", tensors=lambda t: t.pop(key)), "only one of lora_A / lora_B")
    _refused(store, variant("layer", tensors=lambda t: t.update(
        {key.replace("layers.0", "layers.9"): torch.zeros(64, 4)})), "the base has 2 layers")
    # an adapter version cannot be a base
    store.publish(good, "ok-bot", base="llama-base:1")
    _refused(store, good, "is itself an adapter version", base="ok-bot:1")
    r = cli("bundle", "publish", tmp / "r", "--name", "bad-bot", "--base", "llama-base:1", store=store.root)
    assert r.returncode == 1 and r.stderr.startswith("slotserve: error: ") and "Traceback" not in r.stderr


def test_planner_counts_an_adapter_version_as_its_adapter_bytes_when_the_base_is_resident(base):
    from slotserve.slots.planner import estimate

    store, bm, model, tmp = base
    ad = build_demo_adapter(model, tmp / "plan", seed=9, rank=4, targets=("q_proj", "v_proj"))
    m = store.publish(ad, "plan-bot", base="llama-base:1")
    opened = store.open(m.ref)
    lora_numel = sum(t.numel() for t in load_file(ad / "adapter_model.safetensors").values())
    resident = estimate(opened, device="cpu", shared=lambda file, tensor: True)   # base weights in the pool
    assert resident.weight_bytes == lora_numel * 4                                # fp32 on the CPU
    cold = estimate(opened, device="cpu")
    base_only = estimate(store.open("llama-base:1"), device="cpu")
    assert cold.weight_bytes == base_only.weight_bytes + lora_numel * 4

"""Memory planner: sizes, estimates from safetensors headers, refusals with numbers."""

import json

import pytest
import torch
from safetensors.torch import save_file

from slotserve.slots.planner import (DeviceMemory, LoadEstimate, MemoryPlanError, device_memory,
                              estimate, format_size, parse_size, plan)


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 << 30), ("2G", 2 << 30), ("2g", 2 << 30), ("2GB", 2 * 10**9),
    ("512MiB", 512 << 20), ("1.5 GiB", 3 << 29), ("100", 100), ("64KiB", 64 << 10),
    (123, 123),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "2 parsecs", "-1G", "1e9"])
def test_parse_size_refuses_with_valid_forms(bad):
    with pytest.raises(ValueError, match="GiB"):
        parse_size(bad)


def test_format_size():
    assert format_size(3 << 29) == "1.50 GiB"
    assert format_size(10) == "10 B"


def _budget(n):
    return DeviceMemory("cpu", None, None, n, "budget")


def test_plan_fits_and_reports_free_after():
    need = LoadEstimate(100, 50, 10)
    p = plan(need, _budget(1000), {"live": 300})
    assert p.free_bytes == 700 and p.free_after_bytes == 540


def test_plan_refuses_naming_needed_free_and_held():
    need = LoadEstimate(600, 100, 50, shared_bytes=20)
    with pytest.raises(MemoryPlanError) as ei:
        plan(need, _budget(1000), {"live": 300, "previous": 200})
    e = ei.value
    assert (e.needed, e.free, e.held) == (750, 500, {"live": 300, "previous": 200})
    msg = str(e)
    assert "750 B" in msg and "500 B" in msg
    assert "live=300 B" in msg and "previous=200 B" in msg and "evict_previous" in msg


def test_plan_takes_min_of_device_free_and_budget():
    dev = DeviceMemory("cuda:0", 400, 8000, 1000, "torch")
    assert plan(LoadEstimate(300, 0, 0), dev, {"live": 100}).free_bytes == 400
    with pytest.raises(MemoryPlanError):
        plan(LoadEstimate(450, 0, 0), dev, {"live": 100})
    # headroom override
    with pytest.raises(MemoryPlanError):
        plan(LoadEstimate(300, 0, 0), dev, {}, headroom=200)


def test_plan_without_any_figure_asks_for_a_budget():
    with pytest.raises(ValueError, match="budget"):
        plan(LoadEstimate(1, 0, 0), DeviceMemory("cpu", None, None, None, "budget"), {})


def test_device_memory_cpu_reads_host_and_keeps_budget():
    d = device_memory("cpu", 1 << 30)
    assert d.budget_bytes == 1 << 30 and d.device == "cpu"
    assert d.free_bytes is None or d.free_bytes > 0
    with pytest.raises(ValueError, match="cuda"):
        device_memory("tpu")


class _B:
    def __init__(self, path):
        self.path = path


def _bundle(tmp_path, serving):
    model = tmp_path / "model"
    model.mkdir()
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "hidden_size": 32, "torch_dtype": "float32"}
    (model / "config.json").write_text(json.dumps(cfg))
    save_file({"a": torch.zeros(10, 32), "b": torch.zeros(32, dtype=torch.float32),
               "ids": torch.zeros(4, dtype=torch.int64)}, str(model / "model.safetensors"))
    (tmp_path / "serving.json").write_text(json.dumps(serving))
    return _B(tmp_path)


def test_estimate_weights_kv_and_shared(tmp_path):
    b = _bundle(tmp_path, {"dtype": "float16", "kv_cache_tokens": 100})
    e = estimate(b, headroom_bytes=0)
    # floats cast to fp16 (352 elems * 2), int64 kept (4 * 8)
    assert e.weight_bytes == 352 * 2 + 32 and e.shared_bytes == 0
    # tokens (100 rounded up to 16-token blocks) × layers × 2 × kv_heads × head_dim(32/4) × 2 B
    assert e.kv_bytes == 112 * 2 * 2 * 2 * 8 * 2
    s = estimate(b, shared=lambda f, t: t == "a", headroom_bytes=0)
    assert s.shared_bytes == 320 * 2 and s.weight_bytes == e.weight_bytes - 640
    assert estimate(b).headroom_bytes >= 16 << 20


def test_estimate_auto_dtype_and_kv_bytes(tmp_path):
    b = _bundle(tmp_path, {"dtype": "auto", "kv_cache_bytes": 4096 * 16})
    e = estimate(b, headroom_bytes=0)  # auto on CPU is float32, like the engine
    assert e.weight_bytes == 352 * 4 + 32
    assert e.kv_bytes == 4096 * 16  # 256 B/token × 256 tokens (already whole blocks)
    # on CUDA auto means 16-bit floats
    assert estimate(b, device="cuda", headroom_bytes=0).weight_bytes == 352 * 2 + 32

"""Injected faults: parsing, deterministic error draws, OOM from the Nth request, NaN."""

import asyncio
import time

import pytest
import torch

from slotserve.slots.faults import FaultInjector, Faults, InjectedError, InjectedOOM


def test_parse_and_as_dict():
    f = Faults.from_serving({"faults": {"latency_ms": 5, "oom_after": 3}})
    assert f.active and f.as_dict() == {"latency_ms": 5, "oom_after": 3}
    assert not Faults.from_serving({}).active and Faults().as_dict() == {}


@pytest.mark.parametrize("bad,match", [
    ({"latency": 5}, "valid keys"), ({"error_rate": 1.5}, r"\[0, 1\]"),
    ({"oom_after": -1}, ">= 0"), ({"oom_after": 1.5}, "integer"),
    ({"nan_logits": "yes"}, "true or false"), ({"latency_ms": -1}, ">= 0"),
])
def test_bad_faults_say_what_is_valid(bad, match):
    with pytest.raises(ValueError, match=match):
        Faults.from_dict(bad)


def _outcomes(inj, n):
    out = []
    for _ in range(n):
        try:
            inj.before_request()
            out.append("ok")
        except InjectedError:
            out.append("err")
    return out


def test_error_rate_is_deterministic_per_digest():
    f = Faults(error_rate=0.3)
    a = _outcomes(FaultInjector(f, "sha256:ab12cd34ef56"), 400)
    b = _outcomes(FaultInjector(f, "sha256:ab12cd34ef56"), 400)
    c = _outcomes(FaultInjector(f, "sha256:0000ffff1111"), 400)
    assert a == b and a != c
    assert 0.2 < a.count("err") / 400 < 0.4


def test_oom_from_nth_request_on():
    inj = FaultInjector(Faults(oom_after=3), "sha256:00")
    inj.before_request()
    inj.before_request()
    for _ in range(3):
        with pytest.raises(torch.OutOfMemoryError):  # InjectedOOM is one
            inj.before_request()
    inj.on_load()  # oom_after > 0 does not touch loading
    with pytest.raises(InjectedOOM, match="loading"):
        FaultInjector(Faults(oom_after=0)).on_load()


def test_latency_sync_and_async():
    inj = FaultInjector(Faults(latency_ms=30))
    t = time.perf_counter()
    inj.before_request()
    assert time.perf_counter() - t >= 0.029

    async def two():
        t = time.perf_counter()
        await asyncio.gather(inj.before_request_async(), inj.before_request_async())
        return time.perf_counter() - t
    assert 0.029 <= asyncio.run(two()) < 0.055  # concurrent, not serial


def test_nan_logits_installed_on_engine():
    class Eng:
        logits_hook = None
    e = Eng()
    FaultInjector(Faults()).install(e)
    assert e.logits_hook is None
    FaultInjector(Faults(nan_logits=True)).install(e)
    assert torch.isnan(e.logits_hook(torch.zeros(2, 5))).all()


def test_list_form_merges_and_refuses_duplicates():
    assert Faults.from_dict([{"latency_ms": 1}, {"error_rate": 0.5}]) == Faults(latency_ms=1, error_rate=0.5)
    with pytest.raises(ValueError, match="distinct"):
        Faults.from_dict([{"latency_ms": 1}, {"latency_ms": 2}])
    with pytest.raises(ValueError, match="object"):
        Faults.from_dict("slow")

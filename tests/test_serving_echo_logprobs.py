"""Completions' `echo` with `logprobs` (prompt logprobs), as eval harnesses send it, and `min_p`
with a grammar: the official `openai` client (raw JSON where a harness reads it so) against
the real app in process (replica, slot manager and engine are the real ones) on the tiny
random demo bundle; logprobs are checked against a transformers fp32 forward pass.

The real demo model (SmolLM2) gets the same check in test_structured_openai.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from slotserve.api.auth import digest
from slotserve.api.routes import create_app
from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings

openai = pytest.importorskip("openai")

TOL = 1e-3
PROMPT = "the quick brown fox jumps over the lazy dog and the cat"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    publish_demo(Store(root), "demo", seed=0)
    loop = asyncio.new_event_loop()
    ctl = SlotController(str(root), app="local", bundle="demo:1")
    rep = Replica(Settings(store=str(root), app="local", admin_token_sha256=digest("t")),
                  LocalController(ctl), replica_id="r1")
    loop.run_until_complete(rep.start())
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://test", timeout=120)
    client = openai.AsyncOpenAI(api_key="none", base_url="http://test/v1", http_client=http, max_retries=0)
    from transformers import AutoModelForCausalLM
    engine = rep.backend.mgr.get("live").engine
    model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
    yield loop, client, http, rep, model
    loop.run_until_complete(http.aclose())
    loop.run_until_complete(rep.stop())
    loop.close()


def _run(served, coro):
    return served[0].run_until_complete(coro)


def view(served):
    return served[3].backend.views()["live"]


def reference(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the positions predicting tokens 1..len-1: [len - 1, V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)


def check_against_transformers(served, lp: dict, ids: list[int], top_n: int):
    """`lp` (completions' logprobs: prompt then output tokens) against a forward pass over `ids`."""
    tok = view(served).tokenizer
    assert lp["tokens"] == [tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None    # nothing predicts token 0
    want = reference(served[4], ids)
    for p in range(1, len(ids)):
        assert abs(lp["token_logprobs"][p] - want[p - 1, ids[p]].item()) < TOL, p
        # top alternatives by text: two byte-level tokens may decode to the same text ("\ufffd")
        # and share a key, so each value must be that of one of the top-n tokens with its text
        top, best = lp["top_logprobs"][p], want[p - 1].topk(top_n)
        texts = [tok.decode([i]) for i in best.indices.tolist()]
        assert set(top) == set(texts), p
        for text, value in top.items():
            assert any(t == text and abs(v - value) < TOL for t, v in zip(texts, best.values.tolist())), p
    assert lp["text_offset"][0] == 0 and all(b >= a for a, b in zip(lp["text_offset"], lp["text_offset"][1:]))


def test_echo_with_logprobs_covers_prompt_then_answer(served):
    _, client, *_ = served
    r = _run(served, client.completions.create(model="demo", prompt=PROMPT, echo=True, logprobs=3, max_tokens=4,
                                               temperature=0))
    c = r.choices[0]
    assert c.text.startswith(PROMPT) and len(c.text) > len(PROMPT)
    ids = view(served).encode(PROMPT)
    lp = c.logprobs.model_dump()
    assert len(lp["tokens"]) == r.usage.prompt_tokens + r.usage.completion_tokens == len(ids) + 4
    # greedy: the answer's tokens are transformers' argmax, so one forward pass covers it all
    answer = _run(served, _answer_ids(served, ids, 4))
    check_against_transformers(served, lp, ids + answer, 3)
    assert lp["text_offset"][len(ids)] == len(PROMPT)                # the answer's offsets index `text`


async def _answer_ids(served, ids, n):
    h = await served[3].backend.mgr.generate("live", ids, {"temperature": 0, "max_tokens": n})
    return await h.result()


def test_max_tokens_zero_scores_the_prompt_as_eval_harnesses_ask(served):
    _, _, http, *_ = served
    ids = view(served).encode(PROMPT)
    # lm-evaluation-harness's local-completions loglikelihood: token ids, echo, logprobs 1, no generation
    r = _run(served, http.post("/v1/completions", json={"model": "demo", "prompt": [ids], "echo": True,
                                                        "logprobs": 1, "max_tokens": 0, "temperature": 0}))
    assert r.status_code == 200, r.text
    body = r.json()
    c = body["choices"][0]
    assert c["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    assert c["text"] == view(served).tokenizer.decode(ids)
    check_against_transformers(served, c["logprobs"], ids, 1)
    # the harness's greedy check: a token is greedy when its logprob is the best alternative's
    greedy = [t == max(top.values()) for t, top in zip(c["logprobs"]["token_logprobs"][1:],
                                                        c["logprobs"]["top_logprobs"][1:])]
    want = reference(served[4], ids)
    assert greedy == [int(want[p].argmax()) == ids[p + 1] for p in range(len(ids) - 1)]


def test_prefix_cache_hit_and_a_batch_mixed_with_ordinary_requests(served):
    _, client, *_ = served
    ids = view(served).encode(PROMPT * 4)                     # several full KV blocks

    async def go():
        plain = await client.completions.create(model="demo", prompt=ids, max_tokens=2, temperature=0)
        echo = dict(model="demo", prompt=ids, echo=True, logprobs=2, max_tokens=0)
        first = await client.completions.create(**echo)       # the prompt sits in the prefix cache now
        plain = await client.completions.create(model="demo", prompt=ids, max_tokens=2, temperature=0)
        chat = dict(model="demo", messages=[{"role": "user", "content": "count to ten"}], temperature=0,
                    max_tokens=24)
        solo = await client.chat.completions.create(**chat)
        together = await asyncio.gather(client.completions.create(**echo),
                                        *[client.chat.completions.create(**chat) for _ in range(3)],
                                        client.completions.create(**{**echo, "max_tokens": 3, "temperature": 0}))
        return plain, first, solo, together

    plain, first, solo, together = _run(served, go())
    cached = lambda r: r.usage.prompt_tokens_details.cached_tokens if r.usage.prompt_tokens_details else 0  # noqa: E731
    assert cached(first) == 0                                # the scoring request computed every position,
    assert cached(plain) >= len(ids) - 16                    # while ordinary ones use the cache
    check_against_transformers(served, first.choices[0].logprobs.model_dump(), ids, 2)
    again, *chats, longer = together
    assert again.choices[0].logprobs.model_dump() == first.choices[0].logprobs.model_dump()
    assert all(c.choices[0].message.content == solo.choices[0].message.content for c in chats)
    lp = longer.choices[0].logprobs.model_dump()
    assert {k: v[:len(ids)] for k, v in lp.items()} == first.choices[0].logprobs.model_dump()
    assert len(lp["tokens"]) == len(ids) + 3


def test_streamed_echo_sends_the_prompt_first_then_the_answer(served):
    _, client, *_ = served
    kw = dict(model="demo", prompt=PROMPT, echo=True, logprobs=2, max_tokens=5, temperature=0)

    async def go():
        whole = await client.completions.create(**kw)
        stream = await client.completions.create(**kw, stream=True)
        return whole, [c async for c in stream]

    whole, chunks = _run(served, go())
    first = chunks[0].choices[0]
    assert first.text == PROMPT and len(first.logprobs.tokens) == len(view(served).encode(PROMPT))
    merged = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            for k in merged:
                merged[k] += getattr(c.choices[0].logprobs, k)
    assert merged == whole.choices[0].logprobs.model_dump()
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_echo_with_n_choices_scores_the_prompt_in_each(served):
    _, client, *_ = served
    r = _run(served, client.completions.create(model="demo", prompt=PROMPT, echo=True, logprobs=1, max_tokens=3,
                                               n=2, temperature=1.0, seed=4))
    n = len(view(served).encode(PROMPT))
    assert [c.index for c in r.choices] == [0, 1]
    a, b = (c.logprobs.model_dump() for c in r.choices)
    assert {k: v[:n] for k, v in a.items()} == {k: v[:n] for k, v in b.items()}
    assert len(a["tokens"]) == len(b["tokens"]) == n + 3


def test_refusals_name_the_field(served):
    _, _, http, *_ = served
    cases = [("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),          # 0 needs echo
             ("/v1/completions", {"prompt": "a", "max_tokens": -1, "echo": True}, "max_tokens"),
             ("/v1/completions", {"prompt": "a", "echo": True, "logprobs": 21}, "logprobs"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "echo": True,
                                       "logprobs": True}, "echo")]
    for path, body, param in cases:
        r = _run(served, http.post(path, json={"model": "demo", **body}))
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"], (body, err)
    assert "completions" in err["message"]                    # chat: says where echo lives


def test_high_min_p_with_a_json_schema_still_parses(served):
    _, client, *_ = served
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}

    async def go():
        return await asyncio.gather(*[client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "ok?"}], temperature=1.0, seed=s, max_tokens=60,
            response_format=fmt, extra_body={"min_p": 0.9}) for s in range(3)])

    for r in _run(served, go()):
        assert json.loads(r.choices[0].message.content).keys() == {"ok"}, r.choices[0].message.content

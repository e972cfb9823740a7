"""Request handling without Ray: validation, routing/pinning, stop strings, SSE, retries."""

from __future__ import annotations

import asyncio
import json

import pytest

from pydantic import ValidationError

from slotserve.api.errors import APIError, describe_validation_error
from slotserve.api.handler import Handler
from slotserve.api.requests import ChatCompletionRequest, CompletionRequest, FeedbackRequest
from slotserve.api.text_stream import TextStream
from slotserve.replica import BundleView, Routing


class CharTokenizer:
    """One token per character (id = code point); enough to exercise the text paths."""

    eos_token_id = 0
    chat_template = None

    def __len__(self):
        return 0x110000

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)

    def apply_chat_template(self, msgs, chat_template=None, tokenize=False, add_generation_prompt=True):
        return "".join(f"[{m['role']}]{m['content']}" for m in msgs) + "[assistant]"


def view(name="bot", version=1, ctx=64, digest=None, system=None):
    return BundleView(ref=f"{name}:{version}", name=name, version=version,
                      digest=digest or ("sha256:" + f"{version:x}" * 64)[:71],
                      retrieval_index="docs@3", max_model_len=ctx, tokenizer=CharTokenizer(),
                      chat_template=None, system_prompt=system, sampling={"max_tokens": 8})


class Handle:
    def __init__(self, tokens, fail=None, finish="length"):
        self.tokens, self.fail, self.finish_reason, self.cancelled = tokens, fail, finish, False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        if self.fail:
            raise self.fail
        for t in self.tokens:
            if self.cancelled:
                return
            await asyncio.sleep(0)
            yield t

    def cancel(self):
        self.cancelled = True


class Backend:
    def __init__(self, views, outputs):
        self._views, self.outputs, self.calls, self.handles = views, outputs, [], []

    def views(self):
        return dict(self._views)

    async def generate(self, slot, prompt_ids, params):
        self.calls.append((slot, prompt_ids, params))
        out = self.outputs[slot]
        h = out() if callable(out) else Handle([ord(c) for c in out])
        self.handles.append(h)
        return h


def chat(**kw):
    body = {"model": "bot", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return ChatCompletionRequest.model_validate(body)


def run(coro):
    return asyncio.run(coro)


BAD = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 17}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"model": ""}, "model"),
    ({"messages": "hi"}, "messages"),
]


@pytest.mark.parametrize("patch,needle", BAD)
def test_bad_chat_requests_say_what_is_valid(patch, needle):
    body = {"model": "bot", "messages": [{"role": "user", "content": "hi"}], **patch}
    with pytest.raises(ValidationError) as ei:
        ChatCompletionRequest.model_validate(body)
    msg, _ = describe_validation_error(ei.value)
    assert needle in msg


def test_openai_client_shapes_accepted():
    # What openai-python sends (an unknown field is refused: tests/test_serving_strict.py).
    r = ChatCompletionRequest.model_validate({
        "model": "bot", "messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0, "seed": 1, "user": "u1", "stop": "\n", "frequency_penalty": 0})
    assert r.token_limit() == 5 and r.include_usage and r.messages[1].text() == "hi"
    c = CompletionRequest.model_validate({"model": "bot", "prompt": ["hello"]})
    assert c.prompt == "hello" and c.max_tokens == 16


def test_feedback_ratings():
    assert FeedbackRequest.model_validate({"id": "x", "rating": "up"}).rating == 1
    assert FeedbackRequest.model_validate({"id": "x", "rating": -1}).thumbs_down
    for bad in ("meh", 0, True, 2):
        with pytest.raises(ValidationError):
            FeedbackRequest.model_validate({"id": "x", "rating": bad})


def test_text_stream_stop_strings_and_holdback():
    ts = TextStream(CharTokenizer(), ["END"])
    out = "".join(ts.push(ord(c)) for c in "abcEN")
    assert out == "abc"  # "EN" held back: could become END
    assert ts.push(ord("D")) == "" and ts.stopped and ts.text == "abc"
    ts2 = TextStream(CharTokenizer(), ["END"])
    out = "".join(ts2.push(ord(c)) for c in "abEN") + ts2.flush()
    assert out == "abEN" and not ts2.stopped


def test_routing_pinning_and_unknown_model():
    b = Backend({"live": view(version=1), "previous": view(version=0x2)}, {"live": "x", "previous": "y"})
    h = Handler(b)
    assert h.resolve("bot", None) == ("live", False)
    assert h.resolve("bot:2", None) == ("previous", True)
    with pytest.raises(APIError) as ei:
        h.resolve("gpt-4", None)
    assert ei.value.status == 404 and "bot:1" in ei.value.message and "bot:2" in ei.value.message
    assert h.served_names() == ["bot", "bot:1", "bot:2"]


def test_chat_response_with_stop_and_usage():
    b = Backend({"live": view(system="SYS")}, {"live": "hello world"})
    h = Handler(b)

    async def go():
        r = await h.start("chat", chat(stop=" wor"), {})
        return r, await r.response()
    r, body = run(go())
    assert body["model"] == "bot:1" and body["system_fingerprint"].startswith("sha256:")
    assert body["choices"][0]["message"]["content"] == "hello"
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt = "".join(chr(i) for i in b.calls[0][1])
    assert prompt == "[system]SYS[user]hi[assistant]"
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert r.headers()["x-slotserve-retrieval-index"] == "docs@3"
    assert b.handles[0].cancelled  # stop string: engine request cancelled
    assert h.inflight == 0


def test_context_limits():
    h = Handler(Backend({"live": view(ctx=20)}, {"live": "x"}))
    with pytest.raises(APIError) as ei:
        run(h.start("chat", chat(messages=[{"role": "user", "content": "y" * 30}]), {}))
    assert ei.value.status == 400 and ei.value.code == "context_length_exceeded"
    with pytest.raises(APIError) as ei:
        run(h.start("chat", chat(max_tokens=10), {}))
    assert ei.value.status == 400 and "at most" in ei.value.message


def test_sse_stream_shape():
    h = Handler(Backend({"live": view()}, {"live": "abc"}))

    async def go():
        r = await h.start("chat", chat(stream=True, stream_options={"include_usage": True}), {})
        return [e async for e in r.sse()]
    events = run(go())
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "abc"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_candidate_failure_is_retried_on_live():
    seen = []
    b = Backend({"live": view(version=1), "candidate": view(version=2)},
                {"live": "ok", "candidate": lambda: Handle([], fail=RuntimeError("boom"))})
    h = Handler(b, observe=seen.append)
    h.routing = Routing(weights={"candidate": 100.0})

    async def go():
        r = await h.start("chat", chat(), {})
        return await r.response(), r.headers()
    body, headers = run(go())
    assert body["model"] == "bot:1" and body["choices"][0]["message"]["content"] == "ok"
    assert headers["x-slotserve-retried-from"] == "bot:2"
    assert [(o.slot, o.ok) for o in seen] == [("candidate", False), ("live", True)]
    # Pinned to the candidate: no retry, an OpenAI error object.
    with pytest.raises(APIError) as ei:
        run(h.start("chat", chat(model="bot:2"), {}))
    assert ei.value.status == 500 and "boom" in ei.value.message


def test_disconnect_cancels_engine_request():
    b = Backend({"live": view()}, {"live": "abcdefgh"})
    h = Handler(b)

    async def go():
        r = await h.start("chat", chat(stream=True), {})
        gen = r.sse()
        await gen.__anext__()
        await gen.__anext__()
        await gen.aclose()  # what a client disconnect does to the response body
    run(go())
    assert b.handles[0].cancelled and h.inflight == 0


def test_feedback_attribution():
    v = view()
    h = Handler(Backend({"live": v}, {"live": "x"}))
    rid = h.response_id(v, "live")
    slot, got = h.feedback(FeedbackRequest(id=rid, rating="down"))
    assert slot == "live" and got is v
    with pytest.raises(APIError) as ei:
        h.feedback(FeedbackRequest(id="nope", rating="down"))
    assert ei.value.status == 404


def feedback_error(h, rid):
    with pytest.raises(APIError) as ei:
        h.feedback(FeedbackRequest(id=rid, rating="down"))
    return ei.value


def test_feedback_counts_only_ids_this_app_issued_and_each_once():
    from slotserve.api.response_ids import ResponseIds

    v = view()
    secret = {"sha": "ab" * 32}
    key = lambda: secret["sha"]   # noqa: E731  (what TokenCheck.expected_sha answers)
    h = Handler(Backend({"live": v}, {"live": "x"}), ids=ResponseIds(key))
    rid = h.response_id(v, "live")
    assert h.feedback(FeedbackRequest(id=rid, rating="down"))[0] == "live"
    err = feedback_error(h, rid)             # a repeat of a real id
    assert err.status == 409 and err.code == "already_rated"
    # Forgeries: the public digest with a made-up MAC, a tampered slot or random part.
    digest16 = v.digest.split(":")[-1][:16]
    body, mac = rid.rsplit("-", 1)
    for forged in (f"chatcmpl-{'0' * 24}-{digest16}-live-{'0' * 16}", f"chatcmpl-FAKE-{digest16}",
                   rid + "\n", rid + " ", " " + rid, rid.upper(),   # second spellings of a rated id
                   body.replace("-live", "-candidate") + "-" + mac, "chatcmpl-" + "f" * 24 + body[33:] + "-" + mac):
        assert feedback_error(h, forged).status == 404, forged
    # Another replica of the same app (same key) accepts an id this one issued, once;
    # an app with another admin token does not.
    other = Handler(Backend({"live": v}, {"live": "x"}), ids=ResponseIds(key))
    rid2 = h.response_id(v, "live")
    assert other.feedback(FeedbackRequest(id=rid2, rating="up"))[0] == "live"
    stranger = Handler(Backend({"live": v}, {"live": "x"}), ids=ResponseIds(lambda: "cd" * 32))
    assert feedback_error(stranger, h.response_id(v, "live")).status == 404
    # Rotating the admin token re-keys at once: ids signed with the old token are refused.
    old_id = h.response_id(v, "live")
    secret["sha"] = "ef" * 32
    assert feedback_error(h, old_id).status == 404
    assert h.feedback(FeedbackRequest(id=h.response_id(v, "live"), rating="up"))[0] == "live"


def test_feedback_goes_to_the_slot_that_answered_while_it_holds_that_bundle():
    old, new = view(version=1), view(version=2)
    # `slotserve load <previous ref>` may put one bundle in both previous and candidate
    h = Handler(Backend({"live": new, "previous": old, "candidate": old}, {}))
    rid = h.response_id(old, "candidate")
    assert h.feedback(FeedbackRequest(id=rid, rating="down"))[0] == "candidate"
    # after a promote the bundle is live and candidate is empty: it is rated where it is now
    h.backend = Backend({"live": old, "previous": new}, {})
    rid = Handler(Backend({}, {}), ids=h.ids).response_id(old, "candidate")
    assert h.feedback(FeedbackRequest(id=rid, rating="down"))[0] == "live"
    # a bundle no longer in any slot: accepted, attributed to nobody
    h.backend = Backend({"live": new}, {})
    rid = h.response_id(old, "live")
    assert h.feedback(FeedbackRequest(id=rid, rating="down")) == (None, None)

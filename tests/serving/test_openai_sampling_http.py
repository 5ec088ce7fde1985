"""/v1 logprobs and n > 1, in OpenAI's shapes, through the official client where it has them."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import SERVER_MODEL as MODEL

MESSAGES = [{"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_logprobs_cover_every_token_with_the_top_alternatives(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob  # greedy: the top-1
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode() == t.token


def test_chat_logprobs_stream_with_their_deltas(client, smollm2_server):
    # Both requests below must find the same cached prefix (this one's), or their attention
    # runs on different paths (cached vs fresh prefill) and logprobs differ in the last bits.
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=2)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True)
    entries, text = [], ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            entries += chunk.choices[0].logprobs.content
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == whole.choices[0].message.content
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]


def test_completion_logprobs_in_the_legacy_shape(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and top[tok] == value == max(top.values())


def test_chat_n_returns_n_choices_sampled_independently(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=3, n=3,
                                       logprobs=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    # The same request again gives the same three (seeded), one at a time with seed + i too.
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=3, n=3,
                                           logprobs=True)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    second = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=4)
    assert second.choices[0].message.content == r.choices[1].message.content
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_completions_n_streams_every_choice_to_its_finish(smollm2_server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 3,
            "stream": True, "stream_options": {"include_usage": True}}
    texts, finishes, usage = {}, {}, None
    with httpx.stream("POST", smollm2_server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                if c["finish_reason"]:
                    finishes[c["index"]] = c["finish_reason"]
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert usage["completion_tokens"] == 24
    whole = httpx.post(smollm2_server.url + "/v1/completions", json=body | {"stream": False}, timeout=60).json()
    assert [c["text"] for c in whole["choices"]] == [texts[i] for i in range(3)]


@pytest.mark.parametrize("fields,status,says", [
    ({"priority": -1}, 200, None), ({"service_tier": "flex"}, 200, None), ({"service_tier": "priority"}, 200, None),
    ({"priority": 1000}, 400, "priority must be an integer in [-10, 10]"),
    ({"service_tier": "ultra"}, 400, "service_tier must be one of"),
    ({"priority": 1, "service_tier": "flex"}, 400, "not both"),
])
def test_priority_and_service_tiers_are_taken_and_bounded(smollm2_server, fields, status, says):
    r = httpx.post(smollm2_server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 2} | fields)
    assert r.status_code == status, r.text
    if says:
        assert says in r.json()["error"]["message"]


def test_usage_names_the_prompt_tokens_the_prefix_cache_held(smollm2_server):
    messages = [{"role": "user", "content": "Describe, in detail, the water cycle of a temperate forest " * 4}]

    def usage() -> dict:
        r = httpx.post(smollm2_server.url + "/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": messages, "max_tokens": 2})
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    usage()
    again = usage()
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["prompt_tokens"]  # whole blocks of the same prompt, from the first request
    assert again["completion_tokens_details"] == {"reasoning_tokens": 0}

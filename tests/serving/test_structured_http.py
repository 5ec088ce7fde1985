"""Tool calls and structured answers through /v1 on the default model, with the openai
client: required and named calls always validate against the tool's schema, none never
calls, response_format replies validate, bad schemas and unsupported fields are 400s."""
import json

import httpx
import jsonschema
import openai
import pytest

from conftest import SERVER_MODEL as MODEL

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "add_numbers", "description": "Adds two numbers",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "get_capital", "description": "The capital city of a country",
                                      "parameters": {"type": "object", "properties": {
                                          "country": {"type": "string"}}, "required": ["country"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = ["What's the weather in Paris?", "What is 17 plus 25?", "What is the capital of Japan?",
             "Is it raining in Oslo right now?", "Add 3 and 4.", "Which city is the capital of Peru?"]


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(client, question, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          tools=TOOLS, max_tokens=120, temperature=0, **kw)


def assert_valid_calls(message):
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.function.name in SCHEMAS and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_choice_required_always_gives_schema_valid_calls_to_declared_tools(client):
    for q in QUESTIONS:
        r = ask(client, q, tool_choice="required")
        assert r.choices[0].finish_reason == "tool_calls"
        assert_valid_calls(r.choices[0].message)
    single = ask(client, QUESTIONS[0], tool_choice="required", parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1


def test_named_tool_choice_calls_that_tool_and_none_calls_nothing(client):
    for q in QUESTIONS[:3]:
        r = ask(client, q, tool_choice={"type": "function", "function": {"name": "add_numbers"}},
                parallel_tool_calls=False)
        assert_valid_calls(r.choices[0].message)
        assert [c.function.name for c in r.choices[0].message.tool_calls] == ["add_numbers"]
        none = ask(client, q, tool_choice="none")
        assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
        assert none.choices[0].finish_reason in ("stop", "length")


def test_auto_mode_replies_are_text_or_valid_calls(client):
    for q in QUESTIONS[:3]:
        r = ask(client, q, tool_choice="auto")
        msg = r.choices[0].message
        assert msg.content or msg.tool_calls
        if msg.tool_calls:
            assert_valid_calls(msg)


def test_streamed_tool_calls_arrive_as_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of Japan?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_capital"}}, max_tokens=60, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].function.name == "get_capital" and deltas[0].index == 0
    assert "country" in json.loads(deltas[0].function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                         "country": {"type": "string", "maxLength": 30},
                                         "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]},
                                         "is_capital": {"type": "boolean"}},
        "required": ["city", "country", "continent", "is_capital"], "additionalProperties": False}


def test_response_format_json_schema_and_json_object_replies_validate(client):
    for city in ("Paris", "Tokyo", "Nairobi"):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Describe {city} as JSON."}], max_tokens=120,
            temperature=0, response_format={"type": "json_schema",
                                            "json_schema": {"name": "city", "schema": CITY, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), CITY)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi in JSON."}],
                                       max_tokens=80, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def test_vllm_structured_outputs_field_and_completions_response_format(client, server):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                       max_tokens=10, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")
    c = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 20,
        "structured_outputs": {"regex": "[A-Z][a-z]+"}}).json()
    assert c["choices"][0]["text"][:1].isupper() and c["choices"][0]["text"].isalpha()


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     None, "bogus"),
    ({"response_format": {"type": "yaml"}}, None, "response_format type"),
    ({"response_format": {"type": "json_schema"}}, None, "json_schema"),
    ({"structured_outputs": {"regex": "("}}, None, "regex is invalid"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None, "nope"),
    ({"tool_choice": "required"}, None, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, None, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, None, "parallel_tool_calls"),
    ({"tools": TOOLS, "structured_outputs": {"choice": ["a"]}}, None, "cannot be combined"),
    ({"guided_json": {"type": "object"}}, "guided_json", "unsupported field 'guided_json'"),
    ({"logit_bias": {"42": 5}}, "logit_bias", "not supported"),
    ({"top_logprobs": 3}, "logprobs", "needs 'logprobs': true"),
    ({"logprobs": True, "top_logprobs": 21}, "logprobs", "in [0, 20]"),
    ({"logprobs": "yes"}, "logprobs", "must be a boolean"),
])
def test_bad_structured_requests_are_400s_that_name_the_problem(server, body, param, message):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_fields_that_ask_for_nothing_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       logprobs=False, store=False, user="u1", response_format={"type": "text"})
    assert r.choices[0].message.content is not None

"""ADK's own OpenAI connector (`OpenAILlm`) and LiteLLM's `hosted_vllm/` and `openai/`
providers against our /v1, end to end on the served default model: text, streaming with
usage, tool calls, JSON replies. Whatever fields these clients send must work."""
import asyncio
import json

import litellm
import pytest
from google.adk.agents import LlmAgent
from google.adk.agents.run_config import RunConfig, StreamingMode
from google.adk.runners import InMemoryRunner
from google.genai import types

from adk_backend.tool_policy import call_tools_then_answer
from agents.tools.agent import add_numbers  # the example agent's tool
from conftest import SERVER_MODEL as MODEL

QUESTION = "Name three fruits."
ADD = {"type": "function", "function": {"name": "add_numbers", "description": "Adds two numbers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}


def openai_llm(server):
    from google.adk.integrations.openai import OpenAILlm
    return OpenAILlm(model=MODEL, base_url=server.url + "/v1", api_key="unused", max_tokens=16)


async def run(agent: LlmAgent, text: str, streaming: bool) -> list:
    runner = InMemoryRunner(agent=agent, app_name="t")
    session = await runner.session_service.create_session(app_name="t", user_id="u")
    mode = StreamingMode.SSE if streaming else StreamingMode.NONE
    return [e async for e in runner.run_async(user_id="u", session_id=session.id, run_config=RunConfig(
        streaming_mode=mode, max_llm_calls=4), new_message=types.Content(role="user", parts=[types.Part(text=text)]))]


def final(events) -> types.Content:
    finals = [e for e in events if not e.partial and e.content and e.content.parts]
    return finals[-1]


def test_adks_openai_llm_gets_text_streamed_or_not_with_usage(smollm2_server):
    agent = LlmAgent(name="chat", model=openai_llm(smollm2_server),
                     generate_content_config=types.GenerateContentConfig(temperature=0, max_output_tokens=12))

    async def both():  # one event loop: the connector keeps its client
        return await run(agent, QUESTION, streaming=False), await run(agent, QUESTION, streaming=True)
    plain_events, streamed_events = asyncio.run(both())
    plain, streamed = final(plain_events), final(streamed_events)
    assert plain.content.parts[0].text and plain.content.parts[0].text == streamed.content.parts[0].text
    assert any(e.partial for e in streamed_events)
    for event in (plain, streamed):
        usage = event.usage_metadata
        assert usage.prompt_token_count > 0 and 0 < usage.candidates_token_count <= 12


def test_adks_openai_llm_calls_a_tool_and_answers_from_its_result(smollm2_server):
    agent = LlmAgent(name="calc", model=openai_llm(smollm2_server), tools=[add_numbers],
                     instruction="Use add_numbers to add.", before_model_callback=call_tools_then_answer,
                     generate_content_config=types.GenerateContentConfig(temperature=0, max_output_tokens=48))
    events = asyncio.run(run(agent, "What is 17 plus 25?", streaming=False))
    calls = [p.function_call for e in events for p in e.content.parts or [] if p.function_call]
    results = [p.function_response for e in events for p in e.content.parts or [] if p.function_response]
    assert len(calls) == 1 and calls[0].name == "add_numbers" and set(calls[0].args) == {"a", "b"}
    assert results[0].response == add_numbers(**calls[0].args)
    assert final(events).content.parts[0].text


@pytest.mark.parametrize("provider", ["hosted_vllm", "openai"])
def test_litellms_openai_compatible_providers(smollm2_server, provider):
    common = dict(model=f"{provider}/{MODEL}", api_base=smollm2_server.url + "/v1", api_key="unused",
                  temperature=0, max_tokens=12)
    messages = [{"role": "user", "content": QUESTION}]
    plain = litellm.completion(messages=messages, **common)
    text = plain.choices[0].message.content
    assert text and plain.usage.prompt_tokens > 0
    chunks = list(litellm.completion(messages=messages, stream=True, stream_options={"include_usage": True},
                                     **common))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert any(getattr(c, "usage", None) and c.usage.completion_tokens for c in chunks)
    called = litellm.completion(messages=[{"role": "user", "content": "Add 2 and 3."}], tools=[ADD],
                                tool_choice="required", **(common | {"max_tokens": 48}))
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "add_numbers" and set(json.loads(call.function.arguments)) == {"a", "b"}
    as_json = litellm.completion(messages=[{"role": "user", "content": "A fruit, as JSON."}],
                                 response_format={"type": "json_object"}, **(common | {"max_tokens": 64}))
    assert isinstance(json.loads(as_json.choices[0].message.content), dict)


# -- /v1/responses: ADK's OpenAIResponsesLlm and the OpenAI SDK's own client ----------------
def responses_llm(server, max_tokens: int = 16):
    from google.adk.integrations.openai import OpenAIResponsesLlm
    return OpenAIResponsesLlm(model=MODEL, base_url=server.url + "/v1", api_key="unused",
                              extra_request_args={"max_output_tokens": max_tokens})


def test_adks_responses_llm_gets_the_chat_reply_streamed_or_not_with_usage(smollm2_server):
    agent = LlmAgent(name="chat", model=responses_llm(smollm2_server), instruction="Answer briefly.",
                     generate_content_config=types.GenerateContentConfig(temperature=0))
    chat_agent = LlmAgent(name="chat", model=openai_llm(smollm2_server), instruction="Answer briefly.",
                          generate_content_config=types.GenerateContentConfig(temperature=0))

    async def three():
        return (await run(agent, QUESTION, streaming=False), await run(agent, QUESTION, streaming=True),
                await run(chat_agent, QUESTION, streaming=False))
    plain_events, streamed_events, chat_events = asyncio.run(three())
    plain, streamed, chat = final(plain_events), final(streamed_events), final(chat_events)
    # the same conversation, rendered the same way: the same greedy tokens as /v1/chat/completions
    assert plain.content.parts[0].text == streamed.content.parts[0].text == chat.content.parts[0].text
    partial = "".join(p.text or "" for e in streamed_events if e.partial and e.content for p in e.content.parts)
    assert partial == plain.content.parts[0].text
    for event in (plain, streamed):
        usage = event.usage_metadata
        assert usage.prompt_token_count == chat.usage_metadata.prompt_token_count
        assert 0 < usage.candidates_token_count == chat.usage_metadata.candidates_token_count <= 16
        assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count


def test_adks_responses_llm_calls_a_tool_and_answers_from_its_result(smollm2_server):
    agent = LlmAgent(name="calc", model=responses_llm(smollm2_server, 48), tools=[add_numbers],
                     instruction="Use add_numbers to add.", before_model_callback=call_tools_then_answer,
                     generate_content_config=types.GenerateContentConfig(temperature=0))
    async def both():  # one event loop: the connector keeps its client
        return [await run(agent, "What is 17 plus 25?", streaming=streaming) for streaming in (False, True)]
    for events in asyncio.run(both()):
        calls = [p.function_call for e in events if not e.partial for p in e.content.parts or [] if p.function_call]
        results = [p.function_response for e in events for p in e.content.parts or [] if p.function_response]
        assert len(calls) == 1 and calls[0].name == "add_numbers" and set(calls[0].args) == {"a", "b"}
        assert calls[0].id.startswith("call_") and results[0].id == calls[0].id  # call_id round trip
        assert results[0].response == add_numbers(**calls[0].args)
        assert final(events).content.parts[0].text


def test_responses_stream_events_and_json_format_with_the_openai_sdk(smollm2_server):
    from openai import OpenAI
    client = OpenAI(base_url=smollm2_server.url + "/v1", api_key="unused")
    schema = {"type": "object", "properties": {"fruit": {"type": "string"}}, "required": ["fruit"],
              "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "fruit", "schema": schema, "strict": True}}
    whole = client.responses.create(model=MODEL, input="Name a fruit.", text=fmt, max_output_tokens=40,
                                    temperature=0, store=False, prompt_cache_key="fruit-run")  # the program
    assert whole.status == "completed" and whole.id.startswith("resp_")
    assert set(json.loads(whole.output_text)) == {"fruit"}
    events = list(client.responses.create(model=MODEL, input="Name a fruit.", text=fmt, max_output_tokens=40,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text and set(json.loads(deltas)) == {"fruit"}
    assert events[-1].response.usage.output_tokens > 0


@pytest.mark.parametrize("field, value, param", [
    ("store", True, "store"), ("previous_response_id", "resp_1", "previous_response_id"),
    ("tools", [{"type": "web_search"}], "tools"), ("background", True, "background"),
    ("input", [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}], "input[0]"),
    ("input", [{"type": "item_reference", "id": "msg_1"}], "input[0]"), ("seedless", 1, "seedless"),
    ("prompt_cache_key", "", "prompt_cache_key"), ("prompt_cache_key", "k" * 257, "prompt_cache_key"),
])
def test_responses_refuses_what_it_cannot_honour_by_name(smollm2_server, field, value, param):
    import httpx
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 4, field: value}
    r = httpx.post(smollm2_server.url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text

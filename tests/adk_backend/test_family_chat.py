"""Each family's tool calls and thinking, through its own chat format (fixtures in
tests/fixtures/chat_templates): rendered and parsed in the family's format, round-tripped
through ADK (function call -> function response -> answer) and the OpenAI API on a tiny
random checkpoint of that family, and Qwen3's thinking split out as reasoning_content and
as ADK thought parts, never parsed for calls and never sent back to the model."""
import asyncio
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Literal

import httpx
import pytest
from google.adk.agents import LlmAgent
from google.adk.runners import InMemoryRunner
from google.genai import types

from adk_backend import configure_engine, engine_for
from adk_backend.chat import ChatResult, chat_formats, chat_stream
from adk_backend.chat_format import ToolCall, assistant_message, messages_with_tools, tool_message
from adk_backend.reply_grammar import ReplySpec
from adk_backend.server import create_app
from adk_backend.tool_formats import HERMES, LLAMA3_JSON
from engine import SamplingParams
from engine.loader import DEFAULT_MODEL, resolve_model_dir
from server_helpers import LiveServer
from helpers import chat_template
from tiny_models import save_tiny

FAMILIES = ["qwen3", "llama3", "gemma3"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}}}


def get_weather(city: Literal["Paris", "Lima", "Oslo"]) -> dict:
    """Weather in a city."""
    return {"city": city, "forecast": {"Paris": "rain", "Lima": "sun", "Oslo": "snow"}.get(city, "unknown")}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """name -> engine name: each family's tiny checkpoint with the default model's tokenizer
    and that family's chat template, registered as an engine."""
    from transformers import AutoTokenizer
    names = {}
    for family in FAMILIES:
        path = save_tiny(family, tmp_path_factory.mktemp(f"{family}-chat"), vocab_size=49152)
        tok = AutoTokenizer.from_pretrained(resolve_model_dir(DEFAULT_MODEL))
        tok.chat_template = chat_template(family)
        tok.save_pretrained(path)
        name = f"{family}-chat-tiny"
        configure_engine(name, model=str(path), dtype="float32", num_kv_blocks=256, max_model_len=2048)
        names[family] = name
    return names


def conversation() -> list[dict]:
    call = ToolCall("get_weather", {"city": "Paris"}, id="call_1")
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            assistant_message("", [call]), tool_message("get_weather", "call_1", {"forecast": "rain"})]


async def prompt_of(engine, messages, tools, template_kwargs=None) -> str:
    formats = await chat_formats(engine)
    messages, tools = messages_with_tools(messages, tools, formats.native_tools, formats.tool_role, formats.tools)
    return await engine.apply_chat_template(messages, tools, template_kwargs)


def test_each_family_renders_tools_calls_and_results_in_its_own_format(family_models):
    async def main():
        out = {}
        for family, name in family_models.items():
            engine = engine_for(name)
            out[family] = (await chat_formats(engine), await prompt_of(engine, conversation(), [WEATHER]))
        return out
    found = asyncio.run(main())

    fmt, prompt = found["qwen3"]
    assert (fmt.tools, fmt.native_tools, fmt.reasoning.name) == (HERMES, True, "qwen3")
    assert "# Tools" in prompt and '"name": "get_weather"' in prompt.split("\n</tools>")[0]
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in prompt
    assert '<|im_start|>user\n<tool_response>\n{"forecast": "rain"}\n</tool_response><|im_end|>' in prompt

    fmt, prompt = found["llama3"]
    assert (fmt.tools, fmt.native_tools, fmt.reasoning) == (LLAMA3_JSON, True, None)
    assert "Environment: ipython" in prompt and '"name": "get_weather"' in prompt
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}' \
        in prompt
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"forecast": "rain"}<|eot_id|>' in prompt

    fmt, prompt = found["gemma3"]  # no tools in its template: Hermes, results in a user turn
    assert (fmt.tools, fmt.native_tools, fmt.tool_role, fmt.reasoning) == (HERMES, False, False, None)
    assert prompt.count("<start_of_turn>user") == 2 and "<start_of_turn>tool" not in prompt
    assert "Be brief.\n\nYou are a function calling AI model" in prompt
    assert '<start_of_turn>model\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt


def test_llama3_json_calls_parse_alone_joined_and_after_python_tag():
    names = {"get_weather", "get_time"}
    one = LLAMA3_JSON.parse('{"name": "get_weather", "parameters": {"city": "Lima"}}', names)
    assert [(c.name, c.arguments) for c in one.tool_calls] == [("get_weather", {"city": "Lima"})] and one.text == ""
    two = LLAMA3_JSON.parse('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                            '{"name": "get_time", "arguments": {}}', names)
    assert [c.name for c in two.tool_calls] == ["get_weather", "get_time"] and two.text == ""
    text = 'The JSON is {"name": "other", "parameters": {}} as you see.'
    assert LLAMA3_JSON.parse(text, names).tool_calls == [] and LLAMA3_JSON.parse(text, names).text == text
    cut = '{"name": "get_weather", "parameters": {"city": "Li'
    assert LLAMA3_JSON.parse(cut, names).tool_calls == [] and LLAMA3_JSON.parse(cut, names).text == cut


def test_qwen3_thinking_is_split_and_a_call_inside_it_is_not_parsed(family_models):
    """A call written while thinking is not a call; the one after </think> is."""
    engine = engine_for(family_models["qwen3"])
    reply = ('<think>\nMaybe <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>?\n'
             '</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>')
    # The model is held to exactly this reply (a one-choice grammar): what it says is known.
    forced = SamplingParams(temperature=0, max_tokens=200, structured_outputs={"choice": [reply]})

    async def main():
        items = [item async for item in chat_stream(engine, [{"role": "user", "content": "Weather?"}],
                                                    ReplySpec(tools=[]), forced)]
        return items, await chat_formats(engine)
    items, formats = asyncio.run(main())
    result = items[-1]
    assert isinstance(result, ChatResult) and result.choices[0].finish_reason == "stop"
    assert result.reply.reasoning.startswith("Maybe <tool_call>") and "Oslo" in result.reply.reasoning
    assert "".join(i.reasoning for i in items[:-1]).strip() == result.reply.reasoning
    # With the tool callable, only the call after the thinking counts.
    parsed = formats.tools.parse(result.reply.text, {"get_weather"})
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Lima"})]
    assert parsed.text == "Checking."


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adk_round_trip_in_each_familys_format(family_models, family):
    """ANY mode makes the call (the grammar follows the family's format), the tool answers,
    NONE mode gives the answer; the second prompt carries call and result in that format."""
    name = family_models[family]
    engine = engine_for(name)
    prompts = []
    render = engine.apply_chat_template

    async def spy(messages, tools=None, template_kwargs=None):
        prompts.append(await render(messages, tools, template_kwargs))
        return prompts[-1]

    def policy(callback_context, llm_request):
        answered = any(p.function_response for p in llm_request.contents[-1].parts or [])
        mode = types.FunctionCallingConfigMode.NONE if answered else types.FunctionCallingConfigMode.ANY
        llm_request.config.tool_config = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode=mode))
        llm_request.config.thinking_config = types.ThinkingConfig(thinking_budget=0)  # Qwen3: answer directly

    agent = LlmAgent(name="weather", model=f"engine/{name}", instruction="Use get_weather.", tools=[get_weather],
                     before_model_callback=policy,
                     generate_content_config=types.GenerateContentConfig(max_output_tokens=64))

    async def main():
        runner = InMemoryRunner(agent=agent, app_name="fam")
        session = await runner.session_service.create_session(app_name="fam", user_id="u")
        msg = types.Content(role="user", parts=[types.Part(text="Weather in Paris?")])
        return [e async for e in runner.run_async(user_id="u", session_id=session.id, new_message=msg)]

    engine.apply_chat_template = spy
    try:
        events = asyncio.run(main())
    finally:
        del engine.apply_chat_template
    calls = [p.function_call for e in events for p in e.content.parts or [] if p.function_call]
    responses = [p.function_response for e in events for p in e.content.parts or [] if p.function_response]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].args["city"] in ("Paris", "Lima", "Oslo")
    assert responses[0].response == get_weather(calls[0].args["city"])
    assert events[-1].is_final_response() and events[-1].content.parts[0].text
    city, answer_prompt = calls[0].args["city"], prompts[-1]
    expected = {"qwen3": f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>',
                "llama3": f'{{"name": "get_weather", "parameters": {{"city": "{city}"}}}}<|eot_id|>'
                          f'<|start_header_id|>ipython<|end_header_id|>',
                "gemma3": f'<start_of_turn>model\n<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}'}
    assert expected[family] in answer_prompt
    if family == "qwen3":  # thinking switched off by thinking_budget=0
        assert answer_prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.fixture(scope="module")
def family_servers(family_models):
    with contextlib.ExitStack() as stack:
        yield {family: stack.enter_context(LiveServer(create_app(agents_dir="agents", model=name)))
               for family, name in family_models.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_openai_round_trip_with_the_familys_calls(family_models, family_servers, family):
    url, model = family_servers[family].url, family_models[family]
    messages = [{"role": "user", "content": "Weather in Lima?"}]
    body = {"model": model, "messages": messages, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 64,
            "chat_template_kwargs": {"enable_thinking": False}}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    args = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "get_weather" and args["city"] in ("Paris", "Lima", "Oslo")
    messages += [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(get_weather(**args))}]
    r = httpx.post(url + "/v1/chat/completions", json=body | {"messages": messages, "tool_choice": "none"}, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]
    assert answer["finish_reason"] in ("stop", "length") and answer["message"]["content"]
    assert "tool_calls" not in answer["message"]


THINK_REGEX = r"<think>\n[a-z]{3,12}( [a-z]{3,12}){1,3}\n</think>\n\n[A-Z][a-z]{2,10}( [a-z]{2,10}){0,3}\."


def test_qwen3_thinking_arrives_as_reasoning_content_streamed_and_not(family_models, family_servers):
    """The model's output is held to a think block then an answer (vLLM's structured_outputs
    regex), so that a random model thinks; the server must split it."""
    url, model = family_servers["qwen3"].url, family_models["qwen3"]
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 80,
            "structured_outputs": {"regex": THINK_REGEX}}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] and "<think>" not in message["reasoning_content"]
    details = r.json()["usage"]["completion_tokens_details"]
    assert 0 < details["reasoning_tokens"] < r.json()["usage"]["completion_tokens"]
    assert message["content"] and "think>" not in message["content"] and message["content"].endswith(".")
    reasoning = content = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                reasoning += delta.get("reasoning_content") or ""
                content += delta.get("content") or ""
    assert reasoning.strip() == message["reasoning_content"] and content == message["content"]


def test_qwen3_thinking_shows_as_adk_thought_parts_and_never_goes_back(family_models, monkeypatch):
    import adk_backend.adk_model as adk_model
    name = family_models["qwen3"]
    engine = engine_for(name)
    plain = adk_model.sampling_params

    def thinking(config, defaults=None):  # the same regex hold as above: the random model thinks
        return dataclasses.replace(plain(config, defaults), structured_outputs={"regex": THINK_REGEX})
    monkeypatch.setattr(adk_model, "sampling_params", thinking)
    prompts = []
    render = engine.apply_chat_template

    async def spy(messages, tools=None, template_kwargs=None):
        prompts.append(await render(messages, tools, template_kwargs))
        return prompts[-1]
    agent = LlmAgent(name="thinker", model=f"engine/{name}", instruction="Think, then answer.",
                     generate_content_config=types.GenerateContentConfig(
                         max_output_tokens=80, thinking_config=types.ThinkingConfig(include_thoughts=True)))

    async def main():
        runner = InMemoryRunner(agent=agent, app_name="think")
        session = await runner.session_service.create_session(app_name="think", user_id="u")
        turns = []
        for text in ("Hi", "And again?"):
            msg = types.Content(role="user", parts=[types.Part(text=text)])
            turns.append([e async for e in runner.run_async(user_id="u", session_id=session.id, new_message=msg)])
        return turns

    engine.apply_chat_template = spy
    try:
        first, _ = asyncio.run(main())
    finally:
        del engine.apply_chat_template
    final = [e for e in first if e.is_final_response()][-1]
    thought = [p.text for p in final.content.parts if p.thought]
    answer = [p.text for p in final.content.parts if not p.thought]
    assert len(thought) == 1 and thought[0] and "<think>" not in thought[0]
    assert answer and answer[0].endswith(".")
    assert thought[0] not in prompts[-1] and answer[0] in prompts[-1]  # the history keeps the answer only


def test_a_named_tool_call_parser_overrides_the_template(family_models):
    """--tool-call-parser llama3_json on a model whose template renders no tools (Gemma 3's):
    tools are declared, history calls written, the reply constrained and parsed in that format."""
    configure_engine("gemma3-llama-json", model=str(engine_for(family_models["gemma3"]).config.model),
                     dtype="float32", num_kv_blocks=128, max_model_len=2048, tool_call_parser="llama3_json")
    engine = engine_for("gemma3-llama-json")
    spec = ReplySpec(tools=[WEATHER], mode="required", parallel=False)

    async def main():
        formats = await chat_formats(engine)
        prompt = await prompt_of(engine, conversation(), [WEATHER])
        items = [i async for i in chat_stream(engine, conversation()[:2], spec,
                                              SamplingParams(temperature=0, max_tokens=64))]
        return formats, prompt, items[-1]
    formats, prompt, result = asyncio.run(main())
    assert formats.tools is LLAMA3_JSON and not formats.native_tools
    assert '"parameters": dictionary of argument name' in prompt
    assert '<start_of_turn>model\n{"name": "get_weather", "parameters": {"city": "Paris"}}<end_of_turn>' in prompt
    assert [c.name for c in result.reply.tool_calls] == ["get_weather"]
    with pytest.raises(ValueError, match="unknown tool call parser"):
        configure_engine("bad-parser", model="dummy-tiny", tool_call_parser="pythonic")


def test_reasoning_effort_switches_qwen3_thinking_and_is_bounded(family_models, family_servers):
    url, model = family_servers["qwen3"].url, family_models["qwen3"]
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    off = httpx.post(url + "/v1/chat/completions", json=body | {"reasoning_effort": "none"}, timeout=60)
    assert off.status_code == 200, off.text
    assert not off.json()["choices"][0]["message"].get("reasoning_content")
    assert off.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    bad = httpx.post(url + "/v1/chat/completions", json=body | {"reasoning_effort": "maximal"}, timeout=60)
    assert bad.status_code == 400 and "reasoning_effort must be one of" in bad.json()["error"]["message"]

"""Tool calls through ADK: forced calls, round trips, max_llm_calls, calls cut short."""
import asyncio

import litellm
import pytest
from google.adk.agents import LlmAgent
from google.adk.agents.run_config import RunConfig, StreamingMode
from google.adk.models.llm_request import LlmRequest
from google.adk.runners import InMemoryRunner
from google.genai import types

from adk_backend import configure_engine, engine_for
from adk_backend.adk_model import contents_to_messages, tool_declarations
from adk_backend.chat_format import TextStreamFilter, messages_with_tools, parse_reply

MODEL = "engine/smollm2-tools"
CALLS: list[tuple[str, dict]] = []


@pytest.fixture(scope="module", autouse=True)
def engine():
    # fp32: the 135M model's tool arguments are only reproducible with exact numerics
    configure_engine("smollm2-tools", model="smollm2-135m-instruct", num_kv_blocks=2048, dtype="float32")
    return engine_for("smollm2-tools")


def get_capital(country: str) -> dict:
    """Returns the capital city of a country.

    Args:
        country: The country's name in English.
    """
    CALLS.append(("get_capital", {"country": country}))
    return {"capital": {"france": "Paris", "japan": "Tokyo"}.get(country.strip().lower(), "unknown")}


def force_tool_on_first_turn(callback_context, llm_request: LlmRequest):
    """mode ANY while the last content is the user's question; AUTO once a tool answered."""
    last = llm_request.contents[-1]
    answered = any(p.function_response for p in last.parts or [])
    mode = types.FunctionCallingConfigMode.AUTO if answered else types.FunctionCallingConfigMode.ANY
    llm_request.config.tool_config = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode=mode))
    SEEN_REQUESTS.append(llm_request.model_copy(deep=True))


SEEN_REQUESTS: list[LlmRequest] = []


async def run(agent, text, max_llm_calls=10):
    runner = InMemoryRunner(agent=agent, app_name="t")
    session = await runner.session_service.create_session(app_name="t", user_id="u")
    return [ev async for ev in runner.run_async(
        user_id="u", session_id=session.id, new_message=types.Content(role="user", parts=[types.Part(text=text)]),
        run_config=RunConfig(streaming_mode=StreamingMode.SSE, max_llm_calls=max_llm_calls))]


def test_tool_round_trip_forced_call_then_final_answer():
    CALLS.clear()
    SEEN_REQUESTS.clear()
    agent = LlmAgent(name="capitals", model=MODEL, instruction="Use get_capital to answer.", tools=[get_capital],
                     before_model_callback=force_tool_on_first_turn,
                     generate_content_config=types.GenerateContentConfig(max_output_tokens=40))
    events = asyncio.run(run(agent, "What is the capital of France?"))
    calls = [p.function_call for e in events if not e.partial and e.content for p in e.content.parts if p.function_call]
    responses = [p.function_response for e in events if e.content for p in e.content.parts if p.function_response]
    assert calls and calls[0].name == "get_capital" and calls[0].id.startswith("call_")
    assert CALLS and CALLS[0][0] == "get_capital"  # the Python tool really ran
    assert responses and responses[0].name == "get_capital"
    # The second model call carried the function response back to the model ...
    second = SEEN_REQUESTS[1]
    assert any(p.function_response and p.function_response.id == calls[0].id
               for c in second.contents for p in c.parts or [])
    # ... and the turn ended with a text answer.
    final = [e for e in events if not e.partial and e.content and any(p.text for p in e.content.parts)]
    assert final and final[-1].is_final_response()


def test_max_llm_calls_stops_a_looping_agent_while_other_sessions_carry_on(engine):
    from google.adk.agents.invocation_context import LlmCallsLimitExceededError

    model_calls = []

    def always_call_tool(callback_context, llm_request):
        llm_request.config.tool_config = types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(mode=types.FunctionCallingConfigMode.ANY))

    def count_model_call(callback_context, llm_response):
        model_calls.append(llm_response)

    looping = LlmAgent(name="looping", model=MODEL, tools=[get_capital], before_model_callback=always_call_tool,
                       after_model_callback=count_model_call,
                       instruction="Use get_capital.", generate_content_config=types.GenerateContentConfig(
                           max_output_tokens=60))
    chatty = LlmAgent(name="chatty", model=MODEL, instruction="Answer at length.",
                      generate_content_config=types.GenerateContentConfig(max_output_tokens=120))

    async def main():
        return await asyncio.gather(run(looping, "Capital of Japan?", max_llm_calls=3),
                                    *(run(chatty, f"Tell me about number {i}.") for i in range(4)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[0], LlmCallsLimitExceededError)
    assert len(model_calls) == 3  # exactly N model calls, then ADK's safety valve
    assert all(r.content.parts[0].function_call.name == "get_capital" for r in model_calls)
    for events in results[1:]:
        assert not isinstance(events, BaseException)
        assert [e for e in events if not e.partial][-1].is_final_response()
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_contents_become_chat_messages_with_hermes_tool_blocks():
    req = LlmRequest(contents=[
        types.Content(role="user", parts=[types.Part(text="Capital of France?")]),
        types.Content(role="model", parts=[types.Part(function_call=types.FunctionCall(
            id="c1", name="get_capital", args={"country": "France"}))]),
        types.Content(role="user", parts=[types.Part(function_response=types.FunctionResponse(
            id="c1", name="get_capital", response={"capital": "Paris"}))]),
    ], config=types.GenerateContentConfig(system_instruction="Be brief.", tools=[types.Tool(function_declarations=[
        types.FunctionDeclaration(name="get_capital", description="Capital of a country",
                                  parameters=types.Schema(type="OBJECT", properties={"country": types.Schema(
                                      type="STRING")}, required=["country"]))])]))
    msgs = contents_to_messages(req)  # transformers' chat format: structured calls and results
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[2]["tool_calls"] == [{"id": "c1", "type": "function",
                                      "function": {"name": "get_capital", "arguments": {"country": "France"}}}]
    assert msgs[3] == {"role": "tool", "name": "get_capital", "tool_call_id": "c1", "content": '{"capital": "Paris"}'}
    tools = tool_declarations(req.config)
    # For a template without tools (SmolLM2's), they become Hermes blocks and a system block.
    flat, passed_tools = messages_with_tools(msgs, tools, native=False)
    assert passed_tools is None and "<tools>" in flat[0]["content"] and flat[0]["content"].startswith("Be brief.")
    assert flat[2] == {"role": "assistant", "content":
                       '<tool_call>\n{"name": "get_capital", "arguments": {"country": "France"}}\n</tool_call>'}
    assert flat[3]["role"] == "tool" and '"content": {"capital": "Paris"}' in flat[3]["content"]
    assert tools[0]["function"]["parameters"] == {"type": "object", "properties": {"country": {"type": "string"}},
                                                  "required": ["country"]}


def test_function_response_answering_another_calls_id_is_refused():
    req = LlmRequest(contents=[
        types.Content(role="model", parts=[types.Part(function_call=types.FunctionCall(id="c1", name="a", args={}))]),
        types.Content(role="user", parts=[types.Part(function_response=types.FunctionResponse(
            id="c1", name="b", response={}))]),
    ])
    with pytest.raises(ValueError, match="answers call id 'c1', which was a call to 'a'"):
        contents_to_messages(req)


def test_reply_parsing_splits_calls_from_text_and_keeps_anything_else_as_text():
    ok = parse_reply('Sure. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', {"f"})
    assert ok.text == "Sure." and ok.tool_calls[0].name == "f" and ok.tool_calls[0].arguments == {"x": 1}
    bad = '<tool_call>{"name": "f", "arguments": {x: 1}}</tool_call>'
    assert parse_reply(bad, {"f"}).tool_calls == [] and parse_reply(bad, {"f"}).text == bad
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert parse_reply(unknown, {"f"}).tool_calls == [] and parse_reply(unknown, {"f"}).text == unknown
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert parse_reply(call, set()).tool_calls == []  # tool_choice none: nothing is a call
    assert parse_reply("just text", {"f"}).text == "just text"


def test_a_call_cut_short_by_max_tokens_is_text_with_finish_reason_max_tokens_not_an_error(engine):
    from adk_backend.adk_model import final_response
    from adk_backend.chat import ChatChoice, ChatResult
    reply = parse_reply('<tool_call>\n{"name": "f", "arguments": {"x": [1,', {"f"})
    result = ChatResult(choices=[ChatChoice(0, reply, "length", 3)], request_id="r", num_prompt_tokens=5,
                        num_cached_tokens=0)
    resp = final_response(result)
    assert resp.error_code is None and resp.finish_reason == types.FinishReason.MAX_TOKENS
    assert resp.content.parts[0].text.startswith("<tool_call>") and not resp.content.parts[0].function_call
    assert resp.usage_metadata.total_token_count == 8


def test_stream_filter_never_streams_a_tool_call_block():
    f = TextStreamFilter()
    pieces = [f.feed(d) for d in ["Let me ", "check <to", "ol_call>\n{\"name\"", ": \"f\"}</tool_call>"]]
    assert "".join(pieces) == "Let me check "


def test_litellm_completion_with_tools_and_streaming_usage(engine):
    tools = [{"type": "function", "function": {"name": "get_capital", "description": "Capital of a country",
                                               "parameters": {"type": "object",
                                                              "properties": {"country": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "What is the capital of Japan?"}]
    resp = litellm.completion(model=MODEL, messages=messages, tools=tools, tool_choice="required", max_tokens=100)
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "get_capital" and resp.choices[0].finish_reason == "tool_calls"
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens > 0
    chunks = list(litellm.completion(model=MODEL, messages=messages, max_tokens=16, stream=True,
                                     stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = litellm.completion(model=MODEL, messages=messages, max_tokens=16)
    assert text == plain.choices[0].message.content
    assert any(getattr(c, "usage", None) and c.usage.completion_tokens == plain.usage.completion_tokens
               for c in chunks)

    async def acall():
        return await litellm.acompletion(model=MODEL, messages=messages, max_tokens=16)
    assert asyncio.run(acall()).choices[0].message.content == plain.choices[0].message.content


def test_litellm_bad_request_is_a_clean_error(engine):
    with pytest.raises(Exception, match="temperature"):
        litellm.completion(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-2)
    with pytest.raises(Exception, match="tool_call_id"):
        litellm.completion(model=MODEL, messages=[
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "zzz", "content": "1"}])


def test_example_agents_load_with_adks_own_loader():
    from google.adk.cli.utils.agent_loader import AgentLoader
    loader = AgentLoader("agents")
    assert {"assistant", "tools", "country_card"} <= set(loader.list_agents())
    tools_agent = loader.load_agent("tools")
    assert tools_agent.canonical_model.model == "engine/smollm2-135m-instruct"
    assert {t.__name__ for t in tools_agent.tools} == {"get_capital", "add_numbers"}


def test_example_agents_call_their_tools_and_answer_in_their_schema_on_the_default_model():
    """The served configuration (bf16, the default model): the tools agent really calls a
    tool and answers from its result; country_card's answer is a valid CountryCard."""
    from google.adk.cli.utils.agent_loader import AgentLoader
    loader = AgentLoader("agents")
    tools_agent, card_agent = loader.load_agent("tools"), loader.load_agent("country_card")

    async def turn(agent, text):
        runner = InMemoryRunner(agent=agent, app_name="t")
        session = await runner.session_service.create_session(app_name="t", user_id="u")
        events = [ev async for ev in runner.run_async(
            user_id="u", session_id=session.id, new_message=types.Content(role="user", parts=[types.Part(text=text)]),
            run_config=RunConfig(max_llm_calls=4))]
        return events, await runner.session_service.get_session(app_name="t", user_id="u", session_id=session.id)

    for question, tool in (("What is the capital of Peru?", "get_capital"), ("What is 17 plus 25?", "add_numbers")):
        events, _ = asyncio.run(turn(tools_agent, question))
        calls = [p.function_call for e in events if e.content for p in e.content.parts if p.function_call]
        results = [p.function_response.response for e in events if e.content for p in e.content.parts
                   if p.function_response]
        assert [c.name for c in calls] == [tool] and results[0]["status"] == "success"
        assert events[-1].is_final_response() and events[-1].content.parts[0].text
    module = __import__("agents.country_card.agent", fromlist=["CountryCard"])
    events, session = asyncio.run(turn(card_agent, "Japan"))
    card = module.CountryCard.model_validate(session.state["card"])
    assert (card.capital, card.continent, card.population_millions) == ("Tokyo", "Asia", 124)  # the tool's data

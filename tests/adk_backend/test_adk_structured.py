"""ADK on the engine: function-calling modes NONE / AUTO / ANY (allowed_function_names) and
output_schema (pydantic, genai Schema, JSON schema; with and without tools) are enforced by
the reply grammar; 20 sessions in mode ANY share the batch with free-text sessions."""
import asyncio
import json

import jsonschema
from google.adk.agents import LlmAgent
from google.adk.agents.invocation_context import LlmCallsLimitExceededError
from google.adk.agents.run_config import RunConfig, StreamingMode
from google.adk.models.llm_request import LlmRequest
from google.adk.runners import InMemoryRunner
from google.genai import types
from pydantic import BaseModel

from adk_backend import configure_engine, engine_for
from adk_backend.adk_model import EngineLlm, reply_spec

MODEL = "engine/smollm2-tools"  # test_adk_tools' engine (fp32), shared in the process


def setup_module():
    configure_engine("smollm2-tools", model="smollm2-135m-instruct", num_kv_blocks=2048, dtype="float32")


def get_capital(country: str) -> dict:
    """Returns the capital city of a country.

    Args:
        country: The country's name in English.
    """
    return {"capital": {"france": "Paris", "japan": "Tokyo", "peru": "Lima"}.get(country.strip().lower(), "unknown")}


def add_numbers(a: float, b: float) -> dict:
    """Adds two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return {"sum": a + b}


class CityFacts(BaseModel):
    city: str
    country: str
    is_capital: bool


def with_mode(mode, allowed=None):
    """`mode` until a tool has answered, then NONE (so that the turn ends with text)."""
    def callback(callback_context, llm_request: LlmRequest):
        if any(p.function_response for p in llm_request.contents[-1].parts or []):
            mode_now = types.FunctionCallingConfigMode.NONE
        else:
            mode_now = mode
        llm_request.config.tool_config = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(
            mode=mode_now, allowed_function_names=allowed))
    return callback


async def run(agent, text, streaming=True):
    runner = InMemoryRunner(agent=agent, app_name="t")
    session = await runner.session_service.create_session(app_name="t", user_id="u")
    mode = StreamingMode.SSE if streaming else StreamingMode.NONE
    events = [ev async for ev in runner.run_async(
        user_id="u", session_id=session.id, new_message=types.Content(role="user", parts=[types.Part(text=text)]),
        run_config=RunConfig(streaming_mode=mode, max_llm_calls=6))]
    return events, await runner.session_service.get_session(app_name="t", user_id="u", session_id=session.id)


def calls_in(events):
    return [p.function_call for e in events if not e.partial and e.content for p in e.content.parts or []
            if p.function_call]


def final_text(events):
    finals = [e for e in events if e.is_final_response() and e.content]
    return "".join(p.text or "" for p in finals[-1].content.parts)


def test_output_schema_without_tools_gives_json_of_the_schema_and_state():
    agent = LlmAgent(name="facts", model=MODEL, instruction="Give facts about the city the user names.",
                     output_schema=CityFacts, output_key="facts",
                     generate_content_config=types.GenerateContentConfig(max_output_tokens=80))
    for city in ("Paris", "Lima"):
        events, session = asyncio.run(run(agent, city))
        facts = CityFacts.model_validate_json(final_text(events))
        assert facts.city and facts.country
        assert session.state["facts"] == facts.model_dump()  # ADK parsed and stored it


def test_output_schema_with_tools_calls_a_tool_then_answers_in_the_schema():
    assert EngineLlm(model=MODEL).capabilities.output_schema_and_tools

    def any_then_none(callback_context, llm_request: LlmRequest):
        answered = any(p.function_response for p in llm_request.contents[-1].parts or [])
        mode = types.FunctionCallingConfigMode.NONE if answered else types.FunctionCallingConfigMode.ANY
        llm_request.config.tool_config = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode=mode))

    agent = LlmAgent(name="capital_facts", model=MODEL, instruction="Use get_capital, then describe that city.",
                     tools=[get_capital], output_schema=CityFacts, before_model_callback=any_then_none,
                     generate_content_config=types.GenerateContentConfig(max_output_tokens=80))
    events, _ = asyncio.run(run(agent, "What is the capital of Japan?"))
    assert [c.name for c in calls_in(events)] == ["get_capital"]
    CityFacts.model_validate_json(final_text(events))


def test_mode_none_never_calls_and_allowed_function_names_limits_the_calls():
    none = LlmAgent(name="no_tools", model=MODEL, instruction="Use get_capital.", tools=[get_capital],
                    before_model_callback=with_mode(types.FunctionCallingConfigMode.NONE),
                    generate_content_config=types.GenerateContentConfig(max_output_tokens=40))
    events, _ = asyncio.run(run(none, "What is the capital of France?"))
    assert not calls_in(events) and final_text(events)
    only_add = LlmAgent(name="only_add", model=MODEL, instruction="Answer with tools.",
                        tools=[get_capital, add_numbers],
                        before_model_callback=with_mode(types.FunctionCallingConfigMode.ANY, ["add_numbers"]),
                        generate_content_config=types.GenerateContentConfig(max_output_tokens=40))
    events, _ = asyncio.run(run(only_add, "What is the capital of France?", streaming=False))
    calls = calls_in(events)
    assert calls and all(c.name == "add_numbers" and set(c.args) == {"a", "b"} for c in calls)


def test_both_schema_forms_become_the_same_json_schema():
    genai = types.Schema(type="OBJECT", properties={"city": types.Schema(type="STRING"),
                                                     "size": types.Schema(type="INTEGER", nullable=True)},
                         required=["city"], property_ordering=["city", "size"])
    as_json = {"type": "object", "properties": {"city": {"type": "string"}, "size": {"type": ["null", "integer"]}},
               "required": ["city"]}
    decl = [types.Tool(function_declarations=[
        types.FunctionDeclaration(name="f", parameters=genai),
        types.FunctionDeclaration(name="g", parameters_json_schema=as_json)])]
    spec = reply_spec(types.GenerateContentConfig(tools=decl, response_schema=genai))
    assert spec.tools[0]["function"]["parameters"] == spec.tools[1]["function"]["parameters"] == as_json
    assert spec.response_schema == as_json
    jsonschema.validate({"city": "Oslo", "size": None}, spec.response_schema)
    assert reply_spec(types.GenerateContentConfig(response_json_schema=as_json)).response_schema == as_json
    assert reply_spec(types.GenerateContentConfig(response_mime_type="application/json")).response_schema == \
        {"type": "object"}


def test_twenty_sessions_in_mode_any_share_one_batch_with_free_sessions():
    engine = engine_for(MODEL)
    seen: list[tuple[int, int]] = []  # per step: (constrained, free) requests that got a token

    def record(step):
        seen.append((sum(r.grammar is not None for r in step.updated), sum(r.grammar is None for r in step.updated)))
    engine.step_listeners.append(record)
    forced = LlmAgent(name="forced", model=MODEL, instruction="Use get_capital.", tools=[get_capital],
                      before_model_callback=with_mode(types.FunctionCallingConfigMode.ANY),
                      generate_content_config=types.GenerateContentConfig(max_output_tokens=40))
    chatty = LlmAgent(name="chatty", model=MODEL, instruction="Answer at length.",
                      generate_content_config=types.GenerateContentConfig(max_output_tokens=60))
    countries = ["France", "Japan", "Peru", "Kenya", "Italy"]

    async def one_forced(i):
        runner = InMemoryRunner(agent=forced, app_name="t")
        session = await runner.session_service.create_session(app_name="t", user_id="u")
        msg = types.Content(role="user", parts=[types.Part(text=f"Capital of {countries[i % 5]}?")])
        events = []
        try:
            async for ev in runner.run_async(user_id="u", session_id=session.id, new_message=msg,
                                             run_config=RunConfig(max_llm_calls=1)):
                events.append(ev)
        except LlmCallsLimitExceededError:  # its one forced call made, the tool ran: enough
            pass
        return events

    async def main():
        return await asyncio.gather(*(one_forced(i) for i in range(20)),
                                    *(run(chatty, f"Tell me about the number {i}.") for i in range(6)),
                                    return_exceptions=True)
    try:
        results = asyncio.run(main())
    finally:
        engine.step_listeners.remove(record)
    assert all(not isinstance(r, BaseException) for r in results), results
    for events in results[:20]:
        assert [c.name for c in calls_in(events)] == ["get_capital"]
    peak = max(c + f for c, f in seen if c and f)
    assert peak >= 20, f"largest step with both kinds held {peak} requests"
    assert engine.stats()["peak_batch_size"] >= peak


def test_litellm_provider_enforces_response_format_tool_choice_and_vllm_extras():
    import litellm
    schema = CityFacts.model_json_schema()
    r = litellm.completion(model=MODEL, messages=[{"role": "user", "content": "Describe Paris."}], max_tokens=80,
                           response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": schema}})
    CityFacts.model_validate_json(r.choices[0].message.content)
    tools = [{"type": "function", "function": {"name": "get_capital", "parameters": {
        "type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]}}}]
    r = litellm.completion(model=MODEL, messages=[{"role": "user", "content": "Capital of Peru?"}], max_tokens=60,
                           tools=tools, tool_choice="required", parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_capital" and "country" in json.loads(call.function.arguments)
    r = litellm.completion(model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}], max_tokens=60,
                           extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")


def test_adk_litellm_model_with_output_schema_answers_in_the_schema():
    from google.adk.models.lite_llm import LiteLlm
    agent = LlmAgent(name="facts_litellm", model=LiteLlm(model=MODEL), instruction="Describe the city.",
                     output_schema=CityFacts)
    events, _ = asyncio.run(run(agent, "Tokyo"))
    CityFacts.model_validate_json(final_text(events))

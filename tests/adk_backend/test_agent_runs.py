"""A call's agent program, read from the ADK request when no plugin names the run."""
from google.adk.models.llm_request import LlmRequest
from google.genai import types

from adk_backend.agent_runs import CURRENT_PROGRAM, program_of


def _user(text: str) -> types.Content:
    return types.Content(role="user", parts=[types.Part(text=text)])


def _tool_round(call_id: str) -> list[types.Content]:
    call = types.FunctionCall(id=call_id, name="lookup", args={"step": 1})
    result = types.FunctionResponse(id=call_id, name="lookup", response={"facts": "x"})
    return [types.Content(role="model", parts=[types.Part(function_call=call)]),
            types.Content(role="user", parts=[types.Part(function_response=result)])]


def _request(contents: list[types.Content], instruction: str = "Be brief.") -> LlmRequest:
    return LlmRequest(contents=contents, config=types.GenerateContentConfig(system_instruction=instruction))


def test_the_calls_of_one_run_share_a_program_and_the_next_run_or_another_agent_gets_another():
    opening = [_user("What is 2 plus 3?")]
    first_call = program_of(_request(opening))
    after_two_tools = program_of(_request(opening + _tool_round("a") + _tool_round("b")))
    answered = opening + _tool_round("a") + [types.Content(role="model", parts=[types.Part(text="5")])]
    next_run = program_of(_request(answered + [_user("And 4 plus 5?")]))
    assert first_call == after_two_tools != next_run
    assert program_of(_request(opening, instruction="Answer in French.")) != first_call  # another agent
    assert program_of(_request([_user("What is 7 plus 1?")])) != first_call  # another opening


def test_the_plugins_name_for_the_run_comes_first():
    token = CURRENT_PROGRAM.set("t/session/invocation")
    try:
        assert program_of(_request([_user("What is 2 plus 3?")])) == "t/session/invocation"
    finally:
        CURRENT_PROGRAM.reset(token)

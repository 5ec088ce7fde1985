"""A call's agent program, read from the call itself when no plugin names the run."""
from adk_backend.agent_runs import CURRENT_PROGRAM, program_of
from adk_backend.chat_format import ToolCall, assistant_message, tool_message

SYSTEM = {"role": "system", "content": "Be brief."}
OPENING = [SYSTEM, {"role": "user", "content": "What is 2 plus 3?"}]


def _tool_round(call_id: str) -> list[dict]:
    return [assistant_message("", [ToolCall("add", {"a": 2, "b": 3}, id=call_id)]),
            tool_message("add", call_id, {"sum": 5})]


def test_the_calls_of_one_run_share_a_program_and_the_next_run_or_another_agent_gets_another():
    first_call = program_of(OPENING)
    after_two_tools = program_of(OPENING + _tool_round("a") + _tool_round("b"))
    answered = OPENING + _tool_round("a") + [assistant_message("5", [])]
    next_run = program_of(answered + [{"role": "user", "content": "And 4 plus 5?"}])
    assert first_call == after_two_tools != next_run and first_call.startswith("run/")
    assert program_of([{"role": "system", "content": "Answer in French."}] + OPENING[1:]) != first_call  # another agent
    assert program_of([SYSTEM, {"role": "user", "content": "What is 7 plus 1?"}]) != first_call  # another opening


def test_the_plugins_name_for_the_run_comes_first():
    token = CURRENT_PROGRAM.set("t/session/invocation")
    try:
        assert program_of(OPENING) == "t/session/invocation"
    finally:
        CURRENT_PROGRAM.reset(token)

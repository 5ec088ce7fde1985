"""Property-based fuzzing: random sampling parameters and random chat / tool-call input
only ever give clean errors, and never break the engine."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adk_backend.chat_format import TextStreamFilter, parse_reply
from adk_backend.openai_format import openai_reply_spec, openai_to_messages
from engine import LLM, SamplingParams
from helpers import assert_all_blocks_free

LLM_TINY = LLM("dummy-tiny", dtype="float32", num_kv_blocks=64, max_model_len=128)
numbers = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                    st.booleans(), st.text(max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(temperature=numbers, top_p=numbers, top_k=numbers, min_p=numbers, max_tokens=numbers, seed=numbers,
       presence=numbers, stop=st.one_of(st.none(), st.text(max_size=4), st.lists(st.text(max_size=3), max_size=3)))
def test_sampling_params_either_refuse_cleanly_or_generate(temperature, top_p, top_k, min_p, max_tokens, seed,
                                                           presence, stop):
    kwargs = {k: v for k, v in dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                    max_tokens=max_tokens, seed=seed, presence_penalty=presence,
                                    stop=stop).items() if v is not None}
    try:
        params = SamplingParams(**kwargs)
    except ValueError as exc:
        assert "SamplingParams." in str(exc)  # names the field
        return
    if params.max_tokens is not None:
        params.max_tokens = min(params.max_tokens, 8)
        params.min_tokens = min(params.min_tokens, params.max_tokens)
    out = LLM_TINY.generate([[5, 6, 7]], params)[0].outputs[0]
    assert 1 <= len(out.token_ids) <= 8 or out.finish_reason == "stop"
    assert all(0 <= t < 49152 for t in out.token_ids)
    assert_all_blocks_free(LLM_TINY.engine)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                                     st.floats(allow_nan=False)),
                           lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                  st.dictionaries(st.sampled_from(
                                                      ["role", "content", "tool_calls", "tool_call_id", "function",
                                                       "name", "arguments", "id", "type", "parameters"]),
                                                      kids, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(messages=json_values, tools=json_values, tool_choice=json_values, response_format=json_values)
def test_openai_request_conversion_only_raises_value_errors(messages, tools, tool_choice, response_format):
    try:
        openai_reply_spec({"tools": tools, "tool_choice": tool_choice, "response_format": response_format})
        openai_to_messages(messages)
    except (ValueError, KeyError, TypeError, AttributeError):  # what the API maps to 400
        pass


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list('<>/{}":, []tool_call_namearguments\n x1')), max_size=80))
def test_tool_call_parser_never_crashes_and_never_loses_a_block(text):
    reply = parse_reply(text, {"f", "x"})
    if not reply.tool_calls:  # nothing is lost: what is not a call is text
        assert reply.text == text
    for call in reply.tool_calls:
        assert isinstance(call.name, str) and isinstance(call.arguments, dict)
    f = TextStreamFilter()
    streamed = "".join(f.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    assert "<tool_call>" not in streamed
    assert text.startswith(streamed)

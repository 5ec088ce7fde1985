"""Grammar-constrained decoding in the engine: every constrained output matches its grammar,
constrained and free requests share batches, and preemption, chunked prefill, prefix-cache
hits and aborts leave each request's matcher in step with its tokens."""
import asyncio
import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import LLM, AsyncLLM, EngineConfig, SamplingParams, StructuredOutputsParams
from helpers import assert_all_blocks_free

BASE = dict(model="dummy-tiny", dtype="float32", max_model_len=512, max_num_seqs=64)
TINY = LLM(**BASE, num_kv_blocks=512)

# -- JSON schemas from hypothesis: bounded, so that even a random model finishes them -------
names = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
leaves = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(-1000, 1000).flatmap(lambda lo: st.integers(lo, lo + 500).map(
        lambda hi: {"type": "integer", "minimum": lo, "maximum": hi})),
    st.integers(0, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.one_of(st.text(alphabet="xyz ", max_size=4), st.integers(-9, 9)), min_size=1, max_size=4,
             unique=True).map(lambda vs: {"enum": vs}),
)


def objects(children):
    return st.dictionaries(names, children, min_size=1, max_size=3).flatmap(lambda props: st.sets(
        st.sampled_from(sorted(props))).map(lambda req: {"type": "object", "properties": props,
                                                         "required": sorted(req), "additionalProperties": False}))


schemas = st.recursive(leaves, lambda kids: st.one_of(
    objects(kids), kids.map(lambda s: {"type": "array", "items": s, "maxItems": 3})), max_leaves=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas, seed=st.integers(0, 2**31))
# Found by this test: xgrammar's rule for length-bounded strings let a raw control character in.
@example(schema={"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}, seed=1_741_153_605)
def test_every_output_under_a_json_schema_parses_and_validates(schema, seed):
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=400, structured_outputs={"json": schema})
    out = TINY.generate([[5, 6, 7, 8]], params)[0].outputs[0]
    assert out.finish_reason == "stop", (schema, out.text)
    jsonschema.validate(json.loads(out.text), schema)


def test_regex_choice_grammar_and_json_object_outputs_match_their_grammars():
    kinds = [({"regex": r"[a-c]{2}-\d{3}"}, lambda t: re.fullmatch(r"[a-c]{2}-\d{3}", t)),
             ({"choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma")),
             ({"grammar": 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'}, lambda t: re.fullmatch(r"\(\d+(\+\d+)*\)", t)),
             ({"json_object": True}, lambda t: isinstance(json.loads(t), dict))]
    for so, ok in kinds:
        for seed in range(4):
            out = TINY.generate([[9, 10, 11]], SamplingParams(temperature=1.0, seed=seed, max_tokens=300,
                                                                structured_outputs=so))[0].outputs[0]
            if out.finish_reason == "stop":
                assert ok(out.text), (so, out.text)
            else:  # a runaway number or string: what there is, is a prefix the grammar allowed
                assert out.finish_reason == "length"


def constrained(i: int) -> SamplingParams:
    schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]},
                                                        "maxItems": 4}},
              "required": ["id", "tags"], "additionalProperties": False}
    return SamplingParams(temperature=0.9, seed=i, max_tokens=60, structured_outputs={"json": schema})


def free(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.9, seed=1000 + i, max_tokens=10 + i % 20, ignore_eos=True)


def prompts(n: int) -> list[list[int]]:
    shared = list(range(100, 140))  # a shared 40-token prefix: later requests hit the prefix cache
    return [shared + [3 + (i * 13 + j) % 400 for j in range(10 + i % 30)] for i in range(n)]


def mixed_params(n: int) -> list[SamplingParams]:
    return [constrained(i) if i % 2 == 0 else free(i) for i in range(n)]


@pytest.fixture(scope="module")
def ample_outputs():
    llm = LLM(**BASE, num_kv_blocks=2048)
    return [o.outputs[0].token_ids for o in llm.generate(prompts(60), mixed_params(60))]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_constrained_requests_under_preemption_and_chunked_prefill_match_runs_with_ample_kv(mode, ample_outputs):
    llm = LLM(**BASE, num_kv_blocks=40, max_num_batched_tokens=64, preemption_mode=mode,
              swap_space=64 * 2 * 2 * 16 * 2 * 16 * 4)
    outs = llm.generate(prompts(60), mixed_params(60))
    assert [o.outputs[0].token_ids for o in outs] == ample_outputs
    for o, p in zip(outs, mixed_params(60)):
        if p.structured_outputs is not None:
            json.loads(o.outputs[0].text)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    history = list(llm.engine.step_history)
    assert any(0 < s.num_prefill_tokens < sum(s.scheduled.values()) for s in history)  # chunks beside decodes
    assert_all_blocks_free(llm.engine)


def test_constrained_and_free_requests_share_steps():
    llm = LLM(**BASE, num_kv_blocks=512)
    eng = llm.engine
    reqs = [eng.add_request(p, sp) for p, sp in zip(prompts(8), mixed_params(8))]
    mixed_steps = 0
    while eng.has_unfinished():
        eng.step()
        running = eng.scheduler.running
        if any(r.grammar is not None for r in running) and any(r.grammar is None for r in running):
            mixed_steps += 1
    assert mixed_steps > 0
    assert all(r.finish_reason == "stop" for r in reqs[::2])
    assert eng.stats()["grammar_cache_misses"] == 1  # one schema, compiled once


def test_stop_strings_eos_and_max_tokens_inside_a_grammar():
    schema = {"type": "object", "properties": {"word": {"enum": ["apple", "banana"]}}, "required": ["word"]}
    so = {"json": schema}
    full = TINY.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=50, structured_outputs=so))[0].outputs[0]
    assert full.finish_reason == "stop" and full.token_ids[-1] == 2  # the grammar ended; EOS closed it
    assert json.loads(full.text)["word"] in ("apple", "banana")
    cut = TINY.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=3, structured_outputs=so))[0].outputs[0]
    assert cut.finish_reason == "length" and full.text.startswith(cut.text) and len(cut.token_ids) == 3
    stopped = TINY.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=50, stop=['"word"'],
                                                     structured_outputs=so))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == '"word"' and stopped.text == "{"
    # min_tokens cannot hold a finished grammar open: the grammar wins
    held = TINY.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=50, min_tokens=40,
                                                  structured_outputs=so))[0].outputs[0]
    assert held.text == full.text and held.finish_reason == "stop"


def test_json_in_a_structural_tag_has_json_dumps_separators_so_a_call_renders_back_as_generated():
    """A tag's JSON content, as JSON mode, is generated with fixed separators (json.dumps's):
    the text of a call is what tool_formats renders back into the next prompt."""
    args = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                             "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
            "required": ["a", "b"], "additionalProperties": False}
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<call>", "content": {
        "type": "json_schema", "json_schema": args}, "end": "</call>"}}
    tagged = TINY.generate([[5 + i, 6] for i in range(8)], [
        SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured_outputs={"structural_tag": tag})
        for i in range(8)])
    plain = TINY.generate([[7, 8]], SamplingParams(temperature=1.0, seed=0, max_tokens=60,
                                                   structured_outputs={"json": args}))
    for out in [o.outputs[0] for o in tagged + plain]:
        body = out.text.removeprefix("<call>").removesuffix("</call>")
        assert out.finish_reason == "stop" and body == json.dumps(json.loads(body)), out.text


def test_only_json_that_asks_for_no_whitespace_of_its_own_gets_fixed_separators():
    from engine.grammar_worker import fixed_separators
    plain = {"type": "json_schema", "json_schema": {"type": "integer"}}
    spaced = plain | {"max_whitespace_cnt": 4}
    fmt = {"type": "sequence", "elements": [plain, {"type": "tag", "begin": "<", "content": spaced, "end": ">"},
                                             {"type": "tag", "begin": "(", "content": plain, "end": ")"}]}
    rewritten = fixed_separators(fmt, lambda schema: f"root ::= {json.dumps(schema)!r}")
    grammar = {"type": "grammar", "grammar": "root ::= '{\"type\": \"integer\"}'"}
    assert rewritten == {"type": "sequence", "elements": [grammar, {"type": "tag", "begin": "<", "content": spaced,
                                                                    "end": ">"},
                                                          {"type": "tag", "begin": "(", "content": grammar, "end": ")"}]}


def test_bad_grammars_are_value_errors_that_name_the_problem_and_the_engine_keeps_serving():
    with pytest.raises(ValueError, match="exactly one of"):
        SamplingParams(structured_outputs={"json": {"type": "object"}, "regex": "a"})
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams(structured_outputs={"jsonschema": {}})
    cases = [({"json": {"type": "bogus"}}, "json is invalid: .*bogus"),
             ({"json": "{not json"}, "json is invalid"),
             ({"regex": "(unclosed"}, "regex is invalid"),
             ({"grammar": "root ::= undefined_rule"}, "grammar is invalid: .*undefined_rule"),
             ({"structural_tag": {"type": "structural_tag", "format": {"type": "nope"}}}, "structural_tag is invalid")]
    for so, message in cases:
        with pytest.raises(ValueError, match=message):
            TINY.generate([[5]], SamplingParams(structured_outputs=so))
    assert TINY.generate([[5]], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].finish_reason == "length"
    assert_all_blocks_free(TINY.engine)


def test_a_grammar_that_compiles_too_long_is_refused_with_a_value_error():
    llm = LLM(**BASE, num_kv_blocks=64, grammar_compile_timeout=1e-6)
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(50)}}
    with pytest.raises(ValueError, match="did not compile within"):
        llm.generate([[5]], SamplingParams(structured_outputs={"json": schema}))


def test_async_requests_compile_off_the_loop_and_an_aborted_constrained_request_frees_its_blocks():
    engine = AsyncLLM(EngineConfig(**BASE, num_kv_blocks=256))

    async def run(i, p, sp, stop_after=None):
        text, n = "", 0
        async for out in engine.generate(p, sp, request_id=f"r{i}"):
            text += out.outputs[0].text
            n += len(out.outputs[0].token_ids)
            if stop_after is not None and n >= stop_after:
                break  # leaves early: the request is aborted
        return text

    async def main():
        ps, sps = prompts(10), mixed_params(10)
        return await asyncio.gather(*(run(i, ps[i], sps[i], stop_after=3 if i == 0 else None) for i in range(10)))

    try:
        texts = asyncio.run(main())
        for _ in range(100):
            if engine.stats()["num_running"] == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
        stats = engine.stats()
    finally:
        engine.shutdown()
    for i in range(2, 10, 2):
        json.loads(texts[i])
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_structured_outputs_params_key_ignores_dict_order():
    a = StructuredOutputsParams(json={"type": "object", "properties": {}})
    b = StructuredOutputsParams(json={"properties": {}, "type": "object"})
    assert a.key == b.key and a.kind == "json"


def test_tools_go_through_the_chat_template_when_it_renders_them_else_hermes():
    import copy

    from adk_backend.chat import render_chat_offline
    from adk_backend.chat_format import HERMES_SYSTEM
    from adk_backend.tool_formats import PROBE_TOOL
    from engine.input_processor import InputProcessor
    tool = {"type": "function", "function": {"name": "get_capital", "parameters": {"type": "object"}}}
    msgs = [{"role": "user", "content": "Capital of Peru?"}]
    engine = TINY.engine

    def shows_tools() -> bool:  # the chat template shows the tools it is given
        return "probe_tool_7f3a" in engine.apply_chat_template([{"role": "user", "content": "hi"}], [PROBE_TOOL])
    assert not shows_tools()  # SmolLM2's template ignores tools
    hermes = render_chat_offline(engine, msgs, [tool])
    assert HERMES_SYSTEM.split(".")[0] in hermes and '"name": "get_capital"' in hermes
    tools_aware = copy.deepcopy(engine.tokenizer)
    original = engine.inputs

    def render_with(template: str) -> str:
        tools_aware.chat_template = template
        engine.inputs = InputProcessor(tools_aware, original.model_config, original.max_model_len, original.grammars,
                                       original.model_name)
        try:
            assert shows_tools()
            return render_chat_offline(engine, msgs, [tool])
        finally:
            engine.inputs = original
    declares = "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    turns = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}CALLS<|im_end|>\n{% endfor %}" \
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    calls = "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    # It shows tools and renders calls (in Hermes): tools, calls and results go through it.
    prompt = render_with(declares + turns.replace("CALLS", calls))
    assert prompt.startswith("<tools>get_capital;</tools>") and HERMES_SYSTEM.split(".")[0] not in prompt
    # It shows tools but cannot render a call: we declare them ourselves, in Hermes.
    prompt = render_with(declares + turns.replace("CALLS", ""))
    assert "<tools>get_capital;</tools>" not in prompt and HERMES_SYSTEM.split(".")[0] in prompt


def test_a_length_bounded_json_string_never_takes_a_raw_control_character():
    grammars = TINY.engine.grammars
    for schema in ({"type": "string", "maxLength": 6},
                   {"type": "object", "properties": {"s": {"type": "string", "minLength": 1}}, "required": ["s"]}):
        prefix = '"' if schema["type"] == "string" else '{"s": "'
        matcher = grammars.matcher(grammars.compile(StructuredOutputsParams(json=schema)))
        tok = TINY.tokenizer
        assert all(matcher.accept_token(t) for t in tok.encode(prefix, add_special_tokens=False))
        control = tok.encode("\x0f", add_special_tokens=False)
        assert len(control) == 1 and not matcher.accept_token(control[0])
        assert matcher.accept_token(tok.encode("a", add_special_tokens=False)[0])

"""An agent program's next call continues the tokens its last call ended with."""
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.chat_template import ProtectedText

PROMPT = "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
PARAMS = SamplingParams(temperature=0, max_tokens=4)


def _engine(**kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model="dummy-tiny", dtype="float32", num_kv_blocks=64, max_model_len=1024, **kw))


def _last_call(engine: LLMEngine, program: str) -> list[int]:
    """A call of `program` whose reply the model split otherwise than the tokenizer would:
    ' {' '"' where encoding the same text gives ' {"'."""
    tok = engine.tokenizer
    prompt_ids = engine.make_request(PROMPT, PARAMS).prompt_token_ids
    reply = tok.encode(" {", add_special_tokens=False) + tok.encode('"', add_special_tokens=False) + \
        tok.encode('a": 2}', add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.encode(' {"a": 2}', add_special_tokens=False)[0] not in reply  # the tokenizer's own split differs
    engine.inputs.program_tokens.record(program, prompt_ids + reply)
    return prompt_ids + reply


def test_the_next_calls_prompt_takes_the_tokens_the_last_call_wrote_for_the_same_text():
    engine = _engine()
    last = _last_call(engine, "p")
    after = PROMPT + ' {"a": 2}<|im_end|>\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n'
    own = engine.make_request(after, PARAMS).prompt_token_ids  # no program: the tokenizer's split
    continued = engine.make_request(after, PARAMS, program="p").prompt_token_ids
    assert own[:len(last)] != last and continued[:len(last)] == last
    decode = lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert decode(continued) == decode(own) == after
    assert engine.inputs.program_tokens.num_continued == engine.stats()["program_prompts_continued"] == 1
    # another program, or the same one whose prompt says something else, keeps its own tokens
    assert engine.make_request(after, PARAMS, program="q").prompt_token_ids == own
    other = after.replace('"a": 2', '"a": 3')
    assert engine.make_request(other, PARAMS, program="p").prompt_token_ids == \
        engine.make_request(other, PARAMS).prompt_token_ids


def test_a_control_token_the_model_wrote_is_not_taken_where_the_prompt_has_plain_text():
    """The last call ended with <|im_end|> (the control token); a prompt whose same spelling is
    a client's plain text must not turn into it."""
    engine = _engine()
    _last_call(engine, "p")
    text = PROMPT + ' {"a": 2}<|im_end|> and more'
    start = len(PROMPT) + len(' {"a": 2}')
    protected = ProtectedText(text, protected=((start, len(text)),))
    own = engine.make_request(protected, PARAMS).prompt_token_ids
    assert engine.make_request(protected, PARAMS, program="p").prompt_token_ids == own


def test_a_third_call_continues_the_second_though_the_first_reply_was_respelled_long_before():
    """Every later prompt holds the first call's reply: the prompt's own tokens differ from
    the kept ones there, however far back, and the whole of the last call is still taken."""
    engine = _engine()
    tok = engine.tokenizer
    last = _last_call(engine, "p")
    second = PROMPT + ' {"a": 2}<|im_end|>\n<|im_start|>tool\n' + "five " * 400 + "<|im_end|>\n<|im_start|>assistant\n"
    second_ids = engine.make_request(second, PARAMS, program="p").prompt_token_ids
    assert second_ids[:len(last)] == last
    reply = tok.encode(" {", add_special_tokens=False) + tok.encode('"', add_special_tokens=False) + \
        tok.encode('b": 7}', add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    engine.inputs.program_tokens.record("p", second_ids + reply)
    third = second + ' {"b": 7}<|im_end|>\n<|im_start|>tool\n8<|im_end|>\n'
    own = engine.make_request(third, PARAMS).prompt_token_ids
    continued = engine.make_request(third, PARAMS, program="p").prompt_token_ids
    assert len(second_ids + reply) - len(last) > 256  # the first difference lies that far back
    assert continued[:len(second_ids + reply)] == second_ids + reply
    assert tok.decode(continued, skip_special_tokens=False) == tok.decode(own, skip_special_tokens=False) == third


def test_without_prefix_caching_prompts_keep_their_own_tokens():
    assert _engine(enable_prefix_caching=False).inputs.program_tokens is None

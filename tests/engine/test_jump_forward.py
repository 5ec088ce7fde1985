"""Jump-forward decoding (engine/structured_output.py): the text a grammar forces is appended
in one step, the next step computes it as a chunk at the right positions, and everything
that counts tokens (max_tokens, stop strings, logprobs, stats) still holds."""
import re

import xgrammar as xgr

from engine import LLM, SamplingParams
from helpers import assert_all_blocks_free

BASE = dict(model="dummy-tiny", dtype="float32", max_model_len=512, num_kv_blocks=256)
CALL_PREFIX = '<call>{"name": "lookup", "arguments": {"step": '
# the forced prefix, then free text: any characters but a newline
CALL = {"regex": r'<call>\{"name": "lookup", "arguments": \{"step": [^\n]{1,300}'}
TAG = {"structural_tag": {"type": "structural_tag", "format": {
    "type": "tag", "begin": '<call>{"name": "lookup", "arguments": ',
    "content": {"type": "json_schema", "json_schema": {
        "type": "object", "properties": {"step": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "query": {"enum": ["alpha", "beta"]}},
        "required": ["step", "query"], "additionalProperties": False}},
    "end": "}</call>"}}}
PROMPT = [5, 6, 7, 8, 9]


def steps_and_output(llm: LLM, prompt, params: SamplingParams):
    before = llm.stats()["num_steps"]
    out = llm.generate([prompt], params)[0].outputs[0]
    return llm.stats()["num_steps"] - before, out


def test_forced_text_is_appended_in_one_step():
    on, off = LLM(**BASE), LLM(**BASE, jump_forward=False)
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs=TAG)
    steps_on, out_on = steps_and_output(on, PROMPT, params)
    steps_off, out_off = steps_and_output(off, PROMPT, params)
    for out in (out_on, out_off):
        assert out.finish_reason == "stop"
        assert re.fullmatch(r'<call>\{"name": "lookup", "arguments": \{"step": \d+, "query": "(alpha|beta)"\}\}</call>',
                            out.text), out.text
    assert steps_off == len(out_off.token_ids)  # a token a step
    assert steps_on <= 8 < len(out_on.token_ids), (steps_on, out_on.token_ids)
    # the forced stretch after the first sampled token, short of its last token (`": ` ends it:
    # ` ` could merge with a digit), spelled as the tokenizer spells it
    tok = on.tokenizer
    first = tok.decode(out_on.token_ids[:1])
    forced = tok.encode(CALL_PREFIX.removeprefix(first), add_special_tokens=False)[:-1]
    assert out_on.token_ids[1:1 + len(forced)] == forced
    stats = on.stats()
    assert stats["jump_forward_tokens_total"] >= len(forced)
    assert off.stats()["jump_forward_tokens_total"] == 0
    # forced output is not prefill: the prompt alone was (no prefix-cache hit: a fresh engine)
    assert stats["prefill_tokens_computed_total"] == len(PROMPT)
    # computed in steps: all but the closing stretch, which ended the request (`>` and the stop
    # token are the only ones the grammar allows) and needs no forward pass
    computed = sum(s.num_jump_forward_tokens for s in on.engine.step_history)
    assert 0 < computed < stats["jump_forward_tokens_total"]
    assert out_on.token_ids[-1] == 2 and out_off.token_ids[-2:] == out_on.token_ids[-2:]
    assert_all_blocks_free(on.engine)


def test_a_finished_request_reports_the_tokens_whose_kv_it_computed():
    """What a caller's next turn can find in the prefix cache: a token a step leaves all but
    the last sampled token computed; a call that ends in a forced stretch leaves that
    stretch uncomputed too (it was appended after the last step)."""
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs=TAG)
    for llm in (LLM(**BASE, jump_forward=False), LLM(**BASE)):
        result = llm.generate([PROMPT], params)[0]
        total = len(PROMPT) + len(result.outputs[0].token_ids)
        uncomputed_forced = llm.stats()["jump_forward_tokens_total"] - sum(
            s.num_jump_forward_tokens for s in llm.engine.step_history)
        assert result.metrics.num_computed_tokens == total - 1 - uncomputed_forced
        assert (uncomputed_forced > 0) == llm.engine.config.jump_forward


def test_the_token_after_a_jump_is_the_one_the_model_computes_at_its_position():
    """Teacher-forced reference: the same prompt plus the tokens up to the first free choice,
    decoded greedily without a grammar, gives the tokens the jumping engine sampled there
    (its free text allows every token without a newline): a wrong position or a missing KV row
    of the jumped chunk would change them."""
    llm = LLM(**BASE)
    compiled = llm.engine.grammars.compile(SamplingParams(structured_outputs=CALL).structured_outputs)
    checked = 0
    for prompt in ([5, 6, 7, 8, 9], [40, 41, 300, 7], list(range(100, 137))):
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, structured_outputs=CALL))[0]
        ids = out.outputs[0].token_ids
        matcher = xgr.GrammarMatcher(compiled)
        free_at = None
        for i, t in enumerate(ids):
            if i > 1 and not matcher.find_jump_forward_string():
                free_at = i  # the first token after the forced stretch is the model's own
                break
            assert matcher.accept_token(t)
        assert free_at is not None and llm.tokenizer.decode(ids[:free_at]).startswith(CALL_PREFIX.rstrip())
        ref = llm.generate([prompt + ids[:free_at]], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
        n = next((k for k, t in enumerate(ref.token_ids) if "\n" in llm.tokenizer.decode([t])), len(ref.token_ids))
        n = min(n, len(ids) - free_at)
        assert n >= 3 and ids[free_at:free_at + n] == ref.token_ids[:n], (prompt, ids, ref.token_ids)
        checked += n
    assert checked >= 9


def test_a_request_that_asks_for_logprobs_decodes_every_token_with_its_logprob():
    llm = LLM(**BASE)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=80, logprobs=2,
                                                structured_outputs=TAG))[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.logprobs) == len(out.token_ids)
    assert all(t in lp for t, lp in zip(out.token_ids, out.logprobs))
    assert llm.stats()["jump_forward_tokens_total"] == 0


def test_max_tokens_and_stop_strings_cut_inside_a_forced_stretch():
    llm = LLM(**BASE)
    full = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=80, structured_outputs=TAG))[0].outputs[0]
    for cut in (2, 5, 9):
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=cut,
                                                    structured_outputs=TAG))[0].outputs[0]
        assert out.finish_reason == "length" and out.token_ids == full.token_ids[:cut]
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=80, stop=['"arguments"'],
                                                    structured_outputs=TAG))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == '<call>{"name": "lookup", '
    assert_all_blocks_free(llm.engine)


def test_jumping_rows_share_steps_with_decodes_and_prompt_chunks_and_match_each_request_alone():
    """Constrained requests beside free ones, with a small token budget that splits prompts
    and jumped chunks across steps: each output is the one it has alone."""
    params = [SamplingParams(temperature=0, max_tokens=60, structured_outputs=TAG) if i % 2 == 0
              else SamplingParams(temperature=0, max_tokens=12 + i, ignore_eos=True) for i in range(10)]
    prompts = [[3 + (i * 7 + j) % 400 for j in range(6 + 5 * i)] for i in range(10)]
    solo = LLM(**BASE)
    alone = [solo.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    llm = LLM(**BASE, max_num_batched_tokens=16)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs == alone
    history = list(llm.engine.step_history)
    assert any(s.num_jump_forward_tokens and s.num_decodes for s in history)
    assert llm.stats()["jump_forward_tokens_total"] > 0
    assert_all_blocks_free(llm.engine)

"""Sampling parameters change outputs the way their names say."""
import pytest

from engine import LLM, SamplingParams
from helpers import assert_all_blocks_free

PROMPT = [10, 20, 30, 40]


@pytest.fixture(scope="module")
def llm():
    return LLM("dummy-tiny", dtype="float32", num_kv_blocks=64, max_model_len=256)


def tokens(llm, params, prompt=PROMPT):
    return llm.generate([prompt], params)[0].outputs[0].token_ids


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tokens(llm, p)
    in_batch = llm.generate([[7, 8, 9], PROMPT, [1, 2]], [SamplingParams(temperature=1.0, max_tokens=16), p,
                                                          SamplingParams(temperature=0.7, max_tokens=9)])[1]
    assert in_batch.outputs[0].token_ids == alone
    other_seed = tokens(llm, SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True))
    assert other_seed != alone


def test_top_k_one_and_tiny_top_p_equal_greedy(llm):
    greedy = tokens(llm, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert tokens(llm, SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True)) == greedy
    assert tokens(llm, SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=12, ignore_eos=True)) == greedy
    assert tokens(llm, SamplingParams(temperature=1.5, min_p=1.0, max_tokens=12, ignore_eos=True)) == greedy


def test_max_tokens_and_stop_token_ids_end_generation(llm):
    greedy = tokens(llm, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[greedy[3]]))[0].outputs[0]
    first = greedy.index(greedy[3])
    assert out.token_ids == greedy[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == greedy[3]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_min_tokens_suppresses_stop_tokens(llm):
    greedy = tokens(llm, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, min_tokens=6,
                                                stop_token_ids=[greedy[0]]))[0].outputs[0]
    assert greedy[0] not in out.token_ids[:6]
    assert len(out.token_ids) >= 6


def test_stop_string_cuts_the_text_before_it(llm):
    full = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert stop.strip()
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)]


def test_penalties_discourage_repeats(llm):
    # Long enough that plain greedy decoding repeats itself (the sharp random model rarely
    # does within a few dozen tokens).
    plain = tokens(llm, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    penalized = tokens(llm, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, repetition_penalty=5.0,
                                           frequency_penalty=2.0, presence_penalty=2.0))
    assert len(set(plain)) < len(plain)
    assert len(set(penalized)) > len(set(plain))


def test_logprobs_list_top_n_and_the_sampled_token(llm):
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) == 3  # greedy token is the top-1
        assert lp[tok].rank == 1 and sorted(v.rank for v in lp.values()) == [1, 2, 3]
        assert lp[tok].logprob == max(v.logprob for v in lp.values()) and lp[tok].logprob <= 0
        assert lp[tok].decoded_token == llm.tokenizer.decode([tok])
    assert out.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)))
    assert_all_blocks_free(llm.engine)


def test_stop_strings_count_only_once_min_tokens_is_reached():
    llm = LLM(model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=256)
    free = llm.generate([[9, 10, 11]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    early = free.text[2:6]  # a string that occurs within the first few tokens
    assert early and free.text.find(early) < len(llm.tokenizer.decode(free.token_ids[:10]))
    held = llm.generate([[9, 10, 11]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                      min_tokens=25, stop=[early]))[0].outputs[0]
    # nothing is cut out of the middle: the text is the free run's, up to where a stop counted
    assert free.text.startswith(held.text) and len(held.token_ids) >= 25
    if held.finish_reason == "stop":
        assert held.text + early in free.text
    else:
        assert held.text == free.text

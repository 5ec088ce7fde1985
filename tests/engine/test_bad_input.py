"""Bad input raises a ValueError naming the field and the limit; the engine keeps serving."""
import math

import pytest

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from helpers import assert_all_blocks_free


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"seed": -1}, "seed"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop": [3]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logprobs": 50}, "logprobs"),
    ({"max_tokens": "10"}, "max_tokens"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"block_size": 7}, "block_size"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"num_kv_blocks": 0}, "num_kv_blocks"),
    ({"scheduling_policy": "fifo"}, "scheduling_policy"),
    ({"preemption_mode": "drop"}, "preemption_mode"),
    ({"dtype": "int4"}, "dtype"),
])
def test_bad_engine_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model="dummy-tiny", **kwargs)


def test_kv_capacity_below_one_max_length_request_is_refused():
    with pytest.raises(ValueError, match=r"KV capacity of 4 blocks x 16 tokens = 64 tokens cannot hold one "
                                         r"request of max_model_len=128.*at least 8 blocks"):
        LLMEngine(EngineConfig(model="dummy-tiny", num_kv_blocks=4, max_model_len=128))


def test_unknown_model_name_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        LLM("no-such-model")


def test_unknown_engine_option_is_refused():
    with pytest.raises(TypeError, match="unknown engine option.*max_seqs"):
        LLM("dummy-tiny", max_seqs=3)


@pytest.fixture(scope="module")
def llm():
    return LLM("dummy-tiny", dtype="float32", num_kv_blocks=32, max_model_len=64)


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"),
    ([], "prompt is empty"),
    (list(range(3, 3 + 64)), "prompt has 64 tokens; max_model_len is 64"),
    ([1, 2, 10**9], r"prompt token ids must be in \[0, 49152\)"),
    (3.5, "prompt must be a string or a list of token ids"),
])
def test_bad_prompts_are_refused_and_the_engine_keeps_serving(llm, prompt, message):
    good = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6, 7], prompt], good)
    assert llm.engine.has_unfinished() is False  # the good prompt in the same call was not left queued
    out = llm.generate([[5, 6, 7]], good)
    assert len(out[0].outputs[0].token_ids) == 3
    assert_all_blocks_free(llm.engine)


def test_mismatched_params_list_is_refused(llm):
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate([[5], [6]], [SamplingParams()])


def test_bad_chat_messages_are_refused(llm):
    with pytest.raises(ValueError, match="non-empty list"):
        llm.chat([])
    with pytest.raises(ValueError, match="string 'role'"):
        llm.chat([{"content": "hi"}])


def test_float16_on_cpu_is_refused_at_config_time():
    with pytest.raises(ValueError, match="float16.*CPU"):
        EngineConfig(model="dummy-tiny", dtype="float16", device="cpu")

"""Our engine's greedy output equals transformers' greedy generate, token for token (fp32),
with requests arriving at different steps into one mixed batch and prompts chunked."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams
from helpers import assert_all_blocks_free, hf_greedy, run_staggered

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the first snowfall.",
    "List three uses of a paperclip.",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a name for a friendly robot.",
    "Why is the sky blue? Answer briefly, in the style of a pirate, with lots of enthusiasm and detail.",
]
ARRIVALS = [0, 0, 0, 2, 2, 5, 9, 14]


@pytest.fixture(scope="module")
def hf_smollm(real_model_dir):
    return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_answers(hf_smollm):
    """transformers' greedy tokens for each prompt (ids), computed once for the module."""
    cache = {}

    def answer(ids: list[int], max_new: int, eos: int) -> list[int]:
        key = (tuple(ids), max_new, eos)
        if key not in cache:
            cache[key] = hf_greedy(hf_smollm, ids, max_new, eos)
        return cache[key]
    return answer


@pytest.mark.parametrize("chunked_budget", [2048, 16], ids=["whole-prompts", "chunked-prefill-16"])
def test_smollm2_greedy_equals_transformers_in_mixed_batch(real_model_dir, hf_answers, chunked_budget):
    # quantization="none": the GGUF dequantized, the weights transformers runs (the native
    # blocks' int8 activations are held to fp32 in test_served_config_accuracy instead)
    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", dtype="float32", num_kv_blocks=512,
                                    max_num_batched_tokens=chunked_budget, quantization="none"))
    prompts = [engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    max_new = 24
    params = SamplingParams(temperature=0, max_tokens=max_new)
    got = run_staggered(engine, prompts, params, ARRIVALS)
    eos = engine.model_config.eos_token_ids[0]
    for i, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        assert got[f"p{i}"] == hf_answers(ids, max_new, eos), QUESTIONS[i]
    assert engine.peak_batch_size >= 5  # they really ran together
    if chunked_budget == 16:  # prompts (about 40 tokens) were split across steps
        assert any(s.num_prefill_tokens and s.num_decodes for s in engine.step_history)
    assert_all_blocks_free(engine)


def test_tiny_gqa_llama_greedy_equals_transformers(tiny_hf_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(model=str(tiny_hf_dir), dtype="float32", num_kv_blocks=256, block_size=16,
                                    max_num_batched_tokens=24))
    g = torch.Generator().manual_seed(1)
    lengths = [1, 5, 15, 16, 17, 33, 50, 70]
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    got = run_staggered(engine, prompts, params, [0, 0, 1, 1, 3, 4, 8, 12])
    for i, p in enumerate(prompts):
        assert got[f"p{i}"] == hf_greedy(hf, p, 20, None), f"prompt of {lengths[i]} tokens"
    assert_all_blocks_free(engine)

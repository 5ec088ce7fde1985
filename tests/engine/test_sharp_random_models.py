"""The random test models are sharp: a wrong block order or a wrong position changes their
greedy tokens. Output-comparing tests on them therefore prove the paging and positions.

Each bug is injected on purpose into an otherwise correct engine (the block table handed to
attention, or the RoPE positions of decode rows) and must change the tokens."""
import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from helpers import run_staggered

PROMPT_LEN = 40  # block_size 16: two full blocks and a partial third
MAX_TOKENS = 24


def _engine(model: str, backend: str) -> LLMEngine:
    # the C++ kernels' backend on the CPU also where a GPU is present
    return LLMEngine(EngineConfig(model=model, dtype="float32", num_kv_blocks=64, block_size=16, max_model_len=1024,
                                  attention_backend=backend, device="cpu" if backend == "cpu" else None))


def _greedy(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return run_staggered(engine, prompts, params, [0] * len(prompts))


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (PROMPT_LEN + i,), generator=g).tolist() for i in range(3)]


def _swap_first_and_last_block(engine: LLMEngine) -> None:
    """The bug: attention reads a sequence's blocks with its first and last entries swapped
    (K/V are still written to the right slots)."""
    backend = engine.runner.attention
    build = backend.build_metadata

    def permuted(slot_mapping, decodes, prefills):
        for seq in (*decodes, *prefills):
            n = -(-seq.context_len // backend.block_size)
            ids = list(seq.block_ids)  # a copy: the request's own table stays right
            if n > 1:
                ids[0], ids[n - 1] = ids[n - 1], ids[0]
            seq.block_ids = ids
        return build(slot_mapping, decodes, prefills)
    backend.build_metadata = permuted


def _shift_decode_positions(engine: LLMEngine) -> None:
    """The bug: generated tokens are rotated one position too far."""
    rotary = engine.runner.model.rotary
    lookup = rotary.lookup
    rotary.lookup = lambda positions, dtype: lookup(positions + (positions >= PROMPT_LEN).long(), dtype)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("bug", [_swap_first_and_last_block, _shift_decode_positions],
                         ids=["block-order", "decode-position"])
def test_dummy_tiny_sees_an_injected_paging_or_position_bug(backend, bug):
    good = _engine("dummy-tiny", backend)
    prompts = _prompts(good.model_config.vocab_size)
    expected = _greedy(good, prompts)
    assert all(len(set(toks)) > 3 for toks in expected.values()), "degenerate outputs prove nothing"
    broken = _engine("dummy-tiny", backend)
    bug(broken)
    got = _greedy(broken, prompts)
    changed = [rid for rid in expected if got[rid] != expected[rid]]
    assert len(changed) == len(prompts), f"the bug went unseen for {set(expected) - set(changed)}"


def test_tiny_hf_llama_sees_a_block_order_bug(tiny_hf_dir):
    good = _engine(str(tiny_hf_dir), "torch")
    prompts = _prompts(good.model_config.vocab_size)
    expected = _greedy(good, prompts)
    broken = _engine(str(tiny_hf_dir), "torch")
    _swap_first_and_last_block(broken)
    got = _greedy(broken, prompts)
    assert all(got[rid] != expected[rid] for rid in expected)

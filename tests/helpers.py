"""Small shared test utilities."""
from __future__ import annotations

import torch

from engine import LLMEngine, SamplingParams


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id) -> list[int]:
    """transformers' own greedy generate, the reference our engine must match."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, pad_token_id=eos_token_id if eos_token_id is not None else 0)
    return out[0, len(prompt_ids):].tolist()


def run_staggered(engine: LLMEngine, prompts: list, params: SamplingParams, arrivals: list[int]) -> dict[str, list[int]]:
    """Adds prompt i before step arrivals[i] and steps until all finish. Returns token ids per request."""
    assert len(arrivals) == len(prompts)
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    done: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            engine.add_request(prompts[i], params, request_id=f"p{i}")
        for out in engine.step().outputs:
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
        assert step < 10_000
    return done


def assert_all_blocks_free(engine: LLMEngine) -> None:
    kv = engine.kv
    assert kv.num_free_blocks == kv.num_blocks, f"{kv.num_blocks - kv.num_free_blocks} blocks leaked"
    assert all(b.ref_count == 0 for b in kv.pool.blocks)


def fail_next_forward(engine: LLMEngine, exc: Exception) -> None:
    """Fault injection: the model's next forward pass raises `exc` (once)."""
    model = engine.runner.model

    def failing(*args, **kwargs):
        del model.forward  # back to the class's forward
        raise exc
    model.forward = failing


"""Small shared test utilities."""
from __future__ import annotations

from pathlib import Path

import torch

from engine import LLMEngine, SamplingParams
from engine.attention_backends import AttentionRows


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


def greedy_tokens(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Every prompt's greedy output ids (exactly max_tokens each), all in one batch."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [r.output_token_ids for r in reqs]


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


def decode_one_by_one(engine: LLMEngine, ids: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Teacher-forced logits [n, vocab] and each layer's residual stream [n, hidden], one
    token per forward pass over the paged cache (blocks 0.. in order: the engine is idle)."""
    runner, model, bs = engine.runner, engine.runner.model, engine.config.block_size
    streams: list[list[torch.Tensor]] = [[] for _ in model.layers]
    for i, layer in enumerate(model.layers):
        def capture(*args, _forward=layer.forward, _i=i):
            h, residual = _forward(*args)
            streams[_i].append((h.float() + residual.float()).squeeze(0))
            return h, residual
        layer.forward = capture
    block_ids = list(range(-(-len(ids) // bs)))
    logits = []
    try:
        for pos, tok in enumerate(ids):
            seq = AttentionRows(block_ids, context_len=pos + 1, num_tokens=1, start=0)
            t = lambda x: torch.tensor([x])  # noqa: E731
            meta = runner.attention.build_metadata(t(pos), [seq], [])
            hidden = model(t(tok), t(pos), meta, runner.kv_caches, runner.attention)
            logits.append(model.compute_logits(hidden)[0])
    finally:
        for layer in model.layers:
            del layer.forward
    return torch.stack(logits), [torch.stack(s) for s in streams]


CHAT_TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"


def chat_template(family: str) -> str:
    """A family's chat template for tests: a fixture that renders what the public template
    renders for the conversations used (no model hub is reachable here, and the published
    Gemma 3 270M GGUF, the pretrained model, carries none; SmolLM2's comes from its GGUF)."""
    return (CHAT_TEMPLATES / {"qwen3": "qwen3.jinja", "llama3": "llama3.1.jinja", "gemma3": "gemma3.jinja"}[family]
            ).read_text()


# A real-model accuracy text (teacher-forced over its tokens): a plain English story
TEXT = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of "
    "salt and wind. Every evening the keeper climbed the spiral stairs, one hundred and twelve of them, "
    "to light the lamp that warned ships away from the rocks below. In the village, people said he had "
    "not missed a single night in forty years. When the storm of the century arrived, the power failed "
    "across the whole coast, but the keeper had prepared for this: he lit the old oil lamp by hand and "
    "turned the lens himself, hour after hour, until dawn. Three fishing boats came home safely that "
    "night. Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make glucose and oxygen. It takes place mainly in the leaves, inside structures called "
    "chloroplasts, which contain the pigment chlorophyll. To bake bread, mix flour, water, salt and "
    "yeast, knead the dough for ten minutes, let it rise for an hour, shape it, and bake it in a hot "
    "oven until the crust is golden brown. The three largest planets in our solar system are Jupiter, "
    "Saturn and Uranus; Jupiter alone is more than twice as massive as all the others combined. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n"
)

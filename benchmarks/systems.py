"""One runner per system under test. Each takes token-id prompts and exact output lengths
(ignore_eos) so that every system does identical work, and returns a RunResult."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from engine import LLM, SamplingParams


@dataclass
class RunResult:
    system: str
    num_requests: int
    output_tokens: int
    prompt_tokens: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def as_dict(self) -> dict:
        return asdict(self) | {"output_tokens_per_s": self.output_tokens_per_s}


def run_engine(llm: LLM, prompts: list[list[int]], max_tokens: list[int], system: str) -> RunResult:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    engine = llm.engine
    steps_before = engine.step_count
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(max_tokens), "every request must produce exactly max_tokens"
    stats = engine.stats()
    return RunResult(system, len(prompts), produced, sum(map(len, prompts)), seconds,
                     {"steps": engine.step_count - steps_before, "peak_batch_size": stats["peak_batch_size"]})


def run_transformers_static(model_dir, prompts: list[list[int]], max_tokens: list[int], batch_size: int,
                            dtype=torch.bfloat16, system: str = "transformers static") -> RunResult:
    """transformers' own static batching: left-padded batches run to their longest member."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad = model.generation_config.pad_token_id or 0
    model.generation_config.eos_token_id = None  # exactly max_new_tokens for every row
    start = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch_size), desc=system):
        batch, lens = prompts[i:i + batch_size], max_tokens[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max(lens), pad_token_id=pad)
    seconds = time.perf_counter() - start
    # Only each request's own max_tokens are useful output; the rest of the batch is padding.
    return RunResult(system, len(prompts), sum(max_tokens), sum(map(len, prompts)), seconds)


def run_transformers_single(model_dir, prompt: list[int], max_tokens: int, dtype=torch.bfloat16) -> RunResult:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        model.generate(ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=0)
    return RunResult("transformers, one request", 1, max_tokens, len(prompt), time.perf_counter() - start)

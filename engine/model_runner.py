"""Turns a scheduled step into one flattened batch, runs the model, samples.

All step metadata (input ids, positions, slot mapping, and the attention backend's block
tables and masks) is built here once per step; the 30-odd layers only index into it.
A request whose prompt completes this step samples its first token from its last row, and
so do its n - 1 siblings (`Request.forks`), each with its own sampler state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention_backends import Seq, TorchBackend
from engine.models.llama import CausalLM
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import SchedulerOutput


@dataclass
class StepResult:
    sampled: list[Request]                  # requests sampled this step, in order
    token_ids: list[int | None]             # None: this row could not be sampled (see errors)
    logprobs: list[dict | None]
    num_tokens: int                         # tokens computed in the forward pass
    errors: dict[int, str]                  # row in `sampled` -> why it could not be sampled


class ModelRunner:
    def __init__(self, model: CausalLM, kv_buffer: torch.Tensor, block_size: int,
                 attention: TorchBackend, platform, seed: int = 0) -> None:
        self.model = model
        self.kv_buffer = kv_buffer  # [2 * layers, blocks, block_size, kv heads, head dim]
        self.kv_caches = [(kv_buffer[2 * i], kv_buffer[2 * i + 1]) for i in range(kv_buffer.shape[0] // 2)]
        self.block_size = block_size
        self.device = kv_buffer.device
        self.attention = attention  # the step's ops (engine/attention_backends.py)
        self.sampler = Sampler(self.device, platform, seed)

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def prepare(self, sched: SchedulerOutput):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        decodes: list[Seq] = []
        prefills: list[Seq] = []
        # Decodes first (one row each), then prompt chunks, as the attention backends expect.
        for r, n in sorted(sched.scheduled, key=lambda rn: rn[1] > 1):
            row = len(input_ids)
            pad = sched.pads.get(r)
            if pad is not None:  # a finished static-batch member recomputes its last token
                start, ids = pad, [r.all_token_ids[-1]]
            else:
                start = r.num_computed_tokens
                ids = r.all_token_ids[start:start + n]
            ctx = start + n
            input_ids.extend(ids)
            positions.extend(range(start, ctx))
            slots.extend(r.block_ids[p // bs] * bs + p % bs for p in range(start, ctx))
            (decodes if n == 1 else prefills).append(Seq(r.block_ids, ctx, n, row))
            if pad is None and ctx == r.num_tokens:
                for seq in (r, *r.forks):
                    sample_rows.append(row + n - 1)
                    sample_reqs.append(seq)
        meta = self.attention.build_metadata(self._tensor(slots), decodes, prefills)
        return self._tensor(input_ids), self._tensor(positions), meta, sample_rows, sample_reqs

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        input_ids, positions, meta, sample_rows, sample_reqs = self.prepare(sched)
        hidden = self.model(input_ids, positions, meta, self.kv_caches, self.attention)
        if not sample_reqs:
            return StepResult([], [], [], len(input_ids), {})
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows)])
        tokens, logprobs, errors = self.sampler(logits, sample_reqs)
        return StepResult(sample_reqs, tokens, logprobs, len(input_ids), errors)

    @torch.inference_mode()
    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copies whole KV blocks (every layer's K and V) from `src` to `dst` ids."""
        if not src:
            return
        if self.attention.name == "triton":
            self.attention.kernels.copy_blocks(self.kv_buffer, self._tensor(src), self._tensor(dst))
            return
        self.kv_buffer[:, self._tensor(dst)] = self.kv_buffer[:, self._tensor(src)]

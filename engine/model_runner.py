"""Turns a scheduled step into one flattened batch, runs the model, samples.

All step metadata (input ids, positions, slot mapping, block tables, sequence lengths,
masks) is built here once per step; the 30-odd layers only index into it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from engine.attention import CPU_BACKEND, TORCH_BACKEND, AttentionMetadata, PrefillSeq
from kernels.cpu import load as cpu_kernels
from engine.models.llama import LlamaForCausalLM
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import SchedulerOutput


@dataclass
class StepResult:
    sampled: list[Request]                  # requests that got a new token, in order
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    num_tokens: int                         # tokens computed in the forward pass


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device, attention_backend: str, seed: int = 0) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(device, seed)
        if attention_backend == "triton":
            from engine.triton_attention import TRITON_BACKEND
            self.attention = TRITON_BACKEND
        elif device.type == "cpu" and cpu_kernels():
            model.use_cpu_kernels(cpu_kernels())
            self.attention = CPU_BACKEND
        else:
            self.attention = TORCH_BACKEND
        self.needs_varlen = self.attention.name == "triton"
        self.fail_next_step: Exception | None = None  # fault injection for tests

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def prepare(self, sched: SchedulerOutput):
        bs = self.block_size
        decodes = [(r, n) for r, n in sched.scheduled if n == 1]
        prefills = [(r, n) for r, n in sched.scheduled if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        seq_lens: list[int] = []
        # Decodes: one row each. A finished static-batch member recomputes its last token (pad).
        for r, _ in decodes:
            pos = r.static_pad_pos if r.static_done else r.num_computed_tokens
            input_ids.append(r.all_token_ids[-1] if r.static_done else r.all_token_ids[pos])
            positions.append(pos)
            slots.append(r.block_ids[pos // bs] * bs + pos % bs)
            seq_lens.append(pos + 1)
            if not r.static_done and pos + 1 == r.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_reqs.append(r)
        num_decodes = len(decodes)
        decode_bt = decode_lens = decode_mask = None
        if num_decodes:
            max_blocks = max(-(-n // bs) for n in seq_lens)
            decode_bt = self._tensor([r.block_ids[:max_blocks] + [0] * (max_blocks - len(r.block_ids[:max_blocks]))
                                      for r, _ in decodes])
            decode_lens = self._tensor(seq_lens)
            decode_mask = (torch.arange(max_blocks * bs, device=self.device)[None, :]
                           < decode_lens[:, None]).view(num_decodes, 1, 1, max_blocks * bs)
        prefill_seqs: list[PrefillSeq] = []
        for r, n in prefills:
            start = r.num_computed_tokens
            ctx = start + n
            row = len(input_ids)
            input_ids.extend(r.all_token_ids[start:ctx])
            positions.extend(range(start, ctx))
            nblocks = -(-ctx // bs)
            table = r.block_ids[:nblocks]
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, ctx))
            prefill_seqs.append(PrefillSeq(row, n, ctx, self._tensor(table)))
            if ctx == r.num_tokens:
                sample_rows.append(row + n - 1)
                sample_reqs.append(r)
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), num_decodes=num_decodes,
                                 decode_block_tables=decode_bt, decode_seq_lens=decode_lens,
                                 decode_mask=decode_mask, prefills=prefill_seqs)
        if self.needs_varlen:  # one varlen description of all rows, in row order
            rows = decodes + prefills
            lens = seq_lens + [p.context_len for p in prefill_seqs]
            counts = [1] * num_decodes + [p.num_tokens for p in prefill_seqs]
            width = max(-(-n // bs) for n in lens)
            meta.block_tables = self._tensor([r.block_ids[:width] + [0] * (width - len(r.block_ids[:width]))
                                              for r, _ in rows], torch.int32)
            meta.seq_lens = self._tensor(lens, torch.int32)
            meta.query_start_loc = self._tensor([0] + list(itertools.accumulate(counts)), torch.int32)
            meta.max_query_len, meta.max_seq_len = max(counts), max(lens)
        return self._tensor(input_ids), self._tensor(positions), meta, sample_rows, sample_reqs

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        input_ids, positions, meta, sample_rows, sample_reqs = self.prepare(sched)
        if self.fail_next_step is not None:
            exc, self.fail_next_step = self.fail_next_step, None
            raise exc
        hidden = self.model(input_ids, positions, meta, self.kv_caches, self.attention)
        if not sample_reqs:
            return StepResult([], [], [], len(input_ids))
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows)])
        tokens, logprobs = self.sampler(logits, sample_reqs)
        return StepResult(sample_reqs, tokens, logprobs, len(input_ids))

"""Turns a scheduled step into one flattened batch, runs the model, samples.

All step metadata (input ids, positions, slot mapping, and the attention backend's block
tables and masks) is built here once per step; the 30-odd layers only index into it.
A request whose prompt completes this step samples its first token from its last row, and
so do its n - 1 siblings (`Request.forks`), each with its own sampler state. With
`graphs` (engine/cuda_graphs.py), a decode-only step replays its bucket's CUDA graph instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention_backends import AttentionRows, TorchBackend
from engine.cuda_graphs import DecodeGraphs
from engine.models.llama import CausalLM
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import SchedulerOutput
from engine.swap import CpuKVPool


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
        self.graphs: DecodeGraphs | None = None  # set by use_graphs
        self.cpu_pool: CpuKVPool | None = None   # swap preemption's CPU copies (engine/swap.py)

    def move_kv(self, sched: SchedulerOutput) -> None:
        """The step's planned swap-outs, then swap-ins."""
        if sched.swap_out or sched.swap_in:
            assert self.cpu_pool is not None, "swaps planned without a CPU pool"
            self.cpu_pool.swap(sched.swap_out, sched.swap_in)

    def use_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool) -> None:
        """Decode-only steps through padded buckets; `capture`: as CUDA graphs (else eagerly,
        which is what CPU tests check the padding with)."""
        def forward(input_ids, positions, meta):
            return self.model(input_ids, positions, meta, self.kv_caches, self.attention)
        self.graphs = DecodeGraphs(forward, max_num_seqs, max_model_len, self.block_size, self.device)
        if capture:
            self.graphs.capture()

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _rows(self, sched: SchedulerOutput):
        """The step's rows as lists: ids, positions, KV slots, attention's view of each
        sequence (decodes, prompt chunks), and which rows sample for which requests."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        decodes: list[AttentionRows] = []
        prefills: list[AttentionRows] = []
        # one-token rows first, then prompt chunks (SchedulerOutput's order), as attention expects
        for r, n in sched.scheduled:
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
            assert n > 1 or not prefills, "one-token rows come before prompt chunks"
            (decodes if n == 1 else prefills).append(AttentionRows(r.block_ids, ctx, n, row))
            if pad is None and ctx == r.num_tokens:
                for seq in (r, *r.forks):
                    sample_rows.append(row + n - 1)
                    sample_reqs.append(seq)
        return input_ids, positions, slots, decodes, prefills, sample_rows, sample_reqs

    def prepare(self, sched: SchedulerOutput):
        input_ids, positions, slots, decodes, prefills, sample_rows, sample_reqs = self._rows(sched)
        meta = self.attention.build_metadata(self._tensor(slots), decodes, prefills)
        return self._tensor(input_ids), self._tensor(positions), meta, sample_rows, sample_reqs

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        if self.graphs is not None and not sched.pads and sched.num_decodes == len(sched.scheduled) \
                and self.graphs.fits(len(sched.scheduled)):
            input_ids, positions, slots, decodes, _, sample_rows, sample_reqs = self._rows(sched)
            hidden = self.graphs.run(input_ids, positions, slots, decodes)
        else:
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

    # -- what runs ------------------------------------------------------------------------
    def describe_weights(self, config) -> dict:
        """How the weights are held and run: bytes per format, the linear kernels, whether
        decode steps take the one-call C++ layer (`fused`) or the per-op path, and the
        CUDA-graph buckets captured."""
        model = self.model
        fused = all(layer.fused is not None for layer in model.layers)
        return {"bytes_by_format": model.weight_formats(), "linear_kernels": model.linear_kernels(),
                "decode_path": "fused" if fused else "per-op", "attention_backend": self.attention.name,
                "kv_cache_dtype": "int8" if config.kv_cache_dtype == "int8" else config.dtype,
                "cuda_graph_sizes": self.graphs.sizes if self.graphs and self.graphs.graphs else None}

    def describe_platform(self, platform, config, model_config) -> dict:
        """Where it runs: device, ISA level, CPU, dtype, and the kernel behind each op."""
        model = self.model
        kernels = {"linear": "+".join(model.linear_kernels())}
        kernels |= self.attention.kernel_names(config.torch_dtype, model_config.head_dim,
                                               model_config.num_heads // model_config.num_kv_heads,
                                               config.kv_cache_dtype)
        kernels["decode_layer"] = "fused_cpp" if all(layer.fused is not None for layer in model.layers) else "per-op"
        ops = platform.ops
        kernels["sampling_argmax"] = f"{ops.isa_level()}_cpp" if ops is not None else "torch"
        kernels["grammar_bitmask"] = (f"{ops.isa_level()}_cpp" if ops is not None else
                                      "xgrammar" if self.device.type == "cuda" else "torch")
        return platform.describe() | {"dtype": config.dtype, "kernels": kernels}

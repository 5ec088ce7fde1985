"""Tiny random checkpoints of each supported family, built and saved by transformers itself
(safetensors + config.json + generation_config.json), sharp enough that a wrong position,
block order or mask changes the greedy tokens, and not degenerate (their greedy outputs
use many distinct tokens). Llama and Qwen3 get initializer_range 0.25. Gemma 3 scales its
embeddings by sqrt(hidden), so large weights collapse it to one repeated token: it gets
0.05, and its q/k norm weights are set to 1 (a gain of 2, attention logits x4) instead."""
from __future__ import annotations

from pathlib import Path

import torch

SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             initializer_range=0.25, bos_token_id=1, eos_token_id=2)
GEMMA_WINDOW = 12  # tokens: prompts in the tests run well past it


def family_config(family: str, vocab_size: int = 512):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config
    if family == "qwen3":
        return Qwen3Config(vocab_size=vocab_size, num_hidden_layers=3, rope_theta=10000.0,
                           tie_word_embeddings=True, **SHAPE)
    if family == "gemma3":  # layers 0, 1 slide, 2 is global, 3 slides: both kinds, interleaved
        return Gemma3TextConfig(vocab_size=vocab_size, num_hidden_layers=4, sliding_window=GEMMA_WINDOW,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                             "sliding_attention"],
                                query_pre_attn_scalar=16, max_position_embeddings=2048,
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                 "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                    "rope_theta": 1000000.0}},
                                **SHAPE | {"bos_token_id": 2, "eos_token_id": 1, "initializer_range": 0.05})
    if family == "llama3":  # Llama 3.1's rope scaling, with an original context short enough to matter
        return LlamaConfig(vocab_size=vocab_size, num_hidden_layers=3, max_position_embeddings=2048,
                           rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                            "rope_theta": 500000.0},
                           tie_word_embeddings=False, **SHAPE)
    raise ValueError(family)


def save_tiny(family: str, path: Path, vocab_size: int = 512, generation: dict | None = None,
              max_shard_size: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM, GenerationConfig
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, vocab_size), dtype=torch.float32).eval()
    if family == "gemma3":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.fill_(1.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    if generation:
        GenerationConfig(**generation).save_pretrained(path)
    return path

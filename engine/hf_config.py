"""A transformers checkpoint's `config.json` and `generation_config.json`, read into the
engine's ModelConfig and sampling defaults: which family runs it (models/llama.py,
models/gemma3.py), its shapes, RoPE, sliding windows and special tokens; and a refusal, by
field name, of what the model code would otherwise serve wrong without a word."""
from __future__ import annotations

from engine.config import ModelConfig

_ARCHS = {  # transformers architecture -> our family
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3",
}


def _rope(params: dict | None, default_theta: float) -> tuple[float, dict | None]:
    """(theta, scaling or None) from transformers' `rope_parameters` / older `rope_scaling`."""
    rope = dict(params or {})
    theta = rope.pop("rope_theta", default_theta)
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    return theta, rope


def _refuse_what_we_would_serve_wrong(config: dict, archs: list[str]) -> None:
    """A config field the model code does not implement would be served wrong, silently:
    refused at load, by name. (Unknown rope types are refused where the rotary tables are
    built; GGUF tensor types without a kernel, in engine/gguf_weights.py.)"""
    unsupported = {
        "attn_logit_softcapping": "attention logit soft-capping (Gemma 2)",
        "use_sliding_window": "sliding-window attention on a Llama/Qwen2-family model",
        "num_experts": "mixture-of-experts layers", "num_local_experts": "mixture-of-experts layers",
    }
    for field, what in unsupported.items():
        if config.get(field) not in (None, False, 0):
            raise ValueError(f"unsupported checkpoint {archs}: {field}={config[field]!r} ({what}) is not "
                             "implemented, and serving without it would give wrong tokens")
    if "MistralForCausalLM" in archs and config.get("sliding_window") is not None:
        raise ValueError(f"unsupported checkpoint {archs}: sliding_window={config['sliding_window']} "
                         "(Mistral's sliding-window attention) is not implemented")


def model_config_from_hf(config: dict, generation_config: dict | None = None) -> ModelConfig:
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    family = next((_ARCHS[a] for a in archs if a in _ARCHS), None)
    if family is None:
        raise ValueError(f"unsupported architecture {archs}; supported: {sorted(_ARCHS)}")
    if "text_config" in config:  # Gemma 3 4B+ checkpoints: we serve the text model
        config = {**config["text_config"], "architectures": archs}
    _refuse_what_we_would_serve_wrong(config, archs)
    params = config.get("rope_parameters") or config.get("rope_scaling")
    local_theta = sliding = layer_types = scalar = None
    if family == "gemma3":
        n = config["num_hidden_layers"]
        pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
        layer_types = tuple(config.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0
                                                          else "sliding_attention" for i in range(n)])
        if params and "full_attention" in params:  # per layer type (transformers 5)
            local_theta, local_scaling = _rope(params.get("sliding_attention"), 10000.0)
            if local_scaling is not None:
                raise ValueError(f"unsupported checkpoint: rope scaling on the sliding-window layers "
                                 f"({local_scaling}); only their rope_theta is read")
            params = params.get("full_attention")
        else:
            local_theta = config.get("rope_local_base_freq", 10000.0)
        sliding, scalar = config.get("sliding_window", 4096), config.get("query_pre_attn_scalar", 256)
    theta, rope = _rope(params, config.get("rope_theta", 1000000.0 if family == "gemma3" else 10000.0))
    eos = (generation_config or {}).get("eos_token_id", config.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    heads = config["num_attention_heads"]
    return ModelConfig(
        architecture=family,
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        max_position_embeddings=config.get("max_position_embeddings", 8192),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6 if family == "gemma3" else 1e-5), rope_theta=theta,
        rope_scaling=rope, tie_word_embeddings=config.get("tie_word_embeddings", family == "gemma3"),
        attention_bias=config.get("attention_bias", "Qwen2ForCausalLM" in archs),
        qk_norm="Qwen3ForCausalLM" in archs or family == "gemma3",
        final_logit_softcapping=config.get("final_logit_softcapping"),
        layer_types=layer_types, sliding_window=sliding, local_rope_theta=local_theta,
        query_pre_attn_scalar=scalar, bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids)


# Sampling defaults a checkpoint's generation_config.json may set, and their SamplingParams
# names. As vLLM, they apply where a request leaves the field unset.
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def sampling_defaults(generation_config: dict | None) -> dict:
    gen = generation_config or {}
    return {ours: gen[theirs] for theirs, ours in _GENERATION_DEFAULTS.items() if gen.get(theirs) is not None}

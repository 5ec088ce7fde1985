"""Our Llama-family decoder (Llama 2/3.x, SmolLM2, Qwen2, Qwen3, Mistral) over one flattened batch.

There is no padding and no batch dimension: every step runs T tokens from many requests
as one [T, hidden] tensor. Attention reads and writes the paged KV cache through the
step's `AttentionMetadata`, built once per step by the model runner. The family's
differences are flags of the shared blocks: q/k/v biases (Qwen2), per-head q/k norms
(Qwen3), llama3 RoPE scaling (Llama 3.1+). `CausalLM` holds what every family shares:
embeddings, the final norm, the LM head, weight packing for the CPU kernels, loading.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.models.layers import Linear, RMSNorm, RotaryEmbedding, SelfAttention
from engine_kernels.quant import QuantizedWeight, quantize_int8


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, cfg.head_dim ** -0.5)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.intermediate_size = cfg.intermediate_size
        self.cpu_ops = None  # engine_kernels.cpu module when the fused CPU path is on
        self.decode_layer = None  # ops.DecodeLayer: the whole layer in one C++ call, decode-only steps

    def build_decode_layer(self, ops) -> None:
        """The C++ decode path, where every linear runs on a C++ kernel and the attention has
        no per-head norms (Qwen3 keeps the per-op path)."""
        attn = self.self_attn
        linears = [m.cpp_weights(ops) for m in (attn.qkv_proj, attn.o_proj, self.gate_up_proj, self.down_proj)]
        if attn.q_norm is not None or attn.window is not None or any(w is None for w in linears):
            return
        self.decode_layer = ops.DecodeLayer(self.input_layernorm.weight.data, self.post_attention_layernorm.weight.data,
                                            self.input_layernorm.eps, *linears, attn.num_heads, attn.num_kv_heads,
                                            attn.head_dim, attn.scale)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                attention) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the next
        layer's norm adds them, so one add serves both."""
        if self.decode_layer is not None and not meta.prefills and h.shape[0] <= Linear.GEMV_MAX_ROWS:
            return self.decode_layer.run(h, residual, cos, sin, k_cache, v_cache, meta.slot_mapping,
                                         meta.decode_block_tables, meta.decode_seq_lens)
        if self.cpu_ops is not None:
            return self._forward_fused(h, residual, cos, sin, k_cache, v_cache, meta, attention)
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm.add_forward(h, residual)
        h = self.self_attn.forward(h, cos, sin, k_cache, v_cache, meta, attention)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        gate_up = self.gate_up_proj(h)
        h = F.silu(gate_up[:, :self.intermediate_size]) * gate_up[:, self.intermediate_size:]
        return self.down_proj(h), residual

    def _forward_fused(self, h, residual, cos, sin, k_cache, v_cache, meta, attention):
        """Same computation with the C++ CPU kernels: fewer, fused ops per layer."""
        ops, eps = self.cpu_ops, self.input_layernorm.eps
        if residual is None:
            residual = h
            h = ops.rms_norm(h, self.input_layernorm.weight, eps)
        else:
            ops.fused_add_rms_norm(h, residual, self.input_layernorm.weight, eps)
        h = self.self_attn.forward_fused(h, cos, sin, k_cache, v_cache, meta, attention, ops)
        ops.fused_add_rms_norm(h, residual, self.post_attention_layernorm.weight, eps)
        h = ops.silu_and_mul(self.gate_up_proj(h))
        return self.down_proj(h), residual

    def load(self, get, prefix: str) -> None:
        self.input_layernorm.weight.copy_(get(prefix + "input_layernorm.weight"))
        self.post_attention_layernorm.weight.copy_(get(prefix + "post_attention_layernorm.weight"))
        self.self_attn.load(get, prefix + "self_attn.")
        self.gate_up_proj.load([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")])
        self.down_proj.load([get(prefix + "mlp.down_proj.weight")])


class CausalLM(nn.Module):
    """What every family shares. A subclass builds `self.layers` and runs them in `forward`."""
    norm_cls: type[RMSNorm] = RMSNorm

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.norm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def linears(self) -> list[Linear]:
        """Every linear layer, in the order a step runs them (the LM head last)."""
        return [m for m in [*self.layers.modules(), self.lm_head] if isinstance(m, Linear)]

    def prepack(self) -> None:
        for m in self.linears():
            m.prepack()

    def quantize_int8(self) -> None:
        """Weight-only per-channel int8 for every dense linear, the LM head included (the
        embedding lookup keeps its own dense copy)."""
        for m in self.linears():
            if m.qweight is None:
                m.set_quantized(quantize_int8(m.weight))

    def place_quantized(self, kernels) -> None:
        """Quantized linears run on `kernels` (QuantizedLinearKernels), or are dequantized to
        the model dtype when there are none (GPU)."""
        quantized = [m for m in self.linears() if m.qweight is not None]
        for m in quantized:
            if kernels is None:
                m.dequantize(self.embed_tokens.weight.dtype)
            else:
                m.quant_kernels = kernels
        if kernels is not None and kernels.ops is not None and quantized:
            # one huge-page buffer, in the order a step reads them (see _copy_into_huge_pages)
            parts = [(w, name) for w in (m.qweight for m in quantized) for name in ("codes", "scales", "mins")]
            views = _copy_into_huge_pages(kernels.ops, [getattr(w, n).nbytes for w, n in parts],
                                          (getattr(w, n) for w, n in parts))
            for (w, name), view in zip(parts, views):
                setattr(w, name, view)

    def linear_kernels(self) -> list[str]:
        """What runs the linears: "avx512_vnni" (quantized), "avx512_bf16_gemv" (decode) and
        "onednn" (prefill) for bf16, "torch" otherwise."""
        return sorted({name for m in self.linears() for name in m.kernel_names()})

    def weight_formats(self) -> dict[str, int]:
        """Bytes of linear weights per format ("bfloat16", "q4_1", "int8", ...)."""
        out: dict[str, int] = {}
        for m in self.linears():
            fmt = m.qweight.format if m.qweight is not None else str(m.weight.dtype).removeprefix("torch.")
            nbytes = m.qweight.nbytes if m.qweight is not None else m.weight.numel() * m.weight.element_size()
            out[fmt] = out.get(fmt, 0) + nbytes
        return out

    def use_cpu_kernels(self, ops) -> None:
        if self.embed_tokens.weight.dtype == torch.bfloat16 and ops.has_bf16_gemv():
            self._pack_for_gemv(ops)

    def _pack_for_gemv(self, ops) -> None:
        """Copy every supported linear's weight, in the gemv kernel's layout, into one buffer
        on huge pages, in the order a step reads them."""
        linears = [m for m in self.linears() if m.qweight is None and ops.gemv_supported(*m.weight.shape)]
        views = _copy_into_huge_pages(ops, [m.weight.nbytes for m in linears],
                                      (ops.pack_for_gemv(m.weight) for m in linears))
        for m, view in zip(linears, views):
            m.use_gemv(ops.gemv_bf16, view)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head.qweight is not None:  # fp32 in, fp32 out: no bf16 rounding of the logits, no copy
            hidden = hidden.float()
        logits = self.lm_head(hidden).float()
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load transformers-named weights, fusing q/k/v and gate/up projections."""
        get = lambda name: weights.pop(name)  # noqa: E731 - pop so the caller's copy can be freed
        with torch.no_grad():
            self.embed_tokens.weight.copy_(get("model.embed_tokens.weight"))
            self.norm.weight.copy_(get("model.norm.weight"))
            lm_head = weights.pop("lm_head.weight", None)
            if isinstance(lm_head, QuantizedWeight):  # a GGUF's own (for a tied head: token_embd's blocks)
                self.lm_head.load([lm_head])
            elif not self.cfg.tie_word_embeddings:
                if lm_head is None:
                    raise ValueError("checkpoint has no lm_head.weight and does not tie embeddings")
                self.lm_head.load([lm_head])
            for i, layer in enumerate(self.layers):
                layer.load(get, f"model.layers.{i}.")
        leftover = [k for k in weights if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise ValueError(f"unexpected weights in checkpoint: {leftover[:5]}")

    def init_random(self, seed: int, std: float = 0.02) -> None:
        g = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0 if self.norm_cls is RMSNorm else 0.0)  # Gemma's norms scale by 1 + w
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=g)


def _copy_into_huge_pages(ops, sizes: list[int], tensors) -> list[torch.Tensor]:
    """Copies `tensors` (made one at a time; their byte sizes known up front) into one buffer
    on huge pages, in order, 64-byte aligned; returns the copies. Weights streamed through
    4 KiB pages cost about 10% of decode speed in TLB misses."""
    aligned = [-(-n // 64) * 64 for n in sizes]
    arena = torch.empty(sum(aligned), dtype=torch.uint8)
    ops.advise_huge_pages(arena)
    views, offset = [], 0
    for n, step, t in zip(sizes, aligned, tensors):
        assert t.nbytes == n, "a tensor's size changed while it was being packed"
        view = arena[offset:offset + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        views.append(view)
        offset += step
    return views


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.rotary = RotaryEmbedding(cfg.head_dim, max(max_positions, 1), cfg.rope_theta, cfg.rope_scaling)

    def use_cpu_kernels(self, ops) -> None:
        for layer in self.layers:
            layer.cpu_ops = ops
        super().use_cpu_kernels(ops)  # packs the bf16 GEMV weights first
        for layer in self.layers:
            layer.build_decode_layer(ops)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attention) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary.lookup(positions, h.dtype)
        if self.layers[0].cpu_ops is not None:
            cos, sin = cos.squeeze(1), sin.squeeze(1)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            # .forward: skip nn.Module's hook machinery, ~30 calls per step on the hot path
            h, residual = layer.forward(h, residual, cos, sin, k_cache, v_cache, meta, attention)
        if self.layers[0].cpu_ops is not None:
            self.layers[0].cpu_ops.fused_add_rms_norm(h, residual, self.norm.weight, self.norm.eps)
            return h
        h, _ = self.norm.add_forward(h, residual)
        return h

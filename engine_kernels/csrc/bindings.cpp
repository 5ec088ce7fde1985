// The C++ CPU kernels as a Python module: the one file that sees torch. `Kernels(level)`
// holds one ISA level's table (table.h; filled by level_<isa>.cpp from the same kernel
// sources) and exposes each kernel on tensors: shapes and dtypes checked, outputs
// allocated, then the level's function called on raw pointers. Also here: a whole decoder
// layer for decode steps in one call (DecodeLayer), and the process-level helpers (huge
// pages, the OpenMP pool). engine_kernels/cpu.py builds it; engine/platform.py picks the level.
#include <torch/extension.h>
#include <omp.h>
#include <sys/mman.h>
#include "table.h"

using engine::DType;
using engine::KernelTable;

namespace {

void check_float(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
}
DType dtype_of(const at::Tensor& t) {
  check_float(t);
  return t.scalar_type() == at::kFloat ? DType::f32 : DType::bf16;
}

constexpr int64_t kTile = 16, kScaleBytes = 4;  // the int8 KV cache's tiles (engine_kernels/kv_quant.py)

class Kernels {
 public:
  explicit Kernels(const std::string& level) {
    t_ = level == "avx512" ? engine::avx512_table() : level == "avx2" ? engine::avx2_table()
       : level == "generic" ? engine::generic_table() : nullptr;
    TORCH_CHECK(t_ != nullptr, "no ", level, " kernels in this build (levels: ", levels_str(), ")");
  }
  static std::vector<std::string> levels() {
    std::vector<std::string> out;
    for (auto* t : {engine::avx512_table(), engine::avx2_table(), engine::generic_table()})
      if (t) out.emplace_back(t->level);
    return out;
  }
  static std::string levels_str() {
    std::string s;
    for (const auto& l : levels()) s += (s.empty() ? "" : ", ") + l;
    return s;
  }

  std::string isa_level() const { return t_->level; }
  std::string quant_kernel_name() const { return t_->quant_name; }
  std::string attention_kernel_name(at::ScalarType dtype, int64_t head_dim, int64_t group) const {
    return std::string(t_->level) + "_" + t_->decode_attention_name(dtype == at::kBFloat16 ? DType::bf16 : DType::f32,
                                                                       head_dim, group);
  }

  at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool gemma) const {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && w.numel() == x.size(1) &&
                w.scalar_type() == x.scalar_type(), "x must be contiguous [T, n], w [n] of its dtype");
    auto out = at::empty_like(x);
    t_->rms_norm(dtype_of(x), out.data_ptr(), x.data_ptr(), w.data_ptr(), x.size(0), x.size(1), (float)eps, gemma);
    return out;
  }

  void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps, bool gemma) const {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes() &&
                x.scalar_type() == residual.scalar_type(), "x and residual: contiguous [T, n] alike");
    TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(1) && w.scalar_type() == x.scalar_type(), "w [n]");
    t_->fused_add_rms_norm(dtype_of(x), x.data_ptr(), residual.data_ptr(), w.data_ptr(), x.size(0), x.size(1),
                           (float)eps, gemma);
  }

  void head_rms_norm(at::Tensor& qkv, const at::Tensor& q_w, const at::Tensor& k_w, int64_t H, int64_t Hkv, int64_t D,
                     double eps, bool gemma) const {
    TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) >= (H + Hkv) * D, "qkv [T, >= (H + Hkv) D]");
    TORCH_CHECK(q_w.numel() == D && k_w.numel() == D && q_w.is_contiguous() && k_w.is_contiguous() &&
                q_w.scalar_type() == qkv.scalar_type() && k_w.scalar_type() == qkv.scalar_type(), "norm weights [D]");
    t_->head_rms_norm(dtype_of(qkv), qkv.data_ptr(), qkv.size(0), qkv.stride(0), q_w.data_ptr(), k_w.data_ptr(), H,
                      Hkv, D, (float)eps, gemma);
  }

  at::Tensor rope_and_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                               at::Tensor& v_cache, const at::Tensor& slots, int64_t H, int64_t Hkv, int64_t D) const {
    TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (H + 2 * Hkv) * D, "qkv shape");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == qkv.size(0) &&
                cos.size(1) == D && cos.sizes() == sin.sizes() && cos.scalar_type() == qkv.scalar_type() &&
                sin.scalar_type() == qkv.scalar_type(), "cos/sin must be [T, D] in qkv's dtype");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                slots.scalar_type() == at::kLong && slots.numel() == qkv.size(0), "caches and one slot a row");
    auto q = at::empty({qkv.size(0), H, D}, qkv.options());
    auto sl = slots.contiguous();
    if (k_cache.scalar_type() == at::kByte) {
      TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(1) == Hkv && k_cache.size(3) == kTile * (D + kScaleBytes) &&
                  D % 16 == 0 && D <= 256, "int8 caches are [blocks, Hkv, block_size / 16, 16 (D + 4)], D % 16 == 0 "
                  "up to 256");
      t_->rope_write_kv_int8(dtype_of(qkv), q.data_ptr(), qkv.data_ptr(), qkv.size(0), qkv.stride(0), cos.data_ptr(),
                             sin.data_ptr(), k_cache.data_ptr<uint8_t>(), v_cache.data_ptr<uint8_t>(),
                             sl.data_ptr<int64_t>(), H, Hkv, D, k_cache.size(2));
      return q;
    }
    TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() && k_cache.dim() == 4 && k_cache.size(2) == Hkv &&
                k_cache.size(3) == D, "a model-dtype cache is [blocks, block_size, Hkv, D] in qkv's dtype");
    t_->rope_write_kv(dtype_of(qkv), q.data_ptr(), qkv.data_ptr(), qkv.size(0), qkv.stride(0), cos.data_ptr(),
                      sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), sl.data_ptr<int64_t>(), H, Hkv, D);
    return q;
  }

  at::Tensor act_and_mul(const at::Tensor& x, bool gelu) const {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "x must be contiguous [T, 2d]");
    auto out = at::empty({x.size(0), x.size(1) / 2}, x.options());
    t_->act_and_mul(dtype_of(x), out.data_ptr(), x.data_ptr(), x.size(0), x.size(1) / 2, gelu);
    return out;
  }

  bool int8_attention_supported(int64_t head_dim) const { return head_dim == 64 || head_dim == 128 || head_dim == 256; }

  // out[b, h] = softmax(q[b, h] . K_b^T * scale) V_b over the sequence's last min(len, window)
  // tokens (window 0: all), read through block_tables
  at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                    int64_t window) const {
    TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [B, H, D]");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                k_cache.dim() == 4, "caches must be contiguous and alike");
    TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && seq_lens.numel() == q.size(0),
                "int64 block tables [B, max_blocks] and seq_lens [B]");
    TORCH_CHECK(window >= 0, "window >= 0 (0: none)");
    auto bt = block_tables.contiguous();
    auto lens = seq_lens.contiguous();
    auto out = at::empty_like(q);
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
    if (k_cache.scalar_type() == at::kByte) {
      const int64_t Hkv = k_cache.size(1);
      TORCH_CHECK(int8_attention_supported(D) && k_cache.size(3) == kTile * (D + kScaleBytes) && H % Hkv == 0,
                  "int8 KV decode attention needs head_dim 64, 128 or 256 and caches [blocks, Hkv, tiles, 16 (D + 4)]");
      t_->decode_attention_int8(dtype_of(q), out.data_ptr(), q.data_ptr(), k_cache.data_ptr<uint8_t>(),
                                v_cache.data_ptr<uint8_t>(), bt.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), B, H,
                                Hkv, D, k_cache.size(2), bt.size(1), (float)scale, window);
      return out;
    }
    const int64_t Hkv = k_cache.size(2);
    TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && k_cache.size(3) == D && H % Hkv == 0,
                "a model-dtype cache [blocks, block_size, Hkv, D] in q's dtype, H a multiple of Hkv");
    t_->decode_attention(dtype_of(q), out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                         bt.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), B, H, Hkv, D, k_cache.size(1), bt.size(1),
                         (float)scale, window);
    return out;
  }

  bool prefill_attention_supported(at::ScalarType dtype, int64_t head_dim) const {
    return t_->prefill_attention != nullptr && t_->has_bf16() && dtype == at::kBFloat16 &&
           (head_dim == 64 || head_dim == 128 || head_dim == 256);
  }

  // A prompt chunk's attention: q [n, H, D] its rows, the last n of the `context_len`
  // positions held by the blocks `block_table` lists, each attending causally (within
  // `window`; 0: none) over bf16 caches [blocks, block_size, Hkv, D]
  at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_table, int64_t context_len, double scale,
                                     int64_t window) const {
    TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [n, H, D]");
    const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
    TORCH_CHECK(prefill_attention_supported(q.scalar_type(), D),
                "prefill attention needs bf16, head_dim 64, 128 or 256 and AVX512-BF16 (prefill_attention_supported)");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                k_cache.dim() == 4 && k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                k_cache.size(3) == D && H % k_cache.size(2) == 0,
                "caches must be contiguous bf16 [blocks, block_size, Hkv, D], H a multiple of Hkv");
    TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 1 &&
                block_table.numel() * k_cache.size(1) >= context_len && context_len >= n && n >= 1 && window >= 0,
                "an int64 block table [num_blocks] holding context_len >= n >= 1 positions; window >= 0");
    auto blocks = block_table.contiguous();
    auto out = at::empty_like(q);
    t_->prefill_attention(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                          blocks.data_ptr<int64_t>(), n, context_len, H, k_cache.size(2), D, k_cache.size(1),
                          (float)scale, window);
    return out;
  }

  // Blocks of an int8 cache as values [n, block_size, Hkv, D] in `dtype`
  at::Tensor dequantize_kv_blocks(const at::Tensor& cache, const at::Tensor& block_ids, bool is_k,
                                  at::ScalarType dtype) const {
    TORCH_CHECK(cache.scalar_type() == at::kByte && cache.dim() == 4 && cache.is_contiguous(), "an int8 cache");
    TORCH_CHECK(block_ids.scalar_type() == at::kLong && (dtype == at::kFloat || dtype == at::kBFloat16), "ids, dtype");
    const int64_t D = cache.size(3) / kTile - kScaleBytes;
    TORCH_CHECK(D % 16 == 0 && D <= 256 && cache.size(3) == kTile * (D + kScaleBytes), "int8 cache tiles of head_dim D");
    auto ids = block_ids.contiguous();
    auto out = at::empty({ids.numel(), cache.size(2) * kTile, cache.size(1), D}, cache.options().dtype(dtype));
    t_->dequantize_kv_blocks(dtype == at::kFloat ? DType::f32 : DType::bf16, out.data_ptr(), cache.data_ptr<uint8_t>(),
                             ids.data_ptr<int64_t>(), ids.numel(), cache.size(1), cache.size(2), D, is_k);
    return out;
  }

  // y[M, N] = x[M, K] w^T (+ bias), w given by (codes, scales, mins, bits, block, code kind):
  // engine_kernels/quant.py's form
  at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                          const at::Tensor& mins, int64_t bits, int64_t block, int64_t code_kind,
                          const c10::optional<at::Tensor>& bias) const {
    TORCH_CHECK(bits == 4 || bits == 8, "4- or 8-bit codes");
    TORCH_CHECK(block == 32 || (block == 16 && bits == 8), "blocks of 32 values (or 16 with 8-bit codes)");
    TORCH_CHECK(bits == 4 ? code_kind == 4 : (code_kind == 7 || code_kind == 8 || code_kind == 9),
                "code kind: 4 for 4-bit codes; 7 (< 128), 8 (symmetric, in [1, 255]) or 9 (any) for 8-bit");
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(2) == 64 && codes.is_contiguous(),
                "codes: uint8 [N/16, K*bits/32, 64]");
    TORCH_CHECK(scales.sizes() == mins.sizes() && scales.scalar_type() == mins.scalar_type(), "scales and mins alike");
    TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, "fp16 or fp32 scales");
    TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.dim() == 3 && scales.size(2) == 16 &&
                scales.size(0) == codes.size(0), "scales: [N/16, K/block, 16]");
    TORCH_CHECK(codes.size(1) * 32 == scales.size(1) * block * bits, "codes and scales disagree on K");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == scales.size(1) * block, "x must be [M, K]");
    auto xc = x.contiguous();
    auto y = at::empty({x.size(0), codes.size(0) * 16}, x.options());
    at::Tensor b;
    if (bias.has_value() && bias->defined()) {
      b = bias->to(at::kFloat).contiguous();
      TORCH_CHECK(b.numel() == y.size(1), "bias [N]");
    }
    t_->quant_linear(dtype_of(xc), y.data_ptr(), xc.data_ptr(), x.size(0), y.size(1), x.size(1),
                     codes.data_ptr<uint8_t>(), scales.data_ptr(), mins.data_ptr(),
                     scales.scalar_type() == at::kHalf, bits, block, code_kind,
                     b.defined() ? b.data_ptr<float>() : nullptr);
    return y;
  }

  bool has_bf16_gemv() const { return t_->gemv_bf16 != nullptr && t_->has_bf16(); }
  bool gemv_supported(int64_t N, int64_t K) const { return has_bf16_gemv() && N % 64 == 0 && K % 2 == 0; }

  // W [N, K] -> the [N/64][K/2][64][2] layout gemv_bf16 streams
  at::Tensor pack_for_gemv(const at::Tensor& w) const {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "w must be bfloat16 [N, K]");
    TORCH_CHECK(gemv_supported(w.size(0), w.size(1)), "needs N % 64 == 0, even K and AVX512-BF16");
    const int64_t N = w.size(0), K = w.size(1);
    return w.contiguous().view({N / 64, 64, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
  }

  // Small-M bf16 linear over a packed weight; x [M, K] -> [M, N].
  at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w_packed, const c10::optional<at::Tensor>& bias) const {
    TORCH_CHECK(has_bf16_gemv(), "this CPU or level has no AVX512-BF16 GEMV");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bfloat16 [M, K]");
    TORCH_CHECK(w_packed.dim() == 4 && w_packed.size(1) * 2 == x.size(1) && w_packed.is_contiguous() &&
                w_packed.scalar_type() == at::kBFloat16, "w_packed must come from pack_for_gemv for this K");
    auto xc = x.contiguous();
    auto y = at::empty({x.size(0), w_packed.size(0) * 64}, x.options());
    at::Tensor b;
    if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
    t_->gemv_bf16(y.data_ptr(), xc.data_ptr(), x.size(0), x.size(1), y.size(1), w_packed.data_ptr(),
                  b.defined() ? b.data_ptr<float>() : nullptr);
    return y;
  }

  // Greedy sampling's argmax over each row of fp32 logits, as torch.argmax: the first index
  // of the maximum, and the first NaN if a row has one.
  at::Tensor argmax_rows(const at::Tensor& logits) const {
    TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
                "logits must be [N, V] float32 with contiguous rows, V > 0");
    TORCH_CHECK(logits.size(1) < (int64_t(1) << 31), "vocabulary too large for int32 lane indices");
    auto out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
    t_->argmax_rows(out.data_ptr<int64_t>(), logits.data_ptr<float>(), logits.size(0), logits.size(1),
                    logits.stride(0));
    return out;
  }

  // logits[r, j] = -inf where bit j of bitmask[r] is 0, for each r in rows
  void apply_token_bitmask(at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows) const {
    TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1,
                "logits must be [N, V] float32 with contiguous rows");
    TORCH_CHECK(bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 && bitmask.stride(1) == 1,
                "bitmask must be [N, ceil(V/32)] int32");
    TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "rows must be int64 indices");
    auto rows_c = rows.contiguous();
    const int64_t* ids = rows_c.data_ptr<int64_t>();
    for (int64_t k = 0; k < rows_c.numel(); ++k)
      TORCH_CHECK(ids[k] >= 0 && ids[k] < logits.size(0) && ids[k] < bitmask.size(0), "row index out of range");
    t_->apply_token_bitmask(logits.data_ptr<float>(), logits.size(1), logits.stride(0), bitmask.data_ptr<int32_t>(),
                            bitmask.size(1), bitmask.stride(0), ids, rows_c.numel());
  }

 private:
  const KernelTable* t_;
};

// A linear layer as the fused decode path runs it: the bf16 GEMV over a packed weight
// (bits 16), a dense weight through ATen (bits 32: oneDNN/MKL), or the quantized kernel
// (codes, scales, mins; bits 4 or 8).
struct LinearWeights {
  Kernels k;
  at::Tensor w0, w1, w2;
  int64_t bits, block, code_kind;
  c10::optional<at::Tensor> bias;
  at::Tensor operator()(const at::Tensor& x) const {
    if (bits == 16) return k.gemv_bf16(x, w0, bias);
    if (bits == 32) return at::linear(x, w0, bias);
    return k.quant_linear(x, w0, w1, w2, bits, block, code_kind, bias);
  }
};

// One decoder layer for a decode-only step, in one call from Python: the same kernels in
// the same order as engine.models.layers.DecoderLayer.forward, without the ~10 trips
// through the interpreter per layer (measured: about a quarter of a one-stream step on two
// cores). The family's differences are its fields: per-head q/k norms (Qwen3, Gemma 3),
// Gemma's norms (1 + w, in fp32) and its norms after attention and after the MLP, the
// gated activation, the sliding window.
struct DecodeLayer {
  Kernels k;
  at::Tensor input_norm, pre_mlp_norm;
  c10::optional<at::Tensor> post_attention_norm, post_mlp_norm, q_norm, k_norm;
  double eps;
  bool gemma_norms, gelu;
  LinearWeights qkv, o, gate_up, down;
  int64_t H, Hkv, D;
  double scale;
  int64_t window;

  // (this layer's output, the residual stream before it), as DecoderLayer.forward
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor h, c10::optional<at::Tensor> residual, const at::Tensor& cos,
                                         const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                                         const at::Tensor& slots, const at::Tensor& block_tables,
                                         const at::Tensor& seq_lens) const {
    at::Tensor res;
    if (residual.has_value()) {
      res = *residual;
      k.fused_add_rms_norm(h, res, input_norm, eps, gemma_norms);
    } else {
      res = h;
      h = k.rms_norm(h, input_norm, eps, gemma_norms);
    }
    at::Tensor x = qkv(h);
    if (q_norm.has_value()) k.head_rms_norm(x, *q_norm, *k_norm, H, Hkv, D, eps, gemma_norms);
    const at::Tensor q = k.rope_and_write_kv(x, cos, sin, k_cache, v_cache, slots, H, Hkv, D);
    const at::Tensor attn = k.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, window);
    at::Tensor a = o(attn.view({attn.size(0), H * D}));
    if (post_attention_norm.has_value()) a = k.rms_norm(a, *post_attention_norm, eps, gemma_norms);
    k.fused_add_rms_norm(a, res, pre_mlp_norm, eps, gemma_norms);
    at::Tensor m = down(k.act_and_mul(gate_up(a), gelu));
    if (post_mlp_norm.has_value()) m = k.rms_norm(m, *post_mlp_norm, eps, gemma_norms);
    return {m, res};
  }
};

// Ends the OpenMP worker threads that the calling thread started (libgomp keeps a pool per
// thread that ever opened a parallel region). Once a process has more OpenMP threads than
// CPUs, libgomp stops every pool's workers from spin-waiting between regions, and each
// region then pays a futex wake-up: on two cores, a model loaded on the main thread and
// stepped on AsyncLLM's thread ran every kernel 1.5-2x slower (a 2-op region 8 -> 59 us).
int release_openmp_pool() { return omp_pause_resource_all(omp_pause_soft); }

// Ask the kernel for 2 MiB pages under a not-yet-touched buffer: streaming the weights
// through 4 KiB pages costs about 10% of decode speed in TLB misses. Advisory only.
void advise_huge_pages(at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t first = (begin + huge - 1) & ~(huge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(huge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
}

}  // namespace

// The compute calls run without the GIL: they touch no Python object, and an event loop on
// another thread (the server streaming tokens) must not wait for the GIL until a call
// returns (holding it made AsyncLLM's decode steps 1.6-1.9x longer than LLMEngine's at 80
// streams: the loop's Python ran between the step's calls instead of beside them).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("levels", &Kernels::levels, "the ISA levels this build holds kernels for");
  m.def("release_openmp_pool", &release_openmp_pool);
  m.def("advise_huge_pages", &advise_huge_pages);
  py::class_<LinearWeights>(m, "LinearWeights");
  py::class_<DecodeLayer>(m, "DecodeLayer").def("run", &DecodeLayer::run, no_gil);
  py::class_<Kernels>(m, "Kernels")
      .def(py::init<std::string>())
      .def("isa_level", &Kernels::isa_level)
      .def("quant_kernel_name", &Kernels::quant_kernel_name)
      .def("attention_kernel_name", &Kernels::attention_kernel_name)
      .def("rms_norm", &Kernels::rms_norm, no_gil)
      .def("fused_add_rms_norm", &Kernels::fused_add_rms_norm, no_gil)
      .def("head_rms_norm", &Kernels::head_rms_norm, no_gil)
      .def("rope_and_write_kv", &Kernels::rope_and_write_kv, no_gil)
      .def("act_and_mul", &Kernels::act_and_mul, no_gil)
      .def("int8_attention_supported", &Kernels::int8_attention_supported)
      .def("paged_decode_attention", &Kernels::paged_decode_attention, no_gil)
      .def("prefill_attention_supported", &Kernels::prefill_attention_supported)
      .def("paged_prefill_attention", &Kernels::paged_prefill_attention, no_gil)
      .def("dequantize_kv_blocks", &Kernels::dequantize_kv_blocks, no_gil)
      .def("quant_linear", &Kernels::quant_linear, no_gil)
      .def("has_bf16_gemv", &Kernels::has_bf16_gemv)
      .def("gemv_supported", &Kernels::gemv_supported)
      .def("pack_for_gemv", &Kernels::pack_for_gemv, no_gil)
      .def("gemv_bf16", &Kernels::gemv_bf16, no_gil)
      .def("argmax_rows", &Kernels::argmax_rows, no_gil)
      .def("apply_token_bitmask", &Kernels::apply_token_bitmask, no_gil)
      .def("release_openmp_pool", [](const Kernels&) { return release_openmp_pool(); })
      .def("advise_huge_pages", [](const Kernels&, at::Tensor& t) { advise_huge_pages(t); })
      .def("LinearWeights",
           [](const Kernels& k, at::Tensor w0, at::Tensor w1, at::Tensor w2, int64_t bits, int64_t block,
              int64_t code_kind, c10::optional<at::Tensor> bias) {
             return LinearWeights{k, w0, w1, w2, bits, block, code_kind, bias};
           },
           py::arg("w0"), py::arg("w1"), py::arg("w2"), py::arg("bits"), py::arg("block"), py::arg("code_kind"),
           py::arg("bias"))
      .def("DecodeLayer",
           [](const Kernels& k, at::Tensor input_norm, at::Tensor pre_mlp_norm,
              c10::optional<at::Tensor> post_attention_norm, c10::optional<at::Tensor> post_mlp_norm,
              c10::optional<at::Tensor> q_norm, c10::optional<at::Tensor> k_norm, double eps, bool gemma_norms,
              bool gelu, const LinearWeights& qkv, const LinearWeights& o, const LinearWeights& gate_up,
              const LinearWeights& down, int64_t H, int64_t Hkv, int64_t D, double scale, int64_t window) {
             TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q and k norms together");
             return DecodeLayer{k, input_norm, pre_mlp_norm, post_attention_norm, post_mlp_norm, q_norm, k_norm,
                                eps, gemma_norms, gelu, qkv, o, gate_up, down, H, Hkv, D, scale, window};
           });
}

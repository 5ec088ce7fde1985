// The kernels of one ISA level, as a table of plain functions on raw pointers: what the
// bindings (bindings.cpp, the only file that sees torch) call after checking and
// allocating tensors. Each level_<isa>.cpp compiles the same kernel sources for its
// level and fills one table; the platform picks a table at run time.
#pragma once
#include <cstdint>

namespace engine {

enum class DType : int { f32 = 0, bf16 = 1 };

struct KernelTable {
  const char* level;       // "avx512", "avx2", "generic"
  const char* quant_name;  // the quantized linear's form on this level
  bool (*has_bf16)();      // this CPU runs the level's AVX512-BF16 code: the bf16 GEMV and attention tiles

  // elementwise.h: x [rows, n] (row stride n), w [n]
  void (*rms_norm)(DType, void* out, const void* x, const void* w, int64_t rows, int64_t n, float eps, bool gemma);
  void (*fused_add_rms_norm)(DType, void* x, void* residual, const void* w, int64_t rows, int64_t n, float eps,
                             bool gemma);
  // qkv [T, >= (H + Hkv) D] with row stride `stride`: q heads normed by qw, k heads by kw, in place
  void (*head_rms_norm)(DType, void* qkv, int64_t T, int64_t stride, const void* qw, const void* kw, int64_t H,
                        int64_t Hkv, int64_t D, float eps, bool gemma);
  // q_out [T, H, D]; caches [blocks, block_size, Hkv, D] in the model dtype
  void (*rope_write_kv)(DType, void* q_out, const void* qkv, int64_t T, int64_t stride, const void* cos,
                        const void* sin, void* k_cache, void* v_cache, const int64_t* slots, int64_t H, int64_t Hkv,
                        int64_t D);
  // out [rows, d] = act(x[:, :d]) * x[:, d:]
  void (*act_and_mul)(DType, void* out, const void* x, int64_t rows, int64_t d, bool gelu);

  // attention.h: out, q [B, H, D]; caches [blocks, block_size, Hkv, D]; tables [B, max_blocks]
  void (*decode_attention)(DType, void* out, const void* q, const void* k_cache, const void* v_cache,
                           const int64_t* block_tables, const int64_t* seq_lens, int64_t B, int64_t H, int64_t Hkv,
                           int64_t D, int64_t block_size, int64_t max_blocks, float scale, int64_t window);
  const char* (*decode_attention_name)(DType, int64_t D, int64_t G);

  // kv_int8.h: caches [blocks, Hkv, tiles per block, 16 (D + 4)] of uint8
  void (*rope_write_kv_int8)(DType, void* q_out, const void* qkv, int64_t T, int64_t stride, const void* cos,
                             const void* sin, uint8_t* k_cache, uint8_t* v_cache, const int64_t* slots, int64_t H,
                             int64_t Hkv, int64_t D, int64_t tiles_per_block);
  void (*decode_attention_int8)(DType, void* out, const void* q, const uint8_t* k_cache, const uint8_t* v_cache,
                                const int64_t* block_tables, const int64_t* seq_lens, int64_t B, int64_t H,
                                int64_t Hkv, int64_t D, int64_t tiles_per_block, int64_t max_blocks, float scale,
                                int64_t window);
  // out [n, tiles per block * 16, Hkv, D]
  void (*dequantize_kv_blocks)(DType, void* out, const uint8_t* cache, const int64_t* block_ids, int64_t n,
                               int64_t Hkv, int64_t tiles_per_block, int64_t D, bool is_k);

  // quant.h: y [M, N] = x [M, K] w^T (+ bias fp32); codes [N/16, K bits/32, 64]; scales, mins
  // [N/16, K/block, 16] fp16 (half_scales) or fp32
  void (*quant_linear)(DType, void* y, const void* x, int64_t M, int64_t N, int64_t K, const uint8_t* codes,
                       const void* scales, const void* mins, bool half_scales, int64_t bits, int64_t block,
                       int64_t code_kind, const float* bias);

  // gemv_bf16.h (where has_bf16() only): y [M, N] bf16 = x [M, K] bf16 W^T, W packed [N/64, K/2, 64, 2]
  void (*gemv_bf16)(void* y, const void* x, int64_t M, int64_t K, int64_t N, const void* w_packed,
                    const float* bias);
  // prefill_attention.h (where has_bf16() only): out, q [n, H, D] bf16, a prompt chunk's rows;
  // caches [blocks, block_size, Hkv, D] bf16; blocks: its block table; C: its cached positions
  void (*prefill_attention)(void* out, const void* q, const void* k_cache, const void* v_cache,
                            const int64_t* blocks, int64_t n, int64_t C, int64_t H, int64_t Hkv, int64_t D,
                            int64_t block_size, float scale, int64_t window);

  // sampling.h: logits [N, V] fp32 with row stride
  void (*argmax_rows)(int64_t* out, const float* logits, int64_t N, int64_t V, int64_t stride);
  void (*apply_token_bitmask)(float* logits, int64_t V, int64_t stride, const int32_t* bitmask, int64_t words,
                              int64_t bitmask_stride, const int64_t* rows, int64_t num_rows);
};

// The table of each level, or nullptr where this build has none (non-x86, or a compiler
// without GCC's target pragmas: the generic level only).
const KernelTable* avx512_table();
const KernelTable* avx2_table();
const KernelTable* generic_table();

}  // namespace engine

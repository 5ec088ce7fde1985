// The int8 KV cache (`EngineConfig.kv_cache_dtype="int8"`; engine_kernels/kv_quant.py holds the
// layout and its plain-torch reference): each head row quantized on its own (code = round(
// value / scale), scale = amax / 127), a layer's cache [num_blocks, Hkv, block_size / 16,
// 16 * (D + 4)] of 16-position tiles, each tile's codes laid out for vpdpbusd and its 16
// fp32 scales after them. Half the bytes of a bf16 cache: decode attention on two cores is
// bound by reading them.
//
// Here: writing rotated K and V into such a cache (the fused RoPE kernel's int8 form), and
// decode attention over it, one task per (sequence, KV head), a tile at a time:
//   scores: q quantized per head to int8 (amax / 127, as the activations of quant_ops.cpp);
//     a 64-byte load of the K tile is 4 dims of its 16 rows (codes offset by 128: vpdpbusd's
//     unsigned operand), multiplied by those 4 dims of q broadcast: the 16 lanes are the 16
//     rows' dot products, exact in int32, with no horizontal sums (D / 4 instructions a
//     tile per query head); the offset comes back out as one constant per head.
//   P.V: the tile's weights p[t] * scale_v[t] quantized to u8 against their largest (the
//     bf16 kernel rounds probabilities to 8 bits too); a 64-byte load of the V tile is 16
//     dims of 4 rows (signed codes), multiplied by those 4 rows' weights broadcast: 16 dims
//     summed over 4 rows per instruction, exact in int32, scaled into fp32 per tile.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#include <immintrin.h>
#include "vec.h"

namespace {

constexpr int64_t kTile = 16, kScaleBytes = 4;
// K tiles are prefetched this far ahead (2 and 4 measured no different on two cores).
constexpr int64_t kPrefetchTiles = 1;

// codes[d] = round(x[d] / scale) in [-127, 127], scale = amax / 127 (returned): the rounding
// of kernels.kv_quant.quantize_rows, for cached rows and for q alike.
inline float quantize_row(const float* x, int64_t D, int8_t* codes) {
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
  for (int64_t d = 0; d < D; ++d)  // nearbyint: half to even, as torch.round
    codes[d] = static_cast<int8_t>(std::clamp(static_cast<int>(std::nearbyint(x[d] * inv)), -127, 127));
  return scale;
}

// Quantizes one head row x[D] into tile row i: K codes offset by 128 in the K layout, V
// codes signed in the V layout (engine_kernels/kv_quant.py), and the row's scale.
template <bool kIsK>
inline void quantize_into_tile(uint8_t* tile, int64_t i, const float* x, int64_t D) {
  int8_t codes[256];  // D <= 256: checked by rope_write_kv_int8
  const float scale = quantize_row(x, D, codes);
  for (int64_t d = 0; d < D; ++d) {
    if constexpr (kIsK) tile[(d / 4) * 64 + i * 4 + d % 4] = static_cast<uint8_t>(codes[d] + 128);
    else tile[(i / 4) * 4 * D + (d / 16) * 64 + (d % 16) * 4 + i % 4] = static_cast<uint8_t>(codes[d]);
  }
  std::memcpy(tile + kTile * D + i * kScaleBytes, &scale, kScaleBytes);
}

// As rope_write_kv_impl (cpu_ops.cpp), rounding to the model dtype at the same points, then
// each K and V head row quantized into its tile.
template <typename T>
void rope_write_kv_int8_impl(at::Tensor& q_out, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, int64_t H,
                             int64_t Hkv, int64_t D) {
  const int64_t n = qkv.size(0), half = D / 2, stride = qkv.stride(0);
  const int64_t tpb = k_cache.size(2), bs = tpb * kTile, TB = k_cache.size(3);
  const T* src = qkv.data_ptr<T>(); const T* cp = cos.data_ptr<T>(); const T* sp = sin.data_ptr<T>();
  T* qo = q_out.data_ptr<T>();
  uint8_t* kc = k_cache.data_ptr<uint8_t>(); uint8_t* vc = v_cache.data_ptr<uint8_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
    std::vector<float> rot(D);
    for (int64_t t = b; t < e; ++t) {
      const T* row = src + t * stride; const T* c = cp + t * D; const T* s = sp + t * D;
      const int64_t blk = sl[t] / bs, pos = sl[t] % bs, i = pos % kTile;
      const auto tile = [&](int64_t h) { return ((blk * Hkv + h) * tpb + pos / kTile) * TB; };
      for (int64_t h = 0; h < H + Hkv; ++h) {
        const T* x = row + h * D;
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = load(x, j), x2 = load(x, j + half);
          rot[j] = round_to<T>(round_to<T>(x1 * load(c, j)) + round_to<T>(-x2 * load(s, j)));
          rot[j + half] = round_to<T>(round_to<T>(x2 * load(c, j + half)) + round_to<T>(x1 * load(s, j + half)));
        }
        if (h < H) {
          for (int64_t j = 0; j < D; ++j) store(qo + (t * H + h) * D, j, rot[j]);
        } else {
          quantize_into_tile<true>(kc + tile(h - H), i, rot.data(), D);
        }
      }
      for (int64_t h = 0; h < Hkv; ++h) {
        const T* x = row + (H + Hkv + h) * D;
        for (int64_t j = 0; j < D; ++j) rot[j] = load(x, j);
        quantize_into_tile<false>(vc + tile(h), i, rot.data(), D);
      }
    }
  });
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The 16 scores of one K tile for NG query heads at once (each K load serves them all).
template <int NG, int KW>
inline void tile_scores(const uint8_t* kt, const int32_t* q4, const int32_t* qsum, const float* qscale,
                        float* const* dst) {
  __m512i acc[NG];
  for (int g = 0; g < NG; ++g) acc[g] = _mm512_setzero_si512();
  for (int m = 0; m < KW; ++m) {
    const __m512i k = _mm512_load_si512(kt + 64 * m);
    for (int g = 0; g < NG; ++g) acc[g] = _mm512_dpbusd_epi32(acc[g], k, _mm512_set1_epi32(q4[g * KW + m]));
  }
  const __m512 kscale = _mm512_load_ps(reinterpret_cast<const float*>(kt + 64 * KW));
  for (int g = 0; g < NG; ++g) {
    const __m512 dots = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[g], _mm512_set1_epi32(qsum[g])));
    _mm512_storeu_ps(dst[g], _mm512_mul_ps(_mm512_mul_ps(dots, kscale), _mm512_set1_ps(qscale[g])));
  }
}

// D = 64 * NZ.
template <typename T, int NZ>
void decode_attention_int8(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           double scale) {
  constexpr int64_t D = 64 * NZ, TB = kTile * (D + kScaleBytes);
  constexpr int KW = D / 4, VC = D / 16;  // 64-byte loads per K tile; per 4 rows of a V tile
  const int64_t B = q.size(0), H = q.size(1);
  const int64_t Hkv = k_cache.size(1), tpb = k_cache.size(2), G = H / Hkv, max_blocks = block_tables.size(1);
  TORCH_CHECK(k_cache.size(3) == TB, "int8 cache tiles are 16 * (head_dim + 4) bytes");
  const T* qp = q.data_ptr<T>(); T* op = out.data_ptr<T>();
  const uint8_t* kp = k_cache.data_ptr<uint8_t>(); const uint8_t* vp = v_cache.data_ptr<uint8_t>();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(kp) % 64 == 0 && reinterpret_cast<uintptr_t>(vp) % 64 == 0,
              "int8 caches must be 64-byte aligned");
  const int64_t* bt = block_tables.data_ptr<int64_t>(); const int64_t* lens = seq_lens.data_ptr<int64_t>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(G * D), qscale(G);
    std::vector<int32_t> q4(G * KW), qsum(G);
    std::vector<int64_t> toff;  // byte offset of each tile of this (sequence, KV head)
    std::vector<float*> dst(G);
    alignas(64) uint8_t w8[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv, L = lens[b], tiles = (L + kTile - 1) / kTile, Lp = tiles * kTile;
      scores.resize(G * Lp);
      std::fill(acc.begin(), acc.end(), 0.f);
      toff.resize(tiles + kPrefetchTiles);
      const int64_t* blocks = bt + b * max_blocks;
      for (int64_t t = 0; t < tiles; ++t) toff[t] = ((blocks[t / tpb] * Hkv + kvh) * tpb + t % tpb) * TB;
      std::fill(toff.begin() + tiles, toff.end(), toff[0]);  // prefetches past the end
      for (int64_t g = 0; g < G; ++g) {  // q per head to int8, 4 codes to a word
        const T* qh = qp + (b * H + kvh * G + g) * D;
        float qf[D];
        int8_t codes[D];
        for (int64_t d = 0; d < D; ++d) qf[d] = load(qh, d);
        const float qs = quantize_row(qf, D, codes);
        int32_t sum = 0;
        for (int64_t d = 0; d < D; ++d) sum += codes[d];
        std::memcpy(&q4[g * KW], codes, D);
        qscale[g] = qs * static_cast<float>(scale);
        qsum[g] = 128 * sum;  // what the K codes' offset adds to every dot
      }
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const char* kn = reinterpret_cast<const char*>(kp + toff[tile + kPrefetchTiles]);
        const char* vn = reinterpret_cast<const char*>(vp + toff[tile]);
        for (int64_t byte = 0; byte < TB; byte += 64) {
          _mm_prefetch(kn + byte, _MM_HINT_T0);
          _mm_prefetch(vn + byte, _MM_HINT_T1);
        }
        const uint8_t* kt = kp + toff[tile];
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
          const int64_t ng = std::min<int64_t>(4, G - g0);
          for (int64_t g = 0; g < ng; ++g) dst[g] = &scores[(g0 + g) * Lp + tile * kTile];
          const int32_t* qg = &q4[g0 * KW];
          switch (ng) {
            case 1: tile_scores<1, KW>(kt, qg, &qsum[g0], &qscale[g0], dst.data()); break;
            case 2: tile_scores<2, KW>(kt, qg, &qsum[g0], &qscale[g0], dst.data()); break;
            case 3: tile_scores<3, KW>(kt, qg, &qsum[g0], &qscale[g0], dst.data()); break;
            default: tile_scores<4, KW>(kt, qg, &qsum[g0], &qscale[g0], dst.data()); break;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = &scores[g * Lp];
        softmax512(sg, L);
        std::fill(sg + L, sg + Lp, 0.f);  // rows past L weigh nothing
      }
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const uint8_t* vt = vp + toff[tile];
        const __m512 vscale = _mm512_load_ps(reinterpret_cast<const float*>(vt + kTile * D));
        const int64_t groups = (std::min<int64_t>(kTile, L - tile * kTile) + 3) / 4;  // of 4 rows
        for (int64_t g = 0; g < G; ++g) {
          const __m512 w = _mm512_mul_ps(_mm512_loadu_ps(&scores[g * Lp + tile * kTile]), vscale);
          const float wmax = _mm512_reduce_max_ps(w);
          if (!(wmax > 0.f)) continue;  // the tile weighs nothing for this head
          _mm_store_si128(reinterpret_cast<__m128i*>(w8),
                          _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(w, _mm512_set1_ps(255.f / wmax)))));
          const int32_t* w4 = reinterpret_cast<const int32_t*>(w8);
          __m512i a[VC];
          for (int c = 0; c < VC; ++c) a[c] = _mm512_setzero_si512();
          for (int64_t j = 0; j < groups; ++j) {
            const __m512i wj = _mm512_set1_epi32(w4[j]);
            for (int c = 0; c < VC; ++c) a[c] = _mm512_dpbusd_epi32(a[c], wj, _mm512_load_si512(vt + j * 4 * D + 64 * c));
          }
          const __m512 unit = _mm512_set1_ps(wmax / 255.f);
          float* ag = &acc[g * D];
          for (int c = 0; c < VC; ++c)
            _mm512_storeu_ps(ag + 16 * c, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[c]), unit, _mm512_loadu_ps(ag + 16 * c)));
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* dst_row = op + (b * H + kvh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) store(dst_row, d, acc[g * D + d]);
      }
    }
  });
}

// 16 fp32 lanes to dst[0..15] in T (bf16 rounds to nearest even, as c10).
template <typename T> inline void store16(T* dst, __m512 v);
template <> inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
template <> inline void store16(at::BFloat16* dst, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
#else
  alignas(64) float f[16];
  _mm512_store_ps(f, v);
  for (int i = 0; i < 16; ++i) store(dst, i, f[i]);
#endif
}

// Blocks of an int8 cache as values [n, block_size, Hkv, D] in T: what a prompt chunk with
// earlier context attends to (kernels.kv_quant.read is the reference).
template <typename T>
void dequantize_blocks_impl(at::Tensor& out, const at::Tensor& cache, const at::Tensor& block_ids, bool is_k) {
  const int64_t n = block_ids.size(0), Hkv = cache.size(1), tpb = cache.size(2), TB = cache.size(3);
  const int64_t D = TB / kTile - kScaleBytes, bs = tpb * kTile;
  const uint8_t* cp = cache.data_ptr<uint8_t>(); const int64_t* ids = block_ids.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n * Hkv * tpb, 4, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / (Hkv * tpb), h = job / tpb % Hkv, tile = job % tpb;
      const uint8_t* tp = cp + ((ids[b] * Hkv + h) * tpb + tile) * TB;
      const float* scales = reinterpret_cast<const float*>(tp + kTile * D);
      for (int64_t i = 0; i < kTile; ++i) {
        T* dst = op + ((b * bs + tile * kTile + i) * Hkv + h) * D;
        const __m512 s = _mm512_set1_ps(scales[i]);
        for (int64_t c = 0; c < D / 16; ++c) {
          __m512i codes;
          if (is_k) {  // dims 16c.. of row i: 4 words, one per 64-byte load of the tile
            const int32_t* w = reinterpret_cast<const int32_t*>(tp + 4 * i);
            const __m128i words = _mm_setr_epi32(w[(4 * c) * 16], w[(4 * c + 1) * 16], w[(4 * c + 2) * 16],
                                                 w[(4 * c + 3) * 16]);
            codes = _mm512_sub_epi32(_mm512_cvtepu8_epi32(words), _mm512_set1_epi32(128));
          } else {  // lane k of the load is dim 16c + k of rows 4(i/4)..+3: byte i % 4, signed
            const __m512i v = _mm512_load_si512(tp + (i / 4) * 4 * D + 64 * c);
            codes = _mm512_srai_epi32(_mm512_sllv_epi32(v, _mm512_set1_epi32(24 - 8 * static_cast<int>(i % 4))), 24);
          }
          store16(dst + 16 * c, _mm512_mul_ps(_mm512_cvtepi32_ps(codes), s));
        }
      }
    }
  });
}
#endif

}  // namespace

void rope_write_kv_int8(at::Tensor& q_out, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                        at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, int64_t H, int64_t Hkv,
                        int64_t D) {
  TORCH_CHECK(k_cache.scalar_type() == at::kByte && v_cache.scalar_type() == at::kByte, "uint8 caches");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(1) == Hkv && k_cache.size(3) == kTile * (D + kScaleBytes) &&
              D % 16 == 0 && D <= 256 && k_cache.sizes() == v_cache.sizes(),
              "int8 caches are [blocks, Hkv, block_size / 16, 16 * (D + 4)], D a multiple of 16 up to 256");
  if (qkv.scalar_type() == at::kFloat) rope_write_kv_int8_impl<float>(q_out, qkv, cos, sin, k_cache, v_cache, slots, H, Hkv, D);
  else rope_write_kv_int8_impl<at::BFloat16>(q_out, qkv, cos, sin, k_cache, v_cache, slots, H, Hkv, D);
}

bool int8_attention_supported(int64_t head_dim) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return head_dim == 64 || head_dim == 128 || head_dim == 256;
#else
  return false;
#endif
}

at::Tensor paged_decode_attention_int8(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  const int64_t D = q.size(2);
  TORCH_CHECK(int8_attention_supported(D), "int8 KV decode attention needs AVX512-VNNI and head_dim 64, 128 or 256");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && q.size(1) % k_cache.size(1) == 0,
              "int8 caches are [blocks, Hkv, block_size / 16, 16 * (D + 4)]");
  auto out = at::empty_like(q);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    switch (D) {
      case 64: decode_attention_int8<T, 1>(out, q, k_cache, v_cache, block_tables, seq_lens, scale); break;
      case 128: decode_attention_int8<T, 2>(out, q, k_cache, v_cache, block_tables, seq_lens, scale); break;
      default: decode_attention_int8<T, 4>(out, q, k_cache, v_cache, block_tables, seq_lens, scale); break;
    }
  };
  if (q.scalar_type() == at::kFloat) run(float{});
  else run(at::BFloat16{});
#endif
  return out;
}

at::Tensor dequantize_kv_blocks(const at::Tensor& cache, const at::Tensor& block_ids, bool is_k, at::ScalarType dtype) {
  TORCH_CHECK(cache.scalar_type() == at::kByte && cache.dim() == 4 && cache.is_contiguous(), "an int8 cache");
  TORCH_CHECK(block_ids.scalar_type() == at::kLong && (dtype == at::kFloat || dtype == at::kBFloat16), "ids, dtype");
  const int64_t D = cache.size(3) / kTile - kScaleBytes;
  TORCH_CHECK(D % 16 == 0 && int8_attention_supported(D), "int8 KV needs AVX512-VNNI and head_dim 64, 128 or 256");
  auto ids = block_ids.contiguous();
  auto out = at::empty({ids.size(0), cache.size(2) * kTile, cache.size(1), D}, cache.options().dtype(dtype));
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (dtype == at::kFloat) dequantize_blocks_impl<float>(out, cache, ids, is_k);
  else dequantize_blocks_impl<at::BFloat16>(out, cache, ids, is_k);
#endif
  return out;
}

// The int8 KV cache (`EngineConfig.kv_cache_dtype="int8"`; kernels/kv_quant.py holds the
// format and its plain-torch reference). A head's row in a cache is D bytes of codes, then
// its scale as fp32 (D + 4 bytes):
//   value[d] = (code[d] - 128) * scale,  scale = amax / 127,  code = round(value / scale) + 128
// Codes are offset by 128 (unsigned) because vpdpbusd takes its first operand unsigned: the
// offset comes back out as one correction per head, not per row. Half the bytes of a bf16
// cache, and decode attention on two cores is bound by reading them.
//
// Here: writing rotated K and V into such a cache (the fused RoPE kernel's int8 form), and
// decode attention over it:
//   scores: q quantized per head to int8 (amax / 127, as kernels.quant.quantize_activations),
//     one vpdpbusd per 64 dims of a row, exact int32 dots, the tile's 16 reduced together,
//     then scaled by q's scale, the row's scale and the softmax scale;
//   P.V: the weights p[t] * scale_v[t] quantized per head to int16 against their largest
//     (15 bits: finer than the bf16 probabilities of the bf16 kernel), rows widened to int16
//     and interleaved in pairs, one vpdpwssd adds two rows for 16 dims, exact int32 sums
//     scaled into fp32 every 8 tiles.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#include <immintrin.h>
#include "vec.h"

namespace {

constexpr int64_t kScaleBytes = 4;
// P.V sums stay exact in int32 for this many tiles: 8 * 16 rows * 32767 * 255 < 2^31.
constexpr int64_t kTilesPerFlush = 8;

// One head's row: codes offset by 128 and the fp32 scale after them.
inline void quantize_kv_row(uint8_t* dst, const float* x, int64_t D) {
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
  for (int64_t i = 0; i < D; ++i) {
    const int c = static_cast<int>(std::nearbyint(x[i] * inv));  // round half to even, as torch.round
    dst[i] = static_cast<uint8_t>(std::clamp(c, -127, 127) + 128);
  }
  std::memcpy(dst + D, &d, kScaleBytes);
}

inline float row_scale(const uint8_t* row, int64_t D) {
  float s;
  std::memcpy(&s, row + D, kScaleBytes);
  return s;
}

// As rope_write_kv_impl (cpu_ops.cpp), rounding to the model dtype at the same points, then
// each K and V head row quantized into the caches [num_blocks, block_size, Hkv, D + 4].
template <typename T>
void rope_write_kv_int8_impl(at::Tensor& q_out, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, int64_t H,
                             int64_t Hkv, int64_t D) {
  const int64_t n = qkv.size(0), half = D / 2, stride = qkv.stride(0), R = D + kScaleBytes;
  const T* src = qkv.data_ptr<T>(); const T* cp = cos.data_ptr<T>(); const T* sp = sin.data_ptr<T>();
  T* qo = q_out.data_ptr<T>();
  uint8_t* kc = k_cache.data_ptr<uint8_t>(); uint8_t* vc = v_cache.data_ptr<uint8_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
    std::vector<float> rot(D);
    for (int64_t t = b; t < e; ++t) {
      const T* row = src + t * stride; const T* c = cp + t * D; const T* s = sp + t * D;
      for (int64_t h = 0; h < H + Hkv; ++h) {
        const T* x = row + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = load(x, i), x2 = load(x, i + half);
          rot[i] = round_to<T>(round_to<T>(x1 * load(c, i)) + round_to<T>(-x2 * load(s, i)));
          rot[i + half] = round_to<T>(round_to<T>(x2 * load(c, i + half)) + round_to<T>(x1 * load(s, i + half)));
        }
        if (h < H) {
          for (int64_t i = 0; i < D; ++i) store(qo + (t * H + h) * D, i, rot[i]);
        } else {
          quantize_kv_row(kc + (sl[t] * Hkv + (h - H)) * R, rot.data(), D);
        }
      }
      for (int64_t h = 0; h < Hkv; ++h) {
        const T* x = row + (H + Hkv + h) * D;
        for (int64_t i = 0; i < D; ++i) rot[i] = load(x, i);
        quantize_kv_row(vc + (sl[t] * Hkv + h) * R, rot.data(), D);
      }
    }
  });
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Decode attention over int8 caches, D = 64 * NZ; one task per (sequence, KV head), 16 rows
// (a tile) at a time, the layout of work as decode_attention_bf16 (cpu_ops.cpp).
template <typename T, int NZ>
void decode_attention_int8(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           double scale) {
  constexpr int64_t D = 64 * NZ, R = D + kScaleBytes, C = D / 16;
  const int64_t B = q.size(0), H = q.size(1);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = H / Hkv, max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>(); T* op = out.data_ptr<T>();
  const uint8_t* kp = k_cache.data_ptr<uint8_t>(); const uint8_t* vp = v_cache.data_ptr<uint8_t>();
  const int64_t* bt = block_tables.data_ptr<int64_t>(); const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t row = Hkv * R;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, vs, acc(G * D), qscale(G), unit(G);
    std::vector<int32_t> qsum(G), iacc(G * D), chunk_sums;
    std::vector<int8_t> qcodes(G * D);
    std::vector<int16_t> w16;  // p[t] * scale_v[t] per head, as int16 against the head's largest
    std::vector<int64_t> offs;  // byte offset of each cached row's head kvh
    alignas(64) int16_t vbuf[8 * C * 32];  // a tile's V rows widened, interleaved in pairs
    alignas(64) float ks[16];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv, L = lens[b], tiles = (L + 15) / 16, Lp = tiles * 16;
      const int64_t chunks = (tiles + kTilesPerFlush - 1) / kTilesPerFlush;
      scores.resize(G * Lp);
      vs.resize(Lp);
      w16.resize(G * Lp);
      chunk_sums.assign(G * chunks, 0);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(iacc.begin(), iacc.end(), 0);
      offs.resize(Lp + 16);
      const int64_t* blocks = bt + b * max_blocks;
      for (int64_t t = 0, blk = 0, in_blk = 0; t < L; ++t) {
        offs[t] = (blocks[blk] * bs + in_blk) * row + kvh * R;
        if (++in_blk == bs) { in_blk = 0; ++blk; }
      }
      std::fill(offs.begin() + L, offs.end(), offs[0]);  // rows past L: read, weighed 0
      for (int64_t g = 0; g < G; ++g) {  // q per head to int8, as the activations of quant_ops
        const T* qh = qp + (b * H + kvh * G + g) * D;
        float amax = 0.f;
        for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(load(qh, d)));
        const float qs = amax / 127.f, inv = qs > 0.f ? 1.f / qs : 0.f;
        int32_t sum = 0;
        for (int64_t d = 0; d < D; ++d) {
          const int c = std::clamp(static_cast<int>(std::nearbyint(load(qh, d) * inv)), -127, 127);
          qcodes[g * D + d] = static_cast<int8_t>(c);
          sum += c;
        }
        qscale[g] = qs * static_cast<float>(scale);
        qsum[g] = 128 * sum;  // what the codes' offset adds to every dot
      }
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t t0 = tile * 16;
        for (int64_t i = 0; i < 16; ++i) {  // a row spans at most two cache lines
          const char* kn = reinterpret_cast<const char*>(kp + offs[t0 + 16 + i]);
          const char* vn = reinterpret_cast<const char*>(vp + offs[t0 + i]);
          for (int64_t byte = 0; byte < R; byte += 64) {
            _mm_prefetch(kn + byte, _MM_HINT_T0);
            _mm_prefetch(vn + byte, _MM_HINT_T1);
          }
          ks[i] = row_scale(kp + offs[t0 + i], D);
          if (tile > 0) vs[t0 - 16 + i] = row_scale(vp + offs[t0 - 16 + i], D);  // prefetched a tile ago
        }
        const __m512 kscale = _mm512_load_ps(ks);
        for (int64_t g = 0; g < G; ++g) {
          __m512i qv[NZ];
          for (int c = 0; c < NZ; ++c) qv[c] = _mm512_loadu_si512(&qcodes[g * D + 64 * c]);
          __m512 part[16];
          for (int i = 0; i < 16; ++i) {
            const uint8_t* k = kp + offs[t0 + i];
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(k), qv[0]);
            for (int c = 1; c < NZ; ++c) s = _mm512_dpbusd_epi32(s, _mm512_loadu_si512(k + 64 * c), qv[c]);
            part[i] = _mm512_castsi512_ps(s);
          }
          const __m512i dots = _mm512_sub_epi32(_mm512_castps_si512(sum16x16<true>(part)), _mm512_set1_epi32(qsum[g]));
          _mm512_storeu_ps(&scores[g * Lp + t0],
                           _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dots), kscale), _mm512_set1_ps(qscale[g])));
        }
      }
      for (int64_t i = 0; i < 16; ++i) vs[Lp - 16 + i] = row_scale(vp + offs[Lp - 16 + i], D);
      for (int64_t g = 0; g < G; ++g) {  // weights p[t] * scale_v[t], as int16 against their largest
        float* sg = &scores[g * Lp];
        softmax512(sg, L);
        std::fill(sg + L, sg + Lp, 0.f);
        __m512 mx = _mm512_setzero_ps();
        for (int64_t t = 0; t < Lp; t += 16) {
          const __m512 w = _mm512_mul_ps(_mm512_loadu_ps(sg + t), _mm512_loadu_ps(&vs[t]));
          _mm512_storeu_ps(sg + t, w);
          mx = _mm512_max_ps(mx, w);
        }
        const float wmax = _mm512_reduce_max_ps(mx);
        const __m512 to16 = _mm512_set1_ps(wmax > 0.f ? 32767.f / wmax : 0.f);
        unit[g] = wmax / 32767.f;
        for (int64_t t = 0; t < Lp; t += 16) {
          const __m512i wi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(sg + t), to16));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(&w16[g * Lp + t]), _mm512_cvtepi32_epi16(wi));
          chunk_sums[g * chunks + t / (16 * kTilesPerFlush)] += _mm512_reduce_add_epi32(wi);
        }
      }
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t t0 = tile * 16, pairs = (std::min<int64_t>(16, L - t0) + 1) / 2;
        // Two rows' codes widened to int16 and interleaved (unpacklo/hi per 128-bit lane), so
        // that one vpdpwssd adds w[t] v[t] + w[t+1] v[t+1] for 16 dims; lane j of accumulator
        // 2c (2c+1) is dim 32c + 8(j/4) + j%4 (+4), as in decode_attention_bf16.
        for (int64_t i = 0; i < pairs; ++i) {
          const uint8_t* v0 = vp + offs[t0 + 2 * i];
          const uint8_t* v1 = vp + offs[t0 + 2 * i + 1];
          for (int c = 0; c < C / 2; ++c) {
            const __m512i a = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + 32 * c)));
            const __m512i bb = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + 32 * c)));
            _mm512_store_si512(vbuf + (i * C + 2 * c) * 32, _mm512_unpacklo_epi16(a, bb));
            _mm512_store_si512(vbuf + (i * C + 2 * c + 1) * 32, _mm512_unpackhi_epi16(a, bb));
          }
        }
        const bool flush = (tile + 1) % kTilesPerFlush == 0 || tile + 1 == tiles;
        for (int64_t g = 0; g < G; ++g) {
          const uint32_t* wp = reinterpret_cast<const uint32_t*>(&w16[g * Lp + t0]);
          int32_t* ig = &iacc[g * D];
          __m512i a[C];
          for (int c = 0; c < C; ++c) a[c] = _mm512_loadu_si512(ig + 16 * c);
          for (int64_t i = 0; i < pairs; ++i) {
            const __m512i pw = _mm512_set1_epi32(static_cast<int32_t>(wp[i]));
            for (int c = 0; c < C; ++c) a[c] = _mm512_dpwssd_epi32(a[c], pw, _mm512_load_si512(vbuf + (i * C + c) * 32));
          }
          if (!flush) {
            for (int c = 0; c < C; ++c) _mm512_storeu_si512(ig + 16 * c, a[c]);
            continue;
          }
          // exact int32 sums of this chunk of tiles, less the codes' offset, into fp32
          const __m512i offset = _mm512_set1_epi32(128 * chunk_sums[g * chunks + tile / kTilesPerFlush]);
          const __m512 u = _mm512_set1_ps(unit[g]);
          float* ag = &acc[g * D];
          for (int c = 0; c < C; ++c) {
            _mm512_storeu_ps(ag + 16 * c, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[c], offset)), u,
                                                          _mm512_loadu_ps(ag + 16 * c)));
            _mm512_storeu_si512(ig + 16 * c, _mm512_setzero_si512());
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* dst = op + (b * H + kvh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) {
          const int64_t r = d % 32, w = r % 8;
          store(dst, d, acc[g * D + (2 * (d / 32) + w / 4) * 16 + (r / 8) * 4 + w % 4]);
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
  TORCH_CHECK(k_cache.size(-1) == D + kScaleBytes, "int8 cache rows are head_dim + 4 bytes");
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
  TORCH_CHECK(k_cache.size(-1) == D + kScaleBytes && v_cache.size(-1) == D + kScaleBytes,
              "int8 cache rows are head_dim + 4 bytes");
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

// Linear layers over quantized weights, read in their packed form (engine_kernels/quant.py holds
// the format and the plain-torch references):
//   w[n, k] = scale[n, b] * code[n, k] + min[n, b],  b = k / block,
// codes unsigned (4 bits, two per byte, or 8 bits), scales and mins fp16 or fp32. GGUF
// Q4_0/Q4_1/Q8_0/Q4_K/Q6_K and per-channel int8 are all this form. Weights come in panels
// of 16 output rows: one 64-byte load holds 16 rows x 4 k (8-bit; 4-bit: two such in the
// two nibbles), so the 16 lanes of the accumulator are 16 outputs and no horizontal sum
// is needed.
//
// x is quantized per 32 values to int8 (as llama.cpp's Q8
// activations); per weight block, vpdpbusd (unsigned codes x a broadcast of 4 signed x)
// sums exact int32 dots for 16 rows, then one fma scales them by scale * dx, another adds
// min * sum(x over the block). Prefill uses the same kernel, so no dequantized copy is ever
// held (SmolLM2, 32 prompts of 257 tokens: 2,339 prompt tokens/s against 2,092 for bf16 on
// oneDNN, one run). Broadcasts of x are folded into vpdpbusd and the accumulators are locals:
// as separate instructions and spilled arrays they had cost 1.3-2x at 16-512 rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>
#include <immintrin.h>
#include "vec.h"

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <typename S> inline __m512 load_scales(const S* p);
template <> inline __m512 load_scales(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load_scales(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Activations of one call: x rows quantized to int8 per 32 values, with each weight
// block's dx (scale of the x block it lies in) and sum of dequantized x.
struct QuantizedX {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> dx;   // [M, nb]
  std::vector<float> sx;   // [M, nb]
};

// Per 32 values: d = amax / 127, q = round-half-even(x * (1 / d)): the arithmetic of
// kernels.quant.quantize_activations, 16 lanes at a time, rows in parallel (prefill
// quantizes thousands of rows per call).
template <typename T>
QuantizedX quantize_activations(const T* x, int64_t M, int64_t K, int64_t block) {
  const int64_t nb = K / block;
  QuantizedX out{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        const __m512 a = load16(x + m * K + k0), b = load16(x + m * K + k0 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const float d = amax / 127.f;
        const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + m * K + k0), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + m * K + k0 + 16), _mm512_cvtsepi32_epi8(qb));
        const int32_t sa = _mm512_reduce_add_epi32(qa), sb = _mm512_reduce_add_epi32(qb);
        if (block == 32) {
          out.dx[m * nb + k0 / 32] = d;
          out.sx[m * nb + k0 / 32] = d * static_cast<float>(sa + sb);
        } else {  // block == 16
          out.dx[m * nb + k0 / 16] = out.dx[m * nb + k0 / 16 + 1] = d;
          out.sx[m * nb + k0 / 16] = d * static_cast<float>(sa);
          out.sx[m * nb + k0 / 16 + 1] = d * static_cast<float>(sb);
        }
      }
    }
  });
  return out;
}

constexpr int64_t kPrefetchBytes = 4096;  // ahead into L2: the stream is too short for the hardware prefetcher alone
constexpr int kRowTile = 8;  // rows of x per pass over a panel: the unpacked codes serve all of them

// 4 int8 of x, as the {1to16} broadcast operand of vpdpbusd (folded into the instruction:
// a separate vpbroadcastd per dot took an issue slot from the dots)
inline __m512i bcast4(const int8_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }

// One panel (16 output rows) against MM rows of x: out[m] lanes are the 16 outputs. LOADS:
// 64-byte loads of codes per weight block (block * BITS / 32). Accumulators are locals so
// they stay in registers (MM int32 dots + MM fp32 sums + the unpacked codes <= 32 zmm).
template <int BITS, int LOADS, typename S, int MM>
inline void panel_dot(__m512* out, const uint8_t* codes, const S* ws, const S* wm, int64_t nb,
                      const int8_t* qx, const float* dx, const float* sx, int64_t K, int64_t nb_stride) {
  constexpr int64_t block = LOADS * 32 / BITS;
  __m512 acc[MM];
  for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i isum[MM];
    for (int m = 0; m < MM; ++m) isum[m] = _mm512_setzero_si512();
    const uint8_t* cb = codes + b * LOADS * 64;
    _mm_prefetch(reinterpret_cast<const char*>(ws + b * 16) + kPrefetchBytes / 4, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(wm + b * 16) + kPrefetchBytes / 4, _MM_HINT_T1);
    for (int j = 0; j < LOADS; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(cb + 64 * j) + kPrefetchBytes, _MM_HINT_T1);
      const __m512i v = _mm512_loadu_si512(cb + 64 * j);
      if constexpr (BITS == 4) {
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        const int8_t* xk = qx + b * block + 8 * j;
        for (int m = 0; m < MM; ++m) {
          isum[m] = _mm512_dpbusd_epi32(isum[m], lo, bcast4(xk + m * K));
          isum[m] = _mm512_dpbusd_epi32(isum[m], hi, bcast4(xk + m * K + 4));
        }
      } else {
        const int8_t* xk = qx + b * block + 4 * j;
        for (int m = 0; m < MM; ++m) isum[m] = _mm512_dpbusd_epi32(isum[m], v, bcast4(xk + m * K));
      }
    }
    const __m512 s = load_scales(ws + b * 16), mn = load_scales(wm + b * 16);
    for (int m = 0; m < MM; ++m) {
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m]), _mm512_mul_ps(s, _mm512_set1_ps(dx[m * nb_stride + b])), acc[m]);
      acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx[m * nb_stride + b]), acc[m]);
    }
  }
  for (int m = 0; m < MM; ++m) out[m] = acc[m];
}

// panel_dot for the 1-8 rows left, by a switch on the count (each count its own unrolled code)
template <int BITS, int LOADS, typename S>
inline void panel_dot_rows(int64_t mm, __m512* out, const uint8_t* codes, const S* ws, const S* wm, int64_t nb,
                           const int8_t* qx, const float* dx, const float* sx, int64_t K) {
  switch (mm) {
    case 8: panel_dot<BITS, LOADS, S, 8>(out, codes, ws, wm, nb, qx, dx, sx, K, nb); break;
    case 7: panel_dot<BITS, LOADS, S, 7>(out, codes, ws, wm, nb, qx, dx, sx, K, nb); break;
    case 6: panel_dot<BITS, LOADS, S, 6>(out, codes, ws, wm, nb, qx, dx, sx, K, nb); break;
    case 5: panel_dot<BITS, LOADS, S, 5>(out, codes, ws, wm, nb, qx, dx, sx, K, nb); break;
    case 4: panel_dot<BITS, LOADS, S, 4>(out, codes, ws, wm, nb, qx, dx, sx, K, nb); break;
    case 3: panel_dot<BITS, LOADS, S, 3>(out, codes, ws, wm, nb, qx, dx, sx, K, nb); break;
    case 2: panel_dot<BITS, LOADS, S, 2>(out, codes, ws, wm, nb, qx, dx, sx, K, nb); break;
    default: panel_dot<BITS, LOADS, S, 1>(out, codes, ws, wm, nb, qx, dx, sx, K, nb);
  }
}

template <int BITS, typename S, typename T>
void quant_linear_impl(at::Tensor& y, const T* x, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t block, const float* bias) {
  const int64_t M = y.size(0), N = y.size(1), nb = scales.size(1), K = nb * block;
  const QuantizedX qx = quantize_activations(x, M, K, block);
  const auto* cp = codes.data_ptr<uint8_t>();
  const int64_t panel_bytes = codes.size(1) * 64;
  const auto* sp = reinterpret_cast<const S*>(scales.data_ptr());
  const auto* mp = reinterpret_cast<const S*>(mins.data_ptr());
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    __m512 acc[kRowTile];
    alignas(64) float out[16];
    for (int64_t p = begin; p < end; ++p) {
      const uint8_t* cn = cp + p * panel_bytes;
      const S* sn = sp + p * nb * 16;
      const S* mn = mp + p * nb * 16;
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int8_t* q = qx.q.data() + m0 * K;
        const float* dx = qx.dx.data() + m0 * nb;
        const float* sx = qx.sx.data() + m0 * nb;
        const int64_t mm = std::min<int64_t>(kRowTile, M - m0);
        if (BITS == 8 && block == 16) panel_dot_rows<8, 4, S>(mm, acc, cn, sn, mn, nb, q, dx, sx, K);
        else panel_dot_rows<BITS, BITS, S>(mm, acc, cn, sn, mn, nb, q, dx, sx, K);  // blocks of 32
        for (int64_t m = 0; m < mm; ++m) {
          __m512 v = acc[m];
          if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + p * 16));
          _mm512_store_ps(out, v);
          for (int r = 0; r < 16; ++r) yp[(m0 + m) * N + p * 16 + r] = static_cast<T>(out[r]);
        }
      }
    }
  });
}
#endif

void check_quantized(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins, int64_t bits,
                     int64_t block) {
  TORCH_CHECK(bits == 4 || bits == 8, "4- or 8-bit codes");
  TORCH_CHECK(block == 32 || (block == 16 && bits == 8), "blocks of 32 values (or 16 with 8-bit codes)");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(2) == 64 && codes.is_contiguous(),
              "codes: uint8 [N/16, K*bits/32, 64]");
  TORCH_CHECK(scales.sizes() == mins.sizes() && scales.scalar_type() == mins.scalar_type(), "scales and mins alike");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, "fp16 or fp32 scales");
  TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.dim() == 3 && scales.size(2) == 16 &&
              scales.size(0) == codes.size(0), "scales: [N/16, K/block, 16]");
  TORCH_CHECK(codes.size(1) * 32 == scales.size(1) * block * bits, "codes and scales disagree on K");
}

}  // namespace

bool has_quant_kernels() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

// y[M, N] = x[M, K] w^T (+ bias), w given by (codes, scales, mins, bits, block).
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                        int64_t bits, int64_t block, const c10::optional<at::Tensor>& bias) {
  check_quantized(codes, scales, mins, bits, block);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == scales.size(1) * block, "x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "float32 or bfloat16 x");
  TORCH_CHECK(has_quant_kernels(), "built without AVX512-VNNI");
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  auto xc = x.contiguous();
  auto y = at::empty({x.size(0), codes.size(0) * 16}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const bool half = scales.scalar_type() == at::kHalf;
  auto run = [&](auto* xp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    if (bits == 4 && half) quant_linear_impl<4, at::Half, T>(y, xp, codes, scales, mins, block, bp);
    else if (bits == 4) quant_linear_impl<4, float, T>(y, xp, codes, scales, mins, block, bp);
    else if (half) quant_linear_impl<8, at::Half, T>(y, xp, codes, scales, mins, block, bp);
    else quant_linear_impl<8, float, T>(y, xp, codes, scales, mins, block, bp);
  };
  if (x.scalar_type() == at::kFloat) run(xc.data_ptr<float>());
  else run(xc.data_ptr<at::BFloat16>());
  return y;
#else
  return at::Tensor();
#endif
}

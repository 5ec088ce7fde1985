// SIMD helpers shared by cpu_ops.cpp and quant_ops.cpp.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>

// Element access in fp32 for the two dtypes the engine runs (bf16 for speed, fp32 for checks).
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(at::BFloat16* p, int64_t i, float v) {  // round to nearest even, as c10 does
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = std::isnan(v) ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(u >> 16);
}
template <typename T> inline float round_to(float v) { T tmp[1]; store(tmp, 0, v); return load(tmp, 0); }


#if defined(__AVX512F__)
// 16 values as fp32, from fp32 or bf16 memory (bf16 is the top half of an fp32)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

#if defined(__AVX512F__)
// exp for x <= 0 (softmax after subtracting the max): Cephes-style range reduction and a
// degree-6 polynomial, within about 2 ulp of std::exp; 16 lanes at a time.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

// softmax in place over n floats
inline void softmax512(float* s, int64_t n) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + t));
  float m = _mm512_reduce_max_ps(mv);
  for (; t < n; ++t) m = std::max(m, s[t]);
  const __m512 mb = _mm512_set1_ps(m);
  __m512 sv = _mm512_setzero_ps();
  for (t = 0; t + 16 <= n; t += 16) {
    __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), mb));
    _mm512_storeu_ps(s + t, e);
    sv = _mm512_add_ps(sv, e);
  }
  float sum = _mm512_reduce_add_ps(sv);
  for (; t < n; ++t) { s[t] = std::exp(s[t] - m); sum += s[t]; }
  const __m512 inv = _mm512_set1_ps(1.f / sum);
  for (t = 0; t + 16 <= n; t += 16) _mm512_storeu_ps(s + t, _mm512_mul_ps(_mm512_loadu_ps(s + t), inv));
  for (; t < n; ++t) s[t] *= 1.f / sum;
}

#endif

#if defined(__AVX512F__)
// Lane i of the result is the sum of p[i]'s 16 lanes (fp32, or int32 with kInt: the shuffles
// move bits only): 45 shuffles and adds for 16 rows, where
// a horizontal sum per row costs about 8 dependent ones.
template <bool kInt = false>
inline __m512 sum16x16(const __m512 p[16]) {
  const auto add = [](__m512 a, __m512 b) {
    if constexpr (kInt) return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
    else return _mm512_add_ps(a, b);
  };
  __m512 s1[8], s2[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3
    s1[k] = add(_mm512_unpacklo_ps(p[2 * k], p[2 * k + 1]), _mm512_unpackhi_ps(p[2 * k], p[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: the lane's sum of p[4k], p[4k+1], p[4k+2], p[4k+3]
    const __m512d c = _mm512_castps_pd(s1[2 * k]), d = _mm512_castps_pd(s1[2 * k + 1]);
    s2[k] = add(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  // add the four 128-bit lanes: a 4x4 transpose of lanes
  const __m512 u0 = add(_mm512_shuffle_f32x4(s2[0], s2[1], 0x44), _mm512_shuffle_f32x4(s2[0], s2[1], 0xEE));
  const __m512 u1 = add(_mm512_shuffle_f32x4(s2[2], s2[3], 0x44), _mm512_shuffle_f32x4(s2[2], s2[3], 0xEE));
  return add(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}
#endif

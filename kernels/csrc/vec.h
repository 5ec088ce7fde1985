// SIMD helpers shared by cpu_ops.cpp and quant_ops.cpp.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

#if defined(__AVX512F__)
// 16 values as fp32, from fp32 or bf16 memory (bf16 is the top half of an fp32)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

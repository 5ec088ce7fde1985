// Linear layers over quantized weights, read in their packed form (engine_kernels/quant.py
// holds the format and the plain-torch references):
//   w[n, k] = scale[n, b] * code[n, k] + min[n, b],  b = k / block,
// codes unsigned (4 bits, two per byte, or 8 bits), scales and mins fp16 or fp32. GGUF
// Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q5_K/Q6_K and per-channel int8 are all this form. Weights come
// in panels of 16 output rows: one 64-byte load holds 16 rows x 4 k (8-bit; 4-bit: two
// such in the two nibbles), so the 16 lanes of the accumulator are 16 outputs and no
// horizontal sum is needed.
//
// x is quantized per 32 values to int8 (as llama.cpp's Q8 activations); per weight block,
// 4-byte dot products (vec.h: vpdpbusd on AVX512-VNNI, vpmaddubsw + vpmaddwd on AVX2,
// loops elsewhere) sum exact int32 dots for 16 rows, then one fma scales them by
// scale * dx, another adds min * sum(x over the block). Prefill uses the same kernel, so
// no dequantized copy is ever held. Broadcasts of x are folded into the dot instruction
// and the accumulators are locals: as separate instructions and spilled arrays they had
// cost 1.3-2x at 16-512 rows (AVX-512).
//
// AVX2's vpmaddubsw adds two u8 x s8 products into a saturating int16, exact only while
// the pair stays within 16 bits. So 8-bit codes come in kinds (engine_kernels/quant.py
// tells which): codes < 128 (Q6_K, Q5_K: one instruction), codes in [1, 255] of a
// symmetric weight (Q8_0, int8: the signed code - 128 times x by the sign trick, with the
// min term corrected), and any codes (the two nibbles apart).


enum CodeKind : int64_t { kNibble = 4, kBelow128 = 7, kSymmetric = 8, kAnyByte = 9 };

template <typename S> inline F16 load_scales(const S* p);
template <> inline F16 load_scales(const float* p) { return f16_load(p); }
template <> inline F16 load_scales(const f16* p) {
#if ENGINE_AVX512
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
#elif ENGINE_AVX2
  const auto* q = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
#else
  // fp16 -> fp32 in plain arithmetic that vectorizes: exponent and mantissa moved into
  // place and rescaled by 2^112 (normals and subnormals alike), inf/nan kept, sign put back
  alignas(64) float f[16];
#pragma omp simd
  for (int i = 0; i < 16; ++i) {
    const uint32_t h = p[i].bits, mag = (h & 0x7FFFu) << 13;
    float v;
    std::memcpy(&v, &mag, 4);
    v *= 5.192296858534828e+33f;  // 2^112
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    bits |= ((h & 0x7C00u) == 0x7C00u ? 0x7F800000u : 0u) | ((h & 0x8000u) << 16);
    std::memcpy(&f[i], &bits, 4);
  }
  return f16_load(f);
#endif
}

#if ENGINE_AVX2
// Both nibbles of a load against their 4 x values each: the pair sums added in 16 bits
// (at most 2 * 2 * 15 * 127) before one widening, where two dot4_u7 widen twice.
inline I16 dot4_nibbles(I16 acc, B64 lo, B64 hi, int32_t b_lo, int32_t b_hi) {
  const __m256i bl = _mm256_set1_epi32(b_lo), bh = _mm256_set1_epi32(b_hi);
  return {_mm256_add_epi32(acc.lo, madd_ones(_mm256_add_epi16(_mm256_maddubs_epi16(lo.lo, bl), _mm256_maddubs_epi16(hi.lo, bh)))),
          _mm256_add_epi32(acc.hi, madd_ones(_mm256_add_epi16(_mm256_maddubs_epi16(lo.hi, bl), _mm256_maddubs_epi16(hi.hi, bh))))};
}
// sum (a - 128) b for a in [1, 255], b in [-127, 127]: |b| times a - 128 carrying b's sign
inline I16 dot4_symmetric(I16 acc, B64 a, int32_t b4) {
  const __m256i b = _mm256_set1_epi32(b4), bias = _mm256_set1_epi8(static_cast<char>(0x80)), ab = _mm256_abs_epi8(b);
  return {_mm256_add_epi32(acc.lo, madd_ones(_mm256_maddubs_epi16(ab, _mm256_sign_epi8(_mm256_xor_si256(a.lo, bias), b)))),
          _mm256_add_epi32(acc.hi, madd_ones(_mm256_maddubs_epi16(ab, _mm256_sign_epi8(_mm256_xor_si256(a.hi, bias), b))))};
}
constexpr bool kSymmetricIsSigned = true;
constexpr int kRowTile = 4;
#else
inline I16 dot4_nibbles(I16 acc, B64 lo, B64 hi, int32_t b_lo, int32_t b_hi) {
  return dot4_u7(dot4_u7(acc, lo, b_lo), hi, b_hi);
}
inline I16 dot4_symmetric(I16 acc, B64 a, int32_t b4) { return dot4_u8(acc, a, b4); }
constexpr bool kSymmetricIsSigned = false;
// rows of x per pass over a panel: the unpacked codes serve all of them
constexpr int kRowTile = ENGINE_AVX512 ? 8 : 4;
#endif

// The kinds this level tells apart (elsewhere every 8-bit kind is one instruction)
constexpr int64_t level_kind(int64_t kind) {
#if ENGINE_AVX2
  return kind;
#else
  return kind == kNibble ? kNibble : kAnyByte;
#endif
}

// Activations of one call: x rows quantized to int8 per 32 values, with each weight
// block's dx (scale of the x block it lies in) and sum of dequantized x.
struct QuantizedX {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> dx;   // [M, nb]
  std::vector<float> sx;   // [M, nb]
  std::vector<int16_t> wide;  // generic SSE2 only: each 4 values of q as int16, twice: [M, K/4, 8]
};

// Per 32 values: d = amax / 127, q = round-half-even(x * (1 / d)): the arithmetic of
// engine_kernels.quant.quantize_activations, rows in parallel (prefill quantizes
// thousands of rows per call).
template <typename T>
QuantizedX quantize_activations(const T* x, int64_t M, int64_t K, int64_t block) {
  const int64_t nb = K / block;
  QuantizedX out{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        float v[32], amax = 0.f;
        for (int i = 0; i < 32; ++i) { v[i] = load(x, m * K + k0 + i); amax = std::max(amax, std::fabs(v[i])); }
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int32_t qi[32], sa = 0, sb = 0;
#pragma omp simd
        for (int i = 0; i < 32; ++i) qi[i] = static_cast<int32_t>((v[i] * id + 12582912.f) - 12582912.f);  // half to even
        for (int i = 0; i < 16; ++i) { sa += qi[i]; sb += qi[i + 16]; }
        for (int i = 0; i < 32; ++i) out.q[m * K + k0 + i] = static_cast<int8_t>(qi[i]);
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
#if ENGINE_GENERIC && defined(__SSE2__)
  out.wide.resize(M * K * 2);
  for (int64_t i = 0; i < M * K / 4; ++i)
    for (int r = 0; r < 8; ++r) out.wide[8 * i + r] = out.q[4 * i + r % 4];
#endif
  return out;
}

constexpr int64_t kPrefetchBytes = 4096;  // ahead into L2: the stream is too short for the hardware prefetcher alone

inline void prefetch(const void* p) {
#if ENGINE_AVX512 || ENGINE_AVX2
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

inline int32_t word(const int8_t* p) { int32_t w; std::memcpy(&w, p, 4); return w; }

#if ENGINE_GENERIC
// One weight block's 16 row dots against MM rows of x with no ISA beyond the architecture's
// baseline. x86-64's is SSE2, which lacks the u8 x s8 dot: codes are widened to 16 bits and
// multiplied by x's 4 values (repeated) with pmaddwd, the products kept in place (lane pairs
// of a row) and each row's two pair sums added at the block's end; the codes of a load
// are widened once for all MM rows of x. Elsewhere (NEON, ...) plain loops.
#if defined(__SSE2__)
template <int BITS, int LOADS, int MM>
inline void block_dots(I16* isum, const uint8_t* cb, const int16_t* xw, int64_t K) {
  constexpr int kPatterns = BITS == 4 ? 2 : 1;
  __m128i px[LOADS][MM][kPatterns];  // x values each load meets (4-bit: low nibbles', high nibbles')
  for (int j = 0; j < LOADS; ++j)
    for (int m = 0; m < MM; ++m)
      for (int h = 0; h < kPatterns; ++h)
        px[j][m][h] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xw + 2 * (m * K + 4 * (kPatterns * j + h))));
  const __m128i zero = _mm_setzero_si128(), low4 = _mm_set1_epi8(0x0F);
  for (int q = 0; q < 4; ++q) {  // rows 4q..4q+3: 16 bytes of each load, accumulators in registers
    __m128i a0[MM], a1[MM];  // rows 4q, 4q+1 and 4q+2, 4q+3, each as two pair sums
    for (int m = 0; m < MM; ++m) a0[m] = a1[m] = zero;
    for (int j = 0; j < LOADS; ++j) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cb + 64 * j + 16 * q));
      if constexpr (BITS == 4) {
        const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
        const __m128i l0 = _mm_unpacklo_epi8(lo, zero), l1 = _mm_unpackhi_epi8(lo, zero);
        const __m128i h0 = _mm_unpacklo_epi8(hi, zero), h1 = _mm_unpackhi_epi8(hi, zero);
        for (int m = 0; m < MM; ++m) {
          a0[m] = _mm_add_epi32(a0[m], _mm_add_epi32(_mm_madd_epi16(l0, px[j][m][0]), _mm_madd_epi16(h0, px[j][m][1])));
          a1[m] = _mm_add_epi32(a1[m], _mm_add_epi32(_mm_madd_epi16(l1, px[j][m][0]), _mm_madd_epi16(h1, px[j][m][1])));
        }
      } else {  // codes 0..255 as int16: products and their pair sums fit in 32 bits
        const __m128i c0 = _mm_unpacklo_epi8(v, zero), c1 = _mm_unpackhi_epi8(v, zero);
        for (int m = 0; m < MM; ++m) {
          a0[m] = _mm_add_epi32(a0[m], _mm_madd_epi16(c0, px[j][m][0]));
          a1[m] = _mm_add_epi32(a1[m], _mm_madd_epi16(c1, px[j][m][0]));
        }
      }
    }
    for (int m = 0; m < MM; ++m) {  // [a b c d] [e f g h] -> [a+b c+d e+f g+h]: rows 4q..4q+3
      const __m128 f0 = _mm_castsi128_ps(a0[m]), f1 = _mm_castsi128_ps(a1[m]);
      const __m128i even = _mm_castps_si128(_mm_shuffle_ps(f0, f1, _MM_SHUFFLE(2, 0, 2, 0)));
      const __m128i odd = _mm_castps_si128(_mm_shuffle_ps(f0, f1, _MM_SHUFFLE(3, 1, 3, 1)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(isum[m].v + 4 * q), _mm_add_epi32(even, odd));
    }
  }
}
#else
template <int BITS, int LOADS, int MM>
inline void block_dots(I16* isum, const uint8_t* cb, const int8_t* xb, int64_t K) {  // xb: q of the block
  for (int m = 0; m < MM; ++m) isum[m] = i16_zero();
  for (int j = 0; j < LOADS; ++j) {
    const B64 v = b64_load(cb + 64 * j);
    for (int m = 0; m < MM; ++m) {
      const int8_t* xk = xb + m * K + (BITS == 4 ? 8 : 4) * j;
      if constexpr (BITS == 4) isum[m] = dot4_u8(dot4_u8(isum[m], b64_low_nibbles(v), word(xk)), b64_high_nibbles(v), word(xk + 4));
      else isum[m] = dot4_u8(isum[m], v, word(xk));
    }
  }
}
#endif
#endif

// One panel (16 output rows) against MM rows of x: out[m] lanes are the 16 outputs. LOADS:
// 64-byte loads of codes per weight block (block * BITS / 32). Accumulators are locals so
// they stay in registers (MM int32 dots + MM fp32 sums + the unpacked codes).
template <int BITS, int LOADS, int64_t KIND, typename S, int MM>
inline void panel_dot(F16* out, const uint8_t* codes, const S* ws, const S* wm, int64_t nb,
                      const int8_t* qx, const int16_t* xw, const float* dx, const float* sx, int64_t K,
                      int64_t nb_stride) {
  constexpr int64_t block = LOADS * 32 / BITS;
  F16 acc[MM];
  for (int m = 0; m < MM; ++m) acc[m] = f16_zero();
  for (int64_t b = 0; b < nb; ++b) {
    I16 isum[MM];
    for (int m = 0; m < MM; ++m) isum[m] = i16_zero();
    const uint8_t* cb = codes + b * LOADS * 64;
    prefetch(reinterpret_cast<const char*>(ws + b * 16) + kPrefetchBytes / 4);
    prefetch(reinterpret_cast<const char*>(wm + b * 16) + kPrefetchBytes / 4);
#if ENGINE_GENERIC
#if defined(__SSE2__)
    block_dots<BITS, LOADS, MM>(isum, cb, xw + 2 * b * block, K);
#else
    block_dots<BITS, LOADS, MM>(isum, cb, qx + b * block, K);
#endif
#else
    for (int j = 0; j < LOADS; ++j) {
      prefetch(cb + 64 * j + kPrefetchBytes);
      const B64 v = b64_load(cb + 64 * j);
      if constexpr (BITS == 4) {
        const B64 lo = b64_low_nibbles(v), hi = b64_high_nibbles(v);
        const int8_t* xk = qx + b * block + 8 * j;
        for (int m = 0; m < MM; ++m) isum[m] = dot4_nibbles(isum[m], lo, hi, word(xk + m * K), word(xk + m * K + 4));
      } else {
        const int8_t* xk = qx + b * block + 4 * j;
        for (int m = 0; m < MM; ++m) {
          if constexpr (KIND == kBelow128) isum[m] = dot4_u7(isum[m], v, word(xk + m * K));
          else if constexpr (KIND == kSymmetric) isum[m] = dot4_symmetric(isum[m], v, word(xk + m * K));
          else isum[m] = dot4_u8(isum[m], v, word(xk + m * K));
        }
      }
    }
#endif
    const F16 s = load_scales(ws + b * 16);
    F16 mn = load_scales(wm + b * 16);
    if constexpr (KIND == kSymmetric && kSymmetricIsSigned) mn = f16_fma(s, f16_set1(128.f), mn);  // codes - 128 were summed
    for (int m = 0; m < MM; ++m) {
      acc[m] = f16_fma(i16_to_f16(isum[m]), f16_mul(s, f16_set1(dx[m * nb_stride + b])), acc[m]);
      acc[m] = f16_fma(mn, f16_set1(sx[m * nb_stride + b]), acc[m]);
    }
  }
  for (int m = 0; m < MM; ++m) out[m] = acc[m];
}

// panel_dot for the mm rows left (1..MM), each count its own unrolled code
template <int BITS, int LOADS, int64_t KIND, typename S, int MM = kRowTile>
inline void panel_dot_rows(int64_t mm, F16* out, const uint8_t* codes, const S* ws, const S* wm, int64_t nb,
                           const int8_t* qx, const int16_t* xw, const float* dx, const float* sx, int64_t K) {
  if constexpr (MM > 1) {
    if (mm < MM) return panel_dot_rows<BITS, LOADS, KIND, S, MM - 1>(mm, out, codes, ws, wm, nb, qx, xw, dx, sx, K);
  }
  panel_dot<BITS, LOADS, KIND, S, MM>(out, codes, ws, wm, nb, qx, xw, dx, sx, K, nb);
}

template <int BITS, int64_t KIND, typename S, typename T>
void quant_linear_impl(T* yp, const T* x, int64_t M, int64_t N, int64_t K, const uint8_t* cp, const S* sp,
                       const S* mp, int64_t block, const float* bias) {
  const int64_t nb = K / block, panel_bytes = K * BITS / 32 * 64;
  const QuantizedX qx = quantize_activations(x, M, K, block);
  parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    F16 acc[kRowTile];
    alignas(64) float out[16];
    for (int64_t p = begin; p < end; ++p) {
      const uint8_t* cn = cp + p * panel_bytes;
      const S* sn = sp + p * nb * 16;
      const S* mn = mp + p * nb * 16;
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int8_t* q = qx.q.data() + m0 * K;
        const int16_t* xw = qx.wide.empty() ? nullptr : qx.wide.data() + 2 * m0 * K;
        const float* dx = qx.dx.data() + m0 * nb;
        const float* sx = qx.sx.data() + m0 * nb;
        const int64_t mm = std::min<int64_t>(kRowTile, M - m0);
        if (BITS == 8 && block == 16) panel_dot_rows<BITS, 4, KIND, S>(mm, acc, cn, sn, mn, nb, q, xw, dx, sx, K);
        else panel_dot_rows<BITS, BITS, KIND, S>(mm, acc, cn, sn, mn, nb, q, xw, dx, sx, K);  // blocks of 32
        for (int64_t m = 0; m < mm; ++m) {
          F16 v = acc[m];
          if (bias) v = f16_add(v, f16_load(bias + p * 16));
          f16_store(out, v);
          for (int r = 0; r < 16; ++r) store(yp, (m0 + m) * N + p * 16 + r, out[r]);
        }
      }
    }
  });
}

template <typename S, typename T>
void run_quant_linear(T* y, const T* x, int64_t M, int64_t N, int64_t K, const uint8_t* codes, const S* scales,
                      const S* mins, int64_t block, int64_t kind, const float* bias) {
  switch (level_kind(kind)) {
    case kNibble: quant_linear_impl<4, kNibble, S, T>(y, x, M, N, K, codes, scales, mins, block, bias); break;
#if ENGINE_AVX2
    case kBelow128: quant_linear_impl<8, kBelow128, S, T>(y, x, M, N, K, codes, scales, mins, block, bias); break;
    case kSymmetric: quant_linear_impl<8, kSymmetric, S, T>(y, x, M, N, K, codes, scales, mins, block, bias); break;
#endif
    default: quant_linear_impl<8, kAnyByte, S, T>(y, x, M, N, K, codes, scales, mins, block, bias);
  }
}


#if ENGINE_AVX512
constexpr const char* kQuantName = "avx512_vnni";
#elif ENGINE_AVX2
constexpr const char* kQuantName = "avx2_maddubs";
#else
constexpr const char* kQuantName = "generic";
#endif

void quant_linear(DType dt, void* y, const void* x, int64_t M, int64_t N, int64_t K, const uint8_t* codes,
                  const void* scales, const void* mins, bool half_scales, int64_t bits, int64_t block,
                  int64_t code_kind, const float* bias) {
  (void)bits;  // the code kind carries it (4: 4-bit codes)
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (half_scales)
      run_quant_linear(static_cast<T*>(y), static_cast<const T*>(x), M, N, K, codes, static_cast<const f16*>(scales),
                       static_cast<const f16*>(mins), block, code_kind, bias);
    else
      run_quant_linear(static_cast<T*>(y), static_cast<const T*>(x), M, N, K, codes,
                       static_cast<const float*>(scales), static_cast<const float*>(mins), block, code_kind, bias);
  });
}

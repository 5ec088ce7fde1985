// What every kernel source of a level shares: scalar types and element access, a
// parallel loop, and 16-lane vectors written once for the three levels. Included inside a
// level's namespace (level.h), after prelude.h, with exactly one of ENGINE_AVX512,
// ENGINE_AVX2, ENGINE_GENERIC defined by its level_<isa>.cpp, which also sets the target:
//   avx512   AVX-512 F/BW/VL/DQ + VNNI (+ BF16): one zmm a vector
//   avx2     AVX2 + FMA + F16C: two ymm a vector
//   generic  no ISA assumed (SSE2 on x86-64, NEON on aarch64): arrays of 16, in loops the
//            compiler vectorizes for whatever the target has
// The kernels' layouts are built on 16 lanes (16 output rows of a quantized panel, 16
// positions of an int8 KV tile), so a 16-lane vector is the natural unit at every level,
// and each kernel body is written once over it. Where one level has an instruction that
// changes the algorithm (vpdpbusd, vdpbf16ps), the kernel has a specialization for it.
#if ENGINE_AVX512 + ENGINE_AVX2 + ENGINE_GENERIC != 1
#error "define exactly one of ENGINE_AVX512, ENGINE_AVX2, ENGINE_GENERIC"
#endif
#ifndef ENGINE_AVX512
#define ENGINE_AVX512 0
#endif
#ifndef ENGINE_AVX2
#define ENGINE_AVX2 0
#endif
#ifndef ENGINE_GENERIC
#define ENGINE_GENERIC 0
#endif
#ifndef ENGINE_BF16  // the level's build holds AVX512-BF16 code, run only where has_bf16() says
#define ENGINE_BF16 0
#endif

// Whether this CPU runs the level's AVX512-BF16 code (asked once)
inline bool has_bf16() {
#if ENGINE_AVX512 && ENGINE_BF16
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

// bf16 and fp16 in memory; arithmetic is always fp32
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// Element access in fp32 for the two activation dtypes (bf16 for speed, fp32 for checks).
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const bf16* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i].bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(bf16* p, int64_t i, float v) {  // round to nearest even, as c10 does
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = std::isnan(v) ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
  p[i].bits = static_cast<uint16_t>(u >> 16);
}
template <typename T> inline float round_to(float v) { T tmp[1]; store(tmp, 0, v); return load(tmp, 0); }

inline float half_to_float(f16 h) {
#if ENGINE_AVX512 || ENGINE_AVX2
  return _cvtsh_ss(h.bits);
#else
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1Fu, man = h.bits & 0x3FFu, bits;
  if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13);  // inf, nan
  else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
  else if (man == 0) bits = sign;
  else {  // subnormal: normalize
    exp = 113;
    while (!(man & 0x400u)) { man <<= 1; --exp; }
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// Runs f(b, e) over [begin, end) split into one chunk per OpenMP thread, or in this thread
// when the range is within one grain (at::parallel_for's contract, without ATen).
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(omp_get_max_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (threads <= 1 || omp_in_parallel()) {
    f(begin, end);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t nth = omp_get_num_threads(), chunk = (n + nth - 1) / nth;
    const int64_t b = begin + omp_get_thread_num() * chunk, e = std::min(end, b + chunk);
    if (b < e) f(b, e);
  }
}

// Prefetches [p, p + bytes) a cache line at a time into L1 (near) or L2. On x86 by inline
// asm: GCC 12 (-O2 and -O3) deleted a loop over rows whose body was only __builtin_prefetch
// (attention.h's prefetch_task_k: objdump found none of its prefetches in the kernel).
inline void prefetch_bytes(const void* p, int64_t bytes, bool near) {
  const char* c = static_cast<const char*>(p);
  for (int64_t byte = 0; byte < bytes; byte += 64) {
#if defined(__x86_64__)
    if (near) asm volatile("prefetcht0 %0" : : "m"(c[byte]));
    else asm volatile("prefetcht1 %0" : : "m"(c[byte]));
#else
    __builtin_prefetch(c + byte, 0, near ? 3 : 2);
#endif
  }
}

// Items [begin, end) of part `part` of `count` items spread over `parts` parts.
struct Slice { int64_t begin, end; };
inline Slice slice_of(int64_t count, int64_t part, int64_t parts) {
  const int64_t per = (count + parts - 1) / parts;
  return {std::min(count, part * per), std::min(count, (part + 1) * per)};
}

// a * b + c, fused where the level has the instruction (the generic build may not: a call
// to the libm fma would cost more than the rounding it saves)
inline float fmadd(float a, float b, float c) {
#if ENGINE_AVX512 || ENGINE_AVX2 || defined(__ARM_FEATURE_FMA)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// exp in plain arithmetic (Cephes-style range reduction and a degree-6 polynomial, within
// about 2 ulp of std::exp for x in [-87, 88]), so loops over it vectorize at every level:
// n rounded by the 1.5 * 2^23 trick (round half to even, as nearbyint), 2^n built in the
// exponent bits.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = fmadd(n, -0.693359375f, x);
  r = fmadd(n, 2.12194440e-4f, r);
  float y = 1.9875691500E-4f;
  y = fmadd(y, r, 1.3981999507E-3f);
  y = fmadd(y, r, 8.3334519073E-3f);
  y = fmadd(y, r, 4.1665795894E-2f);
  y = fmadd(y, r, 1.6666665459E-1f);
  y = fmadd(y, r, 5.0000001201E-1f);
  y = fmadd(y * r, r, r + 1.f);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y * scale;
}

// ---------------------------------------------------------------------------------------
// F16: 16 fp32 lanes.
struct F16 {
#if ENGINE_AVX512
  __m512 v;
#elif ENGINE_AVX2
  __m256 lo, hi;
#else
  float v[16];
#endif
};

#if ENGINE_AVX512
inline F16 f16_load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F16 f16_load(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))};
}
inline void f16_store(float* p, F16 x) { _mm512_storeu_ps(p, x.v); }
inline F16 f16_set1(float a) { return {_mm512_set1_ps(a)}; }
inline F16 f16_add(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 f16_sub(F16 a, F16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F16 f16_mul(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 f16_max(F16 a, F16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F16 f16_fma(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline float f16_sum(F16 a) { return _mm512_reduce_add_ps(a.v); }
inline float f16_hmax(F16 a) { return _mm512_reduce_max_ps(a.v); }
#elif ENGINE_AVX2
inline __m256 widen_bf16(__m128i raw) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)); }
inline F16 f16_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline F16 f16_load(const bf16* p) {
  const auto* q = reinterpret_cast<const __m128i*>(p);
  return {widen_bf16(_mm_loadu_si128(q)), widen_bf16(_mm_loadu_si128(q + 1))};
}
inline void f16_store(float* p, F16 x) { _mm256_storeu_ps(p, x.lo); _mm256_storeu_ps(p + 8, x.hi); }
inline F16 f16_set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline F16 f16_add(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F16 f16_sub(F16 a, F16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline F16 f16_mul(F16 a, F16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F16 f16_max(F16 a, F16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline F16 f16_fma(F16 a, F16 b, F16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float f16_sum(F16 a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
inline float f16_hmax(F16 a) {
  __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#else
#define F16_MAP(expr) F16 r; _Pragma("omp simd") for (int i = 0; i < 16; ++i) r.v[i] = (expr); return r
template <typename T> inline F16 f16_load(const T* p) { F16_MAP(load(p, i)); }
inline void f16_store(float* p, F16 x) { std::memcpy(p, x.v, sizeof(x.v)); }
inline F16 f16_set1(float a) { F16_MAP(a); }
inline F16 f16_add(F16 a, F16 b) { F16_MAP(a.v[i] + b.v[i]); }
inline F16 f16_sub(F16 a, F16 b) { F16_MAP(a.v[i] - b.v[i]); }
inline F16 f16_mul(F16 a, F16 b) { F16_MAP(a.v[i] * b.v[i]); }
inline F16 f16_max(F16 a, F16 b) { F16_MAP(std::max(a.v[i], b.v[i])); }
inline F16 f16_fma(F16 a, F16 b, F16 c) { F16_MAP(fmadd(a.v[i], b.v[i], c.v[i])); }
#undef F16_MAP
inline float f16_sum(F16 a) {  // pairwise, as a vector unit would
  float s[8];
  for (int i = 0; i < 8; ++i) s[i] = a.v[i] + a.v[i + 8];
  for (int i = 0; i < 4; ++i) s[i] += s[i + 4];
  return (s[0] + s[2]) + (s[1] + s[3]);
}
inline float f16_hmax(F16 a) { float m = a.v[0]; for (int i = 1; i < 16; ++i) m = std::max(m, a.v[i]); return m; }
#endif
inline F16 f16_zero() { return f16_set1(0.f); }
// 16 lanes to T (bf16 rounded to nearest even, as c10)
inline void f16_store(bf16* p, F16 x) {
  alignas(64) float f[16];
  f16_store(f, x);
  for (int i = 0; i < 16; ++i) store(p, i, f[i]);
}
#if ENGINE_AVX512
// exp_approx in every lane, its operations one for one (the same bits), in registers (a loop
// over exp_approx through memory took a quarter of prefill attention's time; only that
// AVX512-BF16 kernel calls this).
inline F16 f16_exp(F16 x) {
  const __m512 big = _mm512_set1_ps(12582912.f);
  // max_ps/min_ps return their second operand where either is NaN: x, as std::max/min do here
  const __m512 v = _mm512_min_ps(_mm512_set1_ps(88.3f), _mm512_max_ps(_mm512_set1_ps(-87.3f), x.v));
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)), big), big);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), v);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return {_mm512_mul_ps(y, _mm512_castsi512_ps(bits))};
}
#endif

// softmax in place over n floats; returns the largest score and the sum of the exps (what
// merging softmaxes over parts of a row needs: attention.h's split decode tasks)
struct SoftmaxStats { float max, sum; };
inline SoftmaxStats softmax(float* s, int64_t n) {
  float m = -INFINITY;
  int64_t t = 0;
  if (n >= 16) {
    F16 mv = f16_load(s);
    for (t = 16; t + 16 <= n; t += 16) mv = f16_max(mv, f16_load(s + t));
    m = f16_hmax(mv);
  }
  for (; t < n; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (t = 0; t < n; ++t) { s[t] = exp_approx(s[t] - m); sum += s[t]; }
  const float inv = 1.f / sum;
#pragma omp simd
  for (t = 0; t < n; ++t) s[t] *= inv;
  return {m, sum};
}

// ---------------------------------------------------------------------------------------
// I16: 16 int32 lanes, and dot products of 4 bytes per lane: lane l of a 64-byte operand
// `a` is bytes 4l..4l+3, multiplied by the 4 signed bytes of `b4` (one int32 broadcast)
// and summed into lane l. This is AVX512-VNNI's vpdpbusd; on AVX2, vpmaddubsw saturates
// its 16-bit pair sums, so each form states the range that keeps it exact.
struct I16 {
#if ENGINE_AVX512
  __m512i v;
#elif ENGINE_AVX2
  __m256i lo, hi;
#else
  int32_t v[16];
#endif
};
// 64 bytes
struct B64 {
#if ENGINE_AVX512
  __m512i v;
#elif ENGINE_AVX2
  __m256i lo, hi;
#else
  uint8_t v[64];
#endif
};

#if ENGINE_AVX512
inline I16 i16_zero() { return {_mm512_setzero_si512()}; }
inline B64 b64_load(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
inline B64 b64_low_nibbles(B64 a) { return {_mm512_and_si512(a.v, _mm512_set1_epi8(0x0F))}; }
inline B64 b64_high_nibbles(B64 a) { return {_mm512_and_si512(_mm512_srli_epi16(a.v, 4), _mm512_set1_epi8(0x0F))}; }
inline F16 i16_to_f16(I16 a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline I16 i16_sub(I16 a, I16 b) { return {_mm512_sub_epi32(a.v, b.v)}; }
inline I16 i16_set1(int32_t x) { return {_mm512_set1_epi32(x)}; }
// a unsigned (any value), b4 signed
inline I16 dot4_u8(I16 acc, B64 a, int32_t b4) { return {_mm512_dpbusd_epi32(acc.v, a.v, _mm512_set1_epi32(b4))}; }
// the same with the roles swapped: b4 four unsigned bytes, a 64 signed bytes
inline I16 dot4_bu(I16 acc, int32_t b4, B64 a) { return {_mm512_dpbusd_epi32(acc.v, _mm512_set1_epi32(b4), a.v)}; }
#elif ENGINE_AVX2
inline I16 i16_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline B64 b64_load(const uint8_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
inline B64 b64_low_nibbles(B64 a) {
  const __m256i m = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(a.lo, m), _mm256_and_si256(a.hi, m)};
}
inline B64 b64_high_nibbles(B64 a) {
  const __m256i m = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(_mm256_srli_epi16(a.lo, 4), m), _mm256_and_si256(_mm256_srli_epi16(a.hi, 4), m)};
}
inline F16 i16_to_f16(I16 a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline I16 i16_sub(I16 a, I16 b) { return {_mm256_sub_epi32(a.lo, b.lo), _mm256_sub_epi32(a.hi, b.hi)}; }
inline I16 i16_set1(int32_t x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
inline __m256i madd_ones(__m256i pairs) { return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)); }
// a < 128 (|products| <= 127 * 128: a pair sum fits in 16 bits)
inline I16 dot4_u7(I16 acc, B64 a, int32_t b4) {
  const __m256i b = _mm256_set1_epi32(b4);
  return {_mm256_add_epi32(acc.lo, madd_ones(_mm256_maddubs_epi16(a.lo, b))),
          _mm256_add_epi32(acc.hi, madd_ones(_mm256_maddubs_epi16(a.hi, b)))};
}
// a any unsigned byte: its two nibbles apart, the high one's sum weighted by 16
inline I16 dot4_u8(I16 acc, B64 a, int32_t b4) {
  const __m256i b = _mm256_set1_epi32(b4), m = _mm256_set1_epi8(0x0F), w16 = _mm256_set1_epi16(16);
  const auto half = [&](__m256i acc_h, __m256i x) {
    const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(x, m), b);
    const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(x, 4), m), b);
    return _mm256_add_epi32(acc_h, _mm256_add_epi32(madd_ones(lo), _mm256_madd_epi16(hi, w16)));
  };
  return {half(acc.lo, a.lo), half(acc.hi, a.hi)};
}
// b4 four unsigned bytes < 128, a 64 signed bytes
inline I16 dot4_bu(I16 acc, int32_t b4, B64 a) {
  const __m256i b = _mm256_set1_epi32(b4);
  return {_mm256_add_epi32(acc.lo, madd_ones(_mm256_maddubs_epi16(b, a.lo))),
          _mm256_add_epi32(acc.hi, madd_ones(_mm256_maddubs_epi16(b, a.hi)))};
}
#else
inline I16 i16_zero() { I16 r; std::memset(r.v, 0, sizeof(r.v)); return r; }
inline B64 b64_load(const uint8_t* p) { B64 r; std::memcpy(r.v, p, 64); return r; }
inline B64 b64_low_nibbles(B64 a) { B64 r; for (int i = 0; i < 64; ++i) r.v[i] = a.v[i] & 0x0F; return r; }
inline B64 b64_high_nibbles(B64 a) { B64 r; for (int i = 0; i < 64; ++i) r.v[i] = a.v[i] >> 4; return r; }
inline F16 i16_to_f16(I16 a) { F16 r; for (int i = 0; i < 16; ++i) r.v[i] = static_cast<float>(a.v[i]); return r; }
inline I16 i16_sub(I16 a, I16 b) { I16 r; for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] - b.v[i]; return r; }
inline I16 i16_set1(int32_t x) { I16 r; for (int i = 0; i < 16; ++i) r.v[i] = x; return r; }
inline I16 dot4_u8(I16 acc, B64 a, int32_t b4) {
  int8_t b[4];
  std::memcpy(b, &b4, 4);
#pragma omp simd
  for (int l = 0; l < 16; ++l)
    acc.v[l] += a.v[4 * l] * b[0] + a.v[4 * l + 1] * b[1] + a.v[4 * l + 2] * b[2] + a.v[4 * l + 3] * b[3];
  return acc;
}
inline I16 dot4_bu(I16 acc, int32_t b4, B64 a) {
  uint8_t b[4];
  std::memcpy(b, &b4, 4);
  const auto* s = reinterpret_cast<const int8_t*>(a.v);
#pragma omp simd
  for (int l = 0; l < 16; ++l)
    acc.v[l] += s[4 * l] * b[0] + s[4 * l + 1] * b[1] + s[4 * l + 2] * b[2] + s[4 * l + 3] * b[3];
  return acc;
}
#endif
#if !ENGINE_AVX2
inline I16 dot4_u7(I16 acc, B64 a, int32_t b4) { return dot4_u8(acc, a, b4); }
#endif

// Probabilities quantized for dot4_bu in the int8 KV cache's P.V stay below this.
#if ENGINE_AVX2
constexpr float kProbCodeMax = 127.f;
#else
constexpr float kProbCodeMax = 255.f;
#endif

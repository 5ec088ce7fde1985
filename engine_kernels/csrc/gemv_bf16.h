// y[M, N] = x[M, K] W[N, K]^T (+ b) in bf16 with fp32 accumulation, for the few rows of a
// decode step: AVX512-BF16 builds only (the only level that runs bf16 activations natively;
// elsewhere the table has no gemv_bf16 and the platform never asks for it).
#if ENGINE_AVX512 && ENGINE_BF16
// y[M, N] = x[M, K] W[N, K]^T (+ b) in bf16 with fp32 accumulation, for the few rows of a
// decode step, which is bound by streaming W from memory. oneDNN pays tens of
// microseconds per call switching between a layer's four shapes (120 calls a step), and
// streams small matrices at half the machine's bandwidth. Here W is packed once at load
// as [N/64][K/2][64][2]: one contiguous stream per 64 output columns, each 64-byte load
// holding 16 columns x one pair of k, multiplied by a broadcast pair of x (vdpbf16ps), so
// lanes are output columns and no horizontal sums are needed.
constexpr int64_t kGemvCols = 64;   // output columns per packed block
constexpr int64_t kGemvKPairs = 256;  // k pairs per pass (32 KiB of W) so M > 4 re-reads W from L1/L2
constexpr int64_t kGemvPrefetchPairs = 32;

template <int MM>
inline void gemv_pass(float* acc_buf, const uint32_t* x_pairs, int64_t x_stride_pairs, const uint16_t* w,
                      int64_t kp_begin, int64_t kp_end) {
  __m512 acc[MM][4];
  for (int m = 0; m < MM; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_loadu_ps(acc_buf + m * kGemvCols + 16 * j);
  for (int64_t kp = kp_begin; kp < kp_end; ++kp) {
    const uint16_t* wk = w + kp * 2 * kGemvCols;
    // 8 KiB ahead into L2: measured best on Zen 4 (the hardware prefetcher alone ramps up
    // too slowly on these short streams)
    const char* ahead = reinterpret_cast<const char*>(wk + kGemvPrefetchPairs * 2 * kGemvCols);
    for (int line = 0; line < 4; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
    for (int m = 0; m < MM; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x_pairs[m * x_stride_pairs + kp]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xb, w2);
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], xb, w3);
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc_buf + m * kGemvCols + 16 * j, acc[m][j]);
}

void gemv_bf16(void* y, const void* x, int64_t M, int64_t K, int64_t N, const void* w_packed, const float* bias) {
  const int64_t K2 = K / 2;
  const auto* xp = static_cast<const uint32_t*>(x);
  const auto* wp = static_cast<const uint16_t*>(w_packed);
  auto* yp = static_cast<uint16_t*>(y);
  parallel_for(0, N / kGemvCols, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(M * kGemvCols);
    for (int64_t nb = begin; nb < end; ++nb) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const uint16_t* wb = wp + nb * K2 * 2 * kGemvCols;
      for (int64_t k0 = 0; k0 < K2; k0 += kGemvKPairs) {
        const int64_t k1 = std::min(K2, k0 + kGemvKPairs);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          float* a = acc.data() + m0 * kGemvCols;
          const uint32_t* xm = xp + m0 * K2;
          switch (std::min<int64_t>(4, M - m0)) {
            case 4: gemv_pass<4>(a, xm, K2, wb, k0, k1); break;
            case 3: gemv_pass<3>(a, xm, K2, wb, k0, k1); break;
            case 2: gemv_pass<2>(a, xm, K2, wb, k0, k1); break;
            default: gemv_pass<1>(a, xm, K2, wb, k0, k1);
          }
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int j = 0; j < 4; ++j) {
          const int64_t n = nb * kGemvCols + 16 * j;
          __m512 v = _mm512_loadu_ps(acc.data() + m * kGemvCols + 16 * j);
          if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(yp + m * N + n), (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    }
  });
}
#endif


// CPU kernels for the engine's hot path. Decode on CPU is bound by per-op dispatch as much
// as by memory, so these fuse what the torch reference does in many small ops:
//   rms_norm / fused_add_rms_norm, rope_and_write_kv, silu_and_mul, and paged decode
//   attention that reads K/V straight through the block tables (no gather), the grammar
//   token bitmask applied to the logits (16 logits per AVX-512 mask register), and greedy
//   argmax.
// fp32 math, rounding to the model dtype at the same points as the torch reference (the
// bf16 attention sums its dot products in another order and weighs V by probabilities
// rounded to bf16: within bf16 tolerance, tested).
// Built at first use by engine_kernels/cpu.py; tests compare each with its reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include "vec.h"

namespace {



template <typename T>
void rms_norm_row(T* out, const T* x, const T* w, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) { float v = load(x, i); ss += v * v; }
  const float inv = 1.f / std::sqrt(ss / n + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store(out, i, load(w, i) * round_to<T>(load(x, i) * inv));
}

template <typename T>
void rms_norm_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t T_ = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>(); const T* wp = w.data_ptr<T>(); T* op = out.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) rms_norm_row(op + t * n, xp + t * n, wp, n, (float)eps);
  });
}

// residual = residual + x; x = rms_norm(residual) * w   (both in place)
template <typename T>
void fused_add_rms_norm_impl(at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps) {
  const int64_t T_ = x.size(0), n = x.size(1);
  T* xp = x.data_ptr<T>(); T* rp = residual.data_ptr<T>(); const T* wp = w.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      T* xr = xp + t * n; T* rr = rp + t * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(rr, i, load(rr, i) + load(xr, i));
      rms_norm_row(xr, rr, wp, n, (float)eps);
    }
  });
}

// qkv: [T, (H + 2 Hkv) * D]. Rotates q and k (half-split layout), returns q as [T, H, D]
// and writes k, v into the caches [num_blocks, block_size, Hkv, D] at slot_mapping.
template <typename T>
void rope_write_kv_impl(at::Tensor& q_out, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                        at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, int64_t H, int64_t Hkv,
                        int64_t D) {
  const int64_t n = qkv.size(0), half = D / 2, stride = qkv.stride(0);
  const T* src = qkv.data_ptr<T>(); const T* cp = cos.data_ptr<T>(); const T* sp = sin.data_ptr<T>();
  T* qo = q_out.data_ptr<T>(); T* kc = k_cache.data_ptr<T>(); T* vc = v_cache.data_ptr<T>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const T* row = src + t * stride; const T* c = cp + t * D; const T* s = sp + t * D;
      for (int64_t h = 0; h < H + Hkv; ++h) {
        const T* x = row + h * D;
        T* dst = h < H ? qo + (t * H + h) * D : kc + (sl[t] * Hkv + (h - H)) * D;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = load(x, i), x2 = load(x, i + half);
          store(dst, i, round_to<T>(round_to<T>(x1 * load(c, i)) + round_to<T>(-x2 * load(s, i))));
          store(dst, i + half, round_to<T>(round_to<T>(x2 * load(c, i + half)) + round_to<T>(x1 * load(s, i + half))));
        }
      }
      std::memcpy(vc + sl[t] * Hkv * D, row + (H + Hkv) * D, sizeof(T) * Hkv * D);
    }
  });
}

template <typename T>
void silu_and_mul_impl(at::Tensor& out, const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1) / 2;
  const T* xp = x.data_ptr<T>(); T* op = out.data_ptr<T>();
  at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const T* g = xp + t * 2 * d; const T* u = g + d; T* o = op + t * d;
      int64_t i0 = 0;
#if defined(__AVX512F__)
      for (; i0 + 16 <= d; i0 += 16) {  // exp dominates: 16 lanes at a time
        alignas(64) float tmp[16];
        const __m512 gv = load16(g + i0);
        const __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(88.f)));
        _mm512_store_ps(tmp, _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
        for (int k = 0; k < 16; ++k) store(o, i0 + k, round_to<T>(tmp[k]) * load(u, i0 + k));
      }
#endif
      for (int64_t i = i0; i < d; ++i) {
        const float gv = load(g, i);
        store(o, i, round_to<T>(gv / (1.f + std::exp(-gv))) * load(u, i));
      }
    }
  });
}

// out[b, h] = softmax(q[b, h] . K_b^T * scale) V_b over seq_lens[b] tokens read through
// block_tables. One task per (sequence, KV head): its G query heads share each row read.
template <typename T>
void decode_attention_impl(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = H / Hkv, max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>(); T* op = out.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>(); const T* vp = v_cache.data_ptr<T>();
  const int64_t* bt = block_tables.data_ptr<int64_t>(); const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t row = Hkv * D;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), kf(D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv, L = lens[b];
      scores.resize(G * L);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = load(qp, (b * H + kvh * G + g) * D + d);
      for (int64_t t = 0; t < L; ++t) {
        const T* krow = kp + (bt[b * max_blocks + t / bs] * bs + t % bs) * row + kvh * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) kf[d] = load(krow, d);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = &qf[g * D];
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
          scores[g * L + t] = s * (float)scale;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s = &scores[g * L];
        float m = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < L; ++t) m = std::max(m, s[t]);
        for (int64_t t = 0; t < L; ++t) { s[t] = std::exp(s[t] - m); sum += s[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) s[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const T* vrow = vp + (bt[b * max_blocks + t / bs] * bs + t % bs) * row + kvh * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) kf[d] = load(vrow, d);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* a = &acc[g * D];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * kf[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) store(op, (b * H + kvh * G + g) * D + d, acc[g * D + d]);
    }
  });
}

#if defined(__AVX512F__)
// Decode attention with AVX-512 for head_dim % 16 == 0: each K/V row is loaded once into
// registers (bf16 widened to fp32) and used by all G query heads of its group.
template <typename T>
void decode_attention_avx512(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  constexpr int64_t kMaxG = 16, kMaxC = 16;  // up to 16 query heads per KV head, head_dim <= 256
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), C = D / 16;
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = H / Hkv, max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>(); T* op = out.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>(); const T* vp = v_cache.data_ptr<T>();
  const int64_t* bt = block_tables.data_ptr<int64_t>(); const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t row = Hkv * D;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    __m512 qv[kMaxG][kMaxC], acc[kMaxG][kMaxC];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv, L = lens[b];
      scores.resize(G * L);
      const __m512 sc = _mm512_set1_ps((float)scale);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c) qv[g][c] = _mm512_mul_ps(load16(qp + (b * H + kvh * G + g) * D + c * 16), sc);
      for (int64_t t = 0; t < L; ++t) {
        const T* krow = kp + (bt[b * max_blocks + t / bs] * bs + t % bs) * row + kvh * D;
        __m512 kv[kMaxC];
        for (int64_t c = 0; c < C; ++c) kv[c] = load16(krow + c * 16);
        for (int64_t g = 0; g < G; ++g) {
          __m512 s = _mm512_mul_ps(qv[g][0], kv[0]);
          for (int64_t c = 1; c < C; ++c) s = _mm512_fmadd_ps(qv[g][c], kv[c], s);
          scores[g * L + t] = _mm512_reduce_add_ps(s);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        softmax512(&scores[g * L], L);
        for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
      }
      for (int64_t t = 0; t < L; ++t) {
        const T* vrow = vp + (bt[b * max_blocks + t / bs] * bs + t % bs) * row + kvh * D;
        __m512 vv[kMaxC];
        for (int64_t c = 0; c < C; ++c) vv[c] = load16(vrow + c * 16);
        for (int64_t g = 0; g < G; ++g) {
          const __m512 p = _mm512_set1_ps(scores[g * L + t]);
          for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        alignas(64) float tmp[16];
        T* dst = op + (b * H + kvh * G + g) * D;
        for (int64_t c = 0; c < C; ++c) {
          _mm512_store_ps(tmp, acc[g][c]);
          for (int i = 0; i < 16; ++i) store(dst, c * 16 + i, tmp[i]);
        }
      }
    }
  });
}
#endif


#if defined(__AVX512BF16__)

// Decode attention over a bf16 cache, one task per (sequence, KV head), 16 cached rows (a
// tile) at a time, D = 32 * P. Scores: q . k by vdpbf16ps on the rows as stored (q is bf16
// already; products exact, fp32 sums), the tile's 16 partial sums reduced together, scaled
// after. P.V by vdpbf16ps too: the probabilities rounded to bf16 (as the output is), the tile's
// V rows interleaved in pairs once, then per query head one instruction adds two rows for 16
// dims, its accumulators in registers across the tile (fp32 FMAs on widened rows took 3x the
// instructions: with the cache in L2, 580 -> 390 us per layer at 96 x 315 tokens). Row
// offsets are computed once per task (no division per row), and the rows, scattered over the
// cache, are prefetched a tile ahead (K) and for the P.V pass (V). Measured in the engine
// (every layer's KV cold), a batch of 64 at 65 tokens: 310 -> 240 us per layer from the
// prefetches; 2x before that from the tiling. (One task per sequence reading whole rows
// measured no better, and leaves a core idle at batch 1; prefetching 2-4 tiles ahead, no better.)
template <int P>
void decode_attention_bf16(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  constexpr int64_t D = 32 * P, C = D / 16;
  const int64_t B = q.size(0), H = q.size(1);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = H / Hkv, max_blocks = block_tables.size(1);
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const uint16_t* vp16 = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  const int64_t* bt = block_tables.data_ptr<int64_t>(); const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t row = Hkv * D;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc;
    std::vector<uint16_t> pbuf;  // the probabilities in bf16, in token pairs
    std::vector<int64_t> offs;  // element offset of each cached row's head kvh
    alignas(64) uint16_t vbuf[16 * D];  // a tile's V rows, interleaved in pairs
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv, L = lens[b], tiles = (L + 15) / 16, Lp = tiles * 16;
      scores.resize(G * Lp);
      pbuf.resize(G * Lp);
      acc.assign(G * D, 0.f);
      offs.resize(Lp + 16);
      const int64_t* blocks = bt + b * max_blocks;
      for (int64_t t = 0, blk = 0, in_blk = 0; t < L; ++t) {
        offs[t] = (blocks[blk] * bs + in_blk) * row + kvh * D;
        if (++in_blk == bs) { in_blk = 0; ++blk; }
      }
      std::fill(offs.begin() + L, offs.end(), offs[0]);  // rows past L: read, never used
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t t0 = tile * 16;
        for (int64_t i = 0; i < 16; ++i)
          for (int64_t byte = 0; byte < 2 * D; byte += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(kp + offs[t0 + 16 + i]) + byte, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(vp16 + offs[t0 + i]) + byte, _MM_HINT_T1);
          }
        for (int64_t g = 0; g < G; ++g) {
          const uint16_t* qh = qp + (b * H + kvh * G + g) * D;
          __m512bh qv[P];
          for (int c = 0; c < P; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qh + 32 * c);
          __m512 part[16];
          for (int i = 0; i < 16; ++i) {
            const uint16_t* k = kp + offs[t0 + i];
            __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(k));
            for (int c = 1; c < P; ++c) s = _mm512_dpbf16_ps(s, qv[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
            part[i] = s;
          }
          _mm512_storeu_ps(&scores[g * Lp + t0], _mm512_mul_ps(sum16x16(part), _mm512_set1_ps((float)scale)));
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = &scores[g * Lp];
        softmax512(sg, L);
        std::fill(sg + L, sg + Lp, 0.f);  // the pad rows of the last pair weigh nothing
        for (int64_t t = 0; t < Lp; t += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(&pbuf[g * Lp + t]), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sg + t)));
      }
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t t0 = tile * 16, pairs = (std::min<int64_t>(16, L - t0) + 1) / 2;
        // Two rows' words interleaved (unpacklo/hi per 128-bit lane), so that one vdpbf16ps
        // adds p[t] v[t] + p[t+1] v[t+1] for 16 dims; lane j of accumulator 2c (2c+1) is dim
        // 32c + 8(j/4) + j%4 (+4), put back in order at the end.
        for (int64_t i = 0; i < pairs; ++i) {
          const uint16_t* v0 = vp16 + offs[t0 + 2 * i];
          const uint16_t* v1 = vp16 + offs[t0 + 2 * i + 1];
          for (int c = 0; c < P; ++c) {
            const __m512i a = _mm512_loadu_si512(v0 + 32 * c), b = _mm512_loadu_si512(v1 + 32 * c);
            _mm512_store_si512(vbuf + (i * C + 2 * c) * 32, _mm512_unpacklo_epi16(a, b));
            _mm512_store_si512(vbuf + (i * C + 2 * c + 1) * 32, _mm512_unpackhi_epi16(a, b));
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          __m512 a[C];
          float* ag = &acc[g * D];
          for (int c = 0; c < C; ++c) a[c] = _mm512_loadu_ps(ag + 16 * c);
          const uint32_t* pg = reinterpret_cast<const uint32_t*>(&pbuf[g * Lp + t0]);
          for (int64_t i = 0; i < pairs; ++i) {
            const __m512bh p = (__m512bh)_mm512_set1_epi32(pg[i]);
            for (int c = 0; c < C; ++c)
              a[c] = _mm512_dpbf16_ps(a[c], p, (__m512bh)_mm512_load_si512(vbuf + (i * C + c) * 32));
          }
          for (int c = 0; c < C; ++c) _mm512_storeu_ps(ag + 16 * c, a[c]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        at::BFloat16* dst = op + (b * H + kvh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) {
          const int64_t r = d % 32, w = r % 8;
          store(dst, d, acc[g * D + (2 * (d / 32) + w / 4) * 16 + (r / 8) * 4 + w % 4]);
        }
      }
    }
  });
}
#endif

#if defined(__AVX512BF16__)
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

void gemv_bf16_impl(at::Tensor& y, const at::Tensor& x, const at::Tensor& w_packed, const float* bias) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), K2 = K / 2;
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w_packed.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, N / kGemvCols, 1, [&](int64_t begin, int64_t end) {
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

// logits[r, j] = -inf where bit j of bitmask[r] is 0, for each r in rows. A 16-bit slice
// of the bitmask is exactly an AVX-512 lane mask: one blend per 16 logits.
void apply_token_bitmask_impl(at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  const int64_t V = logits.size(1), words = bitmask.size(1);
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  const int64_t num_rows = rows.numel();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < num_rows; ++k) {
    const int64_t r = row_ids[k];
    float* out = logits.data_ptr<float>() + r * logits.stride(0);
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(bitmask.data_ptr<int32_t>() + r * bitmask.stride(0));
    const int64_t covered = std::min(V, words * 32);
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512 inf16 = _mm512_set1_ps(neg_inf);
    for (; j + 16 <= covered; j += 16) {
      const __mmask16 keep = bits[j / 16];  // little-endian: bits 0-15 of word j/32, then 16-31
      if (keep != 0xFFFF) _mm512_storeu_ps(out + j, _mm512_mask_blend_ps(keep, inf16, _mm512_loadu_ps(out + j)));
    }
#endif
    for (; j < covered; ++j)
      if (!((bits[j / 16] >> (j % 16)) & 1)) out[j] = neg_inf;
    for (; j < V; ++j) out[j] = neg_inf;  // ids past the bitmask are not the grammar's
  }
}

void check_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
}

#define DISPATCH(t, NAME, ...)                                                      \
  do {                                                                              \
    check_dtype(t);                                                                 \
    if ((t).scalar_type() == at::kFloat) { using scalar_t = float; __VA_ARGS__(); } \
    else { using scalar_t = at::BFloat16; __VA_ARGS__(); }                          \
  } while (0)

}  // namespace

// kv_int8_ops.cpp: the int8 KV cache's write and decode attention
void rope_write_kv_int8(at::Tensor& q_out, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                        at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, int64_t H, int64_t Hkv,
                        int64_t D);
at::Tensor paged_decode_attention_int8(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
bool int8_attention_supported(int64_t head_dim);
at::Tensor dequantize_kv_blocks(const at::Tensor& cache, const at::Tensor& block_ids, bool is_k, at::ScalarType dtype);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "x must be contiguous [T, n]");
  auto out = at::empty_like(x);
  DISPATCH(x, "rms_norm", [&] { rms_norm_impl<scalar_t>(out, x, w, eps); });
  return out;
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes(), "shape");
  DISPATCH(x, "fused_add_rms_norm", [&] { fused_add_rms_norm_impl<scalar_t>(x, residual, w, eps); });
}

at::Tensor rope_and_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                             at::Tensor& v_cache, const at::Tensor& slots, int64_t H, int64_t Hkv, int64_t D) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (H + 2 * Hkv) * D, "qkv shape");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(-1) == D, "cos/sin must be [T, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slots.scalar_type() == at::kLong, "cache");
  auto q = at::empty({qkv.size(0), H, D}, qkv.options());
  auto sl = slots.contiguous();
  if (k_cache.scalar_type() == at::kByte) {
    check_dtype(qkv);
    rope_write_kv_int8(q, qkv, cos, sin, k_cache, v_cache, sl, H, Hkv, D);
    return q;
  }
  DISPATCH(qkv, "rope_and_write_kv", [&] { rope_write_kv_impl<scalar_t>(q, qkv, cos, sin, k_cache, v_cache, sl, H, Hkv, D); });
  return q;
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [T, 2d]");
  auto out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  DISPATCH(x, "silu_and_mul", [&] { silu_and_mul_impl<scalar_t>(out, x); });
  return out;
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [B, H, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong, "int64 metadata");
  auto bt = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  if (k_cache.scalar_type() == at::kByte) return paged_decode_attention_int8(q, k_cache, v_cache, bt, lens, scale);
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  auto out = at::empty_like(q);
#if defined(__AVX512BF16__)
  if (q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16) {
    switch (q.size(2)) {
      case 64: decode_attention_bf16<2>(out, q, k_cache, v_cache, bt, lens, scale); return out;
      case 128: decode_attention_bf16<4>(out, q, k_cache, v_cache, bt, lens, scale); return out;
      case 256: decode_attention_bf16<8>(out, q, k_cache, v_cache, bt, lens, scale); return out;
      default: break;
    }
  }
#endif
#if defined(__AVX512F__)
  if (q.size(2) % 16 == 0 && q.size(2) <= 256 && q.size(1) / k_cache.size(2) <= 16) {
    DISPATCH(q, "paged_decode_attention", [&] { decode_attention_avx512<scalar_t>(out, q, k_cache, v_cache, bt, lens, scale); });
    return out;
  }
#endif
  DISPATCH(q, "paged_decode_attention", [&] { decode_attention_impl<scalar_t>(out, q, k_cache, v_cache, bt, lens, scale); });
  return out;
}

// Ends the OpenMP worker threads that the calling thread started (libgomp keeps a pool per
// thread that ever opened a parallel region). Once a process has more OpenMP threads than
// CPUs, libgomp stops every pool's workers from spin-waiting between regions, and each
// region then pays a futex wake-up: on two cores, a model loaded on the main thread and
// stepped on AsyncLLM's thread ran every kernel 1.5-2x slower (a 2-op region 8 -> 59 us).
int release_openmp_pool() { return omp_pause_resource_all(omp_pause_soft); }

bool has_bf16_gemv() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// Ask the kernel for 2 MiB pages under a not-yet-touched buffer: streaming the weights
// through 4 KiB pages costs about 10% of decode speed in TLB misses. Advisory only.
void advise_huge_pages(at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t first = (begin + huge - 1) & ~(huge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(huge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
}

// W [N, K] -> the [N/64][K/2][64][2] layout gemv_bf16 streams; None-able by callers
// checking gemv_supported(N, K) first.
bool gemv_supported(int64_t N, int64_t K) {
  return has_bf16_gemv() && N % 64 == 0 && K % 2 == 0;
}

at::Tensor pack_for_gemv(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "w must be bfloat16 [N, K]");
  TORCH_CHECK(gemv_supported(w.size(0), w.size(1)), "needs N % 64 == 0, even K and AVX512-BF16");
  const int64_t N = w.size(0), K = w.size(1);
  return w.contiguous().view({N / 64, 64, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// Small-M bf16 linear over a packed weight; x [M, K] -> [M, N].
at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w_packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bfloat16 [M, K]");
  TORCH_CHECK(w_packed.dim() == 4 && w_packed.size(1) * 2 == x.size(1) && w_packed.is_contiguous(),
              "w_packed must come from pack_for_gemv for this K");
#if defined(__AVX512BF16__)
  auto xc = x.contiguous();
  auto y = at::empty({x.size(0), w_packed.size(0) * 64}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  gemv_bf16_impl(y, xc, w_packed, b.defined() ? b.data_ptr<float>() : nullptr);
  return y;
#else
  TORCH_CHECK(false, "built without AVX512-BF16");
#endif
}

// Greedy sampling's argmax over each row of fp32 logits, as torch.argmax: the first index of
// the maximum, and the first NaN if a row has one. 64 rows of a 49k vocabulary: 0.22 ms,
// against 1.0 ms for torch's (about 4% of a batch-64 decode step), rows in parallel.
int64_t argmax_row(const float* x, int64_t V) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if (V >= 16) {
    __m512 best = _mm512_loadu_ps(x);
    __m512i best_idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i idx = best_idx;
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
    for (j = 16; j + 16 <= V; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + j);
      idx = _mm512_add_epi32(idx, step);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // strict: each lane keeps its first
      best = _mm512_mask_blend_ps(gt, best, v);
      best_idx = _mm512_mask_blend_epi32(gt, best_idx, idx);
    }
    if (nan) {  // rare: find the first NaN as torch does
      for (int64_t i = 0; i < V; ++i) if (std::isnan(x[i])) return i;
    }
    alignas(64) float vals[16];
    alignas(64) int32_t ids[16];
    _mm512_store_ps(vals, best);
    _mm512_store_si512(ids, best_idx);
    float m = vals[0];
    int64_t arg = ids[0];
    for (int i = 1; i < 16; ++i)
      if (vals[i] > m || (vals[i] == m && ids[i] < arg)) { m = vals[i]; arg = ids[i]; }
    for (; j < V; ++j) {
      if (std::isnan(x[j])) return j;
      if (x[j] > m) { m = x[j]; arg = j; }
    }
    return arg;
  }
#endif
  int64_t arg = 0;
  for (j = 0; j < V; ++j) {
    if (std::isnan(x[j])) return j;
    if (x[j] > x[arg]) arg = j;
  }
  return arg;
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
              "logits must be [N, V] float32 with contiguous rows, V > 0");
  TORCH_CHECK(logits.size(1) < (int64_t(1) << 31), "vocabulary too large for int32 lane indices");
  auto out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t V = logits.size(1), stride = logits.stride(0);
  at::parallel_for(0, logits.size(0), 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) o[r] = argmax_row(x + r * stride, V);
  });
  return out;
}

void apply_token_bitmask(at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1,
              "logits must be [N, V] float32 with contiguous rows");
  TORCH_CHECK(bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 && bitmask.stride(1) == 1,
              "bitmask must be [N, ceil(V/32)] int32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "rows must be int64 indices");
  auto rows_c = rows.contiguous();
  const int64_t* ids = rows_c.data_ptr<int64_t>();
  for (int64_t k = 0; k < rows_c.numel(); ++k)
    TORCH_CHECK(ids[k] >= 0 && ids[k] < logits.size(0) && ids[k] < bitmask.size(0), "row index out of range");
  apply_token_bitmask_impl(logits, bitmask, rows_c);
}

// quant_ops.cpp
bool has_quant_kernels();
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                        int64_t bits, int64_t block, const c10::optional<at::Tensor>& bias);

// A linear layer as the fused decode path runs it: the bf16 GEMV over a packed weight
// (bits == 16) or the quantized kernel (codes, scales, mins, bits, block).
struct LinearWeights {
  at::Tensor w0, w1, w2;
  int64_t bits, block;
  c10::optional<at::Tensor> bias;
  at::Tensor operator()(const at::Tensor& x) const {
    return bits == 16 ? gemv_bf16(x, w0, bias) : quant_linear(x, w0, w1, w2, bits, block, bias);
  }
};

// One Llama-family decoder layer for a decode-only step, in one call from Python: the same
// kernels in the same order as DecoderLayer._forward_fused, without the ~10 trips through
// the interpreter per layer (measured: about a quarter of a one-stream step on two cores).
struct DecodeLayer {
  at::Tensor input_norm, post_attention_norm;
  double eps;
  LinearWeights qkv, o, gate_up, down;
  int64_t H, Hkv, D;
  double scale;

  // (this layer's MLP output, the residual stream before it), as DecoderLayer.forward
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor h, c10::optional<at::Tensor> residual, const at::Tensor& cos,
                                         const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                                         const at::Tensor& slots, const at::Tensor& block_tables,
                                         const at::Tensor& seq_lens) const {
    at::Tensor res;
    if (residual.has_value()) {
      res = *residual;
      fused_add_rms_norm(h, res, input_norm, eps);
    } else {
      res = h;
      h = rms_norm(h, input_norm, eps);
    }
    const at::Tensor q = rope_and_write_kv(qkv(h), cos, sin, k_cache, v_cache, slots, H, Hkv, D);
    const at::Tensor attn = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale);
    at::Tensor a = o(attn.view({attn.size(0), H * D}));
    fused_add_rms_norm(a, res, post_attention_norm, eps);
    return {down(silu_and_mul(gate_up(a))), res};
  }
};

// The compute calls run without the GIL: they touch no Python object, and an event loop on
// another thread (the server streaming tokens) must not wait for the GIL until a call
// returns (holding it made AsyncLLM's decode steps 1.6-1.9x longer than LLMEngine's at 80
// streams: the loop's Python ran between the step's calls instead of beside them).
const auto kNoGil = pybind11::call_guard<pybind11::gil_scoped_release>();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<LinearWeights>(m, "LinearWeights")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, c10::optional<at::Tensor>>());
  pybind11::class_<DecodeLayer>(m, "DecodeLayer")
      .def(pybind11::init<at::Tensor, at::Tensor, double, LinearWeights, LinearWeights, LinearWeights, LinearWeights,
                          int64_t, int64_t, int64_t, double>())
      .def("run", &DecodeLayer::run, kNoGil);
  m.def("has_quant_kernels", &has_quant_kernels);
  m.def("quant_linear", &quant_linear, kNoGil);
  m.def("apply_token_bitmask", &apply_token_bitmask, kNoGil);
  m.def("argmax_rows", &argmax_rows, kNoGil);
  m.def("rms_norm", &rms_norm, kNoGil);
  m.def("fused_add_rms_norm", &fused_add_rms_norm, kNoGil);
  m.def("rope_and_write_kv", &rope_and_write_kv, kNoGil);
  m.def("silu_and_mul", &silu_and_mul, kNoGil);
  m.def("paged_decode_attention", &paged_decode_attention, kNoGil);
  m.def("has_bf16_gemv", &has_bf16_gemv);
  m.def("int8_attention_supported", &int8_attention_supported);
  m.def("dequantize_kv_blocks", &dequantize_kv_blocks, kNoGil);
  m.def("advise_huge_pages", &advise_huge_pages);
  m.def("release_openmp_pool", &release_openmp_pool);
  m.def("gemv_supported", &gemv_supported);
  m.def("pack_for_gemv", &pack_for_gemv, kNoGil);
  m.def("gemv_bf16", &gemv_bf16, kNoGil);
}

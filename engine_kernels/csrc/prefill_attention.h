// Prefill attention of one prompt chunk over a bf16 cache [num_blocks, block_size, Hkv, D]
// (AVX512-BF16 builds only, head_dim 64/128/256; elsewhere torch's SDPA runs it): the chunk's n query rows are the last
// n of its C cached positions (its own K/V written there first), each attending causally,
// within `window` if one is set, straight through the block table (no gather).
//
// The call after a tool call is such a chunk: a hundred new tokens over a thousand cached
// ones, where attention costs as much as the linears. torch's SDPA ran it at about 100
// GFLOP/s on two Zen 4 cores (2.7 ms a SmolLM2 layer for 108 rows over 1,100); this kernel
// at 180-260 (1.3 ms); 1.27-1.29x that since a tile's 16 score chains advance together and
// the exps stay in registers (same bits; SmolLM2's layer, 64 rows over 564: 210 -> 165 us,
// docs/performance.md). One task is (query head, 16 query positions), and the 16 positions
// are the 16 lanes of a vector, so that nothing is summed across lanes:
//   scores: q transposed once per task into dword pairs of dims (lane i of qt[dp] holds
//     position i's dims 2dp, 2dp+1); one cached row's dword dp, broadcast, times qt[dp] by
//     vdpbf16ps adds those two dims to 16 positions' scores for that row;
//   softmax online over 16-row tiles (flash attention): lane-wise max, exp, sum; the
//     probabilities rounded to bf16, as the decode kernel's;
//   P.V: the tile's V rows interleaved in pairs, so that a broadcast dword is (v[t][d],
//     v[t+1][d]), against the lanes' (p[t], p[t+1]): one instruction adds two rows to dim d
//     of 16 positions' outputs.
// Within bf16 tolerance of the reference (engine/attention.py's torch_prefills), tested.

#if ENGINE_AVX512 && ENGINE_BF16
template <int P>
void prefill_attention_bf16(bf16* out, const uint16_t* q, const uint16_t* kc, const uint16_t* vc,
                            const int64_t* blocks, int64_t n, int64_t C, int64_t H, int64_t Hkv, int64_t bs,
                            float scale, int64_t window) {
  constexpr int64_t D = 32 * P, DP = D / 2;  // dims, dword pairs of dims
  const int64_t G = H / Hkv, row = Hkv * D, qblocks = (n + 15) / 16;
  int32_t where[D];
  for (int64_t d = 0; d < D; ++d) where[d] = static_cast<int32_t>(pair_dword(d));
  parallel_for(0, H * qblocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t qt[DP][16];
    alignas(64) float acc[D][16];
    alignas(64) uint16_t vbuf[8][D * 2];  // a tile's V rows, interleaved in pairs
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / qblocks, i0 = task % qblocks * 16, m = std::min<int64_t>(16, n - i0);
      const int64_t kvh = h / G, p0 = C - n + i0;  // position of lane 0
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p0 - window + 1) : 0, hi = p0 + m;  // rows [lo, hi)
      for (int64_t dp = 0; dp < DP; ++dp)
        for (int64_t i = 0; i < 16; ++i)
          qt[dp][i] = i < m ? reinterpret_cast<const uint32_t*>(q + ((i0 + i) * H + h) * D)[dp] : 0u;
      std::memset(acc, 0, sizeof(acc));
      const __m512i lane_pos = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(p0)),
                                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      const __m512i window_v = _mm512_set1_epi32(static_cast<int32_t>(window));
      const __mmask16 valid = static_cast<__mmask16>((1u << m) - 1);
      __m512 mx = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
      for (int64_t t0 = lo / 16 * 16; t0 < hi; t0 += 16) {
        const uint16_t* krow[16];
        const uint16_t* vrow[16];
        if (bs % 16 == 0 && t0 + 15 < hi) {  // the tile's rows are consecutive in one block
          const int64_t off = paged_row(blocks, bs, t0) * row + kvh * D;
          for (int64_t r = 0; r < 16; ++r) krow[r] = kc + off + r * row, vrow[r] = vc + off + r * row;
        } else {
          for (int64_t r = 0; r < 16; ++r) {
            const int64_t t = std::min(t0 + r, hi - 1);  // rows past hi: read, masked
            const int64_t off = paged_row(blocks, bs, t) * row + kvh * D;
            krow[r] = kc + off, vrow[r] = vc + off;
          }
        }
        // The 16 rows' scores are 16 independent chains, advanced together one dword pair
        // at a time: a row at a time (8 pairs each) left each chain's latency exposed.
        __m512 s[16];
        for (int64_t r = 0; r < 16; ++r) s[r] = _mm512_setzero_ps();
        for (int64_t dp0 = 0; dp0 < DP; dp0 += 4) {
          for (int j = 0; j < 4; ++j) {
            const __m512bh qv = (__m512bh)_mm512_load_si512(qt[dp0 + j]);
            for (int64_t r = 0; r < 16; ++r)
              s[r] = _mm512_dpbf16_ps(s[r], qv, (__m512bh)_mm512_set1_epi32(
                                                    reinterpret_cast<const int32_t*>(krow[r])[dp0 + j]));
          }
        }
        // Lanes that may not see row t: past their position, before their window, or no position.
        const bool whole = t0 + 15 < p0 && (window <= 0 || t0 > p0 + 15 - window) && m == 16 && t0 + 15 < hi;
        __m512 tmax = mx;
        for (int64_t r = 0; r < 16; ++r) {
          s[r] = _mm512_mul_ps(s[r], _mm512_set1_ps(scale));
          if (!whole) {
            const __m512i t = _mm512_set1_epi32(static_cast<int32_t>(t0 + r));
            __mmask16 sees = _mm512_mask_cmple_epi32_mask(valid, t, lane_pos);
            if (window > 0)
              sees &= _mm512_cmpgt_epi32_mask(t, _mm512_sub_epi32(lane_pos, window_v));
            if (t0 + r >= hi) sees = 0;
            s[r] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), sees, s[r]);
          }
          tmax = _mm512_max_ps(tmax, s[r]);
        }
        // A lane that has seen no row yet keeps max -inf: shift by 0 there (its exps are all 0).
        const __mmask16 seen = _mm512_cmp_ps_mask(tmax, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 shift = _mm512_mask_mov_ps(_mm512_setzero_ps(), seen, tmax);
        const __m512 alpha = f16_exp(F16{_mm512_sub_ps(_mm512_mask_mov_ps(shift, seen, mx), shift)}).v;
        mx = tmax;
        l = _mm512_mul_ps(l, alpha);
        __m512bh p2[8];
        for (int64_t pr = 0; pr < 8; ++pr) {
          __m512 pe = f16_exp(F16{_mm512_sub_ps(s[2 * pr], shift)}).v;
          __m512 po = f16_exp(F16{_mm512_sub_ps(s[2 * pr + 1], shift)}).v;
          pe = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s[2 * pr], _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), pe);
          po = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s[2 * pr + 1], _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), po);
          // bf16 pairs (p[t], p[t+1]) per lane; l sums what P.V weighs: the rounded values
          const __m512i be = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(pe));
          const __m512i bo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(po));
          p2[pr] = (__m512bh)_mm512_or_si512(be, _mm512_slli_epi32(bo, 16));
          l = _mm512_add_ps(l, _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(be, 16)),
                                             _mm512_castsi512_ps(_mm512_slli_epi32(bo, 16))));
        }
        for (int64_t pr = 0; pr < 8; ++pr)
          for (int c = 0; c < P; ++c) {
            const __m512i a = _mm512_loadu_si512(vrow[2 * pr] + 32 * c);
            const __m512i b = _mm512_loadu_si512(vrow[2 * pr + 1] + 32 * c);
            _mm512_store_si512(vbuf[pr] + 64 * c, _mm512_unpacklo_epi16(a, b));
            _mm512_store_si512(vbuf[pr] + 64 * c + 32, _mm512_unpackhi_epi16(a, b));
          }
        for (int64_t d = 0; d < D; ++d) {
          __m512 a = _mm512_mul_ps(_mm512_load_ps(acc[d]), alpha);
          for (int64_t pr = 0; pr < 8; ++pr) {
            const int32_t v2 = reinterpret_cast<const int32_t*>(vbuf[pr])[where[d]];  // (v[t][d], v[t+1][d])
            a = _mm512_dpbf16_ps(a, p2[pr], (__m512bh)_mm512_set1_epi32(v2));
          }
          _mm512_store_ps(acc[d], a);
        }
      }
      alignas(64) float inv[16];
      _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), l));
      for (int64_t i = 0; i < m; ++i) {
        bf16* dst = out + ((i0 + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) store(dst, d, acc[d][i] * inv[i]);
      }
    }
  });
}

// out, q [n, H, D] bf16 (the chunk's rows); caches [blocks, block_size, Hkv, D] bf16; blocks:
// the sequence's block table; C: its cached positions, the chunk's included; D 64, 128, 256.
inline void prefill_attention(void* out, const void* q, const void* k_cache, const void* v_cache,
                              const int64_t* blocks, int64_t n, int64_t C, int64_t H, int64_t Hkv, int64_t D,
                              int64_t block_size, float scale, int64_t window) {
  const auto run = [&](auto kernel) {
    kernel(static_cast<bf16*>(out), static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k_cache),
           static_cast<const uint16_t*>(v_cache), blocks, n, C, H, Hkv, block_size, scale, window);
  };
  switch (D) {
    case 64: return run(prefill_attention_bf16<2>);
    case 128: return run(prefill_attention_bf16<4>);
    case 256: return run(prefill_attention_bf16<8>);
    default: assert(false && "head_dim 64, 128 or 256");
  }
}
#endif

// The int8 KV cache (`EngineConfig.kv_cache_dtype="int8"`; engine_kernels/kv_quant.py holds the
// layout and its plain-torch reference): each head row quantized on its own (code = round(
// value / scale), scale = amax / 127), a layer's cache [num_blocks, Hkv, block_size / 16,
// 16 * (D + 4)] of 16-position tiles, each tile's codes laid out for vpdpbusd and its 16
// fp32 scales after them. Half the bytes of a bf16 cache: decode attention on two cores is
// bound by reading them.
//
// Here: writing rotated K and V into such a cache (the fused RoPE kernel's int8 form), and
// decode attention over it, one task per (sequence, KV head), a tile at a time (the next
// task's K tiles prefetched during the P.V pass, as attention.h's prefetch_task_k):
//   scores: q quantized per head to int8 (amax / 127, as the activations of quant_ops.cpp);
//     a 64-byte load of the K tile is 4 dims of its 16 rows (codes offset by 128: vpdpbusd's
//     unsigned operand), multiplied by those 4 dims of q broadcast: the 16 lanes are the 16
//     rows' dot products, exact in int32, with no horizontal sums (D / 4 instructions a
//     tile per query head); the offset comes back out as one constant per head.
//   P.V: the tile's weights p[t] * scale_v[t] quantized to u8 against their largest (the
//     bf16 kernel rounds probabilities to 8 bits too; AVX2 to 7, see kProbCodeMax); a
//     64-byte load of the V tile is 16 dims of 4 rows (signed codes), multiplied by those
//     4 rows' weights broadcast: 16 dims summed over 4 rows per instruction, exact in
//     int32, scaled into fp32 per tile.
// Written once over vec.h's 16-lane vectors. On AVX2 the K codes' offset cannot go through
// vpmaddubsw (255 x 127 pairs overflow 16 bits): K dots take the sign trick on the signed
// codes instead, and need no offset correction. A sliding window starts at the tile that
// holds its first visible row; the rows before it get probability 0.


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

// As rope_write_kv (elementwise.h), rounding to the model dtype at the same points, then
// each K and V head row quantized into its tile.
template <typename T>
void rope_write_kv_int8_impl(T* qo, const T* src, int64_t n, int64_t stride, const T* cp, const T* sp, uint8_t* kc,
                             uint8_t* vc, const int64_t* sl, int64_t H, int64_t Hkv, int64_t D, int64_t tpb) {
  const int64_t half = D / 2, bs = tpb * kTile, TB = kTile * (D + kScaleBytes);
  parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
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

#if ENGINE_AVX2
// sum (k - 128) q over 4 dims for 16 rows, k in [1, 255] (the stored codes), q in
// [-127, 127]: |q| times k - 128 carrying q's sign (vpmaddubsw pairs stay within 16 bits)
inline I16 dot4_k(I16 acc, B64 k, int32_t q4) {
  const __m256i q = _mm256_set1_epi32(q4), bias = _mm256_set1_epi8(static_cast<char>(0x80)), aq = _mm256_abs_epi8(q);
  return {_mm256_add_epi32(acc.lo, madd_ones(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(_mm256_xor_si256(k.lo, bias), q)))),
          _mm256_add_epi32(acc.hi, madd_ones(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(_mm256_xor_si256(k.hi, bias), q))))};
}
constexpr int32_t kKOffset = 0;  // dot4_k took the offset out
#else
inline I16 dot4_k(I16 acc, B64 k, int32_t q4) { return dot4_u8(acc, k, q4); }
constexpr int32_t kKOffset = 128;  // every dot carries 128 * sum(q): taken out once per tile
#endif

// The 16 scores of one K tile for NG query heads at once (each K load serves them all).
template <int NG, int KW>
inline void tile_scores(const uint8_t* kt, const int32_t* q4, const int32_t* qsum, const float* qscale,
                        float* const* dst) {
  I16 acc[NG];
  for (int g = 0; g < NG; ++g) acc[g] = i16_zero();
  for (int m = 0; m < KW; ++m) {
    const B64 k = b64_load(kt + 64 * m);
    for (int g = 0; g < NG; ++g) acc[g] = dot4_k(acc[g], k, q4[g * KW + m]);
  }
  const F16 kscale = f16_load(reinterpret_cast<const float*>(kt + 64 * KW));
  for (int g = 0; g < NG; ++g) {
    const F16 dots = i16_to_f16(i16_sub(acc[g], i16_set1(qsum[g])));
    f16_store(dst[g], f16_mul(f16_mul(dots, kscale), f16_set1(qscale[g])));
  }
}

// Index of tile `tile` (counted from the sequence's start) of KV head kvh, among a cache's
// [blocks, Hkv, tiles per block] tiles.
inline int64_t tile_offset(const int64_t* blocks, int64_t Hkv, int64_t kvh, int64_t tpb, int64_t tile) {
  return (blocks[tile / tpb] * Hkv + kvh) * tpb + tile % tpb;
}

// D = 64 * NZ.
template <typename T, int NZ>
void decode_attention_int8_impl(T* op, const T* qp, const uint8_t* kp, const uint8_t* vp, const int64_t* bt,
                                const int64_t* lens, int64_t B, int64_t H, int64_t Hkv, int64_t tpb,
                                int64_t max_blocks, float scale, int64_t window) {
  constexpr int64_t D = 64 * NZ, TB = kTile * (D + kScaleBytes);
  constexpr int KW = D / 4, VC = D / 16;  // 64-byte loads per K tile; per 4 rows of a V tile
  const int64_t G = H / Hkv;
  run_decode_tasks(lens, B, H, Hkv, 1, D, window, op, [&] {  // head-major tiles: one KV head a task
    return [&, scores = std::vector<float>(), acc = std::vector<float>(G * D), qscale = std::vector<float>(G),
            q4 = std::vector<int32_t>(G * KW), qsum = std::vector<int32_t>(G),
            toff = std::vector<int64_t>(),  // byte offset of each tile of this task, from its first
            dst = std::vector<float*>(G), stats = std::vector<SoftmaxStats>(G)](
               const DecodeTask& task, const DecodeTask* next, const TaskOutput<T>& o) mutable {
      alignas(64) uint8_t w8[kTile];
      const int64_t b = task.b, kvh = task.kv0, tile0 = task.r0 / kTile;
      const int64_t n = task.r1 - tile0 * kTile, skip = task.r0 - tile0 * kTile;  // rows from tile0's first on
      const int64_t tiles = (n + kTile - 1) / kTile, Lp = tiles * kTile;
      scores.resize(G * Lp);
      acc.assign(G * D, 0.f);
      toff.resize(tiles + kPrefetchTiles);
      const int64_t* blocks = bt + b * max_blocks;
      for (int64_t t = 0; t < tiles; ++t) toff[t] = tile_offset(blocks, Hkv, kvh, tpb, tile0 + t) * TB;
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
        qsum[g] = kKOffset * sum;  // what the K codes' offset adds to every dot
      }
      for (int64_t tile = 0; tile < tiles; ++tile) {
        prefetch_bytes(kp + toff[tile + kPrefetchTiles], TB, true);
        prefetch_bytes(vp + toff[tile], TB, false);
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
        stats[g] = softmax(sg + skip, n - skip);
        std::fill(sg, sg + skip, 0.f);  // before the window
        std::fill(sg + n, sg + Lp, 0.f);  // rows past the task's weigh nothing
      }
      for (int64_t tile = 0; tile < tiles; ++tile) {
        // The next task's K tiles into L2 (a batch of 8 at 532 tokens, cold: 154 -> 131 us a
        // layer on avx512, 234 -> 223 on avx2)
        if (next) {
          const int64_t nt0 = next->r0 / kTile;
          const Slice part = slice_of((next->r1 + kTile - 1) / kTile - nt0, tile, tiles);
          for (int64_t t = part.begin; t < part.end; ++t)
            prefetch_bytes(kp + tile_offset(bt + next->b * max_blocks, Hkv, next->kv0, tpb, nt0 + t) * TB, TB, false);
        }
        const uint8_t* vt = vp + toff[tile];
        const F16 vscale = f16_load(reinterpret_cast<const float*>(vt + kTile * D));
        const int64_t groups = (std::min<int64_t>(kTile, n - tile * kTile) + 3) / 4;  // of 4 rows
        for (int64_t g = 0; g < G; ++g) {
          alignas(64) float w[kTile];
          f16_store(w, f16_mul(f16_load(&scores[g * Lp + tile * kTile]), vscale));
          float wmax = 0.f;
          for (int i = 0; i < kTile; ++i) wmax = std::max(wmax, w[i]);
          if (!(wmax > 0.f)) continue;  // the tile weighs nothing for this head
          const float to_code = kProbCodeMax / wmax;
          for (int i = 0; i < kTile; ++i)  // round half to even, as vcvtps2dq
            w8[i] = static_cast<uint8_t>((w[i] * to_code + 12582912.f) - 12582912.f);
          const int32_t* w4 = reinterpret_cast<const int32_t*>(w8);
          I16 a[VC];
          for (int c = 0; c < VC; ++c) a[c] = i16_zero();
          for (int64_t j = 0; j < groups; ++j)
            for (int c = 0; c < VC; ++c) a[c] = dot4_bu(a[c], w4[j], b64_load(vt + j * 4 * D + 64 * c));
          const F16 unit = f16_set1(wmax / kProbCodeMax);
          float* ag = &acc[g * D];
          for (int c = 0; c < VC; ++c) f16_store(ag + 16 * c, f16_fma(i16_to_f16(a[c]), unit, f16_load(ag + 16 * c)));
        }
      }
      for (int64_t g = 0; g < G; ++g) o.write(task, g, &acc[g * D], stats[g]);
    };
  });
}

// Blocks of an int8 cache as values [n, block_size, Hkv, D] in T: what a prompt chunk with
// earlier context attends to (engine_kernels.kv_quant.read is the reference).
template <typename T>
void dequantize_blocks_impl(T* op, const uint8_t* cp, const int64_t* ids, int64_t n, int64_t Hkv, int64_t tpb,
                            int64_t D, bool is_k) {
  const int64_t TB = kTile * (D + kScaleBytes), bs = tpb * kTile;
  parallel_for(0, n * Hkv * tpb, 4, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / (Hkv * tpb), h = job / tpb % Hkv, tile = job % tpb;
      const uint8_t* tp = cp + ((ids[b] * Hkv + h) * tpb + tile) * TB;
      float scales[kTile];
      std::memcpy(scales, tp + kTile * D, sizeof(scales));
      for (int64_t i = 0; i < kTile; ++i) {
        T* dst = op + ((b * bs + tile * kTile + i) * Hkv + h) * D;
        if (is_k) {  // byte (d / 4) * 64 + 4 i + d % 4, offset by 128
#pragma omp simd
          for (int64_t d = 0; d < D; ++d)
            store(dst, d, static_cast<float>(static_cast<int32_t>(tp[(d / 4) * 64 + 4 * i + d % 4]) - 128) * scales[i]);
        } else {  // byte (i / 4) 4 D + (d / 16) 64 + (d % 16) 4 + i % 4, signed
          const auto* sp = reinterpret_cast<const int8_t*>(tp) + (i / 4) * 4 * D + i % 4;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d)
            store(dst, d, static_cast<float>(sp[(d / 16) * 64 + (d % 16) * 4]) * scales[i]);
        }
      }
    }
  });
}


void rope_write_kv_int8(DType dt, void* q_out, const void* qkv, int64_t T_, int64_t stride, const void* cos,
                        const void* sin, uint8_t* k_cache, uint8_t* v_cache, const int64_t* slots, int64_t H,
                        int64_t Hkv, int64_t D, int64_t tiles_per_block) {
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    rope_write_kv_int8_impl<T>(static_cast<T*>(q_out), static_cast<const T*>(qkv), T_, stride,
                               static_cast<const T*>(cos), static_cast<const T*>(sin), k_cache, v_cache, slots, H,
                               Hkv, D, tiles_per_block);
  });
}

void decode_attention_int8(DType dt, void* out, const void* q, const uint8_t* k_cache, const uint8_t* v_cache,
                           const int64_t* block_tables, const int64_t* seq_lens, int64_t B, int64_t H, int64_t Hkv,
                           int64_t D, int64_t tiles_per_block, int64_t max_blocks, float scale, int64_t window) {
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    T* o = static_cast<T*>(out);
    const T* qp = static_cast<const T*>(q);
    switch (D) {  // the bindings allow 64, 128, 256
      case 64: decode_attention_int8_impl<T, 1>(o, qp, k_cache, v_cache, block_tables, seq_lens, B, H, Hkv,
                                                tiles_per_block, max_blocks, scale, window); break;
      case 128: decode_attention_int8_impl<T, 2>(o, qp, k_cache, v_cache, block_tables, seq_lens, B, H, Hkv,
                                                 tiles_per_block, max_blocks, scale, window); break;
      default: decode_attention_int8_impl<T, 4>(o, qp, k_cache, v_cache, block_tables, seq_lens, B, H, Hkv,
                                                tiles_per_block, max_blocks, scale, window); break;
    }
  });
}

void dequantize_kv_blocks(DType dt, void* out, const uint8_t* cache, const int64_t* block_ids, int64_t n,
                          int64_t Hkv, int64_t tiles_per_block, int64_t D, bool is_k) {
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    dequantize_blocks_impl<T>(static_cast<T*>(out), cache, block_ids, n, Hkv, tiles_per_block, D, is_k);
  });
}

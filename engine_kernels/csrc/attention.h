// Paged decode attention over a model-dtype cache [num_blocks, block_size, Hkv, D]:
// out[b, h] = softmax(q[b, h] . K_b^T * scale) V_b over the last min(seq_lens[b], window)
// tokens, read straight through block_tables (no gather). One task per (sequence, chunk of
// 256 rows or more, KV heads: DecodeTask): its query heads share each row read; a task
// covers every KV head of its rows where the batch gives each core enough tasks
// (kv_heads_per_task; the vec16 form), so that it reads the cache's rows whole; while a
// task's P.V pass reads V from cache, the next task's K rows are prefetched
// (prefetch_task_k). Three forms:
//   - bf16 cache on an AVX512-BF16 build, head_dim 64/128/256: 16-row tiles, vdpbf16ps;
//   - head_dim a multiple of 16 up to 256: 16-lane vectors (vec.h), every ISA level;
//   - any other shape: plain loops.
// An int8 cache goes to kv_int8.h. fp32 sums; the bf16 tile form sums its dot
// products in another order and weighs V by probabilities rounded to bf16 (within bf16
// tolerance of the reference, tested).


// The first visible position of a sequence of L tokens (its query is the last one).
inline int64_t first_visible(int64_t L, int64_t window) { return window > 0 ? std::max<int64_t>(0, L - window) : 0; }

struct AttentionArgs {  // a decode step's attention over a model-dtype cache
  void* out; const void* q; const void* k_cache; const void* v_cache;
  const int64_t* bt; const int64_t* lens;
  int64_t B, H, Hkv, D, bs, max_blocks;
  float scale;
  int64_t window;
};

// The cache row (block * block_size + slot) of position t of the sequence whose block table is `blocks`.
inline int64_t paged_row(const int64_t* blocks, int64_t bs, int64_t t) { return blocks[t / bs] * bs + t % bs; }

// Element offset of row t of KV head kvh of sequence b in a [blocks, block_size, Hkv, D] cache.
inline int64_t row_offset(const AttentionArgs& a, int64_t b, int64_t kvh, int64_t t) {
  return paged_row(a.bt + b * a.max_blocks, a.bs, t) * a.Hkv * a.D + kvh * a.D;
}

// A decode task: rows [r0, r1) of KV heads [kv0, kv1) of sequence b. With one task per
// (sequence, KV head), a batch of one gave SmolLM2's 3 KV heads to 2 cores, one idle a third
// of the time; so a sequence's visible rows are split into max(1, rows / kChunkRows) chunks
// of equal size (cut at multiples of 16), one task each, and the chunks' results merged. The
// cuts follow from the sequence alone, so its result never depends on the rest of the batch
// (nor on how many KV heads a task covers: heads are independent).
constexpr int64_t kChunkRows = 256;  // 128 measured no better
struct DecodeTask {
  int64_t b, kv0, kv1, r0, r1;
  int64_t part;   // its slot among the partial results; -1: the task covers the whole sequence
  int64_t split;  // the index of its (sequence, KV heads) among the split ones
};

// How many tasks' chunks a sequence of L tokens is cut into (above).
inline int64_t decode_chunks(int64_t L, int64_t window) {
  return std::max<int64_t>(1, (L - first_visible(L, window)) / kChunkRows);
}

// KV heads a decode task of the vec16 form covers, over a [blocks, block_size, Hkv, D]
// cache: all of them where the batch's (sequence, chunk) pairs give every core a task (and
// a task has at most max_query_heads query heads), else one. A row holds every KV head of
// its position: a task of one head reads D elements of every Hkv * D, a task of all reads
// the rows whole and computes each row's offset once. SmolLM2 (3 KV heads), 2 cores (Zen 4),
// 30 layers' caches cold, float32 at the AVX2 level, us a layer, old and new builds in
// turns: a batch of 64 at 150 tokens 617 -> 486, at 300 1,149 -> 951, 32 at 200 362 -> 307,
// 8 at 532 264 -> 239 (bf16 237 -> 217); with a task per head and the same prefetches, no
// faster than before. One sequence of under 512 tokens (one chunk) keeps a task per head,
// so that its 3 tasks busy both cores (level with before, within the noise). (The bf16 tile
// form keeps a task per head: all heads a task gained it 1.13x at a batch of 8 at 532
// tokens and nothing at 500.)
inline int64_t kv_heads_per_task(const int64_t* lens, int64_t B, int64_t Hkv, int64_t G, int64_t window,
                                 int64_t max_query_heads) {
  if (Hkv * G > max_query_heads) return 1;
  int64_t pairs = 0;
  for (int64_t b = 0; b < B; ++b) pairs += decode_chunks(lens[b], window);
  return pairs >= omp_get_max_threads() ? Hkv : 1;
}

// The tasks of a decode step, sequence by sequence, KV heads by KV heads, chunk by chunk.
struct DecodePlan {
  std::vector<DecodeTask> tasks;
  std::vector<int64_t> first_part, num_parts;  // of each split (sequence, KV heads)
};

inline DecodePlan plan_decode_tasks(const int64_t* lens, int64_t B, int64_t Hkv, int64_t kv_per_task,
                                    int64_t window) {
  assert(Hkv % kv_per_task == 0);
  DecodePlan plan;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lens[b], first = first_visible(L, window), n = decode_chunks(L, window);
    for (int64_t kv0 = 0; kv0 < Hkv; kv0 += kv_per_task) {
      const int64_t kv1 = kv0 + kv_per_task;
      if (n == 1) {
        plan.tasks.push_back({b, kv0, kv1, first, L, -1, -1});
        continue;
      }
      const int64_t split = static_cast<int64_t>(plan.first_part.size());
      const int64_t part0 = plan.first_part.empty() ? 0 : plan.first_part.back() + plan.num_parts.back();
      plan.first_part.push_back(part0);
      plan.num_parts.push_back(n);
      for (int64_t c = 0; c < n; ++c) {
        const int64_t r0 = c == 0 ? first : (first + c * (L - first) / n) / 16 * 16;
        const int64_t r1 = c == n - 1 ? L : (first + (c + 1) * (L - first) / n) / 16 * 16;
        plan.tasks.push_back({b, kv0, kv1, r0, r1, part0 + c, split});
      }
    }
  }
  return plan;
}

// Where a task's result for its query head g (of Q: head kv0 * G + g of the sequence) goes:
// the output row, or its partial slot of D + 2 floats (the output over its rows alone, then
// their largest score and sum of exps). The task that completes a split (sequence, KV heads),
// on whichever core, merges its parts: each part weighed by its share of the softmax's
// denominator, exp(m_k - M) l_k, in part order.
template <typename T>
struct TaskOutput {
  T* out; float* parts; int64_t H, G, Q, D;  // G query heads a KV head, Q a task
  const DecodePlan* plan;
  std::atomic<int64_t>* remaining;  // parts still running, per split (sequence, KV heads)

  void write(const DecodeTask& task, int64_t g, const float* row, SoftmaxStats st) const {
    if (task.part < 0) {
      T* dst = out + (task.b * H + task.kv0 * G + g) * D;
      for (int64_t d = 0; d < D; ++d) store(dst, d, row[d]);
      return;
    }
    float* slot = parts + (task.part * Q + g) * (D + 2);
    std::memcpy(slot, row, D * sizeof(float));
    slot[D] = st.max, slot[D + 1] = st.sum;
  }

  void finish(const DecodeTask& task) const {
    if (task.part < 0 || remaining[task.split].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    const int64_t p0 = plan->first_part[task.split], np = plan->num_parts[task.split];
    for (int64_t g = 0; g < Q; ++g) {
      float m = -INFINITY, total = 0.f, row[256];  // D <= 256: vec_shape and the tile forms
      for (int64_t k = 0; k < np; ++k) m = std::max(m, parts[((p0 + k) * Q + g) * (D + 2) + D]);
      std::fill(row, row + D, 0.f);
      for (int64_t k = 0; k < np; ++k) {
        const float* slot = parts + ((p0 + k) * Q + g) * (D + 2);
        const float w = std::exp(slot[D] - m) * slot[D + 1];
        total += w;
        for (int64_t d = 0; d < D; ++d) row[d] += w * slot[d];
      }
      T* dst = out + (task.b * H + task.kv0 * G + g) * D;
      for (int64_t d = 0; d < D; ++d) store(dst, d, row[d] / total);
    }
  }
};

// Runs the step's tasks, kv_per_task KV heads each, on every core: each core makes its
// worker (make_worker(), a callable owning its buffers) and calls worker(task, the next task
// on this core or null, output) on its share.
template <typename T, typename F>
void run_decode_tasks(const int64_t* lens, int64_t B, int64_t H, int64_t Hkv, int64_t kv_per_task, int64_t D,
                      int64_t window, T* out, const F& make_worker) {
  const DecodePlan plan = plan_decode_tasks(lens, B, Hkv, kv_per_task, window);
  const int64_t splits = static_cast<int64_t>(plan.num_parts.size()), G = H / Hkv, Q = kv_per_task * G;
  const int64_t parts = splits ? plan.first_part.back() + plan.num_parts.back() : 0;
  std::vector<float> partial(parts * Q * (D + 2));
  std::vector<std::atomic<int64_t>> remaining(splits);
  for (int64_t s = 0; s < splits; ++s) remaining[s].store(plan.num_parts[s], std::memory_order_relaxed);
  const TaskOutput<T> o{out, partial.data(), H, G, Q, D, &plan, remaining.data()};
  const std::vector<DecodeTask>& tasks = plan.tasks;
  parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    auto work = make_worker();
    for (int64_t i = begin; i < end; ++i) {
      work(tasks[i], i + 1 < end ? &tasks[i + 1] : nullptr, o);
      o.finish(tasks[i]);
    }
  });
}

// Part `part` of `parts` of task `next`'s K rows (its KV heads' part of each), into L2. A
// task's P.V pass reads V rows that its Q.K pass brought into cache, so DRAM would idle
// through it, and the next task would then wait on every K row it reads: spread over that
// pass, these prefetches overlap the two. Cold caches, SmolLM2's heads, a batch of 8 at 532
// tokens, us a layer: bf16 tiles 220 -> 180, float32 on avx2 698 -> 461 (avx512 581 ->
// 452), bf16 on avx2 533 -> 340.
template <typename T>
void prefetch_task_k(const AttentionArgs& a, const T* k_cache, const DecodeTask* next, int64_t part, int64_t parts) {
  if (!next) return;
  const Slice s = slice_of(next->r1 - next->r0, part, parts);
  for (int64_t t = next->r0 + s.begin; t < next->r0 + s.end; ++t)
    prefetch_bytes(k_cache + row_offset(a, next->b, next->kv0, t), (next->kv1 - next->kv0) * a.D * int64_t(sizeof(T)),
                   false);
}

template <typename T>
void decode_attention_loops(const AttentionArgs& a) {
  const int64_t B = a.B, H = a.H, D = a.D, Hkv = a.Hkv, G = H / Hkv;
  const int64_t* lens = a.lens;
  const int64_t window = a.window;
  const float scale = a.scale;
  const T* qp = static_cast<const T*>(a.q); T* op = static_cast<T*>(a.out);
  const T* kp = static_cast<const T*>(a.k_cache); const T* vp = static_cast<const T*>(a.v_cache);
  parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), kf(D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv, L = lens[b], t0 = first_visible(L, window), n = L - t0;
      scores.resize(G * n);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = load(qp, (b * H + kvh * G + g) * D + d);
      for (int64_t t = t0; t < L; ++t) {
        const T* krow = kp + row_offset(a, b, kvh, t);
        for (int64_t d = 0; d < D; ++d) kf[d] = load(krow, d);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = &qf[g * D];
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
          scores[g * n + t - t0] = s * (float)scale;
        }
      }
      for (int64_t g = 0; g < G; ++g) softmax(&scores[g * n], n);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = t0; t < L; ++t) {
        const T* vrow = vp + row_offset(a, b, kvh, t);
        for (int64_t d = 0; d < D; ++d) kf[d] = load(vrow, d);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + t - t0];
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

// head_dim % 16 == 0, up to 256, at most 16 query heads per KV head: each K/V row is loaded
// once into 16-lane vectors and used by all G query heads of its group.
constexpr int64_t kVecMaxQ = 16, kVecMaxC = 16;  // query heads a task, 16-lane vectors a row
template <typename T>
void decode_attention_vec(const AttentionArgs& a) {
  const int64_t H = a.H, D = a.D, C = D / 16, G = H / a.Hkv;
  const T* qp = static_cast<const T*>(a.q);
  const T* kp = static_cast<const T*>(a.k_cache); const T* vp = static_cast<const T*>(a.v_cache);
  const int64_t kv_per_task = kv_heads_per_task(a.lens, a.B, a.Hkv, G, a.window, kVecMaxQ);
  run_decode_tasks(a.lens, a.B, H, a.Hkv, kv_per_task, D, a.window, static_cast<T*>(a.out), [&] {
    return [&, scores = std::vector<float>()](const DecodeTask& task, const DecodeTask* next,
                                              const TaskOutput<T>& o) mutable {
      // `heads`, the task's KV heads, is a constant where it is 1: as a variable, its loops cost
      // a sequence alone 1.1x (AVX2)
      const auto attend = [&](auto heads) {
        F16 qv[kVecMaxQ][kVecMaxC], acc[kVecMaxQ][kVecMaxC];
        const int64_t b = task.b, Q = heads * G, t0 = task.r0, L = task.r1, n = L - t0;
        scores.resize(Q * n);
        const F16 sc = f16_set1(a.scale);
        const T* q0 = qp + (b * H + task.kv0 * G) * D;  // the task's Q query heads, one after another
        for (int64_t g = 0; g < Q; ++g)
          for (int64_t c = 0; c < C; ++c) qv[g][c] = f16_mul(f16_load(q0 + g * D + c * 16), sc);
        for (int64_t t = t0; t < L; ++t) {
          const int64_t off = row_offset(a, b, task.kv0, t);
          prefetch_bytes(vp + off, heads * D * int64_t(sizeof(T)), false);  // for the P.V pass
          for (int64_t j = 0; j < heads; ++j) {
            const T* krow = kp + off + j * D;
            F16 kv[kVecMaxC];
            for (int64_t c = 0; c < C; ++c) kv[c] = f16_load(krow + c * 16);
            for (int64_t g = j * G; g < (j + 1) * G; ++g) {
              F16 s = f16_mul(qv[g][0], kv[0]);
              for (int64_t c = 1; c < C; ++c) s = f16_fma(qv[g][c], kv[c], s);
              scores[g * n + t - t0] = f16_sum(s);
            }
          }
        }
        SoftmaxStats stats[kVecMaxQ];
        for (int64_t g = 0; g < Q; ++g) {
          stats[g] = softmax(&scores[g * n], n);
          for (int64_t c = 0; c < C; ++c) acc[g][c] = f16_zero();
        }
        for (int64_t t = t0; t < L; ++t) {
          // the next task's K rows, about one a row (16 rows' worth every 16 rows, a task of
          // every head sent bursts of ~180 prefetches: a batch of 64 at 150 tokens 1.13x slower)
          prefetch_task_k(a, kp, next, t - t0, n);
          const T* vrow = vp + row_offset(a, b, task.kv0, t);
          for (int64_t j = 0; j < heads; ++j) {
            F16 vv[kVecMaxC];
            for (int64_t c = 0; c < C; ++c) vv[c] = f16_load(vrow + j * D + c * 16);
            for (int64_t g = j * G; g < (j + 1) * G; ++g) {
              const F16 p = f16_set1(scores[g * n + t - t0]);
              for (int64_t c = 0; c < C; ++c) acc[g][c] = f16_fma(p, vv[c], acc[g][c]);
            }
          }
        }
        for (int64_t g = 0; g < Q; ++g) {
          alignas(64) float row[16 * kVecMaxC];
          for (int64_t c = 0; c < C; ++c) f16_store(row + c * 16, acc[g][c]);
          o.write(task, g, row, stats[g]);
        }
      };
      if (task.kv1 - task.kv0 == 1) attend(std::integral_constant<int64_t, 1>());
      else attend(task.kv1 - task.kv0);
    };
  });
}

// Where dim d of a row lands among the dwords of two rows interleaved by unpacklo/hi_epi16
// per 32 dims (lane L of a 128-bit lane pair holds dims 8L..8L+3 in the low half, +4..+7 in
// the high): the dword holding (v0[d], v1[d]); so also the lane, among the C accumulators of
// a P.V by vdpbf16ps on such pairs, that sums dim d.
inline int64_t pair_dword(int64_t d) {
  const int64_t c = d / 32, r = d % 32, lane = r / 8, w = r % 8;
  return c * 32 + (w < 4 ? 0 : 16) + lane * 4 + w % 4;
}

#if ENGINE_AVX512 && ENGINE_BF16
// Lane i of the result is the sum of p[i]'s 16 lanes: 45 shuffles and adds for 16 rows,
// where a horizontal sum per row costs about 8 dependent ones.
inline __m512 sum16x16(const __m512 p[16]) {
  __m512 s1[8], s2[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3
    s1[k] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * k], p[2 * k + 1]), _mm512_unpackhi_ps(p[2 * k], p[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: the lane's sum of p[4k], p[4k+1], p[4k+2], p[4k+3]
    const __m512d c = _mm512_castps_pd(s1[2 * k]), d = _mm512_castps_pd(s1[2 * k + 1]);
    s2[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  // add the four 128-bit lanes: a 4x4 transpose of lanes
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x44), _mm512_shuffle_f32x4(s2[0], s2[1], 0xEE));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x44), _mm512_shuffle_f32x4(s2[2], s2[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

// Decode attention over a bf16 cache, 16 cached rows (a tile) at a time, D = 32 * P.
// Scores: q . k by vdpbf16ps on the rows as stored (q is bf16 already; products exact,
// fp32 sums), the tile's 16 partial sums reduced together, scaled after. P.V by vdpbf16ps
// too: the probabilities rounded to bf16 (as the output is), the tile's V rows interleaved
// in pairs once, then per query head one instruction adds two rows for 16 dims, its
// accumulators in registers across the tile (fp32 FMAs on widened rows took 3x the
// instructions: with the cache in L2, 580 -> 390 us per layer at 96 x 315 tokens). Row
// offsets are computed once per task (no division per row), and the rows, scattered over the
// cache, are prefetched a tile ahead (K) and for the P.V pass (V). Measured in the engine
// (every layer's KV cold), a batch of 64 at 65 tokens: 310 -> 240 us per layer from the
// prefetches; 2x before that from the tiling. A sliding window starts at the tile holding
// its first visible row; the rows before it get probability 0.
template <int P>
void decode_attention_bf16(const AttentionArgs& a) {
  constexpr int64_t D = 32 * P, C = D / 16;
  const int64_t H = a.H, bs = a.bs, Hkv = a.Hkv, G = H / Hkv, max_blocks = a.max_blocks;
  const int64_t* bt = a.bt;
  const float scale = a.scale;
  const uint16_t* qp = static_cast<const uint16_t*>(a.q);
  const uint16_t* kp = static_cast<const uint16_t*>(a.k_cache);
  const uint16_t* vp16 = static_cast<const uint16_t*>(a.v_cache);
  const int64_t row = Hkv * D;
  // one KV head a task (kv_heads_per_task)
  run_decode_tasks(a.lens, a.B, H, Hkv, 1, D, a.window, static_cast<bf16*>(a.out), [&] {
    return [&, scores = std::vector<float>(), acc = std::vector<float>(),
            pbuf = std::vector<uint16_t>(),  // the probabilities in bf16, in token pairs
            offs = std::vector<int64_t>(),   // element offset of each cached row's head kvh, from the first tile's
            stats = std::vector<SoftmaxStats>(G)](const DecodeTask& task, const DecodeTask* next,
                                                  const TaskOutput<bf16>& o) mutable {
      alignas(64) uint16_t vbuf[16 * D];  // a tile's V rows, interleaved in pairs
      const int64_t b = task.b, kvh = task.kv0, L = task.r1;
      const int64_t first = task.r0, base = first / 16 * 16;  // rows from base on
      const int64_t n = L - base, tiles = (n + 15) / 16, Lp = tiles * 16, skip = first - base;
      scores.resize(G * Lp);
      pbuf.resize(G * Lp);
      acc.assign(G * D, 0.f);
      offs.resize(Lp + 16);
      const int64_t* blocks = bt + b * max_blocks;
      for (int64_t t = 0, blk = base / bs, in_blk = base % bs; t < n; ++t) {
        offs[t] = (blocks[blk] * bs + in_blk) * row + kvh * D;
        if (++in_blk == bs) { in_blk = 0; ++blk; }
      }
      std::fill(offs.begin() + n, offs.end(), offs[0]);  // rows past L: read, never used
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t t0 = tile * 16;
        for (int64_t i = 0; i < 16; ++i) {
          prefetch_bytes(kp + offs[t0 + 16 + i], 2 * D, true);
          prefetch_bytes(vp16 + offs[t0 + i], 2 * D, false);
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
        stats[g] = softmax(sg + skip, n - skip);
        std::fill(sg, sg + skip, 0.f);  // before the window
        std::fill(sg + n, sg + Lp, 0.f);  // the pad rows of the last pair weigh nothing
        for (int64_t t = 0; t < Lp; t += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(&pbuf[g * Lp + t]), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sg + t)));
      }
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t t0 = tile * 16, pairs = (std::min<int64_t>(16, n - t0) + 1) / 2;
        prefetch_task_k(a, kp, next, tile, tiles);
        // Two rows' words interleaved (unpacklo/hi per 128-bit lane), so that one vdpbf16ps
        // adds p[t] v[t] + p[t+1] v[t+1] for 16 dims; lane j of accumulator 2c (2c+1) is dim
        // 32c + 8(j/4) + j%4 (+4), put back in order at the end (pair_dword).
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
        float ordered[D];
        for (int64_t d = 0; d < D; ++d) ordered[d] = acc[g * D + pair_dword(d)];
        o.write(task, g, ordered, stats[g]);
      }
    };
  });
}
#endif

constexpr bool kBf16Tiles = ENGINE_AVX512 && ENGINE_BF16;

bool vec_shape(int64_t D, int64_t G) { return D % 16 == 0 && D <= 256 && G <= 16; }

const char* decode_attention_name(DType dt, int64_t D, int64_t G) {
  if (kBf16Tiles && has_bf16() && dt == DType::bf16 && (D == 64 || D == 128 || D == 256)) return "bf16_tiles";
  return vec_shape(D, G) ? "vec16" : "loops";
}

void decode_attention(DType dt, void* out, const void* q, const void* k_cache, const void* v_cache,
                      const int64_t* block_tables, const int64_t* seq_lens, int64_t B, int64_t H, int64_t Hkv,
                      int64_t D, int64_t block_size, int64_t max_blocks, float scale, int64_t window) {
  const AttentionArgs a{out, q, k_cache, v_cache, block_tables, seq_lens, B, H, Hkv, D, block_size, max_blocks,
                        scale, window};
#if ENGINE_AVX512 && ENGINE_BF16
  if (dt == DType::bf16 && has_bf16()) {
    switch (D) {
      case 64: return decode_attention_bf16<2>(a);
      case 128: return decode_attention_bf16<4>(a);
      case 256: return decode_attention_bf16<8>(a);
      default: break;
    }
  }
#endif
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (vec_shape(D, H / Hkv)) decode_attention_vec<T>(a);
    else decode_attention_loops<T>(a);
  });
}

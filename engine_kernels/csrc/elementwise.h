// Per-row kernels of a decoder layer, fusing what the torch reference does in several ops:
// RMSNorm (+ the residual add), per-head q/k RMSNorm, RoPE with the K/V write into a
// model-dtype paged cache, and the gated activations (SiLU, tanh-GELU) times up.
// Plain loops the compiler vectorizes for the level's target. fp32 math, rounding to the
// model dtype at the same points as the references (engine_kernels/reference.py):
//   Llama-style norm  w * round(x * inv)             (transformers' LlamaRMSNorm)
//   Gemma-style norm  round(x * inv * (1 + w))       (Gemma3RMSNorm, all in fp32)

template <typename T>
void rms_norm_row(T* out, const T* x, const T* w, int64_t n, float eps, bool gemma) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) { float v = load(x, i); ss += v * v; }
  const float inv = 1.f / std::sqrt(ss / n + eps);
  if (gemma) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store(out, i, load(x, i) * inv * (1.f + load(w, i)));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store(out, i, load(w, i) * round_to<T>(load(x, i) * inv));
  }
}

// Runs f with T = float or bf16, by dtype.
template <typename F>
inline void by_dtype(DType dt, const F& f) {
  if (dt == DType::f32) f(float{});
  else f(bf16{});
}

void rms_norm(DType dt, void* out, const void* x, const void* w, int64_t rows, int64_t n, float eps, bool gemma) {
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        rms_norm_row(static_cast<T*>(out) + t * n, static_cast<const T*>(x) + t * n, static_cast<const T*>(w), n,
                     eps, gemma);
    });
  });
}

// residual = residual + x; x = rms_norm(residual) * w   (both in place)
void fused_add_rms_norm(DType dt, void* x, void* residual, const void* w, int64_t rows, int64_t n, float eps,
                        bool gemma) {
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        T* xr = static_cast<T*>(x) + t * n;
        T* rr = static_cast<T*>(residual) + t * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) store(rr, i, load(rr, i) + load(xr, i));
        rms_norm_row(xr, rr, static_cast<const T*>(w), n, eps, gemma);
      }
    });
  });
}

void head_rms_norm(DType dt, void* qkv, int64_t T_, int64_t stride, const void* qw, const void* kw, int64_t H,
                   int64_t Hkv, int64_t D, float eps, bool gemma) {
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(0, T_, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        for (int64_t h = 0; h < H + Hkv; ++h) {
          T* row = static_cast<T*>(qkv) + t * stride + h * D;
          rms_norm_row(row, row, static_cast<const T*>(h < H ? qw : kw), D, eps, gemma);
        }
    });
  });
}

// Rotates q and k of qkv [T, (H + 2 Hkv) D] (half-split layout); q into q_out [T, H, D], k and
// v into the caches [num_blocks, block_size, Hkv, D] at slots.
void rope_write_kv(DType dt, void* q_out, const void* qkv, int64_t n, int64_t stride, const void* cos,
                   const void* sin, void* k_cache, void* v_cache, const int64_t* slots, int64_t H, int64_t Hkv,
                   int64_t D) {
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t half = D / 2;
    const T* src = static_cast<const T*>(qkv); const T* cp = static_cast<const T*>(cos);
    const T* sp = static_cast<const T*>(sin);
    T* qo = static_cast<T*>(q_out); T* kc = static_cast<T*>(k_cache); T* vc = static_cast<T*>(v_cache);
    parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const T* row = src + t * stride; const T* c = cp + t * D; const T* s = sp + t * D;
        for (int64_t h = 0; h < H + Hkv; ++h) {
          const T* x = row + h * D;
          T* dst = h < H ? qo + (t * H + h) * D : kc + (slots[t] * Hkv + (h - H)) * D;
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = load(x, i), x2 = load(x, i + half);
            store(dst, i, round_to<T>(round_to<T>(x1 * load(c, i)) + round_to<T>(-x2 * load(s, i))));
            store(dst, i + half, round_to<T>(round_to<T>(x2 * load(c, i + half)) + round_to<T>(x1 * load(s, i + half))));
          }
        }
        std::memcpy(vc + slots[t] * Hkv * D, row + (H + Hkv) * D, sizeof(T) * Hkv * D);
      }
    });
  });
}

inline float silu(float g) { return g / (1.f + exp_approx(-g)); }
inline float gelu_tanh(float g) {  // 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh z = 1 - 2 / (e^2z + 1)
  const float z = 0.7978845608028654f * (g + 0.044715f * g * g * g);
  return 0.5f * g * (2.f - 2.f / (exp_approx(2.f * z) + 1.f));
}

// out = act(x[:, :d]) * x[:, d:], act rounded to the model dtype first (as F.silu(g) * u)
template <typename T, bool kGelu>
void act_and_mul_rows(T* out, const T* x, int64_t n, int64_t d) {
  parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const T* g = x + t * 2 * d; const T* u = g + d; T* o = out + t * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const float gv = load(g, i);
        store(o, i, round_to<T>(kGelu ? gelu_tanh(gv) : silu(gv)) * load(u, i));
      }
    }
  });
}

void act_and_mul(DType dt, void* out, const void* x, int64_t rows, int64_t d, bool gelu) {
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (gelu) act_and_mul_rows<T, true>(static_cast<T*>(out), static_cast<const T*>(x), rows, d);
    else act_and_mul_rows<T, false>(static_cast<T*>(out), static_cast<const T*>(x), rows, d);
  });
}

// AVX2 + FMA + F16C kernel (Haswell and later, Zen 1-3): 8 floats per step, the tail through the scalar
// element function compiled for the same ISA, which does the same operations, so the result is identical.
// `out` is written with streaming stores for the reason given in adam_avx512.cpp.
#include "adam_common.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#include "adam_element.h"

namespace ratel::adam {
namespace {

struct Broadcast {
  __m256 grad_scale, decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;
  explicit Broadcast(const Constants& c)
      : grad_scale(_mm256_set1_ps(c.grad_scale)),
        decay(_mm256_set1_ps(c.decay)),
        lerp_coeff(_mm256_set1_ps(c.lerp_coeff)),
        beta2(_mm256_set1_ps(c.beta2)),
        one_minus_beta2(_mm256_set1_ps(c.one_minus_beta2)),
        bias_correction2_sqrt(_mm256_set1_ps(c.bias_correction2_sqrt)),
        eps(_mm256_set1_ps(c.eps)),
        neg_step_size(_mm256_set1_ps(c.neg_step_size)) {}
};

template <Dtype G>
inline __m256 load_grad8(const void* grad, int64_t i) {
  if constexpr (G == Dtype::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(grad) + i);
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(grad) + i));
    if constexpr (G == Dtype::kBFloat16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}

// Same rounding as float_to_bf16 in adam_element.h.
inline __m128i float_to_bf16_8(__m256 x) {
  __m256i bits = _mm256_castps_si256(x);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
  __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  top = _mm256_blendv_epi8(top, _mm256_set1_epi32(0xFFFF), is_nan);
  // Every lane is <= 0xFFFF, so the unsigned-saturating pack is a plain narrowing.
  return _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
}

template <bool Stream>
inline void store_128(__m128i* dst, __m128i x) {
  if constexpr (Stream) {
    _mm_stream_si128(dst, x);
  } else {
    _mm_storeu_si128(dst, x);
  }
}

template <Dtype O, bool Stream>
inline void store_out8(void* out, int64_t i, __m256 p) {
  if constexpr (O != Dtype::kNone) {
    __m128i* dst = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i);
    if constexpr (O == Dtype::kBFloat16) {
      store_128<Stream>(dst, float_to_bf16_8(p));
    } else {
      store_128<Stream>(dst, _mm256_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

// Mirrors adamw_element() in adam_element.h operation by operation.
template <Dtype G, Dtype O, bool Stream>
inline void step8(const Buffers& b, const Constants& c, const Broadcast& k, int64_t i) {
  __m256 g = load_grad8<G>(b.grad, i);
  if (c.has_grad_scale) g = rounded(_mm256_mul_ps(g, k.grad_scale));
  __m256 p = _mm256_loadu_ps(b.master + i);
  if (c.has_decay) p = rounded(_mm256_mul_ps(p, k.decay));
  __m256 m = _mm256_loadu_ps(b.exp_avg + i);
  m = _mm256_fmadd_ps(k.lerp_coeff, _mm256_sub_ps(g, m), c.lerp_from_exp_avg ? m : g);
  __m256 v = _mm256_loadu_ps(b.exp_avg_sq + i);
  v = _mm256_fmadd_ps(_mm256_mul_ps(k.one_minus_beta2, g), g, _mm256_mul_ps(v, k.beta2));
  _mm256_storeu_ps(b.exp_avg + i, m);
  _mm256_storeu_ps(b.exp_avg_sq + i, v);
  __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), k.bias_correction2_sqrt), k.eps);
  p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(k.neg_step_size, m), denom));
  _mm256_storeu_ps(b.master + i, p);
  store_out8<O, Stream>(b.out, i, p);
}

template <Dtype G, Dtype O>
struct Avx2Loop {
  static void run(const Buffers& b, const Constants& c, int64_t begin, int64_t end) {
    const Broadcast k(c);
    int64_t i = begin;
    const bool stream = O != Dtype::kNone && b.stream_out &&
                        (reinterpret_cast<uintptr_t>(static_cast<uint16_t*>(b.out) + begin) % 16) == 0;
    if (stream) {
      for (; i + 8 <= end; i += 8) step8<G, O, true>(b, c, k, i);
      _mm_sfence();
    } else {
      for (; i + 8 <= end; i += 8) step8<G, O, false>(b, c, k, i);
    }
    adamw_elements<G, O>(b, c, i, end);
  }
};

}  // namespace

void adamw_avx2(const Buffers& b, const Constants& c, int64_t begin, int64_t end) {
  dispatch_dtypes<Avx2Loop>(b, c, begin, end);
}

}  // namespace ratel::adam

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // __x86_64__

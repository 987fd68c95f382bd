// AVX-512 kernel (Skylake-SP and later, Zen 4): 16 floats per step, the tail done with masked loads and
// stores so every element goes through the same instructions.
//
// The compute copy `out` is written with non-temporal stores: nothing on the CPU reads it again (it goes to
// the GPU by DMA), and a normal store would first read each line from memory (read-for-ownership), 2 more
// bytes per parameter on a loop that is memory bound. Measured +5-7% on the dev VM (benchmarks/optimizer.py,
// row native_full_cached_stores). master, exp_avg and exp_avg_sq keep normal stores: their lines were just
// loaded, so there is no extra read to save.
//
// NOTE: no AVX512-BF16 instruction is used on purpose. vcvtneps2bf16 flushes subnormal inputs to zero,
// while torch's .to(torch.bfloat16) rounds them; the integer round-to-nearest-even below is exact and costs
// a few integer ops per 16 elements in a loop that waits on memory anyway.
#include "adam_common.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

#include "adam_element.h"

// GCC 12 warns about the deliberately undefined vectors inside its own AVX-512 headers (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace ratel::adam {
namespace {

struct Broadcast {
  __m512 grad_scale, decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;
  explicit Broadcast(const Constants& c)
      : grad_scale(_mm512_set1_ps(c.grad_scale)),
        decay(_mm512_set1_ps(c.decay)),
        lerp_coeff(_mm512_set1_ps(c.lerp_coeff)),
        beta2(_mm512_set1_ps(c.beta2)),
        one_minus_beta2(_mm512_set1_ps(c.one_minus_beta2)),
        bias_correction2_sqrt(_mm512_set1_ps(c.bias_correction2_sqrt)),
        eps(_mm512_set1_ps(c.eps)),
        neg_step_size(_mm512_set1_ps(c.neg_step_size)) {}
};

template <bool Masked>
inline __m512 load_f32(const float* p, __mmask16 mask) {
  if constexpr (Masked) return _mm512_maskz_loadu_ps(mask, p);
  return _mm512_loadu_ps(p);
}

template <bool Masked>
inline void store_f32(float* p, __m512 x, __mmask16 mask) {
  if constexpr (Masked) {
    _mm512_mask_storeu_ps(p, mask, x);
  } else {
    _mm512_storeu_ps(p, x);
  }
}

template <bool Masked>
inline __m256i load_16bit(const uint16_t* p, __mmask16 mask) {
  if constexpr (Masked) return _mm256_maskz_loadu_epi16(mask, p);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

template <bool Masked, bool Stream>
inline void store_16bit(uint16_t* p, __m256i x, __mmask16 mask) {
  if constexpr (Masked) {
    _mm256_mask_storeu_epi16(p, mask, x);
  } else if constexpr (Stream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), x);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
  }
}

template <Dtype G, bool Masked>
inline __m512 load_grad16(const void* grad, int64_t i, __mmask16 mask) {
  if constexpr (G == Dtype::kFloat32) {
    return load_f32<Masked>(static_cast<const float*>(grad) + i, mask);
  } else {
    __m256i h = load_16bit<Masked>(static_cast<const uint16_t*>(grad) + i, mask);
    if constexpr (G == Dtype::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// Same rounding as float_to_bf16 in adam_element.h.
inline __m256i float_to_bf16_16(__m512 x) {
  __m512i bits = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
  __m512i top = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  top = _mm512_mask_mov_epi32(top, is_nan, _mm512_set1_epi32(0xFFFF));
  return _mm512_cvtepi32_epi16(top);
}

template <Dtype O, bool Masked, bool Stream>
inline void store_out16(void* out, int64_t i, __m512 p, __mmask16 mask) {
  if constexpr (O == Dtype::kBFloat16) {
    store_16bit<Masked, Stream>(static_cast<uint16_t*>(out) + i, float_to_bf16_16(p), mask);
  } else if constexpr (O == Dtype::kFloat16) {
    store_16bit<Masked, Stream>(static_cast<uint16_t*>(out) + i,
                                _mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), mask);
  }
}

// Mirrors adamw_element() in adam_element.h operation by operation.
template <Dtype G, Dtype O, bool Masked, bool Stream>
inline void step16(const Buffers& b, const Constants& c, const Broadcast& k, int64_t i, __mmask16 mask) {
  __m512 g = load_grad16<G, Masked>(b.grad, i, mask);
  if (c.has_grad_scale) g = rounded(_mm512_mul_ps(g, k.grad_scale));
  __m512 p = load_f32<Masked>(b.master + i, mask);
  if (c.has_decay) p = rounded(_mm512_mul_ps(p, k.decay));
  __m512 m = load_f32<Masked>(b.exp_avg + i, mask);
  m = _mm512_fmadd_ps(k.lerp_coeff, _mm512_sub_ps(g, m), c.lerp_from_exp_avg ? m : g);
  __m512 v = load_f32<Masked>(b.exp_avg_sq + i, mask);
  v = _mm512_fmadd_ps(_mm512_mul_ps(k.one_minus_beta2, g), g, _mm512_mul_ps(v, k.beta2));
  store_f32<Masked>(b.exp_avg + i, m, mask);
  store_f32<Masked>(b.exp_avg_sq + i, v, mask);
  __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), k.bias_correction2_sqrt), k.eps);
  p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(k.neg_step_size, m), denom));
  store_f32<Masked>(b.master + i, p, mask);
  store_out16<O, Masked, Stream>(b.out, i, p, mask);
}

template <Dtype G, Dtype O>
struct Avx512Loop {
  static void run(const Buffers& b, const Constants& c, int64_t begin, int64_t end) {
    const Broadcast k(c);
    int64_t i = begin;
    // Streaming stores need 32-byte alignment; chunk edges are multiples of 64 elements, so this holds for
    // every full vector of the chunk when it holds for the first.
    const bool stream = O != Dtype::kNone && b.stream_out &&
                        (reinterpret_cast<uintptr_t>(static_cast<uint16_t*>(b.out) + begin) % 32) == 0;
    if (stream) {
      for (; i + 16 <= end; i += 16) step16<G, O, false, true>(b, c, k, i, 0xFFFF);
      _mm_sfence();  // order the weakly-ordered streaming stores before whatever signals "done"
    } else {
      for (; i + 16 <= end; i += 16) step16<G, O, false, false>(b, c, k, i, 0xFFFF);
    }
    if (i < end) step16<G, O, true, false>(b, c, k, i, __mmask16((1u << (end - i)) - 1u));
  }
};

}  // namespace

void adamw_avx512(const Buffers& b, const Constants& c, int64_t begin, int64_t end) {
  dispatch_dtypes<Avx512Loop>(b, c, begin, end);
}

}  // namespace ratel::adam

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // __x86_64__

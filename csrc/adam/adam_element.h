// One element of the AdamW update plus the fp16/bf16 conversions, in plain C++.
//
// NOTE: this header is included *after* a `#pragma GCC target(...)` in the SIMD files, so each translation
// unit compiles its own copy for its own ISA (std::fma becomes one instruction under "fma"). It must stay
// free of #includes for that reason; adam_common.h pulls in what it needs first.
//
// The element function is the reference that the vector loops mirror operation by operation.
#pragma once

namespace ratel::adam {
namespace {

// Keeps the compiler from contracting a product into a later add (GCC contracts by default in GNU mode,
// -ffp-contract=fast). Torch rounds `p * decay` and `g * scale` to float before adding, so we must too.
template <typename T>
inline T rounded(T x) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(x));
#elif defined(__aarch64__)
  asm("" : "+w"(x));
#endif
  return x;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// Round to nearest even, like c10::BFloat16 and torch's vectorized conversion; every NaN becomes 0xFFFF
// because that is what torch's vectorized .to(torch.bfloat16) writes, and `out` must equal it bit for bit.
inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0xFFFF;
  uint32_t u = float_bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Exact (every fp16 value is an fp32 value). A signalling NaN comes back quiet, as vcvtph2ps does.
inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u));
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Subnormal or zero: mantissa * 2^-24 is exact in fp32.
  float magnitude = float(mantissa) * bits_float(0x33800000u);
  return bits_float(sign | float_bits(magnitude));
}

// Round to nearest even, subnormals and overflow to inf included, like vcvtps2ph (which torch uses).
// A NaN keeps its sign and top payload bits and becomes quiet, as vcvtps2ph does.
inline uint16_t float_to_fp16(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((u >> 13) & 0x3FFu));
  if (u >= 0x47800000u) return uint16_t(sign | 0x7C00u);  // >= 65536: inf
  if (u < 0x38800000u) {
    // Below fp16's smallest normal: adding 0.5 lines the fp16 subnormal grid up with fp32's last mantissa
    // bits, and the fp32 add rounds to nearest even for us (this is the classic "denorm magic" trick).
    const float denorm_magic = bits_float(0x3F000000u);
    float shifted = bits_float(u) + denorm_magic;
    return uint16_t(sign | (float_bits(shifted) - 0x3F000000u));
  }
  uint32_t mantissa_odd = (u >> 13) & 1u;
  u += 0xC8000FFFu + mantissa_odd;  // rebias exponent 127 -> 15 and add the rounding bias
  return uint16_t(sign | (u >> 13));  // a carry out of 65504..65535 lands on 0x7C00, i.e. inf
}

template <Dtype D>
inline float load_grad(const void* grad, int64_t i) {
  if constexpr (D == Dtype::kFloat32) return static_cast<const float*>(grad)[i];
  if constexpr (D == Dtype::kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(grad)[i]);
  if constexpr (D == Dtype::kFloat16) return fp16_to_float(static_cast<const uint16_t*>(grad)[i]);
  return 0.0f;
}

template <Dtype D>
inline void store_out(void* out, int64_t i, float value) {
  if constexpr (D == Dtype::kBFloat16) static_cast<uint16_t*>(out)[i] = float_to_bf16(value);
  if constexpr (D == Dtype::kFloat16) static_cast<uint16_t*>(out)[i] = float_to_fp16(value);
}

// The order of operations is torch's vector loop (not its scalar tail, which GCC compiles differently):
//   p = p * decay;  m = fma(coeff, g - m, base);  v = fma((1-beta2)*g, g, v*beta2)
//   p = p + (-step_size * m) / (sqrt(v) / sqrt(bias_correction2) + eps)
template <Dtype G, Dtype O>
inline void adamw_element(const Buffers& b, const Constants& c, int64_t i) {
  float g = load_grad<G>(b.grad, i);
  if (c.has_grad_scale) g = rounded(g * c.grad_scale);
  float p = b.master[i];
  if (c.has_decay) p = rounded(p * c.decay);
  float m = b.exp_avg[i];
  m = std::fma(c.lerp_coeff, g - m, c.lerp_from_exp_avg ? m : g);
  float v = b.exp_avg_sq[i];
  v = std::fma(c.one_minus_beta2 * g, g, v * c.beta2);
  b.exp_avg[i] = m;
  b.exp_avg_sq[i] = v;
  float denom = std::sqrt(v) / c.bias_correction2_sqrt + c.eps;
  p = p + (c.neg_step_size * m) / denom;
  b.master[i] = p;
  store_out<O>(b.out, i, p);
}

template <Dtype G, Dtype O>
inline void adamw_elements(const Buffers& b, const Constants& c, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) adamw_element<G, O>(b, c, i);
}

// Instantiates Body<G, O>::run for the run-time dtypes (no lambdas: they would escape the target pragma).
template <template <Dtype, Dtype> class Body, Dtype G>
inline void dispatch_out_dtype(const Buffers& b, const Constants& c, int64_t begin, int64_t end) {
  switch (b.out_dtype) {
    case Dtype::kBFloat16: return Body<G, Dtype::kBFloat16>::run(b, c, begin, end);
    case Dtype::kFloat16: return Body<G, Dtype::kFloat16>::run(b, c, begin, end);
    default: return Body<G, Dtype::kNone>::run(b, c, begin, end);
  }
}

template <template <Dtype, Dtype> class Body>
inline void dispatch_dtypes(const Buffers& b, const Constants& c, int64_t begin, int64_t end) {
  switch (b.grad_dtype) {
    case Dtype::kBFloat16: return dispatch_out_dtype<Body, Dtype::kBFloat16>(b, c, begin, end);
    case Dtype::kFloat16: return dispatch_out_dtype<Body, Dtype::kFloat16>(b, c, begin, end);
    default: return dispatch_out_dtype<Body, Dtype::kFloat32>(b, c, begin, end);
  }
}

}  // namespace
}  // namespace ratel::adam

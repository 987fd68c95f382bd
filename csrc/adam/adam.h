// CPU AdamW for one flat buffer: shared declarations of the kernels and of the constants they use.
//
// Every kernel (scalar, AVX2, AVX-512) does the same operations in the same order as torch's fused CPU
// AdamW (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, ADAMW mode, fp32 parameters), so the ISA picked at
// run time never changes a bit of the result, and the result equals torch._fused_adamw_ on grad.float().
#pragma once

#include <cstdint>

namespace ratel::adam {

enum class Dtype : int { kNone = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Step constants, computed once per call in double exactly as torch does and then rounded to float: torch
// rounds each of them to float before the vector loop, so rounding them here gives the same fp32 values.
struct Constants {
  float decay;                  // 1 - lr * weight_decay (decoupled weight decay)
  bool has_decay;               // torch skips the multiply when weight_decay == 0
  float lerp_coeff;             // torch's lerp: weight w if |w| < 0.5, else w - 1
  bool lerp_from_exp_avg;       // |w| < 0.5: m + w*(g - m); otherwise g + (w - 1)*(g - m)
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;
  float eps;
  float neg_step_size;          // -lr / (1 - beta1^step)
  float grad_scale;             // gradient multiplier (e.g. 1 / loss scale); skipped when 1
  bool has_grad_scale;
};

struct Buffers {
  float* master;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* out;                    // low-precision copy of the updated master, or nullptr
  Dtype grad_dtype;
  Dtype out_dtype;              // kNone when out is nullptr
  bool stream_out;              // write `out` with non-temporal stores where aligned (large buffers only)
};

// Updates elements [begin, end) of the buffers. Kernels never read or write outside that range.
using Kernel = void (*)(const Buffers&, const Constants&, int64_t begin, int64_t end);

void adamw_scalar(const Buffers&, const Constants&, int64_t begin, int64_t end);
#if defined(__x86_64__)
void adamw_avx2(const Buffers&, const Constants&, int64_t begin, int64_t end);
void adamw_avx512(const Buffers&, const Constants&, int64_t begin, int64_t end);
#endif

}  // namespace ratel::adam

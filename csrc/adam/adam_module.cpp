// ratel._adam: the CPU AdamW update for one flat buffer, bound with pybind11.
//
// Tensors cross as raw addresses plus an element count (no link to torch's C++ ABI); ratel/runtime/cpu_adam.py
// checks dtypes, sizes and contiguity and keeps the tensors alive. This file owns three decisions:
//   1. the step constants, computed in double exactly as torch's fused kernel computes them;
//   2. which ISA runs, picked at run time from CPUID so one wheel serves every x86-64 CPU;
//   3. how the buffer is split over threads; the GIL is released for the whole update.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "adam.h"

namespace py = pybind11;

namespace ratel::adam {
namespace {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512bf16 = false;
};

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) && defined(__GNUC__)
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0), not just CPUID.
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect_cpu_features();
  return features;
}

struct Isa {
  const char* name;
  Kernel kernel;
  bool supported;
};

// Fastest first; "scalar" is always last and always supported.
std::vector<Isa> isas() {
  const CpuFeatures& f = cpu_features();
  std::vector<Isa> list;
#if defined(__x86_64__)
  list.push_back({"avx512", adamw_avx512,
                  f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma && f.f16c && f.avx2});
  list.push_back({"avx2", adamw_avx2, f.avx2 && f.fma && f.f16c});
#endif
  list.push_back({"scalar", adamw_scalar, true});
  return list;
}

Isa select_isa(const std::string& name) {
  for (const Isa& isa : isas()) {
    if (name == "auto" && isa.supported) return isa;
    if (name == isa.name) {
      if (!isa.supported) throw std::invalid_argument("ISA '" + name + "' is not supported by this CPU");
      return isa;
    }
  }
  throw std::invalid_argument("unknown ISA '" + name + "' (expected auto, avx512, avx2 or scalar)");
}

Dtype parse_dtype(const std::string& name, const char* what) {
  if (name == "float32") return Dtype::kFloat32;
  if (name == "bfloat16") return Dtype::kBFloat16;
  if (name == "float16") return Dtype::kFloat16;
  if (name == "none") return Dtype::kNone;
  throw std::invalid_argument(std::string(what) + ": unknown dtype '" + name + "'");
}

// Same expressions, same double precision and same final rounding to float as adam_fused_step_impl in
// torch's FusedAdamKernel.cpp; any difference here would show up as a 1-ulp drift every step.
Constants step_constants(int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                         double grad_scale) {
  const double bias_correction1 = 1 - std::pow(beta1, double(step));
  const double step_size = lr / bias_correction1;
  const double bias_correction2 = 1 - std::pow(beta2, double(step));
  const float lerp_weight = float(1 - beta1);
  Constants c;
  c.has_decay = weight_decay != 0.0;
  c.decay = float(1 - lr * weight_decay);
  c.lerp_from_exp_avg = std::abs(lerp_weight) < 0.5f;
  c.lerp_coeff = c.lerp_from_exp_avg ? lerp_weight : lerp_weight - 1.0f;
  c.beta2 = float(beta2);
  c.one_minus_beta2 = float(1 - beta2);
  c.bias_correction2_sqrt = float(std::sqrt(bias_correction2));
  c.eps = float(eps);
  c.neg_step_size = float(-step_size);
  c.grad_scale = float(grad_scale);
  c.has_grad_scale = c.grad_scale != 1.0f;
  return c;
}

// Streaming stores pay off once `out` no longer fits in the L2 caches; below that a normal store keeps the
// copy in cache for whoever reads it next.
constexpr int64_t kStreamOutMinElements = int64_t(1) << 20;

// Below this many elements per thread, waking a thread costs more than the memory traffic it would share.
constexpr int64_t kMinElementsPerThread = int64_t(1) << 15;
// Chunk edges fall on multiples of 64 elements (256 B of fp32, 128 B of 16-bit data), so two threads
// never write the same cache line of a 64-byte-aligned buffer.
constexpr int64_t kChunkAlign = 64;

void run_threads(Kernel kernel, const Buffers& b, const Constants& c, int64_t numel, int threads) {
  const int64_t useful = std::max<int64_t>(1, (numel + kMinElementsPerThread - 1) / kMinElementsPerThread);
  threads = int(std::min<int64_t>(std::max(threads, 1), useful));
  if (threads == 1) {
    kernel(b, c, 0, numel);
    return;
  }
  int64_t per_chunk = (numel + threads - 1) / threads;
  per_chunk = (per_chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  const int64_t chunks = (numel + per_chunk - 1) / per_chunk;
#pragma omp parallel num_threads(threads)
  {
    // The runtime may give fewer threads than asked (nesting, OMP_THREAD_LIMIT): stride over all chunks.
    const int64_t team = omp_get_num_threads();
    for (int64_t chunk = omp_get_thread_num(); chunk < chunks; chunk += team) {
      const int64_t begin = chunk * per_chunk;
      kernel(b, c, begin, std::min(numel, begin + per_chunk));
    }
  }
}


// Gradient accumulation reads every micro-batch's gradient once more; torch's CPU kernel for the mixed-dtype
// add (fp32 += bf16) ran at 1.8-2.4 G elements/s on the 16-core GPU host (benchmarks/optimizer_paths.py),
// under the rate of the AdamW pass itself. This loop is plain enough for GCC to vectorise at -O3 and runs
// at the speed of a copy (10.9 G/s there).
template <typename Body>
void parallel_chunks(int64_t numel, int threads, Body body) {
  const int64_t useful = std::max<int64_t>(1, (numel + kMinElementsPerThread - 1) / kMinElementsPerThread);
  threads = int(std::min<int64_t>(std::max(threads, 1), useful));
  int64_t per_chunk = (numel + threads - 1) / threads;
  per_chunk = (per_chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  const int64_t chunks = (numel + per_chunk - 1) / per_chunk;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * per_chunk;
    body(chunk, begin, std::min(numel, begin + per_chunk));
  }
}

template <bool kCopy, bool kBf16>
void accumulate_range(float* acc, const void* grad, int64_t begin, int64_t end) {
  if constexpr (kBf16) {
    const uint16_t* g = static_cast<const uint16_t*>(grad);
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits = uint32_t(g[i]) << 16;
      float value;
      std::memcpy(&value, &bits, sizeof(value));
      acc[i] = kCopy ? value : acc[i] + value;
    }
  } else {
    const float* g = static_cast<const float*>(grad);
    for (int64_t i = begin; i < end; ++i) acc[i] = kCopy ? g[i] : acc[i] + g[i];
  }
}

// acc = float(grad) (copy) or acc += float(grad): one fp32 rounding per element, as torch's add_ does.
void accumulate(uintptr_t acc, uintptr_t grad, const std::string& grad_dtype, int64_t numel, bool copy,
                int num_threads) {
  const Dtype dtype = parse_dtype(grad_dtype, "grad");
  if (dtype != Dtype::kFloat32 && dtype != Dtype::kBFloat16) {
    throw std::invalid_argument("accumulate: grad must be float32 or bfloat16");
  }
  if (numel <= 0) return;
  float* a = reinterpret_cast<float*>(acc);
  const void* g = reinterpret_cast<const void*>(grad);
  const bool bf16 = dtype == Dtype::kBFloat16;
  py::gil_scoped_release no_gil;
  parallel_chunks(numel, num_threads, [&](int64_t, int64_t begin, int64_t end) {
    if (copy) {
      bf16 ? accumulate_range<true, true>(a, g, begin, end) : accumulate_range<true, false>(a, g, begin, end);
    } else {
      bf16 ? accumulate_range<false, true>(a, g, begin, end) : accumulate_range<false, false>(a, g, begin, end);
    }
  });
}

std::string adamw_step(uintptr_t master, uintptr_t grad, const std::string& grad_dtype, uintptr_t exp_avg,
                       uintptr_t exp_avg_sq, int64_t numel, int64_t step, double lr, double beta1, double beta2,
                       double eps, double weight_decay, double grad_scale, uintptr_t out,
                       const std::string& out_dtype, int num_threads, const std::string& isa_name,
                       int stream_out) {
  Buffers b;
  b.master = reinterpret_cast<float*>(master);
  b.grad = reinterpret_cast<const void*>(grad);
  b.exp_avg = reinterpret_cast<float*>(exp_avg);
  b.exp_avg_sq = reinterpret_cast<float*>(exp_avg_sq);
  b.out = reinterpret_cast<void*>(out);
  b.grad_dtype = parse_dtype(grad_dtype, "grad");
  b.out_dtype = parse_dtype(out_dtype, "out");
  b.stream_out = stream_out < 0 ? numel >= kStreamOutMinElements : stream_out > 0;
  if (b.grad_dtype == Dtype::kNone) throw std::invalid_argument("grad: dtype 'none' is not allowed");
  if (b.out_dtype == Dtype::kFloat32) throw std::invalid_argument("out: must be bfloat16 or float16");
  // An empty tensor may report address 0, so addresses are only checked when there is work to do.
  if (numel > 0 && (b.out_dtype == Dtype::kNone) != (out == 0)) {
    throw std::invalid_argument("out: give an address together with out_dtype bfloat16/float16, or neither");
  }
  if (numel < 0) throw std::invalid_argument("numel must be >= 0");
  if (step < 1) throw std::invalid_argument("step must be >= 1 (it is incremented before the update)");
  if (numel > 0 && (!master || !grad || !exp_avg || !exp_avg_sq)) {
    throw std::invalid_argument("null buffer address");
  }
  const Isa isa = select_isa(isa_name);
  const Constants c = step_constants(step, lr, beta1, beta2, eps, weight_decay, grad_scale);
  if (numel > 0) {
    py::gil_scoped_release no_gil;
    run_threads(isa.kernel, b, c, numel, num_threads);
  }
  return isa.name;
}

}  // namespace
}  // namespace ratel::adam

PYBIND11_MODULE(_adam, m) {
  using namespace ratel::adam;
  m.doc() = "CPU AdamW for flat fp32 buffers with fused bf16/fp16 gradient read and write-back "
            "(see ratel/runtime/cpu_adam.py).";
  m.def("adamw_step", &adamw_step, py::arg("master"), py::arg("grad"), py::arg("grad_dtype"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("numel"), py::arg("step"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("grad_scale"), py::arg("out"),
        py::arg("out_dtype"), py::arg("num_threads"), py::arg("isa") = "auto", py::arg("stream_out") = -1,
        "Updates master/exp_avg/exp_avg_sq in place (addresses of contiguous buffers of numel elements) and "
        "writes the rounded master to out when given. stream_out: -1 picks non-temporal stores for `out` by "
        "size, 0/1 forces them off/on (for benchmarks). Returns the ISA that ran.");
  m.def("accumulate", &accumulate, py::arg("acc"), py::arg("grad"), py::arg("grad_dtype"), py::arg("numel"),
        py::arg("copy"), py::arg("num_threads"),
        "acc (fp32) = float(grad) when copy, else acc += float(grad); grad float32 or bfloat16.");
  m.def("supported_isas", [] {
    std::vector<std::string> names;
    for (const Isa& isa : isas()) {
      if (isa.supported) names.push_back(isa.name);
    }
    return names;
  }, "ISAs this CPU can run, fastest first.");
  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512dq"] = f.avx512dq;
    d["avx512bf16"] = f.avx512bf16;
    return d;
  }, "CPU features the dispatcher looked at (AVX512-BF16 is reported, never used: see adam_avx512.cpp).");
}

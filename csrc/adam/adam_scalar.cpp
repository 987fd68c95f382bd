// Portable kernel: the reference every SIMD kernel must equal bit for bit, and the path for CPUs (or
// builds) without AVX2. It compiles for the baseline ISA, so std::fma may be a library call: slow, exact.
#include "adam_common.h"
#include "adam_element.h"

namespace ratel::adam {
namespace {

template <Dtype G, Dtype O>
struct ScalarLoop {
  static void run(const Buffers& b, const Constants& c, int64_t begin, int64_t end) {
    adamw_elements<G, O>(b, c, begin, end);
  }
};

}  // namespace

void adamw_scalar(const Buffers& b, const Constants& c, int64_t begin, int64_t end) {
  dispatch_dtypes<ScalarLoop>(b, c, begin, end);
}

}  // namespace ratel::adam

// The row operation and the diagnostics rows on CPU tensors (backend "cpu"): the kernels of
// row_kernels.h, compiled for baseline x86-64 (or the build machine's baseline elsewhere) and,
// on x86-64, once more for AVX2 + FMA, chosen when the CPU has them.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../include/rows_args.h"

namespace pmi {
namespace cpu {
namespace {

template <typename T, typename In>
inline __attribute__((always_inline)) T to_compute(In x) {
  if constexpr (std::is_same_v<In, c10::BFloat16>) {
    // bf16 is the top half of an fp32: a shift, which vectorizes (c10's conversion does not).
    const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return static_cast<T>(f);
  } else {
    return static_cast<T>(x);
  }
}

template <typename In, typename T>
inline __attribute__((always_inline)) In from_compute(T x) {
  return static_cast<In>(x);  // round to nearest even, as torch's casts
}

namespace baseline {
#include "row_kernels.h"
}  // namespace baseline

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PMI_HAS_AVX2_CLONE 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "row_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

bool use_avx2() {
#ifdef PMI_HAS_AVX2_CLONE
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

template <typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{}, float{});
    case DType::kFloat64: return f(double{}, double{});
    case DType::kBFloat16: return f(c10::BFloat16{}, float{});
    case DType::kFloat16: return f(c10::Half{}, float{});
  }
}

}  // namespace

void rows(const RowsArgs& args) {
  with_dtype(args.dtype, [&](auto in, auto acc) {
    using In = decltype(in);
    using T = decltype(acc);
#ifdef PMI_HAS_AVX2_CLONE
    if (use_avx2()) return avx2::rows_typed<In, T>(args);
#endif
    baseline::rows_typed<In, T>(args);
  });
}

void diagnostics(const DiagnosticsArgs& args) {
  with_dtype(args.dtype, [&](auto in, auto acc) {
    using In = decltype(in);
    using T = decltype(acc);
#ifdef PMI_HAS_AVX2_CLONE
    if (use_avx2()) return avx2::diagnostics_typed<In, T>(args);
#endif
    baseline::diagnostics_typed<In, T>(args);
  });
}

}  // namespace cpu
}  // namespace pmi

// What the op binding (csrc/ops.cpp) hands a kernel: plain pointers, strides and options,
// so the CPU and CUDA kernel sources need no torch headers (and nvcc compiles them fast).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "pmi_math.h"

namespace pmi {

enum class DType : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

// pmi_kernels.options.LossOptions.pack(), unpacked: an absent clip or entry_clip is 0.
struct LossOptions {
  bool pmi;
  double beta, clip;
  bool center;
  double temperature, jsd_beta, entry_clip;

  static LossOptions unpack(const std::vector<double>& v) {
    return {v[0] != 0, v[1], v[2], v[3] != 0, v[4], v[5], v[6]};
  }
  PMI_HD int loss_kind() const { return jsd_beta == 0 ? kForwardKL : jsd_beta == 1 ? kReverseKL : kMixedJSD; }
  PMI_HD bool clip_on() const { return pmi && clip > 0; }  // the soft clip, and so kappa, matter
  PMI_HD bool entry_clip_on() const { return entry_clip > 0; }
  PMI_HD bool fast_grad() const { return loss_kind() == kForwardKL && !entry_clip_on(); }

  template <typename T>
  Scalars<T> scalars() const {
    const double c = clip > 0 ? clip : 1.0;
    return {T(1.0 / temperature), T(1.0 / beta), T(c), T(1.0 / c), T(jsd_beta),
            T(jsd_beta < 1 ? std::log1p(-jsd_beta) : 0.0), T(jsd_beta > 0 ? std::log(jsd_beta) : 0.0),
            T(entry_clip)};
  }
  PMI_HD int kappa_source(bool kappa_given) const {
    if (!clip_on()) return kKappaNone;
    if (kappa_given) return kKappaGiven;
    return center ? kKappaMean : kKappaLseDiff;
  }
};

// Which passes run. A vocabulary split between processes runs the last three, gathering
// between them (pmi_kernels/backends/vocab_parallel.py): pass 1 only, writing this shard's
// (max, sum of exp) of s and g; pass 2 from the whole vocabulary's (max, log sum of exp),
// writing the partial slope sum (and forward KL's gradient); pass 3 from the whole slope sum.
enum Phase : int { kPhaseAll = 0, kPhaseLse = 1, kPhaseFromLse = 2, kPhaseGrad = 3 };

// One call of the row operation over `rows` rows of `vocab` logits. s, t, r, a and grad have
// `dtype`; kappa, row_scale, loss, stats and the phases' per-row tensors (lse_in, lse_out
// [rows, 4], slope sums [rows]; contiguous) the compute type (fp32, or fp64 for fp64). Absent
// tensors are nullptr. grad may alias s. Strides are in elements.
struct RowsArgs {
  DType dtype;
  int64_t rows, vocab;
  const void *s, *t, *r, *a;
  int64_t stride_s, stride_t, stride_r, stride_a;
  const void* kappa;
  const bool* mask;
  const void* row_scale;
  int64_t stride_row_scale;
  void* loss;
  void* grad;
  int64_t stride_grad;
  void* stats;  // [rows, kStats], contiguous
  const void* lse_in;
  void* lse_out;
  const void* slope_sum_in;
  void* slope_sum_out;
  LossOptions options;

  PMI_HD int phase() const {
    if (lse_out != nullptr) return kPhaseLse;
    if (lse_in == nullptr) return kPhaseAll;
    return slope_sum_in == nullptr ? kPhaseFromLse : kPhaseGrad;
  }
};

// One call of the diagnostics rows: out is [rows, kDiagnostics] in the compute type. Absent
// streams (only a) are nullptr.
struct DiagnosticsArgs {
  DType dtype;
  int64_t rows, vocab;
  const void *s, *t, *r, *a;
  int64_t stride_s, stride_t, stride_r, stride_a;
  void* out;
  LossOptions options;
};

namespace cpu {
void rows(const RowsArgs& args);
void diagnostics(const DiagnosticsArgs& args);
}  // namespace cpu

namespace cuda {
// Launched on `stream` (a cudaStream_t): nullptr when the launch succeeded, else CUDA's error text.
const char* rows(const RowsArgs& args, void* stream);
const char* diagnostics(const DiagnosticsArgs& args, void* stream);
}  // namespace cuda

}  // namespace pmi

// What the op binding (csrc/ops.cpp) hands a kernel: plain pointers, strides and options,
// so the CPU and CUDA kernel sources need no torch headers (and nvcc compiles them fast).
#pragma once

#include <cmath>
#include <cstdint>

#include "pmi_math.h"

namespace pmi {

enum class DType : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

// pmi_kernels.options.LossOptions, set field by field from the op's named arguments (csrc/ops.cpp,
// loss_options; no defaults here to drift from Python's). clip and entry_clip are optional there:
// has_clip and has_entry_clip say whether they were given.
struct LossOptions {
  bool pmi;
  double beta;
  bool has_clip;
  double clip;
  bool center;
  double temperature;
  double jsd_beta;
  bool has_entry_clip;
  double entry_clip;

  PMI_HD int loss_kind() const { return jsd_beta == 0 ? kForwardKL : jsd_beta == 1 ? kReverseKL : kMixedJSD; }
  PMI_HD bool clip_on() const { return pmi && has_clip; }  // the soft clip, and so kappa, matter
  PMI_HD bool entry_clip_on() const { return has_entry_clip; }
  PMI_HD bool fast_grad() const { return loss_kind() == kForwardKL && !entry_clip_on(); }

  // The kernels' scalars: the one derivation on the C++ side, mirroring
  // pmi_kernels.options.LossOptions.kernel_scalars (tests/test_options.py compares them).
  template <typename T>
  Scalars<T> scalars() const {
    const double c = has_clip ? clip : 1.0;
    Scalars<T> k{};
    k.inv_tau = T(1.0 / temperature);
    k.inv_beta = T(1.0 / beta);
    k.clip = T(c);
    k.inv_clip = T(1.0 / c);
    k.lam = T(jsd_beta);
    k.log_1m_lam = T(jsd_beta < 1 ? std::log1p(-jsd_beta) : 0.0);
    k.log_lam = T(jsd_beta > 0 ? std::log(jsd_beta) : 0.0);
    k.entry_clip = T(has_entry_clip ? entry_clip : 0.0);
    return k;
  }
  PMI_HD int kappa_source(bool kappa_given) const {
    if (!clip_on()) return kKappaNone;
    if (kappa_given) return kKappaGiven;
    return center ? kKappaMean : kKappaLseDiff;
  }
};

// Which passes run, as the op's `phase` argument numbers them (pmi_kernels.backends.contract.Phase).
// A vocabulary split between processes runs the last three, gathering between them
// (pmi_kernels/vocab_parallel.py): pass 1 only, writing this shard's (max, sum of exp) of s and
// g; pass 2 from the whole vocabulary's (max, log sum of exp), writing the partial slope sum (and
// forward KL's gradient); pass 3 from the whole slope sum.
enum Phase : int { kPhaseAll = 0, kPhaseLse = 1, kPhaseFromLse = 2, kPhaseGrad = 3 };

// One call of the row operation over `rows` rows of `vocab` logits. s, t, r, a and grad have
// `dtype`; kappa, row_scale, loss, stats and the phases' per-row tensors (lse_in, lse_out
// [rows, 4], slope sums [rows]; contiguous) the compute type (fp32, or fp64 for fp64). Absent
// tensors are nullptr. grad may alias s. Strides are in elements. The binding (csrc/ops.cpp)
// sets each field by name and checks that `phase` has the tensors it reads and writes.
struct RowsArgs {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, vocab = 0;
  const void* s = nullptr;
  const void* t = nullptr;
  const void* r = nullptr;
  const void* a = nullptr;
  int64_t stride_s = 0, stride_t = 0, stride_r = 0, stride_a = 0;
  const void* kappa = nullptr;
  const bool* mask = nullptr;
  const void* row_scale = nullptr;
  int64_t stride_row_scale = 0;
  void* loss = nullptr;
  void* grad = nullptr;
  int64_t stride_grad = 0;
  void* stats = nullptr;  // [rows, kStats], contiguous
  const void* lse_in = nullptr;
  void* lse_out = nullptr;
  const void* slope_sum_in = nullptr;
  void* slope_sum_out = nullptr;
  Phase phase = kPhaseAll;
  LossOptions options{};
};

// One call of the diagnostics rows: out is [rows, kDiagnostics] in the compute type. Absent
// streams (only a) are nullptr.
struct DiagnosticsArgs {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, vocab = 0;
  const void* s = nullptr;
  const void* t = nullptr;
  const void* r = nullptr;
  const void* a = nullptr;
  int64_t stride_s = 0, stride_t = 0, stride_r = 0, stride_a = 0;
  void* out = nullptr;
  LossOptions options{};
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

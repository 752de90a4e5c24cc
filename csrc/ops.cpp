// The op schema of the C++ and CUDA kernels, their argument checks, and the CPU and CUDA
// implementations registered under it. The Python layer (pmi_kernels/backends/native) checks
// every user-facing argument first; these TORCH_CHECKs guard the op when called directly.
#include <torch/library.h>

#include <ATen/ATen.h>

#ifdef PMI_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <optional>
#include <string>
#include <vector>

#include "include/rows_args.h"

namespace pmi {
namespace {

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "pmi_kernels: logits must be fp16, bf16, fp32 or fp64, got ", x.scalar_type());
  }
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_stream(const char* name, const at::Tensor& x, const at::Tensor& student) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == student.sizes(), "pmi_kernels: ", name, " has shape ", x.sizes(),
              " but student has ", student.sizes());
  TORCH_CHECK(x.scalar_type() == student.scalar_type(), "pmi_kernels: ", name, " has dtype ", x.scalar_type(),
              " but student has ", student.scalar_type());
  TORCH_CHECK(x.device() == student.device(), "pmi_kernels: ", name, " is on ", x.device(), " but student is on ",
              student.device());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "pmi_kernels: ", name, " must be contiguous along the vocabulary");
}

void check_per_row(const char* name, const at::Tensor& x, const at::Tensor& student, at::ScalarType dtype,
                   int64_t columns = 0) {
  const bool shaped = columns == 0 ? x.dim() == 1 && x.size(0) == student.size(0)
                                   : x.dim() == 2 && x.size(0) == student.size(0) && x.size(1) == columns;
  TORCH_CHECK(shaped, "pmi_kernels: ", name, " must have shape [", student.size(0),
              columns ? ", " + std::to_string(columns) : std::string(), "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, "pmi_kernels: ", name, " must have dtype ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == student.device(), "pmi_kernels: ", name, " is on ", x.device(), " but student is on ",
              student.device());
}

// The options from the op's named arguments, each range checked by name.
LossOptions loss_options(bool pmi, double beta, std::optional<double> clip, bool center, double temperature,
                         double jsd_beta, std::optional<double> entry_clip) {
  TORCH_CHECK(beta > 0, "pmi_kernels: bad options: beta must be > 0, got ", beta);
  TORCH_CHECK(temperature > 0, "pmi_kernels: bad options: temperature must be > 0, got ", temperature);
  TORCH_CHECK(!clip || *clip > 0, "pmi_kernels: bad options: clip must be > 0 or None, got ", clip.value_or(0));
  TORCH_CHECK(!entry_clip || *entry_clip > 0, "pmi_kernels: bad options: entry_clip must be > 0 or None, got ",
              entry_clip.value_or(0));
  TORCH_CHECK(jsd_beta >= 0 && jsd_beta <= 1, "pmi_kernels: jsd_beta must be in [0, 1], got ", jsd_beta);
  LossOptions o{};
  o.pmi = pmi;
  o.beta = beta;
  o.has_clip = clip.has_value();
  o.clip = clip.value_or(0.0);
  o.center = center;
  o.temperature = temperature;
  o.jsd_beta = jsd_beta;
  o.has_entry_clip = entry_clip.has_value();
  o.entry_clip = entry_clip.value_or(0.0);
  return o;
}

const void* data_or_null(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->data_ptr() : nullptr;
}

void* mutable_data_or_null(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->data_ptr() : nullptr;
}

int64_t row_stride(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->stride(0) : 0;
}

using OptTensor = std::optional<at::Tensor>;

const char* phase_name(int64_t phase) {
  switch (phase) {
    case kPhaseAll: return "0 (all passes)";
    case kPhaseLse: return "1 (log-sum-exps)";
    case kPhaseFromLse: return "2 (sums from the log-sum-exps)";
    case kPhaseGrad: return "3 (gradient from the slope sum)";
    default: return "unknown";
  }
}

Phase checked_phase(int64_t phase) {
  TORCH_CHECK(phase >= kPhaseAll && phase <= kPhaseGrad,
              "pmi_kernels: phase must be 0 (all passes), 1 (log-sum-exps), 2 (sums from the log-sum-exps) or 3 "
              "(gradient from the slope sum), got ", phase);
  return static_cast<Phase>(phase);
}

void check_phase_tensor(const char* name, const OptTensor& x, const at::Tensor& s, at::ScalarType acc,
                        int64_t columns, Phase phase, bool read_or_written) {
  TORCH_CHECK(x.has_value() == read_or_written, "pmi_kernels: phase ", phase_name(phase),
              read_or_written ? " needs " : " takes no ", name);
  if (!x) return;
  check_per_row(name, *x, s, acc, columns);
  TORCH_CHECK(x->is_contiguous(), "pmi_kernels: ", name, " must be contiguous");
}

// Checks every argument and returns (args, loss); the caller runs the kernel.
std::pair<RowsArgs, at::Tensor> rows_args(const at::Tensor& s, const at::Tensor& t, const OptTensor& r,
                                          const OptTensor& a, const OptTensor& kappa, const OptTensor& mask,
                                          const OptTensor& row_scale, const OptTensor& grad, const OptTensor& stats,
                                          const OptTensor& lse_in, const OptTensor& lse_out,
                                          const OptTensor& slope_sum_in, const OptTensor& slope_sum_out,
                                          Phase phase, const LossOptions& options) {
  TORCH_CHECK(s.dim() == 2, "pmi_kernels: student must be 2-D [rows, vocab], got ", s.sizes());
  TORCH_CHECK(s.size(1) > 0, "pmi_kernels: the vocabulary must not be empty");
  const at::ScalarType acc = compute_type(s);
  RowsArgs args;
  args.dtype = dtype_of(s);
  check_stream("student", s, s);
  check_stream("teacher", t, s);
  if (r) check_stream("refonly", *r, s);
  if (a) check_stream("anchor", *a, s);
  if (grad) check_stream("grad", *grad, s);
  if (kappa) check_per_row("kappa", *kappa, s, acc);
  if (row_scale) check_per_row("row_scale", *row_scale, s, acc);
  if (mask) {
    check_per_row("mask", *mask, s, at::kBool);
    TORCH_CHECK(mask->is_contiguous(), "pmi_kernels: mask must be contiguous");
  }
  if (stats) {
    TORCH_CHECK(stats->dim() == 2 && stats->size(0) == s.size(0) && stats->size(1) == kStats &&
                    stats->is_contiguous() && stats->scalar_type() == acc && stats->device() == s.device(),
                "pmi_kernels: stats must be a contiguous [", s.size(0), ", ", kStats, "] tensor of dtype ", acc);
  }
  TORCH_CHECK(!slope_sum_in || lse_in, "pmi_kernels: slope_sum_in needs lse_in");
  // Each phase reads or writes exactly these of the phases' tensors.
  check_phase_tensor("lse_in", lse_in, s, acc, 4, phase, phase == kPhaseFromLse || phase == kPhaseGrad);
  check_phase_tensor("lse_out", lse_out, s, acc, 4, phase, phase == kPhaseLse);
  check_phase_tensor("slope_sum_in", slope_sum_in, s, acc, 0, phase, phase == kPhaseGrad);
  check_phase_tensor("slope_sum_out", slope_sum_out, s, acc, 0, phase, phase == kPhaseFromLse);
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(acc));
  args.rows = s.size(0);
  args.vocab = s.size(1);
  args.s = s.data_ptr();
  args.t = t.data_ptr();
  args.r = data_or_null(r);
  args.a = data_or_null(a);
  args.stride_s = s.stride(0);
  args.stride_t = t.stride(0);
  args.stride_r = row_stride(r);
  args.stride_a = row_stride(a);
  args.kappa = data_or_null(kappa);
  args.mask = mask ? mask->data_ptr<bool>() : nullptr;
  args.row_scale = data_or_null(row_scale);
  args.stride_row_scale = row_stride(row_scale);
  args.loss = loss.data_ptr();
  args.grad = mutable_data_or_null(grad);
  args.stride_grad = row_stride(grad);
  args.stats = mutable_data_or_null(stats);
  args.lse_in = data_or_null(lse_in);
  args.lse_out = mutable_data_or_null(lse_out);
  args.slope_sum_in = data_or_null(slope_sum_in);
  args.slope_sum_out = mutable_data_or_null(slope_sum_out);
  args.phase = phase;
  args.options = options;
  return {args, loss};
}

std::pair<DiagnosticsArgs, at::Tensor> diagnostics_args(const at::Tensor& s, const at::Tensor& t, const at::Tensor& r,
                                                        const OptTensor& a, const LossOptions& options) {
  TORCH_CHECK(s.dim() == 2 && s.size(1) > 0, "pmi_kernels: student must be 2-D [rows, vocab > 0], got ", s.sizes());
  check_stream("student", s, s);
  check_stream("teacher", t, s);
  check_stream("refonly", r, s);
  if (a) check_stream("anchor", *a, s);
  at::Tensor out = at::empty({s.size(0), kDiagnostics}, s.options().dtype(compute_type(s)));
  DiagnosticsArgs args;
  args.dtype = dtype_of(s);
  args.rows = s.size(0);
  args.vocab = s.size(1);
  args.s = s.data_ptr();
  args.t = t.data_ptr();
  args.r = r.data_ptr();
  args.a = data_or_null(a);
  args.stride_s = s.stride(0);
  args.stride_t = t.stride(0);
  args.stride_r = r.stride(0);
  args.stride_a = row_stride(a);
  args.out = out.data_ptr();
  args.options = options;
  return {args, out};
}

// The kernels for the tensors' device: the CPU's, or the CUDA ones on the current stream.
void run_rows(const RowsArgs& args, const at::Device& device) {
  if (args.rows == 0) return;
#ifdef PMI_WITH_CUDA
  if (device.is_cuda()) {
    const c10::cuda::CUDAGuard guard(device);
    const char* error = cuda::rows(args, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(error == nullptr, "pmi_kernels: the CUDA row kernel failed to launch: ", error);
    return;
  }
#endif
  TORCH_CHECK(device.is_cpu(), "pmi_kernels: no row kernel for ", device, " tensors");
  cpu::rows(args);
}

void run_diagnostics(const DiagnosticsArgs& args, const at::Device& device) {
  if (args.rows == 0) return;
#ifdef PMI_WITH_CUDA
  if (device.is_cuda()) {
    const c10::cuda::CUDAGuard guard(device);
    const char* error = cuda::diagnostics(args, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(error == nullptr, "pmi_kernels: the CUDA diagnostics kernel failed to launch: ", error);
    return;
  }
#endif
  TORCH_CHECK(device.is_cpu(), "pmi_kernels: no diagnostics kernel for ", device, " tensors");
  cpu::diagnostics(args);
}

// pmi_kernels::rows, registered for CPU and CUDA tensors (the dispatcher picks by device).
at::Tensor rows(const at::Tensor& s, const at::Tensor& t, const OptTensor& r, const OptTensor& a,
                const OptTensor& kappa, const OptTensor& mask, const OptTensor& row_scale, const OptTensor& grad,
                const OptTensor& stats, const OptTensor& lse_in, const OptTensor& lse_out,
                const OptTensor& slope_sum_in, const OptTensor& slope_sum_out, int64_t phase, bool pmi, double beta,
                std::optional<double> clip, bool center, double temperature, double jsd_beta,
                std::optional<double> entry_clip) {
  const LossOptions options = loss_options(pmi, beta, clip, center, temperature, jsd_beta, entry_clip);
  auto [args, loss] = rows_args(s, t, r, a, kappa, mask, row_scale, grad, stats, lse_in, lse_out, slope_sum_in,
                                slope_sum_out, checked_phase(phase), options);
  run_rows(args, s.device());
  return loss;
}

at::Tensor diagnostics_rows(const at::Tensor& s, const at::Tensor& t, const at::Tensor& r, const OptTensor& a,
                            bool pmi, double beta, std::optional<double> clip, bool center, double temperature,
                            double jsd_beta, std::optional<double> entry_clip) {
  const LossOptions options = loss_options(pmi, beta, clip, center, temperature, jsd_beta, entry_clip);
  auto [args, out] = diagnostics_args(s, t, r, a, options);
  run_diagnostics(args, s.device());
  return out;
}

// LossOptions::scalars for the compute type `dtype` (fp32 or fp64), in Scalars' field order: what
// tests/test_options.py compares with pmi_kernels.options.LossOptions.kernel_scalars.
at::Tensor kernel_scalars(bool pmi, double beta, std::optional<double> clip, bool center, double temperature,
                          double jsd_beta, std::optional<double> entry_clip, at::ScalarType dtype) {
  const LossOptions o = loss_options(pmi, beta, clip, center, temperature, jsd_beta, entry_clip);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "pmi_kernels: dtype must be float32 or float64, got ",
              dtype);
  auto values = [](const auto& k) {
    return std::vector<double>{double(k.inv_tau), double(k.inv_beta), double(k.clip), double(k.inv_clip),
                               double(k.lam), double(k.log_1m_lam), double(k.log_lam), double(k.entry_clip)};
  };
  const std::vector<double> v = dtype == at::kDouble ? values(o.scalars<double>()) : values(o.scalars<float>());
  return at::tensor(v, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

}  // namespace
}  // namespace pmi

TORCH_LIBRARY(pmi_kernels, m) {
  // grad may alias student: the kernels read every entry before they write it.
  // The phases' tensors (lse_in, lse_out, slope_sum_in, slope_sum_out) serve a vocabulary split
  // between processes: `phase` (csrc/include/rows_args.h, Phase) says which passes run, and each
  // phase takes exactly the ones it reads and writes (0, all passes: none of them).
  // The options are pmi_kernels.options.LossOptions' fields by name; None clips nothing.
  m.def("rows(Tensor student, Tensor teacher, Tensor? refonly, Tensor? anchor, Tensor? kappa, Tensor? mask, "
        "Tensor? row_scale, Tensor(a!)? grad, Tensor(b!)? stats, Tensor? lse_in, Tensor(c!)? lse_out, "
        "Tensor? slope_sum_in, Tensor(d!)? slope_sum_out, *, int phase, bool pmi, float beta, float? clip, "
        "bool center, float temperature, float jsd_beta, float? entry_clip) -> Tensor");
  m.def("diagnostics_rows(Tensor student, Tensor teacher, Tensor refonly, Tensor? anchor, *, bool pmi, float beta, "
        "float? clip, bool center, float temperature, float jsd_beta, float? entry_clip) -> Tensor");
  // For the tests: the kernels' scalars as the C++ side derives them (no tensor in, so no device).
  m.def("kernel_scalars(*, bool pmi, float beta, float? clip, bool center, float temperature, float jsd_beta, "
        "float? entry_clip, ScalarType dtype) -> Tensor",
        &pmi::kernel_scalars);
}

TORCH_LIBRARY_IMPL(pmi_kernels, CPU, m) {
  m.impl("rows", &pmi::rows);
  m.impl("diagnostics_rows", &pmi::diagnostics_rows);
}

#ifdef PMI_WITH_CUDA
TORCH_LIBRARY_IMPL(pmi_kernels, CUDA, m) {
  m.impl("rows", &pmi::rows);
  m.impl("diagnostics_rows", &pmi::diagnostics_rows);
}
#endif

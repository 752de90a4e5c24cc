// The op schema of the C++ and CUDA kernels, their argument checks, and the CPU and CUDA
// implementations registered under it. The Python layer (pmi_kernels/backends/native) checks
// every user-facing argument first; these TORCH_CHECKs guard the op when called directly.
#include <torch/library.h>

#include <ATen/ATen.h>

#ifdef PMI_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

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

LossOptions unpack_options(at::ArrayRef<double> options) {
  TORCH_CHECK(options.size() == 7, "pmi_kernels: options must hold the 7 values of LossOptions.pack(), got ",
              options.size());
  const LossOptions o = LossOptions::unpack(std::vector<double>(options.begin(), options.end()));
  TORCH_CHECK(o.beta > 0 && o.temperature > 0 && o.clip >= 0 && o.entry_clip >= 0, "pmi_kernels: bad options");
  TORCH_CHECK(o.jsd_beta >= 0 && o.jsd_beta <= 1, "pmi_kernels: jsd_beta must be in [0, 1]");
  return o;
}

const void* data_or_null(const c10::optional<at::Tensor>& x) {
  return x.has_value() ? x->data_ptr() : nullptr;
}

int64_t row_stride(const c10::optional<at::Tensor>& x) {
  return x.has_value() ? x->stride(0) : 0;
}

using OptTensor = c10::optional<at::Tensor>;

void check_phase_tensor(const char* name, const OptTensor& x, const at::Tensor& s, at::ScalarType acc,
                        int64_t columns) {
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
                                          at::ArrayRef<double> options) {
  TORCH_CHECK(s.dim() == 2, "pmi_kernels: student must be 2-D [rows, vocab], got ", s.sizes());
  TORCH_CHECK(s.size(1) > 0, "pmi_kernels: the vocabulary must not be empty");
  const DType dtype = dtype_of(s);
  const at::ScalarType acc = compute_type(s);
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
  check_phase_tensor("lse_in", lse_in, s, acc, 4);
  check_phase_tensor("lse_out", lse_out, s, acc, 4);
  check_phase_tensor("slope_sum_in", slope_sum_in, s, acc, 0);
  check_phase_tensor("slope_sum_out", slope_sum_out, s, acc, 0);
  TORCH_CHECK(!slope_sum_in || lse_in, "pmi_kernels: slope_sum_in needs lse_in");
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(acc));
  RowsArgs args{dtype, s.size(0), s.size(1), s.data_ptr(), t.data_ptr(), data_or_null(r), data_or_null(a),
                s.stride(0), t.stride(0), row_stride(r), row_stride(a), data_or_null(kappa),
                mask ? mask->data_ptr<bool>() : nullptr, data_or_null(row_scale), row_stride(row_scale),
                loss.data_ptr(), grad ? grad->data_ptr() : nullptr, row_stride(grad),
                stats ? stats->data_ptr() : nullptr, data_or_null(lse_in),
                lse_out ? lse_out->data_ptr() : nullptr, data_or_null(slope_sum_in),
                slope_sum_out ? slope_sum_out->data_ptr() : nullptr, unpack_options(options)};
  return {args, loss};
}

std::pair<DiagnosticsArgs, at::Tensor> diagnostics_args(const at::Tensor& s, const at::Tensor& t, const at::Tensor& r,
                                                        const OptTensor& a, at::ArrayRef<double> options) {
  TORCH_CHECK(s.dim() == 2 && s.size(1) > 0, "pmi_kernels: student must be 2-D [rows, vocab > 0], got ", s.sizes());
  check_stream("student", s, s);
  check_stream("teacher", t, s);
  check_stream("refonly", r, s);
  if (a) check_stream("anchor", *a, s);
  at::Tensor out = at::empty({s.size(0), kDiagnostics}, s.options().dtype(compute_type(s)));
  DiagnosticsArgs args{dtype_of(s), s.size(0), s.size(1), s.data_ptr(), t.data_ptr(), r.data_ptr(),
                       data_or_null(a), s.stride(0), t.stride(0), r.stride(0), row_stride(a), out.data_ptr(),
                       unpack_options(options)};
  return {args, out};
}

at::Tensor rows_cpu(const at::Tensor& s, const at::Tensor& t, const OptTensor& r, const OptTensor& a,
                    const OptTensor& kappa, const OptTensor& mask, const OptTensor& row_scale, const OptTensor& grad,
                    const OptTensor& stats, const OptTensor& lse_in, const OptTensor& lse_out,
                    const OptTensor& slope_sum_in, const OptTensor& slope_sum_out, at::ArrayRef<double> options) {
  auto [args, loss] = rows_args(s, t, r, a, kappa, mask, row_scale, grad, stats, lse_in, lse_out, slope_sum_in,
                                slope_sum_out, options);
  if (args.rows > 0) cpu::rows(args);
  return loss;
}

at::Tensor diagnostics_cpu(const at::Tensor& s, const at::Tensor& t, const at::Tensor& r,
                           const c10::optional<at::Tensor>& a, at::ArrayRef<double> options) {
  auto [args, out] = diagnostics_args(s, t, r, a, options);
  if (args.rows > 0) cpu::diagnostics(args);
  return out;
}

#ifdef PMI_WITH_CUDA
at::Tensor rows_cuda(const at::Tensor& s, const at::Tensor& t, const OptTensor& r, const OptTensor& a,
                     const OptTensor& kappa, const OptTensor& mask, const OptTensor& row_scale, const OptTensor& grad,
                     const OptTensor& stats, const OptTensor& lse_in, const OptTensor& lse_out,
                     const OptTensor& slope_sum_in, const OptTensor& slope_sum_out, at::ArrayRef<double> options) {
  const c10::cuda::CUDAGuard guard(s.device());
  auto [args, loss] = rows_args(s, t, r, a, kappa, mask, row_scale, grad, stats, lse_in, lse_out, slope_sum_in,
                                slope_sum_out, options);
  if (args.rows > 0) {
    const char* error = cuda::rows(args, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(error == nullptr, "pmi_kernels: the CUDA row kernel failed to launch: ", error);
  }
  return loss;
}

at::Tensor diagnostics_cuda(const at::Tensor& s, const at::Tensor& t, const at::Tensor& r,
                            const c10::optional<at::Tensor>& a, at::ArrayRef<double> options) {
  const c10::cuda::CUDAGuard guard(s.device());
  auto [args, out] = diagnostics_args(s, t, r, a, options);
  if (args.rows > 0) {
    const char* error = cuda::diagnostics(args, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(error == nullptr, "pmi_kernels: the CUDA diagnostics kernel failed to launch: ", error);
  }
  return out;
}
#endif

}  // namespace
}  // namespace pmi

TORCH_LIBRARY(pmi_kernels, m) {
  // grad may alias student: the kernels read every entry before they write it.
  // The phases' tensors (lse_in, lse_out, slope_sum_in, slope_sum_out) serve a vocabulary split
  // between processes (csrc/include/rows_args.h, Phase); absent, the whole operation runs.
  m.def("rows(Tensor student, Tensor teacher, Tensor? refonly, Tensor? anchor, Tensor? kappa, Tensor? mask, "
        "Tensor? row_scale, Tensor(a!)? grad, Tensor(b!)? stats, Tensor? lse_in, Tensor(c!)? lse_out, "
        "Tensor? slope_sum_in, Tensor(d!)? slope_sum_out, float[] options) -> Tensor");
  m.def("diagnostics_rows(Tensor student, Tensor teacher, Tensor refonly, Tensor? anchor, float[] options) -> Tensor");
}

TORCH_LIBRARY_IMPL(pmi_kernels, CPU, m) {
  m.impl("rows", &pmi::rows_cpu);
  m.impl("diagnostics_rows", &pmi::diagnostics_cpu);
}

#ifdef PMI_WITH_CUDA
TORCH_LIBRARY_IMPL(pmi_kernels, CUDA, m) {
  m.impl("rows", &pmi::rows_cuda);
  m.impl("diagnostics_rows", &pmi::diagnostics_cuda);
}
#endif

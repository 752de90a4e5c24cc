// pmi::cuda::rows and pmi::cuda::diagnostics (csrc/include/rows_args.h): the launch for the
// inputs' dtype, whose kernels rows_<dtype>.cu instantiate.
#include "kernels.cuh"

namespace pmi {
namespace cuda {

extern template const char* launch_rows<__nv_bfloat16>(const RowsArgs&, cudaStream_t);
extern template const char* launch_rows<__half>(const RowsArgs&, cudaStream_t);
extern template const char* launch_rows<float>(const RowsArgs&, cudaStream_t);
extern template const char* launch_rows<double>(const RowsArgs&, cudaStream_t);
extern template const char* launch_diagnostics<__nv_bfloat16>(const DiagnosticsArgs&, cudaStream_t);
extern template const char* launch_diagnostics<__half>(const DiagnosticsArgs&, cudaStream_t);
extern template const char* launch_diagnostics<float>(const DiagnosticsArgs&, cudaStream_t);
extern template const char* launch_diagnostics<double>(const DiagnosticsArgs&, cudaStream_t);

const char* rows(const RowsArgs& args, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kBFloat16: return launch_rows<__nv_bfloat16>(args, s);
    case DType::kFloat16: return launch_rows<__half>(args, s);
    case DType::kFloat32: return launch_rows<float>(args, s);
    case DType::kFloat64: return launch_rows<double>(args, s);
  }
  return "unknown dtype";
}

const char* diagnostics(const DiagnosticsArgs& args, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kBFloat16: return launch_diagnostics<__nv_bfloat16>(args, s);
    case DType::kFloat16: return launch_diagnostics<__half>(args, s);
    case DType::kFloat32: return launch_diagnostics<float>(args, s);
    case DType::kFloat64: return launch_diagnostics<double>(args, s);
  }
  return "unknown dtype";
}

}  // namespace cuda
}  // namespace pmi

// The CUDA kernels for __nv_bfloat16 inputs (one dtype per file, so nvcc builds them in parallel).
#include "kernels.cuh"

PMI_INSTANTIATE_CUDA_KERNELS(__nv_bfloat16)

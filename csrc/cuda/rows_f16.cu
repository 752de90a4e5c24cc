// The CUDA kernels for __half inputs (one dtype per file, so nvcc builds them in parallel).
#include "kernels.cuh"

PMI_INSTANTIATE_CUDA_KERNELS(__half)

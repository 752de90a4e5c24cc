// The CUDA kernels for double inputs (one dtype per file, so nvcc builds them in parallel).
#include "kernels.cuh"

PMI_INSTANTIATE_CUDA_KERNELS(double)

// The CUDA kernels for float inputs (one dtype per file, so nvcc builds them in parallel).
#include "kernels.cuh"

PMI_INSTANTIATE_CUDA_KERNELS(float)

"""Optional CUDA build. `PMI_KERNELS_CUDA=1 pip install -e .` compiles csrc/*.cu and csrc/*.cpp
into the extension pmi_kernels._C (for backend="cuda"); without the variable, or with no
sources in csrc/, the package is pure Python + Triton. The metadata is in pyproject.toml."""
import glob
import os

from setuptools import setup


def cuda_build():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if os.environ.get("PMI_KERNELS_CUDA") != "1" or not sources:
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    # sm_90a for Hopper's wgmma and bulk copies; sm_80 so Ampere cards run too.
    nvcc = ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]
    extension = CUDAExtension("pmi_kernels._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc})
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_build())

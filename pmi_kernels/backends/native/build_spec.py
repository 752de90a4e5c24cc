"""What the C++/CUDA extension is built from and with, for both of its builds: setup.py's, ahead of time,
into the installed package as pmi_kernels._C, and extension.py's, just in time, into a cache. Both read
the sources and flags here, so the two builds cannot drift.

setup.py loads this file by its path, before pmi_kernels (or torch) can be imported: only the standard
library is imported at module level.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

# The ahead-of-time build, inside the package, and the file beside it that records what it was built
# against (the loader reads it before loading the library: a library built for another torch is not loaded).
PACKAGE_EXTENSION = "pmi_kernels._C"
BUILD_INFO = "_C.build.json"
# The just-in-time build's library name, in its cache directory.
JIT_NAME = "pmi_kernels_ext"
# Ampere and Hopper (sm_90a: Hopper's own instructions); TORCH_CUDA_ARCH_LIST, when set, replaces them.
DEFAULT_CUDA_ARCHS = "80;90a"
# The oldest Python the abi3 library loads on (pyproject's requires-python); torch's BuildExtension
# defines Py_LIMITED_API for it when the extension is built with py_limited_api=True.
LIMITED_API_TAG = "cp310"
# setup.py's switch: 0 skips the native build (a pure-Python install; the just-in-time build serves),
# 1 requires it (a failed compile fails the install); unset, it is built where torch is importable,
# and a failed compile leaves a pure-Python install with a warning.
BUILD_SWITCH = "PMI_KERNELS_BUILD_NATIVE"


def source_dir() -> Path:
    """csrc/: in a checkout pmi_kernels/csrc links to it; a wheel carries a copy there."""
    return Path(__file__).resolve().parents[2] / "csrc"


def sources(with_cuda: bool, python_module: bool = False) -> List[Path]:
    """The kernel sources; python_module adds the stub that makes the library importable as a module
    (setup.py's build: setuptools exports PyInit__C)."""
    root = source_dir()
    files = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return files + ([root / "python" / "module.cpp"] if python_module else [])


def source_digest() -> str:
    """A hash of every source and header under csrc/: a library built from other sources is not loaded."""
    digest = hashlib.sha256()
    root = source_dir()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".h", ".cuh", ".cpp", ".cu"):
            digest.update(str(path.relative_to(root).as_posix()).encode() + path.read_bytes())
    return digest.hexdigest()


def include_dirs() -> List[Path]:
    return [source_dir()]


def _msvc() -> bool:
    return sys.platform == "win32"


def cxx_flags(with_cuda: bool) -> List[str]:
    """-fno-trapping-math lets the compiler vectorize the kernels' branch-free selects (it changes no
    value: the code reads no floating-point exception flags); -fno-math-errno likewise. OpenMP: on Linux
    the library's (torch's parallel_for, the kernels' `omp simd`); Apple's clang has no OpenMP runtime,
    so there only its `simd` pragmas (parallel_for runs the rows on one thread)."""
    if _msvc():
        flags = ["/O2", "/std:c++17", "/openmp"]
    elif sys.platform == "darwin":
        flags = ["-O3", "-g0", "-std=c++17", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno"]
    else:
        flags = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    return flags + (["-DPMI_WITH_CUDA"] if with_cuda else [])


def ld_flags() -> List[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cuda_archs() -> List[str]:
    """The CUDA architectures built: TORCH_CUDA_ARCH_LIST (torch's own variable, e.g. "8.0;9.0a"), else
    PMI_KERNELS_CUDA_ARCHS (e.g. "80;90a"), else sm_80 and sm_90a."""
    torch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if torch_list:
        archs = torch_list.replace(" ", ";").split(";")
        return [a.replace(".", "").replace("+PTX", "") for a in archs if a]
    return [a for a in os.environ.get("PMI_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";") if a]


def cuda_flags() -> List[str]:
    """nvcc's flags. With TORCH_CUDA_ARCH_LIST set, torch's build adds the -gencode flags itself."""
    archs = cuda_archs()
    gencode = (
        [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    )
    return ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", f"--threads={len(archs)}", *gencode]


def compiler() -> Optional[str]:
    """The C++ compiler a build would run (CXX, else c++, or cl on Windows), with its path; None if absent."""
    name = os.environ.get("CXX") or ("cl" if _msvc() else "c++")
    return shutil.which(name.split()[0])


def nvcc() -> Optional[str]:
    """nvcc, as torch's build finds it (CUDA_HOME, CUDA_PATH, the PATH, /usr/local/cuda); None if absent."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None
    path = Path(CUDA_HOME) / "bin" / ("nvcc.exe" if _msvc() else "nvcc")
    return str(path) if path.exists() else None


def torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


def build_info(with_cuda: bool) -> Dict[str, object]:
    """What a built library depends on, recorded beside it by setup.py and compared by the loader."""
    import torch

    return {
        "torch": torch.__version__,
        "sources": source_digest(),
        "cuda": with_cuda,
        "cxx_flags": cxx_flags(with_cuda),
        "cuda_flags": cuda_flags() if with_cuda else [],
    }

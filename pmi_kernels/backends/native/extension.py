"""Building and loading csrc/ (the C++ kernels, and the CUDA kernels where CUDA is here) as one
torch extension that registers the ops pmi_kernels::rows and pmi_kernels::diagnostics_rows.

It is built just in time, on first use, into a cache (~/.cache/pmi_kernels, or
$PMI_KERNELS_CACHE), with one printed line: an extension must be compiled against the exact
torch that loads it (torch's C++ ABI changes between releases), which a build at install time
in pip's isolated build environment cannot promise. `python -m pmi_kernels.backends.native.build`
builds it ahead of time (the README's commands run it); PMI_KERNELS_NO_EXTENSION=1 turns it off.
A failed build is remembered in the cache, so later processes fall back at once.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch

NAME = "pmi_kernels_ext"
# Ampere and Hopper (sm_90a: Hopper's own instructions).
DEFAULT_CUDA_ARCHS = "80;90a"
HOW_TO_BUILD = ("build it with `python -m pmi_kernels.backends.native.build` (needs a C++17 compiler and ninja; "
                "for the CUDA kernels also nvcc, found through CUDA_HOME)")


def source_dir() -> Path:
    """csrc/: in a checkout pmi_kernels/csrc links to it; a wheel carries a copy there."""
    return Path(__file__).resolve().parents[2] / "csrc"


def cuda_wanted() -> bool:
    """Whether this torch can run CUDA kernels here and nvcc is there to build them."""
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def sources(with_cuda: bool) -> List[Path]:
    root = source_dir()
    files = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    return files + (sorted((root / "cuda").glob("*.cu")) if with_cuda else [])


def cuda_flags() -> List[str]:
    archs = os.environ.get("PMI_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    return ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", f"--threads={len(gencode)}", *gencode]


def build_dir(with_cuda: bool) -> Path:
    """One directory per (sources, flags, torch, Python): a change to any of them rebuilds."""
    digest = hashlib.sha256()
    root = source_dir()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".h", ".cuh", ".cpp", ".cu"):
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    digest.update(" ".join([torch.__version__, sys.version, str(with_cuda), *CPU_FLAGS, *cuda_flags()]).encode())
    cache = Path(os.environ.get("PMI_KERNELS_CACHE", Path.home() / ".cache" / "pmi_kernels"))
    return cache / f"{NAME}-{digest.hexdigest()[:16]}"


# -fno-trapping-math lets the compiler vectorize the kernels' branch-free selects (it changes no
# value: the code reads no floating-point exception flags); -fno-math-errno likewise.
CPU_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]


def _build(target: Path, with_cuda: bool) -> None:
    from torch.utils.cpp_extension import load
    target.mkdir(parents=True, exist_ok=True)
    print(f"pmi_kernels: building the {'C++/CUDA' if with_cuda else 'C++'} kernels once into {target}",
          file=sys.stderr, flush=True)
    load(name=NAME, sources=[str(p) for p in sources(with_cuda)], build_directory=str(target),
         extra_cflags=CPU_FLAGS + (["-DPMI_WITH_CUDA"] if with_cuda else []),
         extra_cuda_cflags=cuda_flags(), extra_ldflags=["-fopenmp"], extra_include_paths=[str(source_dir())],
         is_python_module=False, verbose=False)


@functools.lru_cache(maxsize=None)
def load(force_build: bool = False) -> Optional[str]:
    """Loads the extension (building it first if needed); None when loaded, else why not."""
    if os.environ.get("PMI_KERNELS_NO_EXTENSION") == "1":
        return "the C++/CUDA extension is turned off (PMI_KERNELS_NO_EXTENSION=1)"
    if not source_dir().is_dir():
        return (f"the C++/CUDA sources are not here ({source_dir()}): reinstall pmi_kernels (its wheel carries "
                "them), or from a source checkout")
    with_cuda = cuda_wanted()
    target = build_dir(with_cuda)
    library, failure = target / f"{NAME}.so", target / "BUILD_FAILED"
    if failure.exists() and not force_build:
        return f"the C++/CUDA extension failed to build earlier ({failure}); {HOW_TO_BUILD}"
    try:
        if not library.exists() or force_build:
            _build(target, with_cuda)
        else:
            torch.ops.load_library(str(library))
    except Exception as err:  # noqa: BLE001 (a compiler error can surface as many types)
        failure.write_text(f"{type(err).__name__}: {err}\n")
        return f"the C++/CUDA extension failed to build ({failure}); {HOW_TO_BUILD}"
    _register_fakes()
    _BUILT_WITH_CUDA.append(with_cuda)
    return None


_BUILT_WITH_CUDA: List[bool] = []


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when the extension's kernels run on `device_type` tensors here, else why not."""
    reason = load()
    if reason is not None:
        return reason
    if device_type == "cuda" and not _BUILT_WITH_CUDA[0]:
        return f"the extension was built without its CUDA kernels (this torch or nvcc lacks CUDA); {HOW_TO_BUILD}"
    return None


def _register_fakes() -> None:
    """Shapes for torch.compile: the ops' outputs, with no kernel run."""
    from ...options import compute_dtype

    @torch.library.register_fake("pmi_kernels::rows")
    def _(student, teacher, refonly, anchor, kappa, mask, row_scale, grad, stats, lse_in, lse_out, slope_sum_in,
          slope_sum_out, options):
        return student.new_empty(student.shape[0], dtype=compute_dtype(student.dtype))

    @torch.library.register_fake("pmi_kernels::diagnostics_rows")
    def _(student, teacher, refonly, anchor, options):
        return student.new_empty(student.shape[0], 7, dtype=compute_dtype(student.dtype))

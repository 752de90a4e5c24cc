"""csrc/ compiles where no GPU is: the CUDA kernels with nvcc for sm_80 and sm_90a (with the
flags the extension is built with, and no register spills), and the op binding with its CUDA
registration. So the CUDA sources cannot rot on CPU-only machines and in CI."""

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils.cpp_extension import CUDA_HOME, include_paths

from pmi_kernels.backends.native import extension

CSRC = extension.source_dir()


def cuda_root():
    """The CUDA toolkit: CUDA_HOME, torch's, /usr/local/cuda, or the one around nvcc on the PATH
    (a CPU build of torch reports none)."""
    nvcc = shutil.which("nvcc")
    candidates = [
        os.environ.get("CUDA_HOME"),
        CUDA_HOME,
        "/usr/local/cuda",
        nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
    ]
    for root in candidates:
        if (
            root
            and os.path.exists(os.path.join(root, "bin", "nvcc"))
            and os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))
        ):
            return root
    return None


CUDA_ROOT = cuda_root()
NVCC = CUDA_ROOT and os.path.join(CUDA_ROOT, "bin", "nvcc")
requires_nvcc = pytest.mark.skipif(CUDA_ROOT is None, reason="needs the CUDA toolkit (nvcc)")


def compile_cuda(source, arch, out_dir):
    flags = [f for f in extension.cuda_flags() if not f.startswith(("-gencode", "--threads"))]
    cmd = [
        NVCC,
        *flags,
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-Xptxas",
        "-v",
        "-I",
        str(CSRC),
        "-c",
        str(source),
        "-o",
        os.path.join(out_dir, f"{source.stem}_{arch}.o"),
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


@requires_nvcc
@pytest.mark.parametrize("arch", ["80", "90a"])
def test_cuda_kernels_compile_without_spills(arch, tmp_path):
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources"
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda src: compile_cuda(src, arch, str(tmp_path)), sources))
    for source, result in zip(sources, results):
        assert result.returncode == 0, f"{source.name}:\n{result.stderr[-3000:]}"
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stderr)]
        assert not any(spills), f"{source.name} spills registers:\n{result.stderr[-3000:]}"


@requires_nvcc
def test_op_binding_compiles_with_its_cuda_registration(tmp_path):
    """ops.cpp with PMI_WITH_CUDA: the CPU torch wheel lacks one generated c10/cuda header, which
    a stub stands in for (it only names how c10_cuda was linked)."""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cxx = os.environ.get("CXX", "c++")
    includes = [f"-I{p}" for p in include_paths()] + [
        f"-I{tmp_path}",
        f"-I{os.path.join(CUDA_ROOT, 'include')}",
        f"-I{CSRC}",
    ]
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DPMI_WITH_CUDA", *includes, str(CSRC / "ops.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_build_command_reports_the_kernels():
    env = {k: v for k, v in os.environ.items() if k != "PMI_KERNELS_NO_EXTENSION"}  # built even where turned off
    out = subprocess.run(
        [sys.executable, "-m", "pmi_kernels.backends.native.build"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "kernels ready in" in out.stdout


def test_import_leaves_dynamo_unloaded():
    """`import pmi_kernels` does not import torch._dynamo (with sympy, about as long as importing torch);
    scripts/bench_import.py measures the import."""
    code = "import sys, pmi_kernels; print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_first_call_leaves_dynamo_unloaded():
    """Nor does the first call of either loss (torch.library would import it to wrap the custom ops'
    implementations), nor torch.distributed.tensor (the FSDP2 heads' DTensor: about 1 s, sympy too)."""
    code = (
        "import sys, torch, pmi_kernels\n"
        "s, t, r = (torch.randn(3, 2, 5, requires_grad=i == 0) for i in range(3))\n"
        "pmi_kernels.pmi_kl(s, t, r, backend='torch').backward()\n"
        "w = torch.randn(5, 4, requires_grad=True)\n"
        "h = [torch.randn(3, 4, requires_grad=i == 0) for i in range(3)]\n"
        "pmi_kernels.fused_pmi_kl(h[0], w, h[1], h[2], backend='torch').backward()\n"
        "print('torch._dynamo' in sys.modules, 'torch.distributed.tensor' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_constant_result_mark_is_torchs():
    """The lazy stand-in for torch.compiler.assume_constant_result marks a function as torch's does."""
    import torch

    from pmi_kernels import lazy_dynamo

    def theirs():
        return None

    def ours():
        return None

    torch.compiler.assume_constant_result(theirs)
    lazy_dynamo.assume_constant_result(ours)
    marks = {k: v for k, v in vars(theirs).items() if not k.startswith("__")}
    assert marks and marks == {k: v for k, v in vars(ours).items() if not k.startswith("__")}


def test_extension_is_usable_where_a_compiler_is_present():
    """With a C++ compiler on the PATH the C++ kernel must build and load: a broken csrc/ fails the suite
    instead of dropping backend "cpu" from the tests in silence. PMI_KERNELS_NO_EXTENSION=1 is the deliberate
    way to test without it."""
    import torch

    from pmi_kernels.backends import usable_backends
    from pmi_kernels.backends.native import build_spec

    if os.environ.get("PMI_KERNELS_NO_EXTENSION") == "1":
        pytest.skip("the extension is turned off (PMI_KERNELS_NO_EXTENSION=1)")
    if build_spec.compiler() is None:
        pytest.skip("no C++ compiler on the PATH")
    assert extension.load() is None, extension.load()
    assert "cpu" in usable_backends(torch.device("cpu"))

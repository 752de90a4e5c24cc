"""Test set-up: the Triton interpreter on machines without a GPU, devices and tolerances.

TRITON_INTERPRET must be set before Triton kernels are defined, so before pmi_kernels is
imported: this file runs first. The GPU is never queried at import time of the package.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# (device, backend) pairs that run here: Triton on CPU only under the interpreter.
PATHS = [pytest.param("cpu", "torch", id="cpu-torch")]
if INTERPRET:
    PATHS.append(pytest.param("cpu", "triton", id="cpu-triton"))
if HAS_CUDA:
    PATHS += [pytest.param("cuda", "triton", id="cuda-triton"), pytest.param("cuda", "torch", id="cuda-torch")]


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs on every run; the seed is printed, so a failure can be replayed
    with PMI_TEST_SEED=<seed>."""
    seed = int(os.environ.get("PMI_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    print(f"seed {seed}")

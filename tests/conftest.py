"""Test set-up: the Triton interpreter on machines without a GPU, devices and tolerances.

TRITON_INTERPRET must be set before Triton kernels are defined, so before pmi_kernels is
imported: this file runs first. The GPU is never queried at import time of the package.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pmi_kernels.backends import usable_backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# (device, backend): every backend of the registry that runs here, on each device here.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
PATHS = [
    pytest.param(device, name, id=f"{device}-{name}")
    for device in DEVICES
    for name in usable_backends(torch.device(device))
]


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs on every run; the seed is printed, so a failure can be replayed
    with PMI_TEST_SEED=<seed>."""
    seed = int(os.environ.get("PMI_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    print(f"seed {seed}")


@pytest.fixture(autouse=True)
def _narrow_interpreter_tiles(monkeypatch):
    """Under the interpreter a tile may span a whole test-sized vocabulary, which would leave
    the kernels' cross-tile logic (online log-sum-exp rescaling, sums over tiles) untested on
    CPU: 256-wide tiles make every V above 256 cross several, as 2,048-wide ones do on a GPU."""
    if INTERPRET:
        import pmi_kernels.backends.triton.row_kernel as triton_rows

        monkeypatch.setattr(triton_rows, "INTERPRETER_BLOCK_V", 256)

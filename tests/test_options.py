"""LossOptions: built by keyword only, and the kernel scalars it derives for the Triton kernels
(LossOptions.kernel_scalars) equal the C++ side's (LossOptions::scalars in
csrc/include/rows_args.h), bit for bit, at options that set every scalar."""

import dataclasses

import pytest
import torch

from pmi_kernels.options import KernelScalars, LossOptions

# Each scalar away from its default at least once: 1/τ, 1/β, the clip (and none), λ at both ends
# (where log(1 - λ) or log λ is -inf and stands as 0) and inside, the entry clip (and none).
OPTIONS = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(temperature=0.7, beta=0.6, clip=1.5, jsd_beta=0.3), id="mixed"),
    pytest.param(dict(jsd_beta=0.0, clip=None, center=False), id="forward-kl-no-clip"),
    pytest.param(dict(jsd_beta=1.0, temperature=1.3, entry_clip=1e-3), id="reverse-kl-entry-clip"),
    pytest.param(dict(pmi=False, beta=2.5, clip=0.25, jsd_beta=0.9, entry_clip=7.0), id="opsd"),
]


def test_positional_options_are_a_type_error():
    """LossOptions(True, 1.0, ...) read the options by position, where two swapped floats pass."""
    with pytest.raises(TypeError):
        LossOptions(True, 1.0)
    with pytest.raises(TypeError):
        LossOptions(True)
    assert LossOptions(pmi=True, beta=1.0) == LossOptions()


@pytest.mark.parametrize("kwargs", OPTIONS)
def test_kernel_scalars_are_the_options(kwargs):
    opts = LossOptions(**{"pmi": True, **kwargs})
    k = opts.kernel_scalars()
    assert k.inv_tau == 1 / opts.temperature and k.inv_beta == 1 / opts.beta
    assert k.clip == (opts.clip or 1.0) and k.inv_clip == 1 / k.clip and k.lam == opts.jsd_beta
    assert k.entry_clip == (opts.entry_clip or 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", OPTIONS)
def test_python_and_cpp_kernel_scalars_agree(kwargs, dtype):
    from pmi_kernels.backends.native import extension

    reason = extension.load()
    if reason is not None:
        pytest.skip(reason)
    opts = LossOptions(**{"pmi": True, **kwargs})
    cpp = torch.ops.pmi_kernels.kernel_scalars(**opts.op_arguments(), dtype=dtype)
    python = torch.tensor(list(opts.kernel_scalars()), dtype=torch.float64).to(dtype)
    assert cpp.dtype == dtype and cpp.shape == (len(KernelScalars._fields),)
    for name, c, p in zip(KernelScalars._fields, cpp.tolist(), python.tolist()):
        assert c == p, f"{name}: C++ {c!r}, Python {p!r} ({dataclasses.asdict(opts)})"

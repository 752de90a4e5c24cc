"""torch.library.opcheck on the library's two Python custom ops, pmi_kernels::pmi_kl_rows and
pmi_kernels::fused_pmi_kl_rows: their schemas, fakes (shapes, dtypes, strides), autograd
registration and traced (AOT, dynamic shapes) runs agree with the real kernels, on every CPU
backend of the registry that runs here, over option sets with and without clips, masks and
statistics."""

import pytest
import torch

from pmi_kernels.backends import usable_backends
from pmi_kernels.ops.fused import fused_pmi_kl_rows
from pmi_kernels.ops.logits import pmi_kl_rows
from pmi_kernels.options import LossOptions

BACKENDS = [name for name in ("torch", "cpu") if name in usable_backends(torch.device("cpu"))]
ALL_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
ROWS, VOCAB, HIDDEN = 6, 37, 8
MASK = [True, False, True, True, False, True]


def case(id, options=None, **settings):
    return pytest.param(dict(options or {}), settings, id=id)


# (loss options, settings): each case varies a few of them, so that every option set, the
# mask, the statistics and the streams given are each covered without their full product.
LOGITS_CASES = [
    case("defaults"),
    case("no-clip-forward-kl-mask-stats", dict(clip=None, center=False, jsd_beta=0.0), masked=True, want_stats=True),
    case("clip-no-center-reverse-kl-opsd", dict(clip=2.0, center=False, jsd_beta=1.0, temperature=1.3), pmi=False),
    case("entry-clip-mask", dict(entry_clip=1e-3, beta=0.7), masked=True),
    case("anchor-stats", dict(jsd_beta=0.3), anchor=True, want_stats=True),
]
FUSED_CASES = [
    case("defaults-everything", wanted=(True, True, True, True)),
    case(
        "no-clip-forward-kl-mask",
        dict(clip=None, center=False, jsd_beta=0.0),
        masked=True,
        wanted=(True, True, False, False),
    ),
    case(
        "clip-no-center-bf16-fp32-weight",
        dict(clip=2.0, center=False, jsd_beta=1.0, temperature=1.3),
        dtype=torch.bfloat16,
        wanted=(True, True, True, True),
    ),
    case(
        "entry-clip-anchor-mask-stats",
        dict(entry_clip=1e-3, beta=0.7),
        anchor=True,
        masked=True,
        wanted=(False, False, False, True),
    ),
    case("opsd-grad-h", pmi=False, wanted=(True, False, False, False)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options,settings", LOGITS_CASES)
@pytest.mark.parametrize("compute_grad", [False, True], ids=["grad-in-backward", "grad-in-forward"])
def test_pmi_kl_rows(backend, options, settings, compute_grad):
    """With compute_grad the backward rescales, in place, the gradient the forward returned
    (pmi_kl discards that output, so the tensor is the backward's): eager's output [1] then
    differs from a traced run's after the backward, which test_aot_dispatch_dynamic compares.
    The traced backward of that case runs in the torch.compile tests (test_pmi_kl.py)."""
    pmi = settings.get("pmi", True)
    student, teacher, refonly, anchor = (torch.randn(ROWS, VOCAB, dtype=torch.float64) * 3 for _ in range(4))
    args = (
        student.requires_grad_(True),
        teacher,
        refonly if pmi else None,
        anchor if settings.get("anchor") else None,
        torch.tensor(MASK) if settings.get("masked") else None,
        torch.full((ROWS,), 1 / ROWS, dtype=torch.float64),
    )
    kwargs = dict(
        LossOptions(pmi=pmi, **options).op_arguments(),
        backend=backend,
        compute_grad=compute_grad,
        want_stats=settings.get("want_stats", False),
        group=None,
        workspace_bytes=4 * VOCAB * 8 * 20,
    )  # several chunks on the torch backend
    utils = ALL_TESTS[:-1] if compute_grad else ALL_TESTS
    torch.library.opcheck(pmi_kl_rows, args, kwargs, test_utils=utils)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options,settings", FUSED_CASES)
def test_fused_pmi_kl_rows(backend, options, settings):
    """The op has no autograd of its own (ops/fused.py's Function wraps it): inputs without
    gradients, its gradients as outputs."""
    dtype, pmi = settings.get("dtype", torch.float32), settings.get("pmi", True)
    h, h_t, h_r, h_a = (torch.randn(ROWS, HIDDEN, dtype=torch.float64).to(dtype) for _ in range(4))
    w, w_f = ((torch.randn(VOCAB, HIDDEN, dtype=torch.float64) * HIDDEN**-0.5 * 4).to(dtype) for _ in range(2))
    b = torch.randn(VOCAB, dtype=torch.float64).to(dtype)
    args = (
        h,
        w,
        b,
        h_t,
        h_r if pmi else None,
        h_a if settings.get("anchor") else None,
        w_f,
        None,
        torch.tensor(MASK) if settings.get("masked") else None,
        torch.full((ROWS,), 1 / ROWS),
    )
    want_h, want_w, want_b, want_stats = settings["wanted"]
    kwargs = dict(
        LossOptions(pmi=pmi, **options).op_arguments(),
        backend=backend,
        group=None,
        chunk_rows=4,
        grad_weight_fp32=dtype == torch.bfloat16,
        want_h=want_h,
        want_w=want_w,
        want_b=want_b,
        want_stats=want_stats,
    )
    torch.library.opcheck(fused_pmi_kl_rows, args, kwargs)

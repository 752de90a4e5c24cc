"""torch.library.opcheck on the C++ ops, pmi_kernels::rows and pmi_kernels::diagnostics_rows
(the CPU kernels): schema (the mutated outputs declared), fake kernels (shapes for
torch.compile), and AOT dispatch, for each phase of the row operation and a few option sets,
every argument by its schema name."""

import dataclasses

import pytest
import torch

from helpers import streams
from pmi_kernels.backends.contract import Phase
from pmi_kernels.options import LossOptions

N, V = 3, 40


@pytest.fixture(autouse=True)
def _needs_the_extension():
    from pmi_kernels.backends.native import extension

    reason = extension.load()
    if reason is not None:
        pytest.skip(reason)


OPTIONS = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(jsd_beta=0.0, clip=None), id="forward-kl-no-clip"),
    pytest.param(dict(jsd_beta=1.0, clip=2.0, center=False, temperature=0.7, entry_clip=1e-3), id="reverse-kl"),
    pytest.param(dict(pmi=False, jsd_beta=0.3, beta=0.5), id="opsd"),
]


def named_options(**kwargs) -> dict:
    return dataclasses.asdict(LossOptions(**{"pmi": True, **kwargs}))


def rows_arguments(phase: Phase, dtype: torch.dtype, options: dict) -> dict:
    """Every argument of pmi_kernels::rows by name, with the tensors `phase` reads and writes."""
    s, t, r, a = streams(N, V, dtype, count=4)
    acc = torch.promote_types(dtype, torch.float32)
    lse = torch.stack([s.float().max(-1).values, torch.ones(N)] * 2, -1).to(acc).contiguous()
    phase_tensors = {
        Phase.ALL: {},
        Phase.LSE: dict(lse_out=torch.empty(N, 4, dtype=acc)),
        Phase.FROM_LSE: dict(lse_in=lse, slope_sum_out=torch.empty(N, dtype=acc)),
        Phase.GRAD: dict(lse_in=lse, slope_sum_in=torch.rand(N, dtype=acc)),
    }[phase]
    args = dict(
        student=s,
        teacher=t,
        refonly=r if options["pmi"] else None,
        anchor=a,
        kappa=None,
        mask=torch.tensor([True, False, True]),
        row_scale=torch.rand(N, dtype=acc),
        grad=torch.empty_like(s),
        stats=torch.empty(N, 3, dtype=acc),
        lse_in=None,
        lse_out=None,
        slope_sum_in=None,
        slope_sum_out=None,
        phase=phase.value,
        **options,
    )
    args.update(phase_tensors)
    return args


def opcheck(op, kwargs: dict) -> None:
    names = [arg.name for arg in op._schema.arguments if not arg.kwarg_only]
    args = tuple(kwargs.pop(name) for name in names)
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.name)
def test_rows_passes_opcheck(phase, options):
    opcheck(torch.ops.pmi_kernels.rows.default, rows_arguments(phase, torch.float32, named_options(**options)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rows_passes_opcheck_in_other_dtypes(dtype):
    opcheck(torch.ops.pmi_kernels.rows.default, rows_arguments(Phase.ALL, dtype, named_options(clip=3.0)))


def test_rows_passes_opcheck_with_kappa_and_no_outputs():
    args = rows_arguments(Phase.ALL, torch.float32, named_options(clip=2.0))
    args.update(kappa=torch.randn(N), grad=None, stats=None, row_scale=None, mask=None)
    opcheck(torch.ops.pmi_kernels.rows.default, args)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("anchor", [False, True], ids=["no-anchor", "anchor"])
def test_diagnostics_rows_passes_opcheck(options, anchor):
    s, t, r, a = streams(N, V, count=4)
    opcheck(
        torch.ops.pmi_kernels.diagnostics_rows.default,
        dict(student=s, teacher=t, refonly=r, anchor=a if anchor else None, **named_options(**options)),
    )

"""The C++ op's own argument checks (csrc/ops.cpp's TORCH_CHECKs), called straight through
torch.ops.pmi_kernels, where no Python check runs first: each check refuses its one spoiled
argument with its message, each option range is accepted at its edge and refused just past it,
and the unspoiled calls (the whole operation and each phase of a split vocabulary) run."""

import dataclasses
import math

import pytest
import torch

from helpers import streams
from pmi_kernels.backends.contract import Phase
from pmi_kernels.options import LossOptions

N, V = 3, 50
TINY = math.nextafter(0.0, 1.0)  # the smallest positive double


@pytest.fixture(autouse=True)
def _needs_the_extension():
    from pmi_kernels.backends.native import extension

    reason = extension.load()
    if reason is not None:
        pytest.skip(reason)


def options(**change):
    """LossOptions' fields as the schemas' named arguments, with raw values put in (no Python
    check runs on them)."""
    named = dataclasses.asdict(LossOptions(pmi=True))
    assert set(change) <= set(named), change
    return {**named, **change}


# The test's names for the phases, as vocab_parallel.parallel_rows runs them.
PHASES = {"whole": Phase.ALL, "lse": Phase.LSE, "sums": Phase.FROM_LSE, "gradient": Phase.GRAD}


def rows_args(phase="whole", dtype=torch.float32):
    """Valid arguments of pmi_kernels::rows, by schema name: the whole operation, or one phase of
    a split vocabulary as vocab_parallel.parallel_rows passes them."""
    s, t, r, a = streams(N, V, dtype, count=4)
    acc = torch.promote_types(dtype, torch.float32)
    args = dict(
        student=s,
        teacher=t,
        refonly=r,
        anchor=a,
        kappa=torch.zeros(N, dtype=acc),
        mask=torch.ones(N, dtype=torch.bool),
        row_scale=torch.ones(N, dtype=acc),
        grad=torch.empty_like(s),
        stats=torch.empty(N, 3, dtype=acc),
        lse_in=None,
        lse_out=None,
        slope_sum_in=None,
        slope_sum_out=None,
        phase=PHASES[phase].value,
        **options(),
    )
    lse = torch.stack([s.max(-1).values, torch.ones(N, dtype=acc)] * 2, -1).to(acc).contiguous()
    if phase == "lse":
        args.update(row_scale=None, grad=None, stats=None, lse_out=torch.empty(N, 4, dtype=acc))
    elif phase == "sums":
        args.update(lse_in=lse, slope_sum_out=torch.empty(N, dtype=acc))
    elif phase == "gradient":
        args.update(stats=None, lse_in=lse, slope_sum_in=torch.ones(N, dtype=acc))
    return args


def rows(**args):
    return torch.ops.pmi_kernels.rows(**args)


def strided(x):
    """x's values in a tensor of x's shape whose last dimension has stride 2."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def spoiled(name, how):
    return lambda args: {name: how(args[name])}


# (what, phase, change(args) -> replaced arguments, message)
ROWS_CASES = [
    ("student-1d", "whole", lambda a: {"student": a["student"][0]}, "student must be 2-D"),
    (
        "empty-vocabulary",
        "whole",
        lambda a: {k: a[k][:, :0] for k in ("student", "teacher", "refonly", "anchor", "grad")},
        "the vocabulary must not be empty",
    ),
    (
        "integer-logits",
        "whole",
        lambda a: {k: a[k].long() for k in ("student", "teacher", "refonly", "anchor")},
        "logits must be fp16, bf16, fp32 or fp64",
    ),
    ("student-strided", "whole", spoiled("student", strided), "student must be contiguous along the vocabulary"),
    ("mask-dtype", "whole", spoiled("mask", lambda x: x.to(torch.uint8)), "mask must have dtype"),
    ("mask-strided", "whole", spoiled("mask", strided), "mask must be contiguous"),
    ("stats-shape", "whole", spoiled("stats", lambda x: x[:, :2]), "stats must be a contiguous"),
    ("stats-rows", "whole", spoiled("stats", lambda x: x[:2]), "stats must be a contiguous"),
    ("stats-dtype", "whole", spoiled("stats", lambda x: x.double()), "stats must be a contiguous"),
    ("stats-strided", "whole", spoiled("stats", strided), "stats must be a contiguous"),
    ("slope-sum-without-lse", "gradient", lambda a: {"lse_in": None}, "slope_sum_in needs lse_in"),
    ("phase-unknown", "whole", lambda a: {"phase": 4}, r"phase must be 0 \(all passes\)"),
    ("phase-negative", "whole", lambda a: {"phase": -1}, r"phase must be 0 \(all passes\)"),
    # The phase is the argument's, never inferred from the tensors: each phase takes its own.
    (
        "whole-with-lse-out",
        "whole",
        lambda a: {"lse_out": torch.empty(N, 4)},
        r"phase 0 \(all passes\) takes no lse_out",
    ),
    ("whole-with-lse-in", "whole", lambda a: {"lse_in": torch.zeros(N, 4)}, r"phase 0 \(all passes\) takes no lse_in"),
    ("lse-without-lse-out", "lse", lambda a: {"lse_out": None}, r"phase 1 \(log-sum-exps\) needs lse_out"),
    ("lse-with-lse-in", "lse", lambda a: {"lse_in": torch.zeros(N, 4)}, r"phase 1 \(log-sum-exps\) takes no lse_in"),
    ("sums-without-lse-in", "sums", lambda a: {"lse_in": None}, r"phase 2 \(sums from .*\) needs lse_in"),
    (
        "sums-without-slope-sum-out",
        "sums",
        lambda a: {"slope_sum_out": None},
        r"phase 2 \(sums from .*\) needs slope_sum_out",
    ),
    (
        "gradient-without-slope-sum-in",
        "gradient",
        lambda a: {"slope_sum_in": None},
        r"phase 3 \(gradient from .*\) needs slope_sum_in",
    ),
    (
        "gradient-with-slope-sum-out",
        "gradient",
        lambda a: {"slope_sum_out": torch.empty(N)},
        r"phase 3 \(gradient from .*\) takes no slope_sum_out",
    ),
]
for stream in ("teacher", "refonly", "anchor", "grad"):
    ROWS_CASES += [
        (f"{stream}-shape", "whole", spoiled(stream, lambda x: x[:, :-1]), f"{stream} has shape"),
        (f"{stream}-rows", "whole", spoiled(stream, lambda x: x[:-1]), f"{stream} has shape"),
        (f"{stream}-dtype", "whole", spoiled(stream, lambda x: x.double()), f"{stream} has dtype"),
        (f"{stream}-strided", "whole", spoiled(stream, strided), f"{stream} must be contiguous along the vocabulary"),
    ]
for name, phase, columns in (
    ("kappa", "whole", ""),
    ("row_scale", "whole", ""),
    ("mask", "whole", ""),
    ("lse_in", "sums", ", 4"),
    ("lse_out", "lse", ", 4"),
    ("slope_sum_in", "gradient", ""),
    ("slope_sum_out", "sums", ""),
):
    ROWS_CASES.append(
        (f"{name}-rows", phase, spoiled(name, lambda x: x[:-1]), rf"{name} must have shape \[{N}{columns}\]")
    )
    if name != "mask":
        ROWS_CASES.append((f"{name}-dtype", phase, spoiled(name, lambda x: x.double()), f"{name} must have dtype"))
    if columns:
        ROWS_CASES += [
            (f"{name}-columns", phase, spoiled(name, lambda x: x[:, :3]), rf"{name} must have shape \[{N}{columns}\]"),
            (f"{name}-strided", phase, spoiled(name, strided), f"{name} must be contiguous"),
        ]
    else:
        ROWS_CASES.append((f"{name}-2d", phase, spoiled(name, lambda x: x[:, None]), rf"{name} must have shape"))


@pytest.mark.parametrize("phase", ["whole", "lse", "sums", "gradient"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_valid_calls_run(phase, dtype):
    loss = rows(**rows_args(phase, dtype))
    assert loss.shape == (N,) and loss.dtype == torch.promote_types(dtype, torch.float32)
    empty = {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in rows_args(phase, dtype).items()}
    assert rows(**empty).shape == (0,)


@pytest.mark.parametrize("what,phase,change,message", [pytest.param(*case, id=case[0]) for case in ROWS_CASES])
def test_rows_refuses(what, phase, change, message):
    args = rows_args(phase)
    args.update(change(args))
    with pytest.raises(RuntimeError, match=f"pmi_kernels: {message}"):
        rows(**args)


# (option, edge accepted, one step past it, message): beta and temperature > 0, the clips > 0
# (None: no clip; 0 is no longer a stand-in for None), jsd_beta in [0, 1].
OPTION_EDGES = [
    ("beta", TINY, 0.0, "bad options: beta"),
    ("temperature", TINY, 0.0, "bad options: temperature"),
    ("clip", TINY, 0.0, "bad options: clip"),
    ("entry_clip", TINY, 0.0, "bad options: entry_clip"),
    ("jsd_beta", 0.0, -TINY, r"jsd_beta must be in \[0, 1\]"),
    ("jsd_beta", 1.0, math.nextafter(1.0, 2.0), r"jsd_beta must be in \[0, 1\]"),
]


@pytest.mark.parametrize("op", ["rows", "diagnostics_rows"])
@pytest.mark.parametrize("name,edge,beyond,message", OPTION_EDGES)
def test_option_ranges_at_their_edges(op, name, edge, beyond, message):
    def call(value):
        if op == "rows":
            return rows(**{**rows_args(), **options(**{name: value})})
        s, t, r, a = streams(N, V, count=4)
        return torch.ops.pmi_kernels.diagnostics_rows(s, t, r, a, **options(**{name: value}))

    call(edge)
    with pytest.raises(RuntimeError, match=f"pmi_kernels: {message}"):
        call(beyond)


def diagnostics_cases():
    cases = [
        ("student-1d", lambda a: {"student": a["student"][0]}, r"student must be 2-D \[rows, vocab > 0\]"),
        (
            "empty-vocabulary",
            lambda a: {k: a[k][:, :0] for k in ("student", "teacher", "refonly", "anchor")},
            r"student must be 2-D \[rows, vocab > 0\]",
        ),
    ]
    for stream in ("teacher", "refonly", "anchor"):
        cases += [
            (f"{stream}-shape", spoiled(stream, lambda x: x[:, :-1]), f"{stream} has shape"),
            (f"{stream}-dtype", spoiled(stream, lambda x: x.double()), f"{stream} has dtype"),
            (f"{stream}-strided", spoiled(stream, strided), f"{stream} must be contiguous along the vocabulary"),
        ]
    return [pytest.param(*case, id=case[0]) for case in cases]


@pytest.mark.parametrize("what,change,message", diagnostics_cases())
def test_diagnostics_rows_refuses(what, change, message):
    s, t, r, a = streams(N, V, count=4)
    args = dict(student=s, teacher=t, refonly=r, anchor=a, **options())
    assert torch.ops.pmi_kernels.diagnostics_rows(**args).shape == (N, 7)
    args.update(change(args))
    with pytest.raises(RuntimeError, match=f"pmi_kernels: {message}"):
        torch.ops.pmi_kernels.diagnostics_rows(**args)


@pytest.mark.parametrize("op", ["rows", "diagnostics_rows"])
def test_absent_clips_are_none(op):
    """clip=None and entry_clip=None clip nothing: the loss equals a clip so large it is the identity."""
    args, (s, t, r, a) = rows_args(), streams(N, V, count=4)

    def call(**change):
        if op == "rows":
            return rows(**{**args, **options(**change)})
        return torch.ops.pmi_kernels.diagnostics_rows(s, t, r, a, **options(**change))

    assert torch.allclose(call(clip=None, entry_clip=None), call(clip=1e30, entry_clip=1e30), rtol=1e-6)


@pytest.mark.parametrize("op", ["rows", "diagnostics_rows"])
def test_the_options_are_named_and_typed(op):
    """The schemas take every option (and the phase) by name only: one left out, one of the wrong
    type, or all of them by position, is refused by the dispatcher before any kernel runs."""
    if op == "rows":
        args = rows_args()
        call = torch.ops.pmi_kernels.rows
    else:
        s, t, r, a = streams(N, V, count=4)
        args = dict(student=s, teacher=t, refonly=r, anchor=a, **options())
        call = torch.ops.pmi_kernels.diagnostics_rows
    for name in [*options(), *(["phase"] if op == "rows" else [])]:
        with pytest.raises(RuntimeError, match=f"missing value for argument '{name}'"):
            call(**{k: v for k, v in args.items() if k != name})
    with pytest.raises(RuntimeError, match="Expected a value of type 'float' for argument 'beta'"):
        call(**{**args, "beta": "one"})
    positional = [args[arg.name] for arg in call.default._schema.arguments]
    with pytest.raises(RuntimeError, match="positional argument"):
        call(*positional)

"""Every check of pmi_kernels/validation.py and of the options, through each public function that
runs it: bad input gets a ValueError whose message starts with the argument's name. Each case
catches the removal of its check: the input then fails later with a raw error, with a message
about another argument, or not at all (a NaN loss).

A tensor on the meta device stands for one on another device, so the device checks run on
CPU-only machines."""

import pytest
import torch

from pmi_kernels import fused_pmi_kl, pmi_diagnostics, pmi_kl

N, V, H = 4, 10, 6
OTHER_DEVICE = "meta"
LOGIT_STREAMS = ["student_logits", "teacher_logits", "refonly_logits", "anchor_logits"]
HIDDEN_STREAMS = ["student_hidden", "teacher_hidden", "refonly_hidden", "anchor_hidden"]
DIAGNOSTICS_STREAMS = ["student", "teacher", "refonly", "anchor"]


def case(name, what, change):
    """`change(args)` returns the arguments to replace; `name` must open the error message."""
    return pytest.param(name, change, id=f"{name}-{what}")


def nan_at_one_entry(x):
    x = x.clone()
    x.view(-1)[1] = float("nan")
    return x


def stream_cases(names):
    """check_streams and check_finite, for streams `names` (the student first)."""
    student = names[0]
    cases = [
        case(student, "not-a-tensor", lambda a: {student: a[student].tolist()}),
        case(student, "integer", lambda a: {student: a[student].long()}),
        case(student, "0-d", lambda a: {k: torch.tensor(1.0) for k in names}),
        case(student, "empty-last-dim", lambda a: {k: a[k][:, :0] for k in names}),
        case(student, "nan", lambda a: {student: nan_at_one_entry(a[student])}),
        case(student, "none", lambda a: {student: None}),
        case(names[1], "none", lambda a: {names[1]: None}),
    ]
    for k in names[1:]:
        cases += [
            case(k, "not-a-tensor", lambda a, k=k: {k: a[k].tolist()}),
            case(k, "integer", lambda a, k=k: {k: a[k].int()}),
            case(k, "shape", lambda a, k=k: {k: a[k][: N - 1]}),
            case(k, "dtype", lambda a, k=k: {k: a[k].double()}),
            case(k, "device", lambda a, k=k: {k: a[k].to(OTHER_DEVICE)}),
            case(k, "inf", lambda a, k=k: {k: a[k].fill_(float("inf"))}),
            case(k, "nan", lambda a, k=k: {k: nan_at_one_entry(a[k])}),
        ]
    return cases


MASK_CASES = [
    case("mask", "not-a-tensor", lambda a: {"mask": [True] * N}),
    case("mask", "float", lambda a: {"mask": torch.ones(N)}),
    case("mask", "shape", lambda a: {"mask": torch.ones(N + 1, dtype=torch.bool)}),
    case("mask", "device", lambda a: {"mask": torch.ones(N, dtype=torch.bool, device=OTHER_DEVICE)}),
]

OPTION_CASES = [
    case("beta", "bool", lambda a: {"beta": True}),
    case("beta", "string", lambda a: {"beta": "1"}),
    case("beta", "inf", lambda a: {"beta": float("inf")}),
    case("beta", "zero", lambda a: {"beta": 0.0}),
    case("temperature", "nan", lambda a: {"temperature": float("nan")}),
    case("temperature", "negative", lambda a: {"temperature": -0.5}),
    case("clip", "zero", lambda a: {"clip": 0}),
    case("center", "int", lambda a: {"center": 1}),
]
LOSS_OPTION_CASES = OPTION_CASES + [
    case("entry_clip", "negative", lambda a: {"entry_clip": -1.0}),
    case("jsd_beta", "bool", lambda a: {"jsd_beta": False}),
    case("jsd_beta", "string", lambda a: {"jsd_beta": "0.5"}),
    case("jsd_beta", "above-1", lambda a: {"jsd_beta": 1.01}),
    case("reduction", "unknown", lambda a: {"reduction": "avg"}),
    case("backend", "unknown", lambda a: {"backend": "tpu"}),
]


def head_cases(weight, bias):
    """check_linear and check_finite for one head: `weight` [V, H] and `bias` [V]."""
    return [
        case(weight, "not-a-tensor", lambda a: {weight: a[weight].tolist()}),
        case(weight, "1-d", lambda a: {weight: a[weight][0]}),
        case(weight, "no-vocabulary", lambda a: {weight: a[weight][:0]}),
        # H = 0: also caught by the H check (the hidden states have H > 0), so "H > 0" cannot be
        # removed alone with a visible effect.
        case(weight, "no-hidden", lambda a: {weight: a[weight][:, :0]}),
        case(weight, "other-hidden", lambda a: {weight: a[weight][:, : H - 1]}),
        case(weight, "dtype", lambda a: {weight: a[weight].double()}),
        case(weight, "device", lambda a: {weight: a[weight].to(OTHER_DEVICE)}),
        case(weight, "nan", lambda a: {weight: nan_at_one_entry(a[weight])}),
        case(bias, "not-a-tensor", lambda a: {bias: a[bias].tolist()}),
        case(bias, "shape", lambda a: {bias: a[bias][: V - 1]}),
        case(bias, "dtype", lambda a: {bias: a[bias].double()}),
        case(bias, "device", lambda a: {bias: a[bias].to(OTHER_DEVICE)}),
        case(bias, "nan", lambda a: {bias: nan_at_one_entry(a[bias])}),
    ]


HEAD_CASES = (
    head_cases("lm_head_weight", "lm_head_bias")
    + head_cases("frozen_weight", "frozen_bias")
    + [
        # Without biases, so that only the vocabularies disagree.
        case(
            "frozen_weight",
            "other-vocabulary",
            lambda a: {"frozen_weight": a["frozen_weight"][: V - 1], "lm_head_bias": None, "frozen_bias": None},
        ),
    ]
)


def stream_args(names, width):
    return {k: torch.randn(N, width) for k in names}


def head_args():
    return dict(
        lm_head_weight=torch.randn(V, H),
        lm_head_bias=torch.randn(V),
        frozen_weight=torch.randn(V, H),
        frozen_bias=torch.randn(V),
    )


def rejects(function, args, change, name):
    args.update(change(args))
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        function(**args)


@pytest.mark.parametrize("name,change", stream_cases(LOGIT_STREAMS) + MASK_CASES + LOSS_OPTION_CASES)
def test_pmi_kl_rejects(name, change):
    """Catches a removed check of pmi_kl: a stream's type, dtype, shape or device (checked
    against the student), NaN/inf in any stream, the mask, an option, reduction or backend."""
    args = dict(stream_args(LOGIT_STREAMS, V), mask=torch.ones(N, dtype=torch.bool))
    rejects(pmi_kl, args, change, name)


@pytest.mark.parametrize("name,change", HEAD_CASES + stream_cases(HIDDEN_STREAMS) + MASK_CASES + LOSS_OPTION_CASES)
def test_fused_pmi_kl_rejects(name, change):
    """Catches a removed check of fused_pmi_kl: as pmi_kl's, plus the lm_head and frozen head
    (type, 2-D, V and H, dtype and device of weight and bias, the frozen vocabulary) and NaN/inf
    in any of the four head tensors."""
    args = dict(stream_args(HIDDEN_STREAMS, H), **head_args(), mask=torch.ones(N, dtype=torch.bool))
    rejects(fused_pmi_kl, args, change, name)


DIAGNOSTICS_CASES = OPTION_CASES + [
    case("refonly", "missing", lambda a: {"refonly": None}),
    case("backend", "unknown", lambda a: {"backend": "tpu"}),  # "tpu" would run the torch path
]


@pytest.mark.parametrize("name,change", stream_cases(DIAGNOSTICS_STREAMS) + DIAGNOSTICS_CASES)
def test_diagnostics_of_logits_rejects(name, change):
    """Catches a removed check of pmi_diagnostics on logits: the streams, the options, a missing
    reference-only stream, an unknown backend."""
    rejects(pmi_diagnostics, stream_args(DIAGNOSTICS_STREAMS, V), change, name)


@pytest.mark.parametrize("name", ["lm_head_bias", "frozen_weight", "frozen_bias"])
def test_diagnostics_of_logits_rejects_a_head(name):
    """Without lm_head_weight the streams are logits: a head argument would be ignored."""
    rejects(pmi_diagnostics, stream_args(DIAGNOSTICS_STREAMS, V), lambda a: {name: head_args()[name]}, name)


@pytest.mark.parametrize("name,change", HEAD_CASES + stream_cases(DIAGNOSTICS_STREAMS) + DIAGNOSTICS_CASES)
def test_diagnostics_of_hidden_states_rejects(name, change):
    """Catches a removed check of pmi_diagnostics on hidden states: the streams and the options,
    both heads, and NaN/inf in the heads (once missing: a NaN weight gave NaN diagnostics)."""
    rejects(pmi_diagnostics, dict(stream_args(DIAGNOSTICS_STREAMS, H), **head_args()), change, name)


@pytest.mark.parametrize(
    "function,args",
    [
        (pmi_kl, lambda: stream_args(LOGIT_STREAMS, V)),
        (fused_pmi_kl, lambda: dict(stream_args(HIDDEN_STREAMS, H), **head_args())),
        (pmi_diagnostics, lambda: dict(stream_args(DIAGNOSTICS_STREAMS, H), **head_args())),
    ],
    ids=["pmi_kl", "fused_pmi_kl", "pmi_diagnostics"],
)
def test_valid_arguments_pass(function, args):
    """The inputs every case above spoils once are accepted as they are."""
    function(**args(), check_finite=True)

"""Every bad input of SPEC gets a ValueError naming the argument, before any kernel runs."""

import pytest
import torch

from pmi_kernels import fused_pmi_kl, pmi_diagnostics, pmi_kl


def logits(n=4, v=10, **kw):
    return torch.randn(n, v, **kw)


LOGIT_CASES = [
    ("teacher_logits", lambda s: dict(teacher_logits=logits(4, 11))),
    ("refonly_logits", lambda s: dict(refonly_logits=logits(5, 10))),
    ("anchor_logits", lambda s: dict(refonly_logits=logits(), anchor_logits=logits(dtype=torch.float64))),
    ("teacher_logits", lambda s: dict(teacher_logits=torch.randint(0, 3, (4, 10)))),
    ("student_logits", lambda s: dict(student_logits=logits(4, 0), teacher_logits=logits(4, 0))),
    ("mask", lambda s: dict(mask=torch.ones(5, dtype=torch.bool))),
    ("mask", lambda s: dict(mask=torch.ones(4))),
    ("temperature", lambda s: dict(temperature=0.0)),
    ("temperature", lambda s: dict(temperature=-1.0)),
    ("beta", lambda s: dict(beta=0.0)),
    ("clip", lambda s: dict(clip=-2.0)),
    ("jsd_beta", lambda s: dict(jsd_beta=1.5)),
    ("jsd_beta", lambda s: dict(jsd_beta=-0.1)),
    ("entry_clip", lambda s: dict(entry_clip=0.0)),
    ("reduction", lambda s: dict(reduction="avg")),
    ("backend", lambda s: dict(backend="tpu")),
    ("student_logits", lambda s: dict(student_logits=s.masked_fill(s > 1, float("nan")))),
    ("teacher_logits", lambda s: dict(teacher_logits=torch.full((4, 10), float("inf")))),
    ("refonly_logits", lambda s: dict(refonly_logits=torch.full((4, 10), float("-inf")))),
]


@pytest.mark.parametrize("name,change", LOGIT_CASES)
def test_pmi_kl_rejects(name, change):
    s = logits()
    args = dict(student_logits=s, teacher_logits=logits(), refonly_logits=logits())
    args.update(change(s))
    with pytest.raises(ValueError, match=name):
        pmi_kl(**args)


def test_check_finite_off_skips_the_check():
    s = logits()
    t = logits()
    t[0, 0] = float("nan")
    pmi_kl(s, t, logits(), check_finite=False)


HIDDEN_CASES = [
    ("lm_head_weight", lambda: dict(lm_head_weight=torch.randn(10, 7))),
    ("lm_head_weight", lambda: dict(lm_head_weight=torch.randn(0, 6))),
    ("lm_head_weight", lambda: dict(lm_head_weight=torch.randn(10, 6, dtype=torch.float64))),
    ("lm_head_bias", lambda: dict(lm_head_bias=torch.randn(9))),
    ("frozen_weight", lambda: dict(frozen_weight=torch.randn(12, 6))),
    ("frozen_bias", lambda: dict(frozen_bias=torch.randn(3))),
    ("teacher_hidden", lambda: dict(teacher_hidden=torch.randn(4, 5))),
    ("student_hidden", lambda: dict(student_hidden=torch.randn(4, 0), teacher_hidden=torch.randn(4, 0))),
    ("anchor_hidden", lambda: dict(anchor_hidden=torch.full((4, 6), float("nan")))),
    ("lm_head_weight", lambda: dict(lm_head_weight=torch.full((10, 6), float("inf")))),
    ("mask", lambda: dict(mask=torch.ones(3, dtype=torch.bool))),
    ("beta", lambda: dict(beta=-1.0)),
    ("reduction", lambda: dict(reduction="mean ")),
]


@pytest.mark.parametrize("name,change", HIDDEN_CASES)
def test_fused_pmi_kl_rejects(name, change):
    args = dict(
        student_hidden=torch.randn(4, 6),
        lm_head_weight=torch.randn(10, 6),
        teacher_hidden=torch.randn(4, 6),
        refonly_hidden=torch.randn(4, 6),
    )
    args.update(change())
    with pytest.raises(ValueError, match=name):
        fused_pmi_kl(**args)


def test_diagnostics_rejects():
    with pytest.raises(ValueError, match="refonly"):
        pmi_diagnostics(logits(), logits(), None)
    with pytest.raises(ValueError, match="teacher"):
        pmi_diagnostics(logits(), logits(3, 10), logits())


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        pmi_kl(logits(), logits(), backend="triton")


def sparse(x):
    return x.to_sparse()


@pytest.mark.parametrize("layout", [sparse, lambda x: x.to_sparse_csr()], ids=["coo", "csr"])
def test_sparse_tensors_are_refused_by_name(layout):
    """A sparse stream, mask or head: a ValueError naming it (the finite check raised
    NotImplementedError); check_finite=False does not let one through to a kernel."""
    s, t, r, a = (logits() for _ in range(4))
    h = {k: torch.randn(4, 6) for k in ("student_hidden", "teacher_hidden", "refonly_hidden", "anchor_hidden")}
    heads = dict(
        lm_head_weight=torch.randn(10, 6),
        lm_head_bias=torch.randn(10),
        frozen_weight=torch.randn(10, 6),
        frozen_bias=torch.randn(10),
    )
    logit_args = dict(student_logits=s, teacher_logits=t, refonly_logits=r, anchor_logits=a)
    for check_finite in (True, False):
        for name in logit_args:
            with pytest.raises(ValueError, match=f"^{name} must be a dense"):
                pmi_kl(**{**logit_args, name: layout(logit_args[name])}, check_finite=check_finite)
        for name in list(h) + [k for k in heads if k.endswith("weight")]:
            args = {**h, **heads}
            with pytest.raises(ValueError, match=f"^{name} must be a dense"):
                fused_pmi_kl(**{**args, name: layout(args[name])}, check_finite=check_finite)
        streams = dict(student=s, teacher=t, refonly=r, anchor=a)
        for name in streams:
            with pytest.raises(ValueError, match=f"^{name} must be a dense"):
                pmi_diagnostics(**{**streams, name: layout(streams[name])}, check_finite=check_finite)
    for name in ("lm_head_bias", "frozen_bias"):  # 1-D: COO only
        with pytest.raises(ValueError, match=f"^{name} must be a dense"):
            fused_pmi_kl(**{**h, **heads, name: sparse(heads[name])})
    with pytest.raises(ValueError, match="^mask must be a dense"):
        pmi_kl(s, t, r, mask=sparse(torch.ones(4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="^labels must be a dense"):
        pmi_kl(s, t, r, labels=sparse(torch.ones(4, dtype=torch.long)))


def test_meta_hidden_states_reach_the_checks_before_autocast():
    """A meta student_hidden: the checks' ValueError, not autocast's "unknown device type"."""
    h, w = torch.randn(4, 6, device="meta"), torch.randn(10, 6)
    with pytest.raises(ValueError, match="^teacher_hidden is on cpu but student_hidden is on meta"):
        fused_pmi_kl(h, w, torch.randn(4, 6))
    with pytest.raises(ValueError, match="^no backend runs on meta"):
        fused_pmi_kl(h, w.to("meta"), torch.randn(4, 6, device="meta"), check_finite=False)


@pytest.mark.parametrize("workspace_bytes", [2**63, 2**70])
def test_workspace_past_int64_is_a_value_error(workspace_bytes):
    """The custom ops carry workspace_bytes as an int64: past it, a ValueError that says so (the op
    schema raised a RuntimeError)."""
    s, t = logits(), logits()
    with pytest.raises(ValueError, match=r"^workspace_bytes must be an integer in \[1, 2\*\*63 - 1\]"):
        pmi_kl(s, t, workspace_bytes=workspace_bytes)
    with pytest.raises(ValueError, match=r"^workspace_bytes must be an integer in \[1, 2\*\*63 - 1\]"):
        fused_pmi_kl(torch.randn(4, 6), torch.randn(10, 6), torch.randn(4, 6), workspace_bytes=workspace_bytes)

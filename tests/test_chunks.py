"""Rows swept in several chunks (a small workspace_bytes=) against the float64 reference, with
masks and per-row gradient scales that differ from chunk to chunk."""

import importlib

import pytest
import torch

from conftest import PATHS
from helpers import assert_close, streams, upcast
from pmi_kernels import fused_pmi_kl, pmi_diagnostics, pmi_kl
from pmi_kernels.backends import REGISTRY
from pmi_kernels.reference import fused_pmi_kl_reference, linear_logits, pmi_diagnostics_reference, pmi_kl_reference


# Where the per-chunk functions live: the one place to re-point when they move. Each is called
# once per chunk, with the chunk's student rows first.
def record_chunk_rows(monkeypatch, kind, backend):
    """The number of rows of each chunk, appended as the chunks are computed: the backend's row
    (or diagnostics) function, as the registry hands it out, counts its calls."""
    package = importlib.import_module(f"pmi_kernels.backends.{REGISTRY[backend].module}")
    name = {"rows": "rows", "diagnostics": "diagnostics_rows"}[kind]
    original = getattr(package, name)
    rows = []

    def counted(student, *args, **kwargs):
        rows.append(student.shape[0])
        return original(student, *args, **kwargs)

    monkeypatch.setattr(package, name, counted)
    return rows


def chunk_masks_differ(mask, chunk_rows):
    """Whether some later chunk's mask differs from the first chunk's (so a path that applies
    the first chunk's mask to every chunk gets a wrong answer)."""
    flat, first = mask.reshape(-1), mask.reshape(-1)[: chunk_rows[0]]
    starts = torch.tensor(chunk_rows).cumsum(0)[:-1].tolist()
    return any(not torch.equal(flat[i : i + n], first[:n]) for i, n in zip(starts, chunk_rows[1:]))


# workspace_bytes(vocab, backend): one row per chunk (less than a row's bytes), or a few rows per
# chunk at today's costs per vocabulary entry (torch path ~60 bytes, Triton ~12); the tests
# assert that there are several chunks, so a change of costs cannot make them vacuous.
WORKSPACES = [
    pytest.param(lambda vocab, backend: 1, id="1-row-chunks"),
    pytest.param(
        lambda vocab, backend: (256 if REGISTRY[backend].row_temporaries else 32) * vocab, id="few-row-chunks"
    ),
]
# Kept rows first: the first chunk is fully kept, later ones are mixed (and the reverse).
MASKS = [
    pytest.param([[1, 1, 1, 1, 1], [0, 1, 0, 0, 1]], id="kept-first"),
    pytest.param([[0, 0, 1, 0, 0], [1, 1, 0, 1, 1]], id="masked-first"),
]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("workspace", WORKSPACES)
def test_pmi_kl_mask_across_chunks(monkeypatch, workspace, mask, reduction):
    """Catches a chunk loop that applies the first chunk's mask (or row scale) to every chunk,
    or writes a chunk's loss or gradient to the wrong rows."""
    vocab = 33
    s, t, r, a = (x.reshape(2, 5, vocab) for x in streams(10, vocab))
    mask = torch.tensor(mask, dtype=torch.bool)
    chunk_rows = record_chunk_rows(monkeypatch, "rows", "torch")
    s.requires_grad_(True)
    loss = pmi_kl(
        s, t, r, a, mask=mask, reduction=reduction, backend="torch", workspace_bytes=workspace(vocab, "torch")
    )
    upstream = torch.rand_like(loss)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), s)
    assert len(chunk_rows) > 1 and sum(chunk_rows) == 10, chunk_rows
    assert chunk_masks_differ(mask, chunk_rows)
    s64 = upcast(s).requires_grad_(True)
    ref = pmi_kl_reference(s64, upcast(t), upcast(r), upcast(a), mask=mask, reduction=reduction)
    (ref_grad,) = torch.autograd.grad((ref * upstream.double()).sum(), s64)
    assert_close(loss, ref, torch.float32, "loss", atol=1e-6)
    assert_close(grad, ref_grad, torch.float32, "grad", atol=1e-9)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("workspace", WORKSPACES)
@pytest.mark.parametrize("device,backend", PATHS)
def test_fused_pmi_kl_mask_and_row_scales_across_chunks(monkeypatch, device, backend, workspace, reduction):
    """Catches a chunk loop that scales every chunk's gradient by the first chunk's row scales
    (reduction="none" sends each row its own upstream gradient), keeps one chunk's weight or
    bias gradient instead of their sum, or puts a kept row's loss or gradient in the wrong place."""
    vocab, hidden = 29, 8
    h, h_t, h_r, h_a = (x.reshape(2, 6, hidden) for x in streams(12, hidden, device=device, scale=1.0))
    w = (torch.randn(vocab, hidden, device=device) * 0.5).requires_grad_(True)
    b = torch.randn(vocab, device=device).requires_grad_(True)
    w_f, b_f = w.detach() + 0.1 * torch.randn_like(w), None  # the frozen streams: W_f and the student's bias
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.bool, device=device)
    chunk_rows = record_chunk_rows(monkeypatch, "rows", backend)
    h.requires_grad_(True)
    kwargs = dict(lm_head_bias=b, frozen_weight=w_f, frozen_bias=b_f, mask=mask, reduction=reduction, clip=3.0)
    loss = fused_pmi_kl(h, w, h_t, h_r, h_a, backend=backend, workspace_bytes=workspace(vocab, backend), **kwargs)
    upstream = torch.rand_like(loss)
    grads = torch.autograd.grad((loss * upstream).sum(), (h, w, b))
    # The masked rows are dropped before the sweep: the kept rows, in several chunks.
    sweep = chunk_rows[: len(chunk_rows) // 2] if reduction == "none" else chunk_rows  # "none" sweeps again
    assert len(sweep) > 1 and sum(sweep) == int(mask.sum()), chunk_rows
    leaves = [upcast(x).requires_grad_(True) for x in (h, w, b)]
    kwargs.update(lm_head_bias=leaves[2], frozen_weight=upcast(w_f), mask=mask.cpu())
    ref = fused_pmi_kl_reference(leaves[0], leaves[1], upcast(h_t), upcast(h_r), upcast(h_a), **kwargs)
    ref_grads = torch.autograd.grad((ref * upstream.cpu().double()).sum(), leaves)
    assert_close(loss, ref, torch.float32, "loss", atol=1e-6)
    for name, got, want in zip(("grad_h", "grad_w", "grad_b"), grads, ref_grads):
        assert_close(got, want, torch.float32, name, atol=1e-9)
    assert (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("device,backend", PATHS)
def test_diagnostics_across_chunks(monkeypatch, device, backend, form):
    """Catches a chunk loop that reads the first chunk's rows of a stream (the anchor, say) for
    every chunk, or concatenates the chunks' results out of order."""
    vocab, hidden = 31, 6
    width = vocab if form == "logits" else hidden
    s, t, r, a = (x.reshape(3, 3, width) for x in streams(9, width, device=device))
    head = {}
    if form == "hidden":
        w, w_f = (torch.randn(vocab, hidden, device=device) for _ in range(2))
        head = dict(lm_head_weight=w, lm_head_bias=torch.randn(vocab, device=device), frozen_weight=w_f)
    chunk_rows = record_chunk_rows(monkeypatch, "diagnostics", backend)
    got = pmi_diagnostics(s, t, r, a, backend=backend, workspace_bytes=1, temperature=0.8, **head)
    assert len(chunk_rows) > 1 and sum(chunk_rows) == 9, chunk_rows
    s, t, r, a = map(upcast, (s, t, r, a))
    if form == "hidden":
        w, b, w_f = (upcast(head[k]) for k in ("lm_head_weight", "lm_head_bias", "frozen_weight"))
        s, t, r, a = linear_logits(s, w, b), *(linear_logits(x, w_f, b) for x in (t, r, a))
    want = pmi_diagnostics_reference(s, t, r, a, temperature=0.8)
    for key in want:
        assert_close(got[key], want[key], torch.float32, key, factor=3, atol=1e-5)

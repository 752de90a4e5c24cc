"""The backend contract: every backend's row function and diagnostics rows against the float64
reference, at the level the API calls them (row scales, masks, statistics, in-place gradients,
strided rows, 64-bit offsets); the registry's choices and errors."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import PATHS, requires_cuda
from helpers import assert_close, clear_entry_clip, streams, upcast
from pmi_kernels.backends import REGISTRY, STATS, resolve_backend
from pmi_kernels.backends.contract import Phase, RowBackend
from pmi_kernels.options import LossOptions, compute_dtype
from pmi_kernels.reference import pmi_kl_reference, pmi_target_logits

OPTIONS = [
    pytest.param(dict(jsd_beta=0.0), id="forward-kl"),
    pytest.param(dict(jsd_beta=1.0, temperature=0.7), id="reverse-kl"),
    pytest.param(dict(jsd_beta=0.4, beta=0.6, clip=1.5), id="mixed"),
    pytest.param(dict(jsd_beta=0.3, entry_clip=1e-3), id="entry-clip"),
    pytest.param(dict(jsd_beta=0.0, clip=3.0, center=False), id="clip-no-center"),
    pytest.param(dict(jsd_beta=0.5, clip=None, center=False), id="no-clip"),
]


def reference_rows(s, t, r, a, mask, row_scale, opts: LossOptions):
    """Per-row loss, row_scale * dloss/ds and the statistics (KL(q||p), H(p), H(q)), from the
    float64 reference."""
    kwargs = dict(
        beta=opts.beta,
        clip=opts.clip,
        center=opts.center,
        temperature=opts.temperature,
        jsd_beta=opts.jsd_beta,
        entry_clip=opts.entry_clip,
    )
    s64, r64 = upcast(s).requires_grad_(True), upcast(r) if opts.pmi else None
    loss = pmi_kl_reference(
        s64, upcast(t), r64, upcast(a), mask=None if mask is None else mask.cpu(), reduction="none", **kwargs
    )
    (grad,) = torch.autograd.grad((loss * upcast(row_scale)).sum(), s64)

    def scaled(x):
        return None if x is None else upcast(x) / opts.temperature

    lp = scaled(s).log_softmax(-1)
    lq = pmi_target_logits(scaled(s), scaled(t), scaled(r64), scaled(a), opts).log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    stats = torch.stack([(q * (lq - lp)).sum(-1), -(p * lp).sum(-1), -(q * lq).sum(-1)], -1)
    if mask is not None:
        stats[~mask.cpu()] = 0
    return loss.detach(), grad, stats


def run_rows(backend, s, t, r, a, opts, **kwargs):
    """(loss, grad, stats) of a backend's row function, with outputs prefilled with NaN so
    unwritten entries show."""
    grad = torch.full_like(s, float("nan"))
    stats = torch.full((s.shape[0], len(STATS)), float("nan"), dtype=compute_dtype(s.dtype), device=s.device)
    loss = REGISTRY[backend].rows(s, t, r if opts.pmi else None, a, opts=opts, grad_out=grad, stats_out=stats, **kwargs)
    return loss, grad, stats


@pytest.mark.parametrize("kwargs", OPTIONS)
@pytest.mark.parametrize("mode", ["pmi", "pmi-anchor", "opsd"])
@pytest.mark.parametrize("device,backend", PATHS)
def test_rows_match_reference(device, backend, mode, kwargs):
    """Loss, gradient (with a per-row scale) and statistics of every row, masked rows all zero.
    V = 1031 crosses tiles, sum blocks and thread groups on every kernel."""
    s, t, r, a = streams(6, 1031, torch.float32, device)
    a = a if mode == "pmi-anchor" else None
    opts = LossOptions(pmi=mode != "opsd", **clear_entry_clip(kwargs, s, t, r if mode != "opsd" else None, a))
    mask = torch.tensor([True, False, True, True, True, False], device=device)
    row_scale = torch.rand(6, dtype=torch.float32, device=device) + 0.5
    loss, grad, stats = run_rows(backend, s, t, r, a, opts, mask=mask, row_scale=row_scale)
    ref_loss, ref_grad, ref_stats = reference_rows(s, t, r, a, mask, row_scale, opts)
    assert_close(loss, ref_loss, torch.float32, "loss", atol=1e-6)
    assert_close(grad, ref_grad, torch.float32, "grad", atol=1e-9)
    assert_close(stats, ref_stats, torch.float32, "stats", factor=3, atol=1e-5)
    assert (grad[~mask] == 0).all() and (stats[~mask] == 0).all() and (loss[~mask] == 0).all()


@pytest.mark.parametrize("vocab", [1, 7, 50257, 151936])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("device,backend", PATHS)
def test_odd_vocabularies_and_dtypes(device, backend, dtype, vocab, monkeypatch):
    """V = 1 and 7 (less than one vector), 50,257 (odd: no 16-byte rows), 151,936 (Qwen's). Under
    the interpreter the large ones run in its wide default tiles (the narrow ones that the other
    tests use to cross tiles would take minutes here)."""
    if backend == "triton" and device == "cpu":
        import pmi_kernels.backends.triton.row_kernel as row_kernel

        monkeypatch.setattr(row_kernel, "INTERPRETER_BLOCK_V", 8192)
    opts = LossOptions(pmi=True, jsd_beta=0.5)
    s, t, r = streams(2, vocab, dtype, device, count=3)
    row_scale = torch.ones(2, dtype=compute_dtype(dtype), device=device)
    loss, grad, stats = run_rows(backend, s, t, r, None, opts, row_scale=row_scale)
    ref_loss, ref_grad, ref_stats = reference_rows(s, t, r, None, None, row_scale, opts)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(loss, ref_loss, acc, "loss", factor=3, atol=1e-6)
    assert_close(grad, ref_grad, dtype, "grad", factor=2, atol=1e-9)
    assert_close(stats, ref_stats, acc, "stats", factor=3, atol=1e-5)


@pytest.mark.parametrize("device,backend", PATHS)
def test_strided_rows_and_gradient_in_place(device, backend):
    """Rows that are views into wider rows (an aligned and an unaligned row stride), and the
    gradient written over the student logits, as the fused path does."""
    opts = LossOptions(pmi=True, jsd_beta=0.3)
    for width in (1024 + 64, 1024 + 13):
        s, t, r = (x[:, :1024] for x in streams(5, width, torch.bfloat16, device, count=3))
        separate = run_rows(backend, s, t, r, None, opts)
        in_place = s.clone()
        loss = REGISTRY[backend].rows(in_place, t, r, opts=opts, grad_out=in_place)
        assert torch.equal(loss, separate[0]) and torch.equal(in_place, separate[1])
        ref_loss, ref_grad, _ = reference_rows(s, t, r, None, None, torch.ones(5), opts)
        assert_close(separate[1], ref_grad, torch.bfloat16, "grad")


@pytest.mark.parametrize("device,backend", PATHS)
def test_64bit_row_offsets(device, backend):
    """The second row starts 2**31 + 5 entries into its storage: offsets must be 64-bit. The
    storage is allocated but never touched beyond the two rows (the OS maps it lazily)."""
    vocab = 257
    opts = LossOptions(pmi=True, jsd_beta=0.0)
    views = []
    for _ in range(3):
        storage = torch.empty(2**31 + 5 + vocab, dtype=torch.bfloat16, device=device)
        rows = storage.as_strided((2, vocab), (2**31 + 5, 1))
        rows.copy_(torch.randn(2, vocab, device=device) * 3)
        views.append(rows)
    s, t, r = views
    row_scale = torch.ones(2, device=device)
    loss, grad, stats = run_rows(backend, s, t, r, None, opts, row_scale=row_scale)
    ref_loss, ref_grad, ref_stats = reference_rows(s, t, r, None, None, row_scale, opts)
    assert_close(loss, ref_loss, torch.float32, "loss", atol=1e-6)
    assert_close(grad, ref_grad, torch.bfloat16, "grad")


CLUSTER_OPTIONS = [OPTIONS[0], OPTIONS[2], OPTIONS[3], OPTIONS[4]]  # forward KL, mixed, entry clip, no centering


@requires_cuda
@pytest.mark.parametrize("kwargs", CLUSTER_OPTIONS)
@pytest.mark.parametrize(
    "vocab,dtype",
    [
        (7, torch.float32),
        (1031, torch.float32),
        (65537, torch.bfloat16),
        (151936, torch.bfloat16),
        (4100, torch.float64),
    ],
)
@pytest.mark.parametrize("blocks", [2, 16])
def test_cuda_rows_split_over_a_cluster(blocks, vocab, dtype, kwargs, monkeypatch):
    """PMI_KERNELS_CUDA_CLUSTER: each row split over a cluster of blocks (sm_90; elsewhere the
    setting runs one block a row), the statistics merged between passes, against the reference:
    V = 7 over 16 blocks leaves most slices empty, 65,537 has no 16-byte rows, a slice's tail."""
    monkeypatch.setenv("PMI_KERNELS_CUDA_CLUSTER", str(blocks))
    s, t, r, a = streams(5, vocab, dtype, "cuda")
    opts = LossOptions(pmi=True, **clear_entry_clip(kwargs, s, t, r, a))
    mask = torch.tensor([True, False, True, True, True], device="cuda")
    row_scale = torch.rand(5, dtype=compute_dtype(dtype), device="cuda") + 0.5
    loss, grad, stats = run_rows("cuda", s, t, r, a, opts, mask=mask, row_scale=row_scale)
    ref_loss, ref_grad, ref_stats = reference_rows(s, t, r, a, mask, row_scale, opts)
    acc = compute_dtype(dtype)
    assert_close(loss, ref_loss, acc, "loss", factor=3, atol=1e-6)
    assert_close(grad, ref_grad, dtype, "grad", factor=2, atol=1e-9)
    assert_close(stats, ref_stats, acc, "stats", factor=3, atol=1e-5)
    assert (grad[~mask] == 0).all() and (stats[~mask] == 0).all() and (loss[~mask] == 0).all()
    in_place = s.clone()  # the gradient over the student logits, as the fused path writes it
    REGISTRY["cuda"].rows(in_place, t, r, a, opts=opts, mask=mask, row_scale=row_scale, grad_out=in_place)
    assert torch.equal(in_place, grad)


@requires_cuda
@pytest.mark.parametrize("jsd_beta", [0.0, 0.5])
def test_cuda_phases_split_over_a_cluster(jsd_beta, monkeypatch):
    """The vocabulary-parallel phases (this shard's log-sum-exps, then loss and slope sums from
    the whole row's, then the gradient) on rows split over clusters, for a group of one."""
    import pmi_kernels.vocab_parallel as vocab_parallel

    monkeypatch.setattr(vocab_parallel, "all_reduce", lambda x, group, op=None: x)
    monkeypatch.setenv("PMI_KERNELS_CUDA_CLUSTER", "8")
    s, t, r = streams(4, 151936, torch.bfloat16, "cuda", count=3)
    opts = LossOptions(pmi=True, jsd_beta=jsd_beta)
    grad, stats = torch.empty_like(s), torch.empty(4, len(STATS), device="cuda")
    loss = vocab_parallel.parallel_rows(
        REGISTRY["cuda"],
        s,
        t,
        r,
        None,
        opts=opts,
        group=None,
        row_scale=torch.ones(4, device="cuda"),
        grad_out=grad,
        stats_out=stats,
    )
    ref_loss, ref_grad, ref_stats = reference_rows(s, t, r, None, None, torch.ones(4), opts)
    assert_close(loss, ref_loss, torch.float32, "loss", factor=3, atol=1e-6)
    assert_close(grad, ref_grad, torch.bfloat16, "grad", factor=2, atol=1e-9)
    assert_close(stats, ref_stats, torch.float32, "stats", factor=3, atol=1e-5)


def test_a_bad_cuda_cluster_setting_is_an_error_naming_it(monkeypatch):
    """PMI_KERNELS_CUDA_CLUSTER=3 is refused by the CUDA launcher, by name."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("PMI_KERNELS_CUDA_CLUSTER", "3")
    s, t, r = streams(2, 64, torch.float32, "cuda", count=3)
    with pytest.raises(RuntimeError, match="PMI_KERNELS_CUDA_CLUSTER"):
        REGISTRY["cuda"].rows(s, t, r, opts=LossOptions(pmi=True))


def test_auto_picks_the_cpu_kernel_and_falls_back_without_it(monkeypatch):
    from pmi_kernels.backends.native import extension

    cpu = torch.device("cpu")
    if extension.load() is None:
        assert resolve_backend("auto", cpu).name == "cpu"
    monkeypatch.setattr(extension, "unavailable_reason", lambda device_type: "not built here")
    assert resolve_backend("auto", cpu).name == "torch"
    with pytest.raises(ValueError, match="not built here"):
        resolve_backend("cpu", cpu)


@pytest.mark.parametrize("name,device_type", [("cuda", "cpu"), ("cpu", "meta"), ("tpu", "cpu")])
def test_backend_on_the_wrong_device_is_a_value_error(name, device_type):
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(name, torch.device(device_type))


def test_extension_turned_off_falls_back_and_says_how_to_build():
    """PMI_KERNELS_NO_EXTENSION=1: auto runs the torch path; backend="cpu" names the variable."""
    code = (
        "import torch; from pmi_kernels import pmi_kl; x = torch.randn(2, 5)\n"
        "print(pmi_kl(x, x, x).item())\n"
        "try:\n    pmi_kl(x, x, x, backend='cpu')\nexcept ValueError as e:\n    print('ValueError', e)\n"
    )
    env = dict(os.environ, PMI_KERNELS_NO_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ValueError" in out.stdout and "PMI_KERNELS_NO_EXTENSION" in out.stdout


def test_op_schema_under_opcheck_and_compile():
    """pmi_kernels::rows has a fake kernel: opcheck passes and torch.compile traces it whole."""
    if resolve_backend("auto", torch.device("cpu")).name != "cpu":
        pytest.skip("the C++ extension is not built here")

    s, t, r = streams(3, 50, torch.float32, count=3)
    options = LossOptions(pmi=True).op_arguments()
    args = (s, t, r, None, None, None, torch.ones(3), torch.empty_like(s), torch.empty(3, 3), None, None, None, None)
    torch.library.opcheck(torch.ops.pmi_kernels.rows.default, args, dict(phase=Phase.ALL.value, **options))
    torch.library.opcheck(torch.ops.pmi_kernels.diagnostics_rows.default, (s, t, r, None), options)
    loss_only = args[:7] + (None,) * 6

    def call(*tensors):
        return torch.ops.pmi_kernels.rows(*tensors, phase=Phase.ALL.value, **options)

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*loss_only), call(*loss_only))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_backend_takes_the_contracts_arguments(name):
    """Each backend's rows and diagnostics_rows take contract.RowBackend's parameters: the
    positional ones in order with the same defaults (named as the backend likes), the keyword
    ones by name with the same defaults (a backend may add keyword ones with defaults)."""
    import inspect

    module = REGISTRY[name]._impl()
    for function in ("rows", "diagnostics_rows"):
        stated = list(inspect.signature(getattr(RowBackend, function)).parameters.values())[1:]  # past self
        taken = list(inspect.signature(getattr(module, function)).parameters.values())
        positional = [p for p in stated if p.kind != p.KEYWORD_ONLY]
        assert [(p.kind, p.default) for p in taken[: len(positional)]] == [(p.kind, p.default) for p in positional], (
            f"{name}.{function}'s positional parameters"
        )
        keywords = {p.name: p for p in taken[len(positional) :]}
        for parameter in stated[len(positional) :]:
            assert parameter.name in keywords, f"{name}.{function} lacks {parameter.name}"
            assert keywords[parameter.name].kind == parameter.KEYWORD_ONLY, f"{name}.{function}: {parameter.name}"
            assert keywords[parameter.name].default == parameter.default, f"{name}.{function}: {parameter.name}"
        extra = [p for p in keywords.values() if p.name not in {q.name for q in stated}]
        assert all(p.kind == p.KEYWORD_ONLY and p.default is not p.empty for p in extra), extra


@pytest.mark.parametrize("device,backend", PATHS)
def test_the_phase_is_given_never_inferred(device, backend):
    """A phase given without its tensors, or with another phase's, is a ValueError naming them."""
    s, t, r = streams(2, 64, torch.float32, device, count=3)
    opts = LossOptions(pmi=True)
    lse = torch.zeros(2, 4, device=device)
    with pytest.raises(ValueError, match="phase LSE needs lse_out"):
        REGISTRY[backend].rows(s, t, r, opts=opts, phase=Phase.LSE)
    with pytest.raises(ValueError, match="phase ALL takes no lse_in"):
        REGISTRY[backend].rows(s, t, r, opts=opts, lse_in=lse)
    with pytest.raises(ValueError, match="phase GRAD needs slope_sum_in"):
        REGISTRY[backend].rows(s, t, r, opts=opts, phase=Phase.GRAD, lse_in=lse)
    with pytest.raises(ValueError, match="phase must be one of"):
        REGISTRY[backend].rows(s, t, r, opts=opts, phase=7)

"""The vocabulary split over a process group (gloo, spawned processes): every rank's loss, and
its shard of the gradients, equal the unsharded float64 reference, at world sizes 2 and 3 with
shards of different sizes, for every loss option, mode, reduction and dtype, on every backend."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import assert_close, upcast

VOCAB = 1001
# Contiguous shards in rank order, of different sizes.
SHARDS = {2: [600, 401], 3: [400, 300, 301]}
OPTIONS = [
    dict(),
    dict(jsd_beta=0.0),
    dict(jsd_beta=1.0, temperature=0.7),
    dict(jsd_beta=0.3, beta=0.5, clip=1.5),
    dict(clip=None, center=False),
    dict(clip=3.0, center=False, jsd_beta=0.0),
    dict(entry_clip=1e-3),
]
MODES = ["pmi", "pmi-anchor", "opsd"]


def shard_of(x, rank, world, dim):
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank])


def inputs(seed, dtype, n=6, hidden=12):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return dict(
        logits=[rand(n, VOCAB, scale=3.0) for _ in range(4)],
        hidden=[rand(n, hidden) for _ in range(4)],
        weight=rand(VOCAB, hidden, scale=0.6),
        bias=rand(VOCAB),
        frozen=rand(VOCAB, hidden, scale=0.6),
        mask=torch.rand(n, generator=gen) > 0.3,
    )


def streams_for(mode, xs):
    s, t, r, a = xs
    return s, t, None if mode == "opsd" else r, a if mode == "pmi-anchor" else None


def check_logits(rank, world, group, backend, dtype, mode, options, reduction, mask, seed):
    from pmi_kernels import pmi_kl
    from pmi_kernels.reference import pmi_kl_reference

    data = inputs(seed, dtype)
    mask = {"some": data["mask"], "none-kept": torch.zeros(6, dtype=torch.bool), None: None}[mask]
    s, t, r, a = streams_for(mode, data["logits"])
    local = [None if x is None else shard_of(x, rank, world, 1).contiguous() for x in (s, t, r, a)]
    student = local[0].clone().requires_grad_(True)
    options = dict(options)
    workspace = options.pop("workspace_bytes", None)
    loss = pmi_kl(
        student,
        *local[1:],
        mask=mask,
        reduction=reduction,
        backend=backend,
        process_group=group,
        workspace_bytes=workspace,
        **options,
    )
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (grad,) = torch.autograd.grad((loss.double() * upstream).sum(), student)
    s64 = upcast(s).requires_grad_(True)
    ref = pmi_kl_reference(s64, upcast(t), upcast(r), upcast(a), mask=mask, reduction=reduction, **options)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), s64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(loss, ref, acc, f"rank {rank} loss", factor=2, atol=1e-6)
    assert_close(grad, shard_of(ref_grad, rank, world, 1), dtype, f"rank {rank} grad", factor=2, atol=1e-9)


def check_fused(rank, world, group, backend, dtype, mode, options, reduction, mask, seed):
    from pmi_kernels import fused_pmi_kl
    from pmi_kernels.reference import fused_pmi_kl_reference

    data = inputs(seed, dtype)
    mask = {"some": data["mask"], "none-kept": torch.zeros(6, dtype=torch.bool), None: None}[mask]
    h, h_t, h_r, h_a = streams_for(mode, data["hidden"])
    leaves = [
        h.clone().requires_grad_(True),
        shard_of(data["weight"], rank, world, 0).clone().requires_grad_(True),
        shard_of(data["bias"], rank, world, 0).clone().requires_grad_(True),
    ]
    options = dict(options)
    workspace = options.pop("workspace_bytes", None)
    loss = fused_pmi_kl(
        leaves[0],
        leaves[1],
        h_t,
        h_r,
        h_a,
        lm_head_bias=leaves[2],
        frozen_weight=shard_of(data["frozen"], rank, world, 0),
        mask=mask,
        reduction=reduction,
        backend=backend,
        process_group=group,
        workspace_bytes=workspace,
        **options,
    )
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    grads = torch.autograd.grad((loss.double() * upstream).sum(), leaves)
    ref_leaves = [upcast(x).requires_grad_(True) for x in (h, data["weight"], data["bias"])]
    ref = fused_pmi_kl_reference(
        ref_leaves[0],
        ref_leaves[1],
        upcast(h_t),
        upcast(h_r),
        upcast(h_a),
        lm_head_bias=ref_leaves[2],
        frozen_weight=upcast(data["frozen"]),
        mask=mask,
        reduction=reduction,
        **options,
    )
    ref_grads = torch.autograd.grad((ref * upstream).sum(), ref_leaves)
    # The GEMMs give logits in the input dtype: bf16 losses are as close as bf16 logits allow.
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32 if dtype == torch.float32 else dtype
    factor = 1 if dtype == torch.float64 else 3  # the bf16 logits round once more in the t - r GEMM
    assert_close(loss, ref, loss_dtype, f"rank {rank} loss", factor=factor, atol=1e-6)
    assert_close(grads[0], ref_grads[0], dtype, f"rank {rank} grad_h (summed)", factor=factor, atol=1e-8)
    assert_close(
        grads[1], shard_of(ref_grads[1], rank, world, 0), dtype, f"rank {rank} grad_W shard", factor=factor, atol=1e-8
    )
    assert_close(
        grads[2], shard_of(ref_grads[2], rank, world, 0), dtype, f"rank {rank} grad_b shard", factor=factor, atol=1e-8
    )


def cases(backends, world):
    """(function, backend, dtype, mode, options, reduction, mask): every option and mode in fp64 on
    the native CPU paths, other dtypes, reductions and masks on a few; the Triton interpreter (slow)
    on one case of each loss kind; at world size 3, the default CPU backend only."""
    native = [b for b in backends if b != "triton"] if world == 2 else ["cpu" if "cpu" in backends else "torch"]
    out = []
    for check in ("logits", "fused"):
        for backend in native:
            out += [
                (check, backend, torch.float64, mode, options, "none", "some") for options in OPTIONS for mode in MODES
            ]
            out += [
                (check, backend, dtype, "pmi", dict(), reduction, mask)
                for dtype in (torch.float32, torch.bfloat16, torch.float16)
                for reduction, mask in (("mean", "some"), ("sum", None))
            ]
            out.append((check, backend, torch.float32, "pmi-anchor", dict(jsd_beta=0.0), "mean", "none-kept"))
            # bf16 with the clip off: the fused path's frozen streams take a GEMM each.
            out.append((check, backend, torch.bfloat16, "pmi-anchor", dict(clip=None, jsd_beta=0.0), "none", "some"))
        if world == 2:  # the chunked torch path over several chunks: every rank must sweep the same ones
            out.append(
                (
                    check,
                    "torch",
                    torch.float64,
                    "pmi-anchor",
                    dict(jsd_beta=0.4, workspace_bytes=120_000),
                    "sum",
                    "some",
                )
            )
        if "triton" in backends and world == 2:
            out += [
                (check, "triton", torch.float64, "pmi", options, "none", "some")
                for options in (dict(jsd_beta=0.0), dict(jsd_beta=0.5, entry_clip=1e-3))
            ]
    return out


def worker(rank, world, init_file, backends):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        for i, (check, backend, dtype, mode, options, reduction, mask) in enumerate(cases(backends, world)):
            fn = check_logits if check == "logits" else check_fused
            try:
                fn(rank, world, group, backend, dtype, mode, options, reduction, mask, seed=1000 + i)
            except AssertionError as err:
                where = f"{check} {backend} {dtype} {mode} {options} {reduction} mask={mask}"
                raise AssertionError(f"{where}: {err}") from err
    finally:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_equals_the_unsharded_reference(world):
    from conftest import PATHS

    backends = sorted({p.values[1] for p in PATHS if p.values[0] == "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "rendezvous"), backends), nprocs=world, join=True)


def test_process_group_needs_an_initialized_group():
    from pmi_kernels import pmi_kl

    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="process_group"):
        pmi_kl(x, x, x, process_group="not a group")


def test_communication_is_o_n_and_matches_the_formula():
    """Every byte handed to an all-reduce, traced on 2 processes, equals benchmarks.comm_bytes's
    formula from the shapes: O(N) per call for pmi_kl, O(N H) for fused_pmi_kl, no O(N V) term."""
    from benchmarks.comm_bytes import traced_check

    report = traced_check()
    assert report.count("traced") == 4


def disagreeing_worker(rank, world, init_file):
    from pmi_kernels import fused_pmi_kl, pmi_kl

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        for case in ("rows", "options", "empty shard", "mask count", "mask rows"):
            rows = 4 if case == "rows" and rank == 1 else 3
            columns = 0 if case == "empty shard" and rank == 1 else 5
            s, t, r = (torch.randn(rows, columns) for _ in range(3))
            jsd_beta = 0.0 if case == "options" and rank == 1 else 0.5
            mask = torch.tensor([True, True, False]) if case.startswith("mask") else None
            if rank == 1 and case.startswith("mask"):  # fewer rows counted, or as many but others
                mask = torch.tensor([True, False, False] if case == "mask count" else [False, True, True])
            with pytest.raises(ValueError, match="process_group|student_logits"):
                pmi_kl(s, t, r, jsd_beta=jsd_beta, mask=mask, process_group=group)
            if case.startswith("mask"):  # the fused path crashed in a collective (its chunks differed)
                h, h_t, h_r, w = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4)
                with pytest.raises(ValueError, match="process_group"):
                    fused_pmi_kl(h, w, h_t, h_r, mask=mask, process_group=group)
        # Calls that differ only in how they run, each once a gloo abort, a hang or mixed scales.
        other = rank == 1
        s, t, r = (torch.randn(3, 5, dtype=torch.float64 if other else torch.float32) for _ in range(3))
        h, h_t, h_r, w = (torch.randn(*shape) for shape in ((3, 4), (3, 4), (3, 4), (5, 4)))
        for _name, call in (
            ("dtype", lambda: pmi_kl(s, t, r, process_group=group)),
            (
                "backend",
                lambda: fused_pmi_kl(h, w, h_t, h_r, backend="torch" if other else "triton", process_group=group),
            ),
            (
                "workspace",
                lambda: fused_pmi_kl(h, w, h_t, h_r, workspace_bytes=64 if other else 2**20, process_group=group),
            ),
            ("normalizer", lambda: fused_pmi_kl(h, w, h_t, h_r, normalizer=3.0 if other else 2.0, process_group=group)),
            ("gradient", lambda: fused_pmi_kl(h.requires_grad_(not other), w, h_t, h_r, process_group=group)),
        ):
            with pytest.raises(ValueError, match="process_group: the ranks differ"):
                call()
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_ranks_that_disagree_all_get_a_value_error():
    """One rank's bad input (an empty shard), other rows, options or masks (another count, or as
    many rows but others): a ValueError on every rank, not a hang in a collective (or a silently
    mixed loss, or gloo's abort on the fused path's different chunk counts) on the others."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(disagreeing_worker, args=(2, os.path.join(tmp, "rendezvous")), nprocs=2, join=True)

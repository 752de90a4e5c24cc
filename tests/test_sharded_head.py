"""A head sharded by FSDP2 (fully_shard: DTensor parameters), on 2 gloo ranks: the loss equals the
unsharded call on each rank's data, the full weight is gathered once per call, and the weight and
bias gradients are each rank's shard of the average over the ranks, as FSDP2 reduces them. A
ZeRO-3 partitioned weight is refused with a message that says what to do."""

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import assert_close

N, H, V, WORLD = 5, 8, 37, 2


def rank_inputs(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(N, H, generator=gen, dtype=torch.float64) for _ in range(3)]


def head_params():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5, torch.randn(
        V, generator=gen, dtype=torch.float64
    )


def worker(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        check_sharded_head(rank)
    finally:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    # After FSDP2 ran on gloo, something in C++ keeps the default group's threads alive past
    # destroy_process_group; torn down at interpreter exit they abort the process now and then
    # ("terminate called without an active exception"). A rank that passed leaves without that.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_sharded_head(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from pmi_kernels import fused_pmi_kl, pmi_diagnostics
    from pmi_kernels.reference import fused_pmi_kl_reference

    weight, bias = head_params()
    head = torch.nn.Linear(H, V, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    fully_shard(head, mesh=init_device_mesh("cpu", (WORLD,)))
    assert isinstance(head.weight, DTensor)
    h, h_t, h_r = rank_inputs(rank)
    gathers = []
    original = DTensor.full_tensor

    def counted(self, *args, **kwargs):
        gathers.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    DTensor.full_tensor = counted
    try:
        loss = fused_pmi_kl(
            h, head.weight, h_t, h_r, lm_head_bias=head.bias, frozen_weight=head.weight.detach(), jsd_beta=0.3
        )
    finally:
        DTensor.full_tensor = original
    assert gathers.count((V, H)) == 1, f"the weight was gathered {gathers.count((V, H))} times"
    loss.backward()
    ref = fused_pmi_kl_reference(h, weight, h_t, h_r, lm_head_bias=bias, jsd_beta=0.3)
    assert_close(loss, ref, torch.float64, "loss")
    # FSDP2's reduction: each rank's gradient, averaged over the ranks.
    want = [torch.zeros_like(weight), torch.zeros_like(bias)]
    for other in range(WORLD):
        leaves = [weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)]
        x, x_t, x_r = rank_inputs(other)
        grads = torch.autograd.grad(
            fused_pmi_kl_reference(x, leaves[0], x_t, x_r, lm_head_bias=leaves[1], jsd_beta=0.3), leaves
        )
        want = [w + g / WORLD for w, g in zip(want, grads)]
    assert isinstance(head.weight.grad, DTensor) and head.weight.grad.placements == head.weight.placements
    assert_close(head.weight.grad.full_tensor(), want[0], torch.float64, "grad_W")
    assert_close(head.bias.grad.full_tensor(), want[1], torch.float64, "grad_b")
    diag = pmi_diagnostics(h, h_t, h_r, lm_head_weight=head.weight, lm_head_bias=head.bias)
    assert torch.isfinite(diag["kl_target_student"]).all()


def test_fsdp2_sharded_head_equals_the_unsharded_call():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "rendezvous"),), nprocs=WORLD, join=True)


def empty_shard_worker(rank, init_file, world):
    """V = 4 rows over 3 ranks: rank 2 holds none of the head's rows, nor of the frozen head's."""
    import datetime

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pmi_kernels import fused_pmi_kl
    from pmi_kernels.reference import fused_pmi_kl_reference

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )  # a rank left waiting fails, not hangs
    try:
        gen = torch.Generator().manual_seed(3)
        weight, frozen_weight = (torch.randn(4, H, generator=gen, dtype=torch.float64) for _ in range(2))
        heads = [torch.nn.Linear(H, 4, bias=False, dtype=torch.float64) for _ in range(2)]
        for head, value in zip(heads, (weight, frozen_weight)):
            with torch.no_grad():
                head.weight.copy_(value)
            fully_shard(head, mesh=init_device_mesh("cpu", (world,)))
        heads[1].requires_grad_(False)
        h, h_t, h_r = rank_inputs(rank)
        loss = fused_pmi_kl(h, heads[0].weight, h_t, h_r, frozen_weight=heads[1].weight, jsd_beta=0.3)
        loss.backward()
        ref = fused_pmi_kl_reference(h, weight, h_t, h_r, frozen_weight=frozen_weight, jsd_beta=0.3)
        assert_close(loss, ref, torch.float64, "loss")
    finally:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_a_rank_holding_no_rows_of_two_heads_gathers_both():
    """Two different FSDP2-sharded heads (the student's and a frozen one) with a rank whose
    shards of both are empty: every rank gathers both. Fails on the rank that took the two
    empty shards (both at address 0) for one head and skipped a gather, the others waiting."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(empty_shard_worker, args=(os.path.join(tmp, "rendezvous"), 3), nprocs=3, join=True)


def test_zero3_partitioned_weight_is_refused():
    """Outside deepspeed.zero.GatheredParameters a ZeRO-3 parameter has numel 0 and a ds_shape."""
    from pmi_kernels import fused_pmi_kl

    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_shape = torch.Size([V, H])
    h = torch.randn(N, H)
    with pytest.raises(ValueError, match="lm_head_weight is a DeepSpeed ZeRO-3 partitioned.*GatheredParameters"):
        fused_pmi_kl(h, partitioned, h, h)

"""The lm_head arguments: the frozen head's defaults, and heads sharded across ranks.

The frozen streams use (frozen_weight, frozen_bias), each defaulting on its own to the
student's (W or b), detached: a frozen base weight with the student's bias is a LoRA'd head's
usual case. (reference.py states the same rule separately, so that the tests compare two
readings of it, not one.)

FSDP2 (`fully_shard`) keeps each parameter as a DTensor sharded over a device mesh, and
unshards it only inside its module's forward. A head weight passed to fused_pmi_kl outside that
forward is gathered here once per call (one full copy beside the shard) and its gradient goes
back as FSDP2 would send it: reduce-scattered to the weight's own placements and averaged over
the mesh (FSDP2's default gradient reduction), so the optimizer step sees what it would have
seen had the head run inside FSDP2's forward.

DeepSpeed ZeRO-3 partitions a parameter to numel 0 outside `deepspeed.zero.GatheredParameters`;
such a weight is refused with a message that says so.
"""

from __future__ import annotations

import sys

import torch


def frozen_head(lm_head_weight, lm_head_bias, frozen_weight, frozen_bias):
    """(W_f, b_f): each defaults on its own to the student's, detached."""
    w_f = lm_head_weight if frozen_weight is None else frozen_weight
    b_f = lm_head_bias if frozen_bias is None else frozen_bias
    return w_f.detach(), None if b_f is None else b_f.detach()


def _dtensor_type():
    """DTensor, or None where no tensor can be one: torch.distributed.tensor not imported yet (its
    import, sympy with it, took about 1 s of a first fused_pmi_kl call) or not built."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


class _GatherSharded(torch.autograd.Function):
    """The full tensor of a sharded DTensor; backward: the gradient averaged over the mesh and
    reduce-scattered back to the DTensor's placements."""

    @staticmethod
    def forward(ctx, sharded):
        ctx.mesh, ctx.placements = sharded.device_mesh, sharded.placements
        return sharded.full_tensor()

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor, Partial

        # Each rank holds the gradient of its own data: a pending sum over the mesh, averaged as
        # FSDP2 averages (dividing first, which works on every backend, gloo included).
        pending = DTensor.from_local(grad / ctx.mesh.size(), ctx.mesh, [Partial()] * ctx.mesh.ndim, run_check=False)
        return pending.redistribute(ctx.mesh, ctx.placements)


def gather_head(x, name: str):
    """`x` as a plain tensor: a sharded (FSDP2 DTensor) weight or bias gathered whole; a ZeRO-3
    partitioned one refused; anything else as it is."""
    if x is None or not isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "ds_shape") and x.numel() == 0:
        raise ValueError(
            f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (numel 0 outside a gather): call "
            f"fused_pmi_kl inside `with deepspeed.zero.GatheredParameters(<the parameter>):`"
        )
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(x, dtensor):
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherSharded.apply(x)
    return x.full_tensor()


def _storage_key(x):
    """What identifies a tensor's data, a DTensor's local shard included (a .detach() of a
    sharded weight is another object over the same shard): its storage itself, not the data's
    address, which is 0 for every empty shard (a rank holding no rows of two different heads
    once took them for one, skipped a gather the other ranks ran, and they waited forever)."""
    dtensor = _dtensor_type()
    local = x.to_local() if dtensor is not None and isinstance(x, dtensor) else x
    return local.untyped_storage()._cdata, local.storage_offset(), tuple(x.shape), tuple(local.stride())


def gather_heads(named: dict) -> dict:
    """gather_head for each named tensor, gathering the same data passed twice (e.g. the frozen
    head given as the student's weight, detached) only once: one full copy beside the shard."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(x, dtensor) for x in named.values()):
        # Nothing to gather; no data_ptr either (torch 2.11's dynamo cannot trace one as a key).
        return {name: gather_head(x, name) for name, x in named.items()}
    out, seen = {}, {}
    for name, x in named.items():
        key = _storage_key(x) if isinstance(x, torch.Tensor) and x.numel() > 0 else None
        if key is not None and key in seen:
            out[name] = seen[key].detach()
            continue
        out[name] = gather_head(x, name)
        if key is not None:
            seen[key] = out[name]
    return out

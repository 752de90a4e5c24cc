"""The trainer under torchrun: data parallelism on torch.distributed.

Every rank holds the whole model (LoRA adapters or all weights, and the frozen copy) and reads
its own rollouts: batch_size is the micro-batch over all ranks, each rank taking its equal,
rank-disjoint slice of the seeded data order and sampling with its own seed, so a config means
the same step at any world size.
Each rank's loss is its token sum divided by the step's token count over all ranks (one
all-reduce), so after the gradients are summed over the ranks (one all-reduce of one flat
buffer per step, after the last micro-batch, where DDP under no_sync would reduce) every rank
holds the gradient of the whole step's token mean: N ranks take the step one process would take
with N times the batch. Rank 0 writes the metrics and the checkpoints (output_dir must be a
filesystem every rank sees); every rank reads a checkpoint to resume.

A stop signal (torchrun forwards SIGINT/SIGTERM to every worker) is acted on where every rank
checks it together (SyncedStop), so no rank leaves a collective the others are in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, TypeVar

import torch

from .interrupts import Interrupted, StopRequest, TrainingFailed

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the trainer's processes (a plain run: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def join_world(device: str) -> World:
    """The default process group: the one already initialized (a test's, a launcher's), or
    torchrun's (WORLD_SIZE > 1 in the environment; nccl for CUDA devices, gloo for "cpu")."""
    import torch.distributed as dist

    if not dist.is_available():
        return World()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return World()
        cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
    size = dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(dist.get_rank(), size, local_rank) if size > 1 else World()


def training_device(device: str, world: World) -> torch.device:
    """config.device, with "auto" and "cuda" meaning this rank's GPU (LOCAL_RANK) under torchrun."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world.distributed:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device(device)


def check_world(config, world: World) -> None:
    """What a run under torchrun cannot do, named by its config key."""
    if world.distributed and config.rollout_engine == "vllm":
        raise ValueError("rollout_engine: 'vllm' runs in one process; under torchrun use 'hf'")
    if config.fsdp and not world.distributed:
        raise ValueError(
            "fsdp: shards the model over torchrun's processes; this run has one (start it with torchrun "
            "--nproc-per-node N, or set fsdp false)"
        )
    if config.batch_size % world.size:
        raise ValueError(
            f"batch_size: {config.batch_size} rollouts per micro-batch do not split evenly over "
            f"{world.size} processes (each samples batch_size / world size of them)"
        )


def check_same_config(world: World, config) -> None:
    """Every rank runs one config (torchrun hands each the same command line; a launcher that
    does not left ranks waiting in collectives, or training apart): else a ValueError on every
    rank naming the keys that differ."""
    if not world.distributed:
        return
    import dataclasses
    import json

    import torch.distributed as dist

    configs: List = [None] * world.size
    dist.all_gather_object(configs, json.dumps(dataclasses.asdict(config), sort_keys=True, default=str))
    values = [json.loads(c) for c in configs]
    differ = sorted(key for key in values[0] if any(v.get(key) != values[0][key] for v in values[1:]))
    if differ:
        raise ValueError(
            f"torchrun: the ranks' configs differ in {', '.join(differ)}; every rank must run the same config"
        )


def on_main(world: World, fn: Callable[[], T]) -> T:
    """fn() run by rank 0 only, its result handed to every rank; its error raised on every rank
    (a ValueError as one, anything else as TrainingFailed), so none waits forever for rank 0."""
    if not world.distributed:
        return fn()
    import torch.distributed as dist

    box: List = [None]
    if world.main:
        try:
            box[0] = ("ok", fn())
        except Exception as err:
            box[0] = (type(err).__name__, str(err))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    error = (ValueError if kind == "ValueError" else TrainingFailed)(f"(from rank 0) {value}")
    error.from_rank_zero = True  # the CLI prints it once, on rank 0
    raise error


def broadcast_module(world: World, module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (as DDP does when it wraps a model)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 over every rank: each decoder layer a unit (gathered for its forward and backward,
    then freed), the rest of the model (embeddings, tied or not, the final norm, the lm_head) the
    root unit. Gradients come back reduce-scattered and averaged over the ranks."""
    import inspect

    from torch.distributed.fsdp import fully_shard

    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise ValueError(
            f"fsdp: {type(model).__name__}.forward takes no logits_to_keep, which the sharded model's "
            "contexts are read with (WholeModelDecoder); set fsdp false"
        )
    for layer in getattr(model.get_decoder(), "layers", []):
        fully_shard(layer)
    fully_shard(model)


class WholeModelDecoder:
    """Called like the decoder, it runs the whole model, so that FSDP2's hooks on the root unit
    gather the embeddings and norm, and returns the decoder's output; the lm_head runs on the last
    position only (logits_to_keep=1), a [B, 1, V] cost, since the loss applies the head itself."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.config = model, model.config

    def __call__(self, **kwargs):
        outputs = []
        hook = self.model.get_decoder().register_forward_hook(lambda module, args, out: outputs.append(out))
        try:
            self.model(**kwargs, logits_to_keep=1)
        finally:
            hook.remove()
        return outputs[-1]


def most_over_ranks(world: World, count: int, device: torch.device) -> int:
    """The largest count any rank has: under FSDP2 every rank must run as many forwards (each
    gathers weights with the others), so the ranks with fewer pad to it."""
    if not world.distributed:
        return count
    import torch.distributed as dist

    flat = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    return int(flat)


def first_over_ranks(world: World, message: Optional[str]) -> Optional[str]:
    """The first rank's message that is not None (every rank gets it), so that all raise together."""
    if not world.distributed:
        return message
    import torch.distributed as dist

    every: List[Optional[str]] = [None] * world.size
    dist.all_gather_object(every, message)
    return next((m for m in every if m is not None), None)


BUCKET_ELEMENTS = 2**25  # gradients all-reduced 128 MiB of fp32 at a time: the transient copy is one bucket


def sum_gradients(world: World, params: List[torch.nn.Parameter]) -> None:
    """Each gradient summed over the ranks in fp32, in buckets of flat buffers. A rank without a
    gradient for a parameter (e.g. one whose rollouts were all empty) adds zeros; a parameter no
    rank has a gradient for keeps none, as in one process (AdamW skips it)."""
    if not world.distributed or not params:
        return
    import torch.distributed as dist

    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad)
    params = [p for p, anyone in zip(params, has_grad.tolist()) if anyone]
    for bucket in _buckets(params):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        dist.all_reduce(flat)
        for p, chunk in zip(bucket, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).to(p.dtype)


def _buckets(params: List[torch.nn.Parameter]) -> Iterable[List[torch.nn.Parameter]]:
    bucket, size = [], 0
    for p in params:
        if bucket and size + p.numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


def sum_over_ranks(world: World, values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """The per-key sums over the ranks (keys any rank has; missing ones count 0), in fp64."""
    if not world.distributed:
        return dict(values)
    import torch.distributed as dist

    every: List[Optional[Iterable[str]]] = [None] * world.size
    dist.all_gather_object(every, sorted(values))
    keys = sorted(set().union(*every))
    flat = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    return dict(zip(keys, flat.tolist()))


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class SyncedStop(StopRequest):
    """A StopRequest whose check() is a collective: every rank reaches the same checks in the same
    order and all stop together when any has the flag. check_local() (reached a different number of
    times on different ranks, e.g. once per packed group) defers to the next check()."""

    def __init__(self, world: World, device: torch.device, stop: StopRequest):
        super().__init__()
        self.world, self.device, self.local = world, device, stop

    @property
    def requested(self) -> bool:
        return self.local.requested

    def catching(self):
        return self.local.catching()

    def check(self, where: str) -> None:
        import torch.distributed as dist

        flag = torch.tensor([self.local.signum or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag):
            raise Interrupted(int(flag), where)

    def check_local(self, where: str) -> None:
        pass

"""The row operation over a vocabulary split between processes (Megatron's vocabulary-parallel
layout: each rank of a process group holds a contiguous shard of the vocabulary, in rank order,
shards of any sizes).

Every definition of the loss is over the whole vocabulary, so the per-row reductions are
gathered with all-reduces of O(1) numbers per row, never a [N, V] tensor:

    kappa        the centering sum of t - r (and the global V), or lse(t) - lse(r)
    phase 1      each shard's (max, sum of exp) of s and of the target g  -> all-reduce max, sum
    phase 2      from the whole log-sum-exps: each shard's loss, slope sum (and statistics)
                 -> all-reduce sum; forward KL's gradient is written here
    phase 3      other losses: the gradient, from the whole slope sum

The backends run the phases (their row functions take lse_out / lse_in / slope_sum_in).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist

from .backends import Backend
from .backends.contract import Phase
from .options import LossOptions, compute_dtype

if TYPE_CHECKING:
    from .call import PreparedCall

# Process groups by name: the custom ops take names (a group is no op argument type).
_GROUPS: Dict[str, "dist.ProcessGroup"] = {}


def group_name(group) -> Optional[str]:
    """The name the custom ops carry for `group` (None: no vocabulary split)."""
    if group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs torch.distributed to be initialized (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    _GROUPS[group.group_name] = group
    return group.group_name


def group_of(name: str):
    return _GROUPS[name]


class Fingerprint(NamedTuple):
    """What the ranks of a vocabulary split must agree on in one call (call_fingerprint), each
    field by what the error names when the ranks differ in it."""

    rows: tuple  # the streams' leading shape (and H for hidden states)
    dtype: object
    optional_tensors_given: tuple  # an anchor or a frozen head on one rank only would mix two targets
    loss_options: object
    counted_rows: tuple  # mask_digest of the mask, or of the labels' counted positions
    normalizer: object
    reduction: object
    return_stats: bool
    check_finite: bool
    grad_weight_fp32: bool
    backend: str
    workspace_bytes: object
    gradient_mode: tuple


def call_fingerprint(call: "PreparedCall") -> Fingerprint:
    """What Agreement compares of one prepared call (call.py), the same fields for pmi_kl and
    fused_pmi_kl. Logits' last dimension is each rank's own vocabulary shard: not compared."""
    return Fingerprint(
        rows=tuple(call.lead if call.width == "V" else call.shape),
        dtype=call.dtype,
        optional_tensors_given=call.given,
        loss_options=call.opts,
        counted_rows=mask_digest(call.mask),
        normalizer=normalizer_digest(call.normalizer),
        reduction=call.reduction,
        return_stats=call.return_stats,
        check_finite=call.check_finite,
        grad_weight_fp32=call.grad_weight_fp32,
        backend=call.backend.name,
        workspace_bytes=call.workspace_bytes,
        gradient_mode=call.gradient,
    )


class Agreement:
    """Every rank's input checks, settled together before any work: `with Agreement(group) as a:`
    around a call's checks, setting `a.fingerprint` (a Fingerprint) to what must be equal on
    every rank. A ValueError on one rank is raised there and, as "another rank's input was
    refused", on the others; different fingerprints are a ValueError on every rank that names
    the fields that differ. Without it, the other ranks would wait in a collective until their
    timeout. No group: no-op. One all-reduce of 3 int64s; a second, of two per field, only when
    the ranks differ (to name the fields)."""

    def __init__(self, group_name: Optional[str]):
        self.group = None if group_name is None else group_of(group_name)
        self.fingerprint: Optional[Fingerprint] = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if self.group is None or (kind is not None and not issubclass(kind, ValueError)):
            return False
        mark = zlib.crc32(repr(self.fingerprint).encode())
        flags = self._highest([int(kind is not None), mark, -mark])
        if kind is not None:
            return False
        if flags[0]:
            raise ValueError("process_group: another rank's input was refused (its own error says why)")
        if flags[1] != -flags[2]:
            raise ValueError(
                f"process_group: the ranks differ in their {', '.join(self._differing_fields())}; "
                "every rank must pass the same rows (its own vocabulary shard of them), mask, streams "
                "and options, with gradients on or off alike"
            )
        return False

    def _highest(self, values: List[int]) -> List[int]:
        """Each value's maximum over the ranks. After a MAX, -max(-x) is the minimum: x and -x
        side by side tell whether every rank holds the same x."""
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(self.group) == "nccl"
            else torch.device("cpu")
        )
        return all_reduce(
            torch.tensor(values, dtype=torch.int64, device=device), self.group, dist.ReduceOp.MAX
        ).tolist()

    def _differing_fields(self) -> List[str]:
        """The Fingerprint's fields that differ between the ranks (every rank calls this alike)."""
        marks = [zlib.crc32(repr(value).encode()) for value in self.fingerprint]
        highest = self._highest(marks + [-m for m in marks])
        count = len(marks)
        return [
            name.replace("_", " ")
            for name, high, negated_low in zip(Fingerprint._fields, highest[:count], highest[count:])
            if high != -negated_low
        ]


def normalizer_digest(normalizer):
    """What Agreement compares of a normalizer: its value (None: the reduction's own)."""
    return None if normalizer is None else float(normalizer)


# Odd 64-bit multipliers (PCG's and splitmix64's, the latter as a signed int64) that spread row
# indices over int64; products wrap alike on every device.
_MIX = (6364136223846793005, -4658895280553007687)


def mask_digest(mask: Optional[torch.Tensor]) -> tuple:
    """What Agreement compares of a mask: the counted rows' count, and two sums over them of
    their indices hashed to int64. Sums of the plain indices and their squares were equal for
    masks such as rows {0, 4, 5} and {1, 2, 6}; hashed ones agree for two masks only by chance.
    Ranks with different masks would sweep different rows: a crash in a collective, or a loss
    that mixes rows."""
    if mask is None:
        return ()
    counted = mask.reshape(-1).to(torch.int64)
    index = torch.arange(counted.numel(), dtype=torch.int64, device=counted.device)
    hashes = [_hashed(index, multiplier) for multiplier in _MIX]
    return tuple(torch.stack([counted.sum()] + [(counted * h).sum() for h in hashes]).tolist())


def _hashed(index: torch.Tensor, multiplier: int) -> torch.Tensor:
    """index -> a scrambled int64 (multiply, fold the high bits down, multiply again)."""
    x = (index + 1) * multiplier
    x = x ^ ((x >> 29) & ((1 << 35) - 1))  # a logical shift: torch shifts int64 arithmetically
    return x * multiplier


def all_reduce(x: torch.Tensor, group, op=None) -> torch.Tensor:
    dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


def gather_lse(local: torch.Tensor, group) -> torch.Tensor:
    """[C, 2k] of this shard's (max, sum of exp) pairs -> the whole vocabulary's (max, log sum of
    exp) pairs. A row with no mass anywhere (masked) gives (-inf, -inf)."""
    m_local, z_local = local[:, 0::2], local[:, 1::2]
    m = all_reduce(m_local.clone(), group, dist.ReduceOp.MAX)
    shift = torch.where(z_local > 0, (m_local - m).exp(), torch.zeros_like(z_local))
    z = all_reduce(z_local * shift, group)
    out = torch.empty_like(local)
    out[:, 0::2], out[:, 1::2] = m, z.log()
    return out


def local_lse(x: torch.Tensor) -> torch.Tensor:
    """[C, 2]: (max, sum of exp(x - max)) over this shard of each row."""
    m = x.max(-1).values
    return torch.stack([m, (x - m[:, None]).exp().sum(-1)], -1)


def global_vocab(local_vocab: int, group, device) -> int:
    return int(all_reduce(torch.tensor([local_vocab], dtype=torch.int64, device=device), group).item())


def widest_shard(local_vocab: int, group, device) -> int:
    return int(
        all_reduce(torch.tensor([local_vocab], dtype=torch.int64, device=device), group, dist.ReduceOp.MAX).item()
    )


def logits_kappa(t_raw, r_raw, opts: LossOptions, vocab: int, group) -> Optional[torch.Tensor]:
    """kappa of raw logit shards [C, V_k], as the kernels would compute it over the whole row."""
    if not opts.needs_kappa:
        return None
    dtype = compute_dtype(t_raw.dtype)
    if opts.center:
        partial = (t_raw.sum(-1, dtype=dtype) - r_raw.sum(-1, dtype=dtype)) / opts.temperature
        return all_reduce(partial, group) / vocab

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype) / opts.temperature

    lse = gather_lse(torch.cat([local_lse(scaled(t_raw)), local_lse(scaled(r_raw))], -1), group)
    return (lse[:, 0] - lse[:, 2]) + (lse[:, 1] - lse[:, 3])


def parallel_rows(
    impl: Backend,
    s,
    t,
    r,
    a,
    *,
    opts: LossOptions,
    group,
    kappa=None,
    mask=None,
    row_scale=None,
    grad_out=None,
    stats_out=None,
) -> torch.Tensor:
    """The row operation's contract (backends/contract.py) over this rank's vocabulary shard:
    the whole row's loss and statistics (the same on every rank), this shard's gradient, in the
    phases of backends.contract.Phase with the gathers between them."""
    n = s.shape[0]
    dtype = compute_dtype(s.dtype)
    local = torch.empty(n, 4, dtype=dtype, device=s.device)
    impl.rows(s, t, r, a, opts=opts, phase=Phase.LSE, kappa=kappa, mask=mask, lse_out=local)
    lse = gather_lse(local, group)
    sums = torch.empty(n, 2 + (0 if stats_out is None else stats_out.shape[1]), dtype=dtype, device=s.device)
    slope_sum = torch.empty(n, dtype=dtype, device=s.device)
    stats = None if stats_out is None else torch.empty_like(stats_out)
    sums[:, 0] = impl.rows(
        s,
        t,
        r,
        a,
        opts=opts,
        phase=Phase.FROM_LSE,
        kappa=kappa,
        mask=mask,
        row_scale=row_scale,
        grad_out=grad_out,
        stats_out=stats,
        lse_in=lse,
        slope_sum_out=slope_sum,
    )
    sums[:, 1] = slope_sum
    if stats is not None:
        sums[:, 2:] = stats
    all_reduce(sums, group)
    if grad_out is not None and not opts.fast_grad:
        impl.rows(
            s,
            t,
            r,
            a,
            opts=opts,
            phase=Phase.GRAD,
            kappa=kappa,
            mask=mask,
            row_scale=row_scale,
            grad_out=grad_out,
            lse_in=lse,
            slope_sum_in=sums[:, 1].contiguous(),
        )
    if stats_out is not None:
        stats_out.copy_(sums[:, 2:])
    return sums[:, 0]

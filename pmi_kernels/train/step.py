"""The parts of one optimizer step that the trainer (loop.py) puts together: the learning-rate
schedule, the sampling seeds, the loss over a group of rollouts (distil) and the step's
metrics record.
"""

from __future__ import annotations

import math
import resource
from typing import Dict, List

import torch

from .. import fused_pmi_kl, pmi_diagnostics
from .config import TrainConfig
from .contexts import ContextReader
from .distributed import World
from .metrics import StepTimer


def lr_factor(config: TrainConfig, step: int) -> float:
    """The schedule: what lr is multiplied by at `step` (linear warm-up, then constant, linear
    or cosine decay to max_steps)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def sampling_seed(config: TrainConfig, world: World, step: int, evaluation: bool = False) -> int:
    """The step's sampling seed on this rank (its evaluation's, apart): an interrupted and
    resumed run samples the same."""
    return ((config.seed * 1_000_003 + step) * world.size + world.rank) * 2 + evaluation


def distil(
    contexts: ContextReader,
    group: List,
    normalizer: int,
    diagnose: bool,
    totals: Dict,
    timer: StepTimer,
    scale: float = 1.0,
) -> None:
    """The loss over every token of a group of (index, rollout) pairs, one fused_pmi_kl call,
    divided by the step's token count; its gradients, times scale, accumulate into the
    parameters'. FSDP2 averages gradients over the ranks where the step needs their sum, so
    there the backward is of the loss times the world size. Adds the loss to totals["loss"]
    and, with diagnose, the diagnostics' sums over the tokens."""
    config = contexts.config
    options = config.loss_options()  # the loss keys, as LossOptions (validate() checked them)
    pmi = options.pmi
    indices, rollouts = [i for i, _ in group], [rollout for _, rollout in group]
    with timer("forwards"):
        states, head, frozen_head = contexts.states(indices, rollouts, pmi_streams=pmi or diagnose)

    def frozen():  # read at each use: under FSDP2 a backward reshards the weights it gathered
        return dict(
            frozen_weight=frozen_head.weight.detach(),
            frozen_bias=None if frozen_head.bias is None else frozen_head.bias.detach(),
        )

    with timer("loss"):
        loss = fused_pmi_kl(
            states["student"],
            head.weight,
            states["teacher"],
            states.get("refonly") if pmi else None,
            states.get("anchor"),
            lm_head_bias=head.bias,
            **frozen(),
            normalizer=normalizer,
            **options.keywords(),
            check_finite=False,
        )
    with timer("backward"):
        (loss * (scale * (contexts.world.size if config.fsdp else 1))).backward()
    totals["loss"] += float(loss.detach())  # the normalizer makes the step's sum a token mean
    if diagnose:
        with timer("diagnostics"):
            diag = pmi_diagnostics(
                states["student"],
                states["teacher"],
                states["refonly"],
                states.get("anchor"),
                lm_head_weight=head.weight.detach(),
                lm_head_bias=None if head.bias is None else head.bias.detach(),
                **frozen(),
                **options.target_keywords(),
                check_finite=False,
            )
            for key, value in diag.items():
                totals[key] = totals.get(key, 0.0) + float(value.nan_to_num().sum())


def peak_memory_gib(device: torch.device) -> float:
    """The step's peak: the GPU's allocated memory, or on a CPU the process's resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_record(
    config: TrainConfig,
    step: int,
    totals: Dict[str, float],
    lr: float,
    grad_norm: float,
    skipped: bool,
    nonfinite_total: int,
    tokens: int,
    rollouts: int,
    seconds: float,
    peak_memory: float,
    timer: StepTimer,
) -> Dict:
    """The metrics row of a step: its loss (the token mean over every rank's rollouts), lr,
    gradient norm, whether it was skipped, the mean rollout length, the throughput and time
    split, and the diagnostics per token (totals holds the loss and the diagnostics' sums)."""
    totals = dict(totals)
    record = {
        "step": step,
        "loss": totals.pop("loss"),
        "lr": lr,
        "grad_norm": grad_norm,
        "skipped": skipped,
        "nonfinite_steps": nonfinite_total,
        "response_length": tokens / max(1, rollouts),
        "tokens_per_s": tokens / seconds,
        "peak_memory_gib": peak_memory,
        "time/step": seconds,
    }
    record.update({f"time/{part}": part_seconds for part, part_seconds in timer.seconds.items()})
    record.update({f"diag/{k}": v / max(1, tokens) for k, v in totals.items()})  # per token
    # KL(q || p_student) for the run's own target q: the teacher in OPSD mode (the
    # diagnostics' target is always the PMI one).
    kl_key = "diag/kl_target_student" if config.mode == "pmi" else "diag/kl_teacher_student"
    if kl_key in record:
        record["kl_q_p"] = record[kl_key]
    return record

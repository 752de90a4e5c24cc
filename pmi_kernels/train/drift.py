"""The drift signal: how far the student has moved from the frozen base, and a warning when it
runs away.

Why a run can run away. The PMI target is q = softmax(a + clip(Δ)/β) with the anchor a. With
the frozen base as the anchor (config `anchor: true`), a and Δ come from frozen weights: q is a
fixed distribution per context, and the student settles where p = q. With the student itself as
the anchor (`anchor: false`, a = sg(s), the loss functions' default), the target is rebuilt from
the student at every step: it asks for s + clip(Δ)/β whatever s already is, so its fixed point
moves with the student, and as long as Δ (from frozen teachers) is not zero the logits keep
being pushed the same way, step after step, without end. Where Δ is large on a few tokens the
student's distribution runs off toward them, and where it is noisy the student diffuses: its
KL from the base keeps growing and its entropy changes with it (on the toy it rises,
and accuracy collapses). Standard OPSD (q = p_T) and the frozen anchor have fixed targets, so
their KL from the base levels off.

The signal, per rollout token, on the steps that compute the diagnostics (diagnostics_every):
KL(p_student || p_base) over the student's own context, H(p_student) and H(p_base). It costs two
forwards without gradient per pack of rollouts on those steps (the student's context, by the
student and by the base). The run warns once, on stderr and as drift/warning in the metrics,
when the KL passes `drift_warn_kl` nats per token. Its default, 0.3, is from the comparison
(compare.py, docs/demo.md: 60 steps, 3 seeds): the frozen-anchored runs stayed under
0.04 and the standard OPSD runs, which move toward a fixed teacher, under 0.29, while every
self-anchored run passed 0.3 (at steps 20 to 45) on its way to collapse. It is a toy's scale: on another
model, read drift/kl_student_base's curve (a fixed target levels off, a moving one does not)
and set the threshold from it.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from .contexts import ContextReader

ROWS = 1024  # a chunk of rows: the logits of a chunk are [ROWS, V], never [tokens, V]


@torch.no_grad()
def drift_sums(student, base, weight, bias, base_weight, base_bias, temperature: float = 1.0) -> Dict[str, float]:
    """Sums over the rows of hidden states [T, H] of KL(p_s || p_b), H(p_s) and H(p_b), with
    p_s = softmax((student·Wᵀ + b)/τ) and p_b from the base's hidden states and head."""
    sums = {"kl_student_base": 0.0, "entropy_student": 0.0, "entropy_base": 0.0}
    for i in range(0, student.shape[0], ROWS):
        log_s = F.log_softmax(
            F.linear(student[i : i + ROWS].float(), weight.float(), None if bias is None else bias.float())
            / temperature,
            dim=-1,
        )
        log_b = F.log_softmax(
            F.linear(base[i : i + ROWS].float(), base_weight.float(), None if base_bias is None else base_bias.float())
            / temperature,
            dim=-1,
        )
        p_s, p_b = log_s.exp(), log_b.exp()
        sums["kl_student_base"] += float((p_s * (log_s - log_b)).sum())
        sums["entropy_student"] += float(-(p_s * log_s).sum())
        sums["entropy_base"] += float(-(p_b * log_b).sum())
    return sums


class Drift:
    """Measures the drift of a run's student over a step's rollouts, and warns once."""

    def __init__(self, warn_kl, cause: str = ""):
        self.warn_kl = warn_kl
        self.cause = cause  # what the warning adds about the run's target (advice())
        self.warned = False

    @staticmethod
    def advice(config) -> str:
        """What a runaway most likely means for this run's target."""
        if config.mode == "pmi" and not config.anchor:
            return (
                "with anchor false the PMI target moves with the student (drift.py): try --anchor true, a "
                "lower lr or a larger beta"
            )
        if config.mode == "pmi":
            return "the frozen-anchored PMI target asks for little movement: check beta, clip and lr"
        return "standard OPSD moves the student toward the teacher: check the markers and the accuracy"

    @torch.no_grad()
    def measure(self, contexts: ContextReader, batch: List[Tuple[int, List[int]]], reduce=None) -> Dict[str, float]:
        """{"drift/kl_student_base", "drift/entropy_student", "drift/entropy_base"}: means per
        rollout token of the (row index, rollout) pairs, read through `contexts`; reduce (under
        torchrun: the sum over the ranks) turns this process's sums and token count into the totals."""
        if not contexts.reads_base():
            return {}  # full fine-tuning that reads no frozen stream keeps no copy of the base
        totals, tokens = {key: 0.0 for key in ("kl_student_base", "entropy_student", "entropy_base")}, 0
        base_model = contexts.base_model()
        head = base_model.get_output_embeddings()
        groups = contexts.groups([(index, rollout) for index, rollout in batch if rollout])
        real = len(groups)
        groups += contexts.fillers(real)  # under FSDP2; their sums are not counted
        for n, group in enumerate(groups):
            indices, rollouts = [index for index, _ in group], [rollout for _, rollout in group]
            with contexts.autocast():
                student = contexts.hidden(contexts.decoder(base_model), "student", indices, rollouts)
                with contexts.frozen_weights(True) as (decoder, base_head):
                    base = contexts.hidden(decoder, "student", indices, rollouts)
            sums = drift_sums(
                student,
                base,
                head.weight,
                head.bias,
                base_head.weight,
                base_head.bias,
                contexts.config.loss_temperature,
            )
            if n < real:
                for key, value in sums.items():
                    totals[key] += value
                tokens += sum(map(len, rollouts))
        if reduce is not None:
            totals = reduce({**totals, "tokens": tokens})
            tokens = totals.pop("tokens")
        return {f"drift/{key}": float(value) / tokens for key, value in totals.items()} if tokens else {}

    def check(self, step: int, record: Dict) -> None:
        """Warn once (on stderr, and drift/warning in the record) when the student's KL from the
        base passes warn_kl."""
        kl = record.get("drift/kl_student_base")
        if self.warn_kl is None or kl is None or kl <= self.warn_kl or self.warned:
            return
        self.warned = True
        record["drift/warning"] = True
        from tqdm import tqdm

        tqdm.write(
            f"step {step}: the student has drifted from the frozen base: KL(student || base) = {kl:.3f} "
            f"nats per token > drift_warn_kl = {self.warn_kl} (entropy {record['drift/entropy_student']:.3f}"
            f", base {record['drift/entropy_base']:.3f})" + (f"; {self.cause}" if self.cause else ""),
            file=sys.stderr,
        )

"""The `actor_rollout_ref.pmi` namespace of a verl config: the PMI options, checked at once
with a one-line ValueError naming the key (`pmi.<key>`), before Ray or any model starts.

Kept free of verl imports, so that the launcher checks a config before importing verl's
workers, and the project's own venv can read these checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Mapping, Optional

from ... import validation
from ...options import LossOptions
from ...prompts import DEFAULT_TEMPLATES, template_fields

MODES = ("pmi", "opsd")
TEACHER_WEIGHTS = ("base", "current")
# The contexts the actor builds (the student's is the rollout's own prompt).
TEMPLATE_KINDS = ("teacher", "refonly")
TEMPLATE_FIELDS = {"teacher": {"question", "solution"}, "refonly": {"solution"}}
# Key -> LossOptions field, each checked by LossOptions under the key's name.
LOSS_OPTION_KEYS = {
    "beta": "beta",
    "clip": "clip",
    "center": "center",
    "jsd_beta": "jsd_beta",
    "entry_clip": "entry_clip",
    "temperature": "temperature",
}


@dataclass
class PMIConfig:
    """The keys of `actor_rollout_ref.pmi` (docs/verl.md says what each does)."""

    mode: str = "pmi"
    beta: float = 1.0
    clip: Optional[float] = 10.0
    center: bool = True
    jsd_beta: float = 0.0
    entry_clip: Optional[float] = None
    temperature: float = 1.0
    anchor: bool = False
    teacher_weights: str = "base"
    question_key: str = "extra_info.question"
    reference_key: str = "extra_info.reference"
    templates: dict = field(default_factory=lambda: {k: DEFAULT_TEMPLATES[k] for k in TEMPLATE_KINDS})
    use_chat_template: bool = True
    use_task_rewards: bool = False
    loss_coef: float = 1.0
    diagnostics_every: int = 0

    @classmethod
    def from_mapping(cls, mapping: Optional[Mapping], lora: bool, reference_model: bool = False) -> "PMIConfig":
        """The checked config from a mapping (an OmegaConf node or a dict); lora: whether the
        actor trains a LoRA adapter (actor_rollout_ref.model.lora_rank > 0); reference_model:
        whether verl builds its reference model in the actor's worker (the frozen base of full
        fine-tuning)."""
        mapping = dict(mapping or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"pmi.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
        if "templates" in mapping:
            mapping["templates"] = {**cls().templates, **dict(mapping["templates"] or {})}
        config = cls(**mapping)
        config.check(lora, reference_model)
        return config

    def check(self, lora: bool, reference_model: bool = False) -> None:
        validation.check_choice("pmi.mode", self.mode, MODES)
        validation.check_choice("pmi.teacher_weights", self.teacher_weights, TEACHER_WEIGHTS)
        if isinstance(self.clip, float) and self.clip == math.inf:
            self.clip = None  # the clip's limit; a command line cannot say null as easily
        for key, option in LOSS_OPTION_KEYS.items():
            try:
                LossOptions(**{option: getattr(self, key)})
            except ValueError as err:
                raise ValueError(f"pmi.{key}: {err}") from None
        for key in ("anchor", "use_chat_template", "use_task_rewards"):
            validation.check_bool(f"pmi.{key}", getattr(self, key))
        for key in ("question_key", "reference_key"):
            value = getattr(self, key)
            if not isinstance(value, str) or not all(value.split(".")):
                raise ValueError(f"pmi.{key} must be a dotted field name such as 'extra_info.reference', got {value!r}")
        coef = self.loss_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not (math.isfinite(coef) and coef >= 0):
            raise ValueError(f"pmi.loss_coef must be a finite number >= 0, got {coef!r}")
        every = self.diagnostics_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"pmi.diagnostics_every must be an int >= 0 (0: never), got {every!r}")
        self._check_templates()
        self._check_weights(lora, reference_model)

    def _check_templates(self) -> None:
        unknown = sorted(set(self.templates) - set(TEMPLATE_KINDS))
        if unknown:
            raise ValueError(
                f"pmi.templates.{unknown[0]}: unknown context (the actor builds "
                f"{', '.join(TEMPLATE_KINDS)}; the student's is the rollout's prompt)"
            )
        for kind in TEMPLATE_KINDS:
            template = self.templates[kind]
            try:
                names = set(template_fields(template))
            except ValueError as err:
                raise ValueError(f"pmi.templates.{kind}: {err}, got {template!r}") from None
            if names != TEMPLATE_FIELDS[kind]:
                wanted = " and ".join(f"{{{name}}}" for name in sorted(TEMPLATE_FIELDS[kind]))
                raise ValueError(f"pmi.templates.{kind} must format exactly {wanted}, got {template!r}")

    def _check_weights(self, lora: bool, reference_model: bool) -> None:
        if self.teacher_weights == "base" and not lora and not reference_model:
            raise ValueError(
                "pmi.teacher_weights: 'base' reads the frozen contexts with the LoRA adapter switched "
                "off, or, for full fine-tuning, with verl's reference model: set "
                "actor_rollout_ref.actor.use_kl_loss=true (kl_loss_coef=0 leaves the loss unchanged), "
                "or use 'current' (the live weights, without gradient)"
            )
        if self.anchor and (self.mode != "pmi" or self.teacher_weights != "base"):
            raise ValueError(
                "pmi.anchor needs pmi.mode 'pmi' and pmi.teacher_weights 'base' (the anchor is the "
                "frozen base read on the student's context; the current weights' would be the "
                "student itself)"
            )

    def loss_options(self) -> LossOptions:
        return LossOptions(
            pmi=self.mode == "pmi",
            beta=self.beta,
            clip=self.clip,
            center=self.center,
            temperature=self.temperature,
            jsd_beta=self.jsd_beta,
            entry_clip=self.entry_clip,
        )

    @property
    def reads_refonly(self) -> bool:
        return self.mode == "pmi"


FSDP_STRATEGIES = ("fsdp2",)


def check_actor_config(actor_rollout_ref: Mapping) -> PMIConfig:
    """The PMI config of a verl `actor_rollout_ref` node, and the actor settings it needs."""
    model, actor = actor_rollout_ref["model"], actor_rollout_ref["actor"]
    strategy = actor.get("strategy")
    if strategy not in FSDP_STRATEGIES:
        raise ValueError(
            f"actor_rollout_ref.actor.strategy must be one of {FSDP_STRATEGIES} for the PMI actor, got "
            f"{strategy!r} (the loss reads the lm_head weight as FSDP2 shards it; FSDP1's flat "
            "parameters and Megatron's pipeline are not supported)"
        )
    if model.get("use_fused_kernels", False):
        raise ValueError(
            "actor_rollout_ref.model.use_fused_kernels must be false for the PMI actor (the fused "
            "kernels return log-probs, not the hidden states the loss reads)"
        )
    lora_rank = max(int(model.get("lora_rank", 0) or 0), int((model.get("lora") or {}).get("rank", 0) or 0))
    # verl keeps a reference model (in the actor's worker, without LoRA) for its KL loss.
    return PMIConfig.from_mapping(
        actor_rollout_ref.get("pmi"), lora=lora_rank > 0, reference_model=bool(actor.get("use_kl_loss", False))
    )

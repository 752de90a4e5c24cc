"""The verl workers that carry the PMI actor: `PMIActorRolloutRefWorker` is verl's
ActorRolloutRefWorker (actor, rollout and reference in one process group) whose actor engine
is the PMI one (actor.PMIEngineMixin) and whose actor loss is actor.PMILoss."""

from __future__ import annotations

import contextlib

from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine import EngineRegistry
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from .actor import PMILoss, pmi_engine_class
from .config import FSDP_STRATEGIES, check_actor_config


@contextlib.contextmanager
def pmi_engines(model_type: str = "language_model"):
    """verl's EngineRegistry, with the language-model engines of the FSDP2 backend replaced by
    their PMI subclasses (on every device they are registered for) while the block runs: a
    TrainingWorker builds its engine through the registry, in its constructor."""
    table = EngineRegistry._engines.get(model_type, {})
    saved = {(backend, key): cls for backend in FSDP_STRATEGIES for key, cls in table.get(backend, {}).items()}
    for (backend, key), cls in saved.items():
        table[backend][key] = pmi_engine_class(cls)
    try:
        yield
    finally:
        for (backend, key), cls in saved.items():
            table[backend][key] = cls


class PMITrainingWorker(TrainingWorker):
    """verl's TrainingWorker, with the PMI engine."""

    def __init__(self, config):
        with pmi_engines(config.model_type):
            super().__init__(config)


class PMIActorRolloutRefWorker(ActorRolloutRefWorker):
    """ActorRolloutRefWorker whose actor trains on the PMI loss (actor_rollout_ref.pmi)."""

    actor_worker_cls = PMITrainingWorker

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        pmi = check_actor_config(self.config) if self._is_actor else None
        if pmi is not None and self.distillation_enabled:
            raise ValueError(
                "distillation.enabled must be false with the PMI actor (its loss replaces verl's distillation loss)"
            )
        super().init_model()
        if pmi is not None:
            # The ActorConfig verl built for its ppo_loss, which the PMI loss adds to (use_task_rewards).
            self.loss_fn = PMILoss(self.loss_fn.keywords["config"], pmi)
            self.actor.set_loss_fn(self.loss_fn)
            if self.ref is not None:  # the frozen base of full fine-tuning (teacher_weights "base")
                self.actor.engine.pmi_reference_engine = self.ref.engine

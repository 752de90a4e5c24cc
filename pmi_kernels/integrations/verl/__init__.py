"""Purified OPSD in verl (0.9): the PMI loss computed inside verl's FSDP2 actor worker, on the
rollout batch it already holds, from its final hidden states and lm_head. Needs verl 0.9
(pip install "pmi-kernels[verl]"); docs/verl.md.

    python -m pmi_kernels.integrations.verl.main --config-path $PWD/examples/verl \
        --config-name pmi_qwen3 actor_rollout_ref.model.path=Qwen/Qwen3-1.7B ...

Pieces: config.PMIConfig (the actor_rollout_ref.pmi keys), actor.PMIEngineMixin (the three
contexts and fused_pmi_kl in the engine's forward_step), actor.PMILoss (verl's loss_agg_mode,
optionally added to verl's PPO loss), workers.PMIActorRolloutRefWorker (the worker to run).
"""

from .config import PMIConfig, check_actor_config

__all__ = ["PMIConfig", "check_actor_config"]

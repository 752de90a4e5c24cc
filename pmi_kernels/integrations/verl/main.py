"""Launch verl's PPO trainer with the PMI actor (docs/verl.md):

    python -m pmi_kernels.integrations.verl.main --config-path $PWD/examples/verl --config-name pmi_qwen3 \\
        actor_rollout_ref.model.path=Qwen/Qwen3-1.7B data.train_files=... trainer.n_gpus_per_node=8

It is verl's main_ppo with one change: the actor/rollout worker is PMIActorRolloutRefWorker
(verl's legacy task runner, trainer.use_v1=false, is the one whose worker classes a launcher
chooses; verl 0.9's v1 trainer builds ActorRolloutRefWorker itself). The config is verl's
ppo_trainer plus the actor_rollout_ref.pmi keys, checked with a one-line error (exit 2)
before Ray starts.
"""

from __future__ import annotations

import sys

import hydra
import ray

from .config import check_actor_config


def check_config(config) -> None:
    """The PMI keys and the verl settings they need; ValueError naming the key."""
    check_actor_config(config.actor_rollout_ref)
    if config.trainer.get("use_v1", False):
        raise ValueError(
            "trainer.use_v1 must be false: verl 0.9's v1 trainer builds its own actor worker class, "
            "the legacy runner takes the PMI one"
        )
    if (config.get("distillation") or {}).get("enabled", False):
        raise ValueError("distillation.enabled must be false: the PMI loss replaces verl's distillation loss")


def pmi_task_runner():
    """verl's (legacy) TaskRunner, as a Ray actor, whose actor/rollout worker is the PMI one."""
    from verl.trainer.main_ppo_v0 import TaskRunner
    from verl.trainer.ppo.ray_trainer import Role

    from .workers import PMIActorRolloutRefWorker

    class PMITaskRunner(TaskRunner.__ray_actor_class__):
        def add_actor_rollout_worker(self, config):
            _, worker_group_cls = super().add_actor_rollout_worker(config)
            for role in (Role.ActorRollout, Role.ActorRolloutRef, Role.Actor):
                if role in self.role_worker_mapping:
                    self.role_worker_mapping[role] = ray.remote(PMIActorRolloutRefWorker)
            return PMIActorRolloutRefWorker, worker_group_cls

    return PMITaskRunner


@hydra.main(config_path=None, config_name=None, version_base=None)
def main(config) -> None:
    try:
        check_config(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=ray.remote(pmi_task_runner()))


if __name__ == "__main__":
    main()

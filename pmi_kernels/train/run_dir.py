"""The run's output directory, checked before anything heavy loads: a run never overwrites
another by accident, and a resumed run continues the run that is there, unchanged."""
from __future__ import annotations

import os
import shutil
from typing import Optional

from .checkpoint import CHECKPOINT_NAME, TEMPORARY_NAME, read_checkpoint_meta, recover_interrupted_save
from .config import TOY, TrainConfig, changed_keys

TOY_BASE = "toy-base"  # the toy run's model after its warm-up: the base every later step reads
# What this trainer writes besides checkpoint-<digits> and its temporaries; --overwrite removes
# these and nothing else.
TRAINER_FILES = ("latest", "metrics.jsonl", "metrics.png", "result.json", TOY_BASE, "tensorboard")


def prepare_output_dir(config: TrainConfig, world_size: int = 1) -> Optional[dict]:
    """Make output_dir; for --resume, check it (written by as many processes as this run has)
    and return its newest checkpoint's meta ({"step", "config", "world_size"}); otherwise refuse
    a non-empty directory unless --overwrite."""
    out = config.output_dir
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        why = f"{type(err).__name__}: {err.strerror}"
        raise ValueError(f"config: output_dir {out!r} cannot be created ({why})") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"config: output_dir {out!r} is not writable")
    if config.resume:
        return _check_resumable(config, world_size)
    entries = sorted(os.listdir(out))
    if entries and not config.overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"output_dir {out!r} is not empty ({shown}): continue its run with --resume, or replace "
                         "it with --overwrite (which removes only what a trainer wrote there)")
    for name in entries:
        if name in TRAINER_FILES or CHECKPOINT_NAME.fullmatch(name) or TEMPORARY_NAME.fullmatch(name):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    return None


def _check_resumable(config: TrainConfig, world_size: int) -> dict:
    out = config.output_dir
    recover_interrupted_save(out)
    meta = read_checkpoint_meta(out)
    ranks = meta["world_size"]
    sharded = bool(meta["config"].get("fsdp", False))
    if sharded != config.fsdp:  # the checkpoints' layout: not a key --allow-config-change can change
        raise ValueError(f"--resume: the run in {out!r} saved its weights {'sharded' if sharded else 'whole'} "
                         f"(fsdp {str(sharded).lower()}); resume it with fsdp {str(sharded).lower()}")
    if ranks != world_size:
        # The step's batch and each rank's slice of the data order depend on the world size.
        how = "in one process (without torchrun)" if ranks == 1 else f"with torchrun and {ranks} processes in all"
        raise ValueError(f"--resume: the run in {out!r} was trained by {ranks} process(es) and this run has "
                         f"{world_size}; resume it {how} to continue it exactly")
    changed = changed_keys(meta["config"], config)
    if changed:
        keys = ",".join(item.split(" ", 1)[0] for item in changed)
        raise ValueError(f"--resume: the config differs from the run's in {'; '.join(changed)}; use the run's "
                         f"values, or accept the change with --allow-config-change {keys}")
    if config.model_path == TOY and not os.path.isdir(os.path.join(out, TOY_BASE)):
        raise ValueError(f"--resume: {os.path.join(out, TOY_BASE)} is missing: it is the toy run's base model "
                         "(built and warmed up when the run began), and the run cannot continue without it")
    return meta

"""The run's output directory, checked before anything heavy loads: a run never overwrites
another by accident, and a resumed run continues the run that is there, unchanged.

A run holds an exclusive lock on the directory (flock on the directory itself: nothing is
written, and the lock goes with the process however it ends), so two runs never write into one.
A fresh run marks the directory as a trainer's (RUN_MARKER); --overwrite removes the trainer's
files only where the mark is, and only after every other check has passed (start_output_dir)."""

from __future__ import annotations

import fcntl
import os
import shutil
import weakref
from typing import List, Optional

from .checkpoint import CHECKPOINT_NAME, TEMPORARY_NAME, read_checkpoint_meta, recover_interrupted_save
from .config import TOY, TrainConfig, changed_keys

TOY_BASE = "toy-base"  # the toy run's model after its warm-up: the base every later step reads
# What this trainer writes besides checkpoint-<digits> and its temporaries; --overwrite removes
# these and nothing else.
TRAINER_FILES = ("latest", "metrics.jsonl", "metrics.png", "result.json", TOY_BASE, "tensorboard")
RUN_MARKER = ".pmi-opsd-run"  # in a directory a trainer's run began in


class DirLock:
    """An exclusive lock on a directory, held until release() or until the process ends."""

    def __init__(self, path: str, made: bool = False):
        self.path, self.made = path, made  # made: this run created the directory
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"output_dir {path!r} is in use by another run (it holds the directory's lock): wait "
                "for that run to end, or choose another output_dir"
            ) from None
        self.release = weakref.finalize(self, os.close, fd)

    def abandon(self) -> None:
        """A run that failed to start: the lock released, and the directory removed if this run
        made it and it is still empty (a refused run leaves no trace; nothing else is touched)."""
        self.release()
        if self.made:
            try:
                os.rmdir(self.path)
            except OSError:  # not empty: it holds what the run had begun to write, kept
                pass


def make_output_dir(out: str) -> None:
    """The directory made (with its parents) and writable, else a ValueError naming it."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        why = f"{type(err).__name__}: {err.strerror}"
        raise ValueError(f"config: output_dir {out!r} cannot be created ({why})") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"config: output_dir {out!r} is not writable")


def prepare_output_dir(config: TrainConfig, world_size: int = 1):
    """(lock, meta): make output_dir and lock it for this run; for --resume, check it (written
    by as many processes as this run has), meta being its newest checkpoint's ({"step",
    "config", "world_size"}); otherwise (meta None) refuse a non-empty directory unless
    --overwrite, and refuse --overwrite where it would remove files no trainer wrote. Nothing is
    removed here: start_output_dir does that, after the run's other checks."""
    out = config.output_dir
    made = not os.path.isdir(out)
    make_output_dir(out)
    lock = DirLock(out, made)
    try:
        return lock, _check_dir(config, world_size)
    except BaseException:
        lock.abandon()  # a refused run holds nothing (a traceback kept in a notebook would)
        raise


def _check_dir(config: TrainConfig, world_size: int) -> Optional[dict]:
    out = config.output_dir
    if config.resume:
        _check_writable(out, ["metrics.jsonl", "latest", RUN_MARKER])  # a resumed run replaces these
        return _check_resumable(config, world_size)
    entries = sorted(set(os.listdir(out)) - {RUN_MARKER})  # a run stopped before it wrote anything left only this
    if entries and not config.overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(
            f"output_dir {out!r} is not empty ({shown}): continue its run with --resume, or replace "
            "it with --overwrite (which removes only what a trainer wrote there)"
        )
    theirs = _trainer_entries(out)
    if theirs and not os.path.isfile(os.path.join(out, RUN_MARKER)):
        raise ValueError(
            f"--overwrite: output_dir {out!r} holds {', '.join(theirs[:4])} but no trainer's run began "
            f"there (no {RUN_MARKER}): they are left alone; move them, or choose another output_dir"
        )
    _check_writable(out, [*theirs, RUN_MARKER])  # --overwrite removes these, the run rewrites the marker
    return None


def _check_writable(out: str, names: List[str]) -> None:
    """Refuse, before anything is removed or loaded, a file or directory here that the run would
    remove or replace but cannot (made read-only or immutable): a run would stop half way."""
    for name in names:
        path = os.path.join(out, name)
        if os.path.lexists(path) and not os.path.islink(path) and not os.access(path, os.W_OK):
            raise ValueError(
                f"output_dir {out!r}: {name} is read-only (or immutable), and this run would replace "
                "or remove it: make it writable, or choose another output_dir"
            )


def _trainer_entries(out: str) -> List[str]:
    return [
        name
        for name in sorted(os.listdir(out))
        if name in TRAINER_FILES or CHECKPOINT_NAME.fullmatch(name) or TEMPORARY_NAME.fullmatch(name)
    ]


def start_output_dir(config: TrainConfig) -> None:
    """After every check of the run has passed: for a fresh run, remove what an earlier trainer's
    run wrote (--overwrite; prepare_output_dir checked it is a trainer's), then mark the
    directory as a trainer's run."""
    out = config.output_dir
    if not config.resume:
        for name in _trainer_entries(out):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    with open(os.path.join(out, RUN_MARKER), "w") as fh:
        fh.write("written by pmi_kernels.train: --overwrite may remove this trainer's files here\n")


def _check_resumable(config: TrainConfig, world_size: int) -> dict:
    out = config.output_dir
    recover_interrupted_save(out)
    meta = read_checkpoint_meta(out)
    ranks = meta["world_size"]
    sharded = bool(meta["config"].get("fsdp", False))
    if sharded != config.fsdp:  # the checkpoints' layout: not a key --allow-config-change can change
        raise ValueError(
            f"--resume: the run in {out!r} saved its weights {'sharded' if sharded else 'whole'} "
            f"(fsdp {str(sharded).lower()}); resume it with fsdp {str(sharded).lower()}"
        )
    if ranks != world_size:
        # The step's batch and each rank's slice of the data order depend on the world size.
        how = "in one process (without torchrun)" if ranks == 1 else f"with torchrun and {ranks} processes in all"
        raise ValueError(
            f"--resume: the run in {out!r} was trained by {ranks} process(es) and this run has "
            f"{world_size}; resume it {how} to continue it exactly"
        )
    changed = changed_keys(meta["config"], config)
    if changed:
        keys = ",".join(item.split(" ", 1)[0] for item in changed)
        raise ValueError(
            f"--resume: the config differs from the run's in {'; '.join(changed)}; use the run's "
            f"values, or accept the change with --allow-config-change {keys}"
        )
    if config.model_path == TOY and not os.path.isdir(os.path.join(out, TOY_BASE)):
        raise ValueError(
            f"--resume: {os.path.join(out, TOY_BASE)} is missing: it is the toy run's base model "
            "(built and warmed up when the run began), and the run cannot continue without it"
        )
    return meta

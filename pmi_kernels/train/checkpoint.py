"""Checkpoints that survive any interruption.

A save writes checkpoint-<step>/ under a temporary name (.checkpoint-<step>.tmp-<pid>), fsyncs
every file and directory in it, renames it into place, then replaces the `latest` pointer by
renaming a fsynced temporary file over it. What `latest` names is never deleted before its
successor is durable: re-saving a step whose directory exists first points `latest` at the new
copy, then swaps that in; a swap cut short is finished by `recover_interrupted_save` at the
next start. Only the newest `keep` checkpoint-<digits> directories are kept, and nothing else
in the directory is ever removed. Each checkpoint holds state.pt (tensors and plain containers
only: it is read with torch.load(weights_only=True)) and checkpoint.json (its step and the run's
config, compared on --resume before anything heavy loads), and beside them the model in the
Hugging Face format (export.py). A Checkpointer saves a run's state so and restores it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch

from .distributed import World, first_over_ranks, on_main
from .interrupts import TrainingFailed, fault_point

if TYPE_CHECKING:  # config.py imports this module (read_checkpoint_meta)
    from .config import TrainConfig

LATEST = "latest"
STATE_FILE = "state.pt"
META_FILE = "checkpoint.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# The temporary names this trainer writes; what is left of them after a crash is removed at start.
TEMPORARY_NAME = re.compile(r"\.(checkpoint-\d+|latest|toy-base|metrics\.jsonl|result\.json)\.tmp-(\d+|sharded)")
SHARDED_DIR = "sharded"  # under FSDP2: the weights and optimizer state, as torch.distributed.checkpoint writes them


def temporary_path(final: str) -> str:
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{os.getpid()}")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def write_dir_atomically(final: str, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary directory, which becomes `final` only once it is durable."""
    tmp = temporary_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_path(os.path.dirname(final) or ".")


def checkpoint_steps(output_dir: str) -> List[int]:
    """Steps of the checkpoint-<digits> directories, oldest first."""
    found = (CHECKPOINT_NAME.fullmatch(name) for name in os.listdir(output_dir))
    return sorted(int(m[1]) for m in found if m and os.path.isdir(os.path.join(output_dir, m[0])))


def read_latest(output_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(output_dir, LATEST)) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


def write_file_atomically(path: str, text: str, fault: Optional[str] = None) -> None:
    """`path` replaced by a fsynced temporary file, renamed over it (then the directory fsynced):
    a reader sees the old text or the new, never a part, whatever stops the write. `fault`: the
    fault point between the write and the rename."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if fault is not None:
        fault_point(fault)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or ".")


def point_latest(output_dir: str, name: str) -> None:
    """Replace `latest` by rename: a reader sees the old name or the new one, never a part."""
    write_file_atomically(os.path.join(output_dir, LATEST), name, fault="save-pointer-written")
    fault_point("save-pointer-moved")


def sharded_staging(output_dir: str, step: int) -> str:
    """Where every rank writes its shards before rank 0 moves them into the checkpoint (one name
    for all ranks; a crash leaves it to recover_interrupted_save)."""
    return os.path.join(output_dir, f".checkpoint-{step}.tmp-sharded")


def save_checkpoint(
    output_dir: str,
    step: int,
    state: dict,
    meta: dict,
    save_pretrained=None,
    keep: int = 2,
    sharded: Optional[str] = None,
) -> str:
    """state -> checkpoint-<step>/state.pt, meta -> checkpoint.json (+ save_pretrained(dir): the Hugging
    Face files, beside them, export.py; + the directory `sharded` moved in as sharded/). A write the
    system refuses (a full disk: torch.save says only RuntimeError) is a one-line TrainingFailed;
    `latest` still names the previous checkpoint, whole, and the partial copy is removed."""
    name = f"checkpoint-{step}"
    try:
        return _save_checkpoint(output_dir, name, state, meta, save_pretrained, keep, sharded)
    except (OSError, RuntimeError) as err:
        raise _save_failed(output_dir, name, err) from err


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE_BYTES = 64 * 2**20  # less than this free after a failed write: the disk filled up


def _out_of_space(err: BaseException, output_dir: str) -> bool:
    """Whether a failed write ran out of space: an errno that says so anywhere in the chain, or
    (torch.save's RuntimeError carries none) almost nothing free on the output directory's disk."""
    seen = err
    for _ in range(16):  # the exception, what it was raised from or while handling, and so on
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(output_dir).free < LOW_SPACE_BYTES
    except OSError:
        return False


def _save_failed(output_dir: str, name: str, err: BaseException) -> TrainingFailed:
    """The error of a save that failed, once its partial copy is removed (unless `latest` names
    it: a re-save cut short after the copy was whole)."""
    full = _out_of_space(err, output_dir)  # before removing the partial copy frees its space
    tmp = temporary_path(os.path.join(output_dir, name))
    latest = read_latest(output_dir)
    if latest != os.path.basename(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    why = "no space left on the device" if full else f"the system refused a write ({error_line(err)})"
    kept = (
        f"the previous checkpoint, {latest}, is intact: continue from it with --resume once the disk has room"
        if latest
        else "no checkpoint was written before it: start the run again once the disk has room"
    )
    return TrainingFailed(f"{why} while saving {name} in {output_dir}; {kept}")


def _save_checkpoint(
    output_dir: str, name: str, state: dict, meta: dict, save_pretrained, keep: int, sharded: Optional[str]
) -> str:
    final = os.path.join(output_dir, name)
    tmp = temporary_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    with open(os.path.join(tmp, META_FILE), "w") as fh:
        json.dump(meta, fh, indent=1, allow_nan=False)
    if save_pretrained is not None:
        save_pretrained(tmp)
    if sharded is not None:
        os.rename(sharded, os.path.join(tmp, SHARDED_DIR))
    fsync_tree(tmp)
    fault_point("save-written")
    if os.path.lexists(final):
        # `latest` may name `final`: it names the new, durable copy while `final` is replaced.
        point_latest(output_dir, os.path.basename(tmp))
        shutil.rmtree(final)
        fault_point("save-old-removed")
    os.rename(tmp, final)
    fsync_path(output_dir)
    fault_point("save-renamed")
    point_latest(output_dir, name)
    prune_checkpoints(output_dir, keep)
    return final


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint-<digits>; never the one `latest` names."""
    protected = read_latest(output_dir)
    steps = checkpoint_steps(output_dir)
    for step in steps[: max(0, len(steps) - keep)]:
        if f"checkpoint-{step}" != protected:
            shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"))


def recover_interrupted_save(output_dir: str) -> None:
    """Finish a re-save that was cut short while `latest` named its temporary copy, then remove
    every other temporary this trainer leaves behind when it is killed."""
    latest = read_latest(output_dir)
    match = TEMPORARY_NAME.fullmatch(latest or "")
    if match and CHECKPOINT_NAME.fullmatch(match[1]):
        final, tmp = os.path.join(output_dir, match[1]), os.path.join(output_dir, latest)
        if os.path.isdir(tmp):  # else it was already renamed into place
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            fsync_path(output_dir)
        point_latest(output_dir, match[1])
    for name in os.listdir(output_dir):
        if TEMPORARY_NAME.fullmatch(name):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _unreadable(output_dir: str, path: str, why: str) -> ValueError:
    """One line: what cannot be read, and what else there is to resume from."""
    latest = read_latest(output_dir)
    names = [f"checkpoint-{step}" for step in reversed(checkpoint_steps(output_dir))]
    others = [name for name in names if name != latest and os.path.isfile(os.path.join(output_dir, name, STATE_FILE))]
    where = (
        f"other checkpoints here: {', '.join(others)} (to resume from one, write its name into "
        f"{os.path.join(output_dir, LATEST)})"
        if others
        else "no other checkpoint is here"
    )
    return ValueError(f"--resume: {path}: {why}; {where}")


def error_line(err: Exception) -> str:
    """The error on one line, cut short: torch's refusals run to paragraphs."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def _latest_file(output_dir: str, filename: str) -> str:
    name = read_latest(output_dir)
    if name is None:
        raise _unreadable(output_dir, os.path.join(output_dir, LATEST), "missing, so there is no checkpoint to resume")
    if not CHECKPOINT_NAME.fullmatch(name):
        raise _unreadable(output_dir, os.path.join(output_dir, LATEST), f"names no checkpoint-<step> ({name!r})")
    return os.path.join(output_dir, name, filename)


def read_checkpoint_meta(output_dir: str) -> dict:
    """The newest checkpoint's checkpoint.json: {"step": int, "config": {...}, "world_size": int}
    (1 for a checkpoint written before the trainer ran under torchrun)."""
    path = _latest_file(output_dir, META_FILE)
    try:
        with open(path) as fh:
            meta = json.load(fh)
        return {"step": int(meta["step"]), "config": dict(meta["config"]), "world_size": int(meta.get("world_size", 1))}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _unreadable(output_dir, path, f"cannot be read ({error_line(err)})") from err


def latest_sharded(output_dir: str) -> str:
    return _latest_file(output_dir, SHARDED_DIR)


def load_checkpoint(output_dir: str) -> dict:
    path = _latest_file(output_dir, STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (corrupt files raise many kinds; name the file)
        raise _unreadable(output_dir, path, f"cannot be read ({error_line(err)})") from err


def rng_state() -> dict:
    """The torch generators, as tensors (torch.load(weights_only=True) reads them back). Python's
    `random` is not saved: the loop draws from its own seeded random.Random objects."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class Checkpointer:
    """Saves the state of a run as a checkpoint, and restores it from state.pt: the trainable
    weights and the optimizer state (under FSDP2 in sharded/, every rank its shards), the torch
    generators, and the run's progress as the trainer hands it over (step, data position,
    non-finite counts, the drift warning), which restore() leaves to the trainer to read back."""

    def __init__(self, config: "TrainConfig", world: World, model, frozen, optimizer, tokenizer):
        self.config, self.world = config, world
        self.model, self.frozen, self.optimizer, self.tokenizer = model, frozen, optimizer, tokenizer
        self.saved_step: Optional[int] = None  # the step the newest checkpoint holds

    def state(self, progress: Dict) -> Dict:
        """What state.pt holds; under FSDP2 the weights and optimizer state are in sharded/ instead."""
        sharded = self.config.fsdp
        state = {
            "trainable": {}
            if sharded
            else {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
            "optimizer": {} if sharded else self.optimizer.state_dict(),
            **progress,
            "rng": rng_state(),
        }
        if sharded:
            state["sharded_optimizer"] = bool(self.optimizer.state)
        return state

    def sharded_state(self, with_optimizer: bool) -> Dict:
        """The model's (and optimizer's) state as DTensor shards, for torch.distributed.checkpoint.
        An optimizer that has not stepped is left out: reading its state would create it, with a
        step count that changes Adam's first update."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {"model": get_model_state_dict(self.model)}
        if with_optimizer:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def restore(self, state: Dict) -> None:
        """The weights, the optimizer state and the torch generators of a loaded state.pt (and,
        under FSDP2, every rank's shards); the checkpoint's step is then the saved one."""
        if self.config.fsdp:  # every rank reads its shards
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            sharded = self.sharded_state(with_optimizer=state["sharded_optimizer"])
            dcp.load(sharded, checkpoint_id=latest_sharded(self.config.output_dir))
            set_model_state_dict(self.model, sharded["model"])
            if "optimizer" in sharded:
                set_optimizer_state_dict(self.model, self.optimizer, sharded["optimizer"])
        params = dict(self.model.named_parameters())
        missing = set(state["trainable"]) - set(params)
        if missing:
            raise ValueError(f"--resume: checkpoint parameters not in this model: {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        if not self.config.fsdp:
            self.optimizer.load_state_dict(state["optimizer"])
        self.saved_step = state["step"]
        set_rng_state(state["rng"])

    def save(self, progress: Dict) -> str:
        """A checkpoint of the step progress["step"]; refused (TrainingFailed) if any parameter or
        optimizer value is not finite, so the previous checkpoint stays the newest."""
        from .export import checkpoint_writer  # export.py reads this module's file names

        config, world, step = self.config, self.world, progress["step"]
        if config.fsdp:  # the root unit stays gathered after forwards without a backward (evaluation)
            for module in filter(None, (self.model, self.frozen)):
                module.reshard()
        names = {p: n for n, p in self.model.named_parameters()}
        tensors = [(name, p) for p, name in names.items() if p.requires_grad]
        tensors += [
            (f"the optimizer's {key} of {names[p]}", value)
            for p, entry in self.optimizer.state.items()
            for key, value in entry.items()
            if value.is_floating_point()
        ]
        bad = next((name for name, tensor in tensors if not torch.isfinite(local_shard(tensor)).all()), None)
        bad = first_over_ranks(world, bad) if config.fsdp else bad  # all ranks refuse together
        if bad is not None:
            raise TrainingFailed(
                f"step {step}: {bad} is not finite; not saved, so the newest checkpoint "
                f"is still {read_latest(config.output_dir)}"
            )
        meta = {"step": step, "config": dataclasses.asdict(config), "world_size": world.size}
        save_pretrained = checkpoint_writer(config, self.model, self.tokenizer)  # under FSDP2 a collective
        sharded = None
        if config.fsdp:  # every rank writes its shards, then rank 0 moves them into the checkpoint
            import torch.distributed.checkpoint as dcp

            sharded = sharded_staging(config.output_dir, step)
            on_main(world, lambda: shutil.rmtree(sharded, ignore_errors=True))
            dcp.save(self.sharded_state(with_optimizer=bool(self.optimizer.state)), checkpoint_id=sharded)

        def write() -> str:  # otherwise every rank holds the same weights and optimizer state: rank 0 writes them
            return save_checkpoint(
                config.output_dir,
                step,
                self.state(progress),
                meta,
                save_pretrained,
                keep=config.keep_checkpoints,
                sharded=sharded,
            )

        path = on_main(world, write)
        self.saved_step = step
        return path

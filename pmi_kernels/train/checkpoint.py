"""Checkpoints written atomically: a new directory under a temporary name, renamed into place,
then a `latest` pointer replaced by rename. An interruption at any moment leaves the previous
checkpoint intact and pointed to."""
from __future__ import annotations

import os
import random
import shutil

import torch

LATEST = "latest"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str, step: int, state: dict, save_pretrained=None) -> str:
    """state -> output_dir/checkpoint-<step>/state.pt (+ save_pretrained(dir) for the adapter)."""
    name = f"checkpoint-{step}"
    final = os.path.join(output_dir, name)
    tmp = os.path.join(output_dir, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    if save_pretrained is not None:
        save_pretrained(os.path.join(tmp, "model"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = os.path.join(output_dir, f".{LATEST}.tmp-{os.getpid()}")
    with open(pointer, "w") as fh:
        fh.write(name)
    os.replace(pointer, os.path.join(output_dir, LATEST))
    for old in os.listdir(output_dir):  # keep only the newest checkpoint
        if old.startswith("checkpoint-") and old != name:
            shutil.rmtree(os.path.join(output_dir, old), ignore_errors=True)
    return final


def load_checkpoint(output_dir: str) -> dict:
    pointer = os.path.join(output_dir, LATEST)
    if not os.path.isfile(pointer):
        raise ValueError(f"--resume: no checkpoint in {output_dir!r} (no '{LATEST}' file)")
    with open(pointer) as fh:
        path = os.path.join(output_dir, fh.read().strip(), "state.pt")
    return torch.load(path, map_location="cpu", weights_only=False)

"""The toy's warmed-up base, built once and reused (config key `base_cache`).

The supervised warm-up is most of a toy run's time, and runs that are to be compared must start
from the same base. With `base_cache` set, the base lives at <base_cache>/toy-base-<digest>,
where the digest is a hash of everything that makes it: the keys the warm-up reads, the device
kind, the torch and transformers versions, and the source of the code that builds the task, the
model and the warm-up. A run whose key has a directory there loads it; any change of a key or of
that code names another directory, so a stale base is never picked up, and is rebuilt. Each
directory holds key.json (what was hashed, to read) beside the model.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil

import torch

from . import tasks, toy
from .checkpoint import temporary_path, write_dir_atomically
from .model import supervised_warmup

# The config keys the warm-up reads: the task and its rows (seed, eval_limit: the held-out rows
# come first), the prompts, the warm-up's own keys.
KEY_FIELDS = ("toy_task", "seed", "eval_limit", "templates", "use_chat_template", "sft_steps", "sft_lr",
              "sft_batch_size")
KEY_FILE = "key.json"


def base_key(config, device) -> dict:
    import transformers
    code = "\n".join(inspect.getsource(obj) for obj in (toy, tasks, supervised_warmup))
    return {**{key: getattr(config, key) for key in KEY_FIELDS}, "device": torch.device(device).type,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "code": hashlib.sha256(code.encode()).hexdigest()}


def base_path(config, device) -> str:
    text = json.dumps(base_key(config, device), sort_keys=True)
    return os.path.join(config.base_cache, f"toy-base-{hashlib.sha256(text.encode()).hexdigest()[:16]}")


def warmed_up_base(model, config, tokenizer, train_rows, prompts, device, stop):
    """The toy model after its warm-up: from the cache when its key is there, else warmed up (and
    stored, with base_cache). Either way the torch generator is then reseeded, so what follows
    (the LoRA initialization) does not depend on whether the base was built or loaded."""
    if config.base_cache is not None and config.sft_steps:
        path = base_path(config, device)
        if os.path.isdir(path):
            print(f"warm-up base: {path} (cached)", flush=True)
            model = _load(path, device)
        else:
            supervised_warmup(model, config, tokenizer, train_rows, prompts, device, stop)
            _store(path, model, tokenizer, base_key(config, device))
            print(f"warm-up base: {path} (built)", flush=True)
            model = _load(path, device)  # the same weights a later run loads, bit for bit
    elif config.sft_steps:
        supervised_warmup(model, config, tokenizer, train_rows, prompts, device, stop)
    torch.manual_seed(config.seed)
    return model


def _load(path: str, device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).to(device)


def _store(path: str, model, tokenizer, key: dict) -> None:
    def write(directory: str) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, KEY_FILE), "w") as fh:
            json.dump(key, fh, indent=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        write_dir_atomically(path, write)
    except OSError:
        if not os.path.isdir(path):  # else another run stored the same key first: keep that one
            raise
        shutil.rmtree(temporary_path(path), ignore_errors=True)

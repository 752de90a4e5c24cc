"""The toy's warmed-up base, built once and reused (config key `base_cache`).

The supervised warm-up is most of a toy run's time, and runs that are to be compared must start
from the same base. With `base_cache` set, the base lives at <base_cache>/toy-base-<digest>,
where the digest is a hash of everything that makes it: the keys the warm-up reads, the device
kind, the torch and transformers versions, and the source of the code that builds the task, the
model and the warm-up. Any change of a key or of that code names another directory, so a stale
base is never picked up. Each directory holds key.json (what was hashed) and manifest.json (the
sha256 of every other file); a directory whose key.json is not the run's key, whose files do
not match the manifest, or which does not load, is said so on stderr, removed and rebuilt:
never used.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import sys

import torch

from ..checkpoint import temporary_path, write_dir_atomically
from ..model import supervised_warmup
from . import tasks, toy

# The config keys the warm-up reads: the task and its rows (seed, eval_limit: the held-out rows
# come first), the prompts, the warm-up's own keys.
KEY_FIELDS = (
    "toy_task",
    "seed",
    "eval_limit",
    "templates",
    "use_chat_template",
    "sft_steps",
    "sft_lr",
    "sft_batch_size",
)
KEY_FILE = "key.json"
MANIFEST = "manifest.json"
# A store's temporary directory (checkpoint.temporary_path): .toy-base-<digest>.tmp-<pid>.
STORE_TEMPORARY = re.compile(r"\.toy-base-[0-9a-f]{16}\.tmp-(\d+)")


def base_key(config, device) -> dict:
    import transformers

    code = "\n".join(inspect.getsource(obj) for obj in (toy, tasks, supervised_warmup))
    return {
        **{key: getattr(config, key) for key in KEY_FIELDS},
        "device": torch.device(device).type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "code": hashlib.sha256(code.encode()).hexdigest(),
    }


def base_path(config, device) -> str:
    text = json.dumps(base_key(config, device), sort_keys=True)
    return os.path.join(config.base_cache, f"toy-base-{hashlib.sha256(text.encode()).hexdigest()[:16]}")


def warmed_up_base(model, config, tokenizer, train_rows, prompts, device, stop):
    """The toy model after its warm-up: from the cache when its key is there and the directory
    checks out, else warmed up (and stored, with base_cache). Either way the torch generator is
    then reseeded, so what follows (the LoRA initialization) does not depend on whether the base
    was built or loaded."""
    if config.base_cache is not None and config.sft_steps:
        remove_abandoned_stores(config.base_cache)
        path, key = base_path(config, device), base_key(config, device)
        cached = _load_checked(path, key, model, device) if os.path.isdir(path) else None
        if cached is not None:
            print(f"warm-up base: {path} (cached)", flush=True)
            model = cached
        else:
            supervised_warmup(model, config, tokenizer, train_rows, prompts, device, stop)
            _store(path, model, tokenizer, key)
            print(f"warm-up base: {path} (built)", flush=True)
            model = _load(path, model, device)  # the same weights a later run loads, bit for bit
    elif config.sft_steps:
        supervised_warmup(model, config, tokenizer, train_rows, prompts, device, stop)
    torch.manual_seed(config.seed)
    return model


def remove_abandoned_stores(cache: str) -> None:
    """Removes the temporary directories of stores whose process is gone (a run killed while it
    wrote a base left 100s of MB): those whose pid runs no process on this machine. Another
    run's store in progress is left alone."""
    if not os.path.isdir(cache):
        return
    for name in os.listdir(cache):
        match = STORE_TEMPORARY.fullmatch(name)
        if match and not _process_exists(int(match[1])):
            shutil.rmtree(os.path.join(cache, name), ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def file_digests(directory: str) -> dict:
    """{file name: sha256} of the directory's files but the manifest."""
    digests = {}
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if name != MANIFEST and os.path.isfile(full):
            with open(full, "rb") as fh:
                digests[name] = hashlib.file_digest(fh, "sha256").hexdigest()
    return digests


def cache_problem(path: str, key: dict):
    """Why the cached directory must not be used (a sentence), or None when it checks out."""
    try:
        with open(os.path.join(path, KEY_FILE)) as fh:
            stored_key = json.load(fh)
        with open(os.path.join(path, MANIFEST)) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as err:
        return f"its {KEY_FILE} or {MANIFEST} cannot be read ({err})"
    if stored_key != key:
        changed = sorted(k for k in set(key) | set(stored_key) if key.get(k) != stored_key.get(k))
        return f"its {KEY_FILE} differs from this run's key in {', '.join(changed)}"
    if file_digests(path) != manifest:
        return f"its files differ from {MANIFEST} (truncated, changed or missing)"
    return None


def _load_checked(path: str, key: dict, model, device):
    """The cached base, or None (and the directory removed) when it does not check out."""
    problem = cache_problem(path, key)
    if problem is None:
        try:
            return _load(path, model, device)
        except Exception as err:  # noqa: BLE001 - any failure to load means: rebuild
            problem = f"it does not load ({type(err).__name__}: {err})"
    print(f"warm-up base: {path} is not used: {problem}; it is rebuilt", file=sys.stderr, flush=True)
    shutil.rmtree(path, ignore_errors=True)
    return None


def _load(path: str, model, device):
    from transformers import AutoModelForCausalLM

    attn = model.config._attn_implementation  # the one load_model chose for this run
    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    with torch.no_grad():  # in memory: the weights may be memory-mapped from the cache's file, which
        for tensor in [*loaded.parameters(), *loaded.buffers()]:  # another run may rebuild or change
            tensor.data = tensor.data.clone()
    return loaded.to(device)


def _store(path: str, model, tokenizer, key: dict) -> None:
    def write(directory: str) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, KEY_FILE), "w") as fh:
            json.dump(key, fh, indent=1)
        with open(os.path.join(directory, MANIFEST), "w") as fh:
            json.dump(file_digests(directory), fh, indent=1)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        write_dir_atomically(path, write)
    except OSError:
        if not os.path.isdir(path):  # else another run stored the same key first: keep that one
            raise
        shutil.rmtree(temporary_path(path), ignore_errors=True)

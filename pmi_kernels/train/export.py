"""Checkpoints in the Hugging Face format, and `pmi-opsd export`.

Every checkpoint-<step>/ holds, beside the trainer's own state (state.pt, checkpoint.json and,
under FSDP2, sharded/), the files a Hugging Face loader reads, as transformers' Trainer lays
them out: with LoRA the PEFT adapter (adapter_config.json, adapter_model.safetensors), its
base_model_name_or_path the model --model-path named (for the toy, the run's toy-base/); with
full fine-tuning save_pretrained's config.json and safetensors (sharded above max_shard_size);
and the tokenizer. So `AutoPeftModelForCausalLM.from_pretrained(checkpoint)` (LoRA) and
`AutoModelForCausalLM.from_pretrained(checkpoint)` load it as it is.

`pmi-opsd export CHECKPOINT OUT [--merge]` writes a standalone copy from the trainer's own state,
so it also reads checkpoints written before these files were (state.pt, or sharded/ under FSDP2).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Callable, Dict, Optional

import torch

from .checkpoint import META_FILE, SHARDED_DIR, STATE_FILE, error_line, write_dir_atomically
from .config import TOY
from .run_dir import TOY_BASE

# save_pretrained's shards: a model larger than this is split in several safetensors files.
MAX_SHARD_SIZE = "5GB"


def base_model_name(model_path: str, output_dir: str) -> str:
    """What an adapter's base_model_name_or_path names: a hub id as given, a local directory
    as an absolute path (the adapter may be loaded from anywhere), the toy's saved base."""
    if model_path == TOY:
        return os.path.abspath(os.path.join(output_dir, TOY_BASE))
    return os.path.abspath(model_path) if os.path.isdir(model_path) else model_path


def checkpoint_writer(config, model, tokenizer) -> Callable[[str], None]:
    """What rank 0 runs in a checkpoint's temporary directory to write the Hugging Face files
    of the run's model and tokenizer. Every rank calls this: under FSDP2 it gathers the full
    state dict (a collective), held on rank 0's CPU only, for as long as the save lasts."""
    state_dict = None
    if config.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if config.lora:
        model.peft_config["default"].base_model_name_or_path = base_model_name(config.model_path, config.output_dir)

    def write(directory: str) -> None:
        save_model(model, directory, state_dict)
        tokenizer.save_pretrained(directory)

    return write


def save_model(model, directory: str, state_dict: Optional[Dict] = None) -> None:
    model.save_pretrained(directory, state_dict=state_dict, max_shard_size=MAX_SHARD_SIZE)


def read_meta(checkpoint: str) -> Dict:
    path = os.path.join(checkpoint, META_FILE)
    try:
        with open(path) as fh:
            return dict(json.load(fh)["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"export: {path}: not a checkpoint of this trainer ({error_line(err)})") from err


def trained_weights(checkpoint: str, config: Dict) -> Dict[str, torch.Tensor]:
    """The trained parameters by name: state.pt's, or under FSDP2 sharded/'s, read whole here."""
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not config.get("fsdp"):
            return state["trainable"]
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            whole = os.path.join(tmp, "weights.pt")
            dcp_to_torch_save(os.path.join(checkpoint, SHARDED_DIR), whole)
            return torch.load(whole, map_location="cpu", weights_only=False)["model"]
    except Exception as err:  # noqa: BLE001 (a damaged file raises many kinds; name the checkpoint)
        raise ValueError(f"export: {checkpoint}: its weights cannot be read ({error_line(err)})") from err


def rebuild(checkpoint: str):
    """(tokenizer, model) as the run trained them at the checkpoint's step: the base the run
    started from, wrapped as it was (LoRA), with the checkpoint's trained weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = read_meta(checkpoint)
    base = base_model_name(config["model_path"], os.path.dirname(os.path.abspath(checkpoint)))
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        has_tokenizer = os.path.isfile(os.path.join(checkpoint, "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(checkpoint if has_tokenizer else base)
    except (OSError, ValueError) as err:
        raise ValueError(f"export: the run's base model {base!r} cannot be loaded ({error_line(err)})") from err
    if config["lora"]:
        from peft import get_peft_model

        from .model import lora_config

        lora = lora_config(
            config["lora_rank"], config["lora_alpha"], config["lora_targets"], base_model_name_or_path=base
        )
        model = get_peft_model(model, lora)
        model.peft_config["default"].base_model_name_or_path = base
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied head too: the shards name it
    weights = trained_weights(checkpoint, config)
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"export: {checkpoint}: weights not in the rebuilt model: {unknown[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return tokenizer, model


def export(checkpoint: str, out: str, merge: bool = False) -> str:
    """A standalone copy of the checkpoint's model in out/: the full model (LoRA merged into
    its base with merge), else the adapter; and the tokenizer. out must not exist, or be empty."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"export: {out} exists and is not an empty directory; name a new one")
    tokenizer, model = rebuild(checkpoint)
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if os.path.isdir(out):
        os.rmdir(out)
    write_dir_atomically(out, lambda d: (save_model(model, d), tokenizer.save_pretrained(d)))
    return out


def main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="pmi-opsd export",
        description=(
            "Write a checkpoint's model as a standalone Hugging Face directory (any checkpoint of this trainer, "
            "LoRA or full, FSDP2's sharded ones and those written before checkpoints held the Hugging Face files)."
        ),
    )
    parser.add_argument("checkpoint", help="a run's checkpoint-<step> directory")
    parser.add_argument("out", help="the directory to write (new or empty)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="LoRA: merge the adapter into the base and write the full model (default: the adapter)",
    )
    args = parser.parse_args(argv)
    print(f"wrote {export(args.checkpoint, args.out, args.merge)}")
    return 0

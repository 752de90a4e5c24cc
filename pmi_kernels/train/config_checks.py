"""What TrainConfig.validate checks about each key on its own: its type (read from the
dataclass annotation, so a new key is checked too), its range and its allowed values. Every
message names the key. A command-line string becomes a value of the key's type here as well."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Dict, List, Tuple

import torch

from ..prompts import template_fields
from .data.packing import IMPLEMENTATIONS

TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
    dict: "a JSON object",
    List[str]: "a list of strings",
}

AT_LEAST_ONE = (
    "lora_rank",
    "lora_alpha",
    "max_new_tokens",
    "max_steps",
    "batch_size",
    "grad_accum",
    "sft_batch_size",
    "log_every",
    "diagnostics_every",
    "eval_samples",
    "save_every",
    "keep_checkpoints",
    "max_nonfinite_steps",
    "max_tokens_per_micro_batch",
)
NON_NEGATIVE = ("seed", "warmup_steps", "sft_steps", "eval_every", "eval_limit", "weight_decay", "eval_temperature")
POSITIVE = (
    "lr",
    "sft_lr",
    "temperature",
    "max_grad_norm",
    "beta",
    "clip",
    "loss_temperature",
    "entry_clip",
    "drift_warn_kl",
)
RANGES = [
    (AT_LEAST_ONE, lambda v: v >= 1, ">= 1"),
    (NON_NEGATIVE, lambda v: v >= 0, ">= 0"),
    (POSITIVE, lambda v: v > 0, "> 0"),
    (("top_p",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("jsd_beta",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("seed",), lambda v: v < 2**32, "< 2**32"),
]
CHOICES = {
    "mode": ("pmi", "opsd"),
    "teacher_weights": ("base", "current"),
    "device": ("auto", "cpu", "cuda"),
    "schedule": ("constant", "cosine", "linear"),
    "rollout_engine": ("hf", "vllm"),
    "attn_implementation": IMPLEMENTATIONS,
    "toy_task": ("misread", "shortcut", "arithmetic"),
    "toy_eval_split": ("held_out", "validation"),
}
NON_EMPTY = (
    "model_path",
    "output_dir",
    "base_cache",
    "question_field",
    "solution_field",
    "answer_field",
    "answer_pattern",
)
TEMPLATE_KINDS = ("student", "teacher", "refonly")
# The architecture key: config.json's names for what the dry run's plan needs (the first five
# required), each an integer >= 1 or a flag; model_type is a name.
ARCHITECTURE = {
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "head_dim": int,
    "max_position_embeddings": int,
    "tie_word_embeddings": bool,
    "attention_bias": bool,
    "model_type": str,
}
ARCHITECTURE_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def field_types(cls) -> Dict[str, Tuple[object, bool]]:
    """key -> (type, whether None is allowed), from the dataclass's annotations."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) is typing.Union and type(None) in args
        out[name] = (next(a for a in args if a is not type(None)) if optional else hint, optional)
    return out


def _has_type(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is List[str]:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    if kind is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, kind)


def _fail(key: str, what: str, value) -> ValueError:
    return ValueError(f"config: {key} must be {what}, got {value!r}")


def check_types(config) -> None:
    """Each value of its key's type; ints given for a float key become floats."""
    for key, (kind, optional) in field_types(type(config)).items():
        value = getattr(config, key)
        if value is None and optional:
            continue
        if not _has_type(value, kind):
            raise _fail(key, TYPE_NAMES[kind] + (" or null" if optional else ""), value)
        if kind is float:
            setattr(config, key, float(value))


def check_values(config) -> None:
    """Ranges, allowed values, and the keys whose text must parse (patterns, templates)."""
    for keys, ok, what in RANGES:
        for key in keys:
            value = getattr(config, key)
            if value is not None and not ok(value):
                raise _fail(key, what, value)
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise _fail(key, f"one of {allowed}", getattr(config, key))
    for key in NON_EMPTY:
        if getattr(config, key) is not None and not getattr(config, key).strip():
            raise _fail(key, "a non-empty string", getattr(config, key))
    for key in ("markers", "lora_targets"):
        if not all(item.strip() for item in getattr(config, key)):
            raise _fail(key, "a list of non-empty strings", getattr(config, key))
    if config.fsdp and config.lora:
        raise _fail(
            "fsdp",
            "false with lora on (FSDP2 shards full fine-tuning; LoRA runs data-parallel, every rank holding the base)",
            config.fsdp,
        )
    if config.anchor and not config.lora and config.teacher_weights == "current":
        raise _fail(
            "teacher_weights",
            "'base' with anchor on and lora off: the loss projects the teacher and the "
            "anchor with one frozen head, and in full fine-tuning the current weights' head (the "
            "teacher's) leaves the base's (the anchor's); or set anchor false",
            config.teacher_weights,
        )
    if config.lora and not config.lora_targets:
        raise _fail("lora_targets", "a non-empty list with lora on", config.lora_targets)
    _check_architecture(config.architecture)
    _check_answer_pattern(config.answer_pattern)
    _check_templates(config.templates)
    unknown = set(config.allow_config_change) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise _fail("allow_config_change", "a list of config keys", sorted(unknown))
    if config.device == "cuda" and not torch.cuda.is_available():
        raise _fail("device", f"'auto' or 'cpu': this torch ({torch.__version__}) sees no CUDA GPU", "cuda")


def _check_architecture(arch: dict) -> None:
    if not arch:
        return
    unknown = set(arch) - set(ARCHITECTURE)
    if unknown:
        raise _fail("architecture", f"keyed by {sorted(ARCHITECTURE)} (unknown: {sorted(unknown)})", arch)
    missing = [key for key in ARCHITECTURE_REQUIRED if key not in arch]
    if missing:
        raise _fail(
            "architecture", f"a JSON object with at least {list(ARCHITECTURE_REQUIRED)} (it lacks {missing})", arch
        )
    for key, value in arch.items():
        kind = ARCHITECTURE[key]
        if not _has_type(value, kind) or (kind is int and value < 1):
            raise _fail(f"architecture.{key}", "an integer >= 1" if kind is int else TYPE_NAMES[kind], value)


def _check_answer_pattern(pattern: str) -> None:
    try:
        groups = re.compile(pattern).groups
    except re.error as err:
        raise _fail("answer_pattern", f"a regular expression ({err})", pattern) from err
    if groups != 1:  # the answer is the match's only group; (?:...) groups others
        raise _fail("answer_pattern", f"a regular expression with one capturing group, not {groups}", pattern)


def _check_templates(templates: dict) -> None:
    missing = set(TEMPLATE_KINDS) - set(templates)
    if missing:
        raise _fail("templates", f"a template for each of {TEMPLATE_KINDS} (it lacks {sorted(missing)})", templates)
    for kind, text in templates.items():
        if kind not in TEMPLATE_KINDS:
            raise _fail("templates", f"keyed by {TEMPLATE_KINDS} only", templates)
        try:
            unknown = set(template_fields(text)) - {"question", "solution"}
        except ValueError as err:
            raise _fail(
                f"templates.{kind}", f"a str.format string over {{question}} and {{solution}} ({err})", text
            ) from err
        if unknown:
            raise _fail(
                f"templates.{kind}",
                "a str.format string over {question} and {solution} (it formats "
                f"{', '.join(sorted(unknown))}; write {{{{ and }}}} for literal braces)",
                text,
            )
        rendered = text.format(question="q", solution="s")
        if not rendered.strip():
            raise _fail(
                f"templates.{kind}",
                "a template that renders to some text (a context's last token predicts the rollout's first)",
                text,
            )


def coerce_flag(key: str, raw: str, kind, optional: bool):
    """A command-line string as a value of the key's type: booleans from true/false/1/0, lists
    as JSON or comma-separated, dicts as JSON, null/none for None where the key allows it."""
    flag = "--" + key.replace("_", "-")
    if optional and raw.lower() in ("null", "none"):
        return None
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[raw.lower()]
        if kind in (int, float):
            return kind(raw)
        if kind is dict:
            value = json.loads(raw)
            return value if isinstance(value, dict) else raw
        if kind is List[str]:
            return json.loads(raw) if raw.lstrip().startswith("[") else [s.strip() for s in raw.split(",") if s.strip()]
    except (KeyError, ValueError) as err:
        raise ValueError(f"{flag}: expected {TYPE_NAMES[kind]}{' or null' if optional else ''}, got {raw!r}") from err
    return raw

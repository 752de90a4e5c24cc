"""Training configuration: one dataclass, loaded from a JSON file, every key overridable from
the command line (--key value), checked before anything is loaded."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..options import LossOptions
from .prompts import DEFAULT_TEMPLATES
from .rollouts import VLLM_MISSING, vllm_available

TOY = "toy"
# The embedded default's sizes: the toy task runs end to end on a CPU in a few minutes.
TOY_DEFAULTS = dict(max_new_tokens=40, batch_size=8, max_steps=40, lr=2e-4, sft_steps=800, save_every=10,
                    eval_limit=64, output_dir="runs/toy", use_chat_template=False, diagnostics_every=5)


@dataclass
class TrainConfig:
    # Model: a local Hugging Face directory, or "toy" (a tiny model and task built in code).
    model_path: str = TOY
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    # "base": teacher, reference-only teacher and anchor run the frozen base (adapter off, or a
    # frozen copy when fine-tuning fully); "current": they run the weights being trained.
    teacher_weights: str = "base"
    gradient_checkpointing: bool = False
    bf16: bool = True  # autocast on CUDA only
    device: str = "auto"  # "cuda" when a GPU is present, else "cpu"

    # Data: local jsonl or parquet; the toy model ignores these and builds its own.
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    question_field: str = "question"
    solution_field: str = "solution"
    answer_field: Optional[str] = "answer"  # None: extract the answer from the solution
    answer_pattern: str = r"\\boxed\{([^}]*)\}"
    templates: dict = field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    use_chat_template: bool = True

    # Rollouts.
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    # "hf": the model's own generate; "vllm": a vLLM engine in this process, given the current
    # weights (LoRA merged) before each step's sampling. vllm_kwargs go to vllm.LLM as they are.
    rollout_engine: str = "hf"
    vllm_kwargs: dict = field(default_factory=dict)

    # The loss (../shared/SPEC.md); mode "pmi" or "opsd" (target = teacher).
    mode: str = "pmi"
    anchor: bool = False
    beta: float = 1.0
    clip: Optional[float] = 10.0
    center: bool = True
    loss_temperature: float = 1.0
    jsd_beta: float = 0.0
    entry_clip: Optional[float] = None

    # Optimization.
    seed: int = 0
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine", "linear"
    max_grad_norm: float = 1.0
    sft_steps: int = 0  # supervised warm-up on the reference solutions before distillation
    sft_lr: float = 3e-3
    sft_batch_size: int = 32

    # What it shows and keeps.
    output_dir: str = "runs/opsd"
    log_every: int = 1
    diagnostics_every: int = 1
    markers: List[str] = field(default_factory=lambda: ["wait", "maybe", "perhaps", "check"])
    tensorboard: bool = False
    eval_every: int = 0  # 0: before and after training only
    eval_samples: int = 1
    eval_temperature: float = 0.0  # 0: greedy
    eval_limit: int = 64
    save_every: int = 50
    resume: bool = False

    def loss_options(self) -> LossOptions:
        return LossOptions(self.mode == "pmi", self.beta, self.clip, self.center, self.loss_temperature,
                           self.jsd_beta, self.entry_clip)

    def validate(self) -> "TrainConfig":
        """Every problem a config can have on its own, before any model or data is loaded."""
        choices = {"mode": ("pmi", "opsd"), "teacher_weights": ("base", "current"),
                   "device": ("auto", "cpu", "cuda"), "schedule": ("constant", "cosine", "linear"),
                   "rollout_engine": ("hf", "vllm")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("max_steps", "batch_size", "grad_accum", "max_new_tokens", "eval_samples", "save_every",
                    "log_every", "diagnostics_every", "lora_rank", "sft_batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"config: {key} must be an integer >= 1, got {getattr(self, key)!r}")
        if self.lr <= 0 or not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ValueError("config: lr and temperature must be > 0 and top_p in (0, 1]")
        self.loss_options()  # the loss's own checks, with its own messages
        if self.rollout_engine == "vllm" and not vllm_available():
            raise ValueError(f"config: {VLLM_MISSING}")
        if self.model_path != TOY:
            if not os.path.isdir(self.model_path):
                raise ValueError(f"config: model_path {self.model_path!r} is not a local directory")
            if self.train_file is None:
                raise ValueError("config: train_file is required with a model_path other than 'toy'")
            for key in ("train_file", "eval_file"):
                path = getattr(self, key)
                if path is not None and not os.path.isfile(path):
                    raise ValueError(f"config: {key} {path!r} does not exist")
        missing = {"student", "teacher", "refonly"} - set(self.templates)
        if missing:
            raise ValueError(f"config: templates lacks {sorted(missing)}")
        return self


def parse_config(argv=None, description: str = "") -> TrainConfig:
    """--config FILE (JSON), then --key value for any key; --resume, --output-dir, --max-steps."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="JSON file of config keys")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's checkpoint")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "resume":
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f"(default {f.default if f.default is not dataclasses.MISSING else 'see docs'})")
    args = parser.parse_args(argv)
    values = {}
    if args.config:
        with open(args.config) as fh:
            values = json.load(fh)
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f"config file {args.config}: unknown keys {sorted(unknown)}")
    # The toy model brings its own defaults; the file and the command line override them.
    toy = (args.model_path or values.get("model_path", TOY)) == TOY
    config = TrainConfig(**{**(TOY_DEFAULTS if toy else {}), **values})
    for f in dataclasses.fields(TrainConfig):
        raw = getattr(args, f.name, None) if f.name != "resume" else None
        if raw is not None:
            setattr(config, f.name, _coerce(f.name, raw, getattr(config, f.name)))
    config.resume = config.resume or args.resume
    return config.validate()


def _coerce(name: str, raw: str, current):
    """A command-line string in the type of the key's current value (JSON for lists, dicts, None)."""
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--{name}: expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    if isinstance(current, (list, dict)) or raw in ("null", "none", "None"):
        return json.loads(raw) if raw not in ("none", "None") else None
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if current is None:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw

"""Training configuration: one dataclass, loaded from a JSON or YAML file, every key overridable from
the command line (--key value), every value checked for type and range before anything loads."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..options import LossOptions
from .config_checks import check_types, check_values, coerce_flag, field_types
from .config_files import load_config_values
from .hub import check_model_path
from .packing import resolve_attn_implementation
from .prompts import DEFAULT_TEMPLATES
from .rollouts import VLLM_MISSING, vllm_available
from .trackers import check_report_to

TOY = "toy"
# The embedded default's sizes: the toy task runs end to end on a CPU in a few minutes.
TOY_DEFAULTS = dict(max_new_tokens=72, batch_size=8, max_steps=40, lr=2e-4, sft_steps=800, save_every=10,
                    eval_limit=64, output_dir="runs/toy", use_chat_template=False, diagnostics_every=5)


@dataclass
class TrainConfig:
    # Model: what from_pretrained takes (a local directory or a Hugging Face Hub id, through the
    # Hugging Face cache; HF_HUB_OFFLINE=1 honoured), or "toy" (a tiny model and task built in code).
    model_path: str = TOY
    # The toy's task (tasks.py): "shortcut" (the reference gives the method and the answer, the
    # question the numbers) or "arithmetic" (the reference is the worked solution).
    toy_task: str = "shortcut"
    # A directory of warmed-up toy bases, each keyed by everything that makes it (base_cache.py):
    # a run finds its base there or builds it there. None: every run warms up its own.
    base_cache: Optional[str] = None
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    # "base": teacher, reference-only teacher and anchor run the frozen base (adapter off, or a
    # frozen copy when fine-tuning fully); "current": they run the weights being trained.
    teacher_weights: str = "base"
    gradient_checkpointing: bool = False
    # Full fine-tuning under torchrun with FSDP2 (fully_shard per decoder layer and the whole
    # model): weights, gradients and optimizer state sharded over the ranks, the frozen copy too;
    # checkpoints through torch.distributed.checkpoint. Needs lora false and torchrun.
    fsdp: bool = False
    bf16: bool = True  # autocast on CUDA only
    device: str = "auto"  # "cuda" when a GPU is present, else "cpu"
    # The model's architecture numbers (config.json's names: hidden_size, num_hidden_layers, ...),
    # for --dry-run's plan when model_path is not a local directory; training reads config.json.
    architecture: dict = field(default_factory=dict)

    # Context forwards (packing.py). packed: a micro-batch's rollouts go through the model in one
    # forward per context, packed without padding (else one forward per rollout and context);
    # max_tokens_per_micro_batch (None: no bound) splits them into packs of at most that many
    # tokens. attn_implementation: "auto" is flash-attn's varlen kernels on CUDA when installed,
    # else "varlen" (torch's varlen_attn on CUDA, one sdpa call per sequence on a CPU); "sdpa" and
    # "eager" get a block-diagonal mask over the whole pack (quadratic in its length).
    packed: bool = True
    max_tokens_per_micro_batch: Optional[int] = None
    attn_implementation: str = "auto"

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

    # The loss (pmi_kernels.reference is its contract); mode "pmi" or "opsd" (target = teacher).
    mode: str = "pmi"
    # The PMI target's anchor a in q = softmax(a + clip(Δ)/β). true: the frozen base read in the
    # student's context (one more forward a step), a fixed target. false: the student itself,
    # detached (the loss functions' default), a target that moves with the student: at every
    # step it asks for s + clip(Δ)/β whatever s already is, so it has no fixed point while Δ is
    # not zero (drift.py). The trainer's default is true because the comparison measured it
    # (README, "The main job": on the toy the self anchor drifted into collapse, the frozen one
    # held); `--anchor false` is the paper's choice, and configs/ writes it out.
    anchor: bool = True
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
    tensorboard: bool = False  # the same as "tensorboard" in report_to
    # Experiment trackers, as transformers' report_to: any of "tensorboard", "trackio", "wandb",
    # "mlflow" (trackers.py), or "none"; each through its own library, on rank 0.
    report_to: List[str] = field(default_factory=list)
    eval_every: int = 0  # 0: before and after training only
    eval_samples: int = 1
    eval_temperature: float = 0.0  # 0: greedy
    eval_limit: int = 64
    save_every: int = 50
    keep_checkpoints: int = 2  # the newest k checkpoint-<step> directories are kept
    # A step whose loss or gradients are not finite is skipped (no update); this many in a row stop the run.
    max_nonfinite_steps: int = 5
    # Warn when the student's KL from the frozen base passes this many nats per token (drift.py;
    # measured on the diagnostics steps); None: never.
    drift_warn_kl: Optional[float] = 0.3
    resume: bool = False  # continue output_dir's run from its latest checkpoint
    overwrite: bool = False  # replace the run in a non-empty output_dir (else it is refused)
    # Keys --resume may change although they change the run (the keys in RESUME_MAY_CHANGE always may).
    allow_config_change: List[str] = field(default_factory=list)

    def loss_options(self) -> LossOptions:
        return LossOptions(self.mode == "pmi", self.beta, self.clip, self.center, self.loss_temperature,
                           self.jsd_beta, self.entry_clip)

    def validate(self, paths: bool = True) -> "TrainConfig":
        """Every problem a config can have on its own, before any model or data is loaded (paths:
        whether model_path, train_file and eval_file must exist; --dry-run needs none of them)."""
        check_types(self)
        check_values(self)
        check_report_to(self)  # a tracker's missing library, before any model loads
        self.loss_options()  # the loss's own checks, with its own messages
        if self.resume and self.overwrite:
            raise ValueError("config: resume and overwrite exclude each other: continue the run, or replace it")
        if self.rollout_engine == "vllm" and not vllm_available():
            raise ValueError(f"config: {VLLM_MISSING}")
        resolve_attn_implementation(self.attn_implementation, self.torch_device())
        if self.model_path != TOY and paths:
            check_model_path(self.model_path)  # a local directory or a hub id (hub.py)
            if self.train_file is None:
                raise ValueError("config: train_file is required with a model_path other than 'toy'")
            for key in ("train_file", "eval_file"):
                path = getattr(self, key)
                if path is not None and not os.path.isfile(path):
                    raise ValueError(f"config: {key} {path!r} does not exist")
            if self.sft_steps:
                raise ValueError("config: sft_steps (the supervised warm-up) is for the toy model only; "
                                 f"with model_path {self.model_path!r} set it to 0")
        return self

    def torch_device(self):
        import torch
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)


# Keys a resumed run may change: they do not change what the steps compute (or, for max_steps,
# they are how a run is extended). Any other changed key needs --allow-config-change KEY.
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "eval_every", "eval_samples", "eval_temperature", "save_every", "log_every", "keep_checkpoints",
    "max_nonfinite_steps", "diagnostics_every", "markers", "tensorboard", "gradient_checkpointing", "output_dir",
    "resume", "overwrite", "allow_config_change", "architecture", "packed", "max_tokens_per_micro_batch",
    "attn_implementation", "drift_warn_kl", "base_cache", "report_to"})


def changed_keys(saved: dict, config: TrainConfig) -> List[str]:
    """'key (saved -> now)' for each key that differs from the saved run's and may not change."""
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    allowed = RESUME_MAY_CHANGE | set(config.allow_config_change)
    return [f"{key} ({saved.get(key, '<unset>')!r} -> {value!r})" for key, value in now.items()
            if key not in allowed and saved.get(key, '<unset>') != value]


def read_config_file(path: str) -> dict:
    try:
        with open(path) as fh:
            values = load_config_values(path, fh)  # JSON, or YAML by extension
    except OSError as err:
        raise ValueError(f"--config {path}: cannot be read ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path}: not valid JSON ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of config keys, got {type(values).__name__}")
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {sorted(unknown)}")
    return values


def parse_config(argv=None, description: str = "", toy_defaults: Optional[dict] = None) -> TrainConfig:
    """--config FILE (JSON or YAML), then --key value for any key (a bare --resume, --overwrite, ... is true).
    The toy's defaults (TOY_DEFAULTS unless given) come under both."""
    return parse_args(argv, description, toy_defaults)[0]


def parse_args(argv=None, description: str = "", toy_defaults: Optional[dict] = None):
    """(config, the dry-run flags): --dry-run prints the plan (plan.py) and loads nothing, so
    the paths need not exist."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)  # --max-step is a typo, not max_steps
    parser.add_argument("--config", help="a JSON or YAML (.yaml, .yml) file of config keys")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the step's plan (tokens, memory per GPU) from the model's config.json or "
                             "the architecture key; no weights are loaded, nothing is downloaded")
    parser.add_argument("--world-size", type=int, default=1, help="--dry-run: GPUs the step is split over")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="--dry-run: the longest context's prompt length assumed (default 512, or what fits "
                             "the model's positions beside max_new_tokens)")
    types = field_types(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else "see docs"
        if types[f.name][0] is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", metavar="true|false",
                                help=f"(default {default})")
        else:
            parser.add_argument(flag, dest=f.name, help=f"(default {default})")
    args = parser.parse_args(argv)
    for flag in ("world_size", "prompt_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    values = read_config_file(args.config) if args.config else {}
    for key, (kind, optional) in types.items():
        if getattr(args, key) is not None:
            values[key] = coerce_flag(key, getattr(args, key), kind, optional)
    # The toy model brings its own defaults; the file and the command line override them.
    defaults = TOY_DEFAULTS if toy_defaults is None else toy_defaults
    if values.get("resume"):  # --resume continues the run's config; what is given here overrides it
        output_dir = values.get("output_dir", defaults["output_dir"] if values.get("model_path", TOY) == TOY
                                else TrainConfig.output_dir)
        values = {**saved_config(output_dir), **values}
    toy = values.get("model_path", TOY) == TOY
    config = TrainConfig(**{**(defaults if toy else {}), **values}).validate(paths=not args.dry_run)
    return config, args


def saved_config(output_dir: str) -> dict:
    """The keys of the run in output_dir, as its newest checkpoint saved them (but where it is
    and how it began: output_dir, resume, overwrite); {} when there is none to read: the
    trainer's checks of the directory then say what is wrong."""
    from .checkpoint import read_checkpoint_meta
    try:
        saved = read_checkpoint_meta(output_dir)["config"]
    except (OSError, ValueError):
        return {}
    keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"output_dir", "resume", "overwrite"}
    return {key: value for key, value in saved.items() if key in keys}

"""Training configuration: one dataclass, loaded from a JSON or YAML file, every key overridable from
the command line (--key value), every value checked for type and range before anything loads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import List, Optional

from ..options import LossOptions
from ..prompts import DEFAULT_TEMPLATES
from .config_checks import check_types, check_values, coerce_flag, field_types
from .config_files import load_config_values
from .config_help import (
    DATA,
    DISTRIBUTED,
    EVALUATION,
    LOGGING,
    METHOD,
    MODEL,
    OPTIMIZATION,
    PACKING,
    ROLLOUTS,
    add_config_arguments,
    option,
)
from .data.packing import resolve_attn_implementation
from .hub import check_model_path
from .rollouts import VLLM_MISSING, vllm_available
from .trackers import check_report_to

TOY = "toy"
# The embedded default's sizes: the toy task runs end to end on a CPU in a few minutes.
TOY_DEFAULTS = dict(
    max_new_tokens=72,
    batch_size=8,
    max_steps=40,
    lr=2e-4,
    sft_steps=800,
    save_every=10,
    eval_limit=64,
    output_dir="runs/toy",
    use_chat_template=False,
    diagnostics_every=5,
)


@dataclass
class TrainConfig:
    # Model: what from_pretrained takes (a local directory or a Hugging Face Hub id, through the
    # Hugging Face cache; HF_HUB_OFFLINE=1 honoured), or "toy" (a tiny model and task built in code).
    model_path: str = option(
        TOY,
        group=MODEL,
        help="the model to train: a local directory, a Hugging Face Hub "
        "id, or toy (a tiny model and task built in code)",
    )
    # The toy's task (tasks.py): "shortcut" (the reference gives the method and the answer, the
    # question the numbers) or "arithmetic" (the reference is the worked solution).
    toy_task: str = option("shortcut", group=MODEL, help="the toy's task: misread, shortcut or arithmetic")
    # What the toy's evaluation reads: "held_out" (the draw's first eval_limit rows) or
    # "validation" (eval_limit other problems, drawn by another seed, none of them a training or
    # held-out question): settings are chosen on it, so the held-out numbers are never tuned on.
    toy_eval_split: str = option(
        "held_out",
        group=EVALUATION,
        help="the toy's evaluation rows: held_out, or validation (a separate draw, for choosing settings)",
    )
    # A directory of warmed-up toy bases, each keyed by everything that makes it (base_cache.py):
    # a run finds its base there or builds it there. None: every run warms up its own.
    base_cache: Optional[str] = option(
        None,
        group=MODEL,
        help="a directory that keeps the toy's warmed-up bases for later runs (null: each run warms up its own)",
    )
    lora: bool = option(True, group=MODEL, help="train a LoRA adapter (peft); false: fine-tune every weight")
    lora_rank: int = option(8, group=MODEL, help="LoRA's rank r")
    lora_alpha: int = option(16, group=MODEL, help="LoRA's alpha (the adapter is scaled by alpha / r)")
    lora_targets: List[str] = option(
        group=MODEL,
        help="the modules LoRA adapts (names or their ends; a list or comma-separated)",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    # "base": teacher, reference-only teacher and anchor run the frozen base (adapter off, or a
    # frozen copy when fine-tuning fully); "current": they run the weights being trained.
    teacher_weights: str = option(
        "base",
        group=METHOD,
        help="the weights the teachers and the anchor run: base (frozen) or current (the ones being trained)",
    )
    gradient_checkpointing: bool = option(
        False, group=MODEL, help="recompute activations in the backward (less memory, more time)"
    )
    # Full fine-tuning under torchrun with FSDP2 (fully_shard per decoder layer and the whole
    # model): weights, gradients and optimizer state sharded over the ranks, the frozen copy too;
    # checkpoints through torch.distributed.checkpoint. Needs lora false and torchrun.
    fsdp: bool = option(
        False,
        group=DISTRIBUTED,
        help="shard weights, gradients and optimizer state over torchrun's ranks with FSDP2 (full fine-tuning only)",
    )
    bf16: bool = option(True, group=MODEL, help="load the model in bf16 and autocast (on CUDA only)")
    device: str = option("auto", group=MODEL, help="auto (cuda when a GPU is present), cpu or cuda")
    # The model's architecture numbers (config.json's names: hidden_size, num_hidden_layers, ...),
    # for --dry-run's plan when model_path is not a local directory; training reads config.json.
    architecture: dict = option(
        group=MODEL,
        factory=dict,
        help="the model's config.json numbers, for --dry-run when the model is not on this machine (JSON)",
    )

    # Context forwards (packing.py). packed: a micro-batch's rollouts go through the model in one
    # forward per context, packed without padding (else one forward per rollout and context);
    # max_tokens_per_micro_batch (None: no bound) splits them into packs of at most that many
    # tokens. attn_implementation: "auto" is flash-attn's varlen kernels on CUDA when installed,
    # else "varlen" (torch's varlen_attn on CUDA, one sdpa call per sequence on a CPU); "sdpa" and
    # "eager" get a block-diagonal mask over the whole pack (quadratic in its length).
    packed: bool = option(
        True, group=PACKING, help="read a micro-batch's rollouts in one forward per context, without padding"
    )
    max_tokens_per_micro_batch: Optional[int] = option(
        None, group=PACKING, help="split the packs at this many tokens (null: no bound)"
    )
    attn_implementation: str = option(
        "auto", group=PACKING, help="the attention kernel: auto, varlen, flash_attention_2, sdpa or eager"
    )

    # Data: local JSON Lines, a JSON array or parquet; the toy model ignores these and builds its own.
    train_file: Optional[str] = option(
        None, group=DATA, help="training rows: JSON Lines, a JSON array or parquet (the toy builds its own)"
    )
    eval_file: Optional[str] = option(None, group=DATA, help="held-out rows for the evaluation, as train_file")
    question_field: str = option("question", group=DATA, help="the rows' field that holds the question")
    solution_field: str = option("solution", group=DATA, help="the rows' field that holds the reference solution")
    answer_field: Optional[str] = option(
        "answer",
        group=DATA,
        help="the rows' field that holds the answer (null: extracted from the solution with answer_pattern)",
    )
    answer_pattern: str = option(
        r"\\boxed\{([^}]*)\}", group=DATA, help="the regular expression whose first group is a text's answer"
    )
    templates: dict = option(
        group=DATA,
        factory=lambda: dict(DEFAULT_TEMPLATES),
        shown="the built-in ones (prompts.py)",
        help="each context's prompt template, student, teacher and refonly (JSON)",
    )
    use_chat_template: bool = option(True, group=DATA, help="wrap each context in the tokenizer's chat template")

    # Rollouts.
    max_new_tokens: int = option(512, group=ROLLOUTS, help="the longest rollout, in tokens")
    temperature: float = option(1.0, group=ROLLOUTS, help="the rollouts' sampling temperature")
    top_p: float = option(1.0, group=ROLLOUTS, help="the rollouts' nucleus sampling mass")
    # "hf": the model's own generate; "vllm": a vLLM engine in this process, given the current
    # weights (LoRA merged) before each step's sampling. vllm_kwargs go to vllm.LLM as they are.
    rollout_engine: str = option(
        "hf",
        group=ROLLOUTS,
        help="what samples the rollouts: hf (the model's generate) or vllm (an engine in this process)",
    )
    vllm_kwargs: dict = option(group=ROLLOUTS, factory=dict, help="arguments to vllm.LLM, as they are (JSON)")

    # The loss (pmi_kernels.reference is its contract); mode "pmi" or "opsd" (target = teacher).
    mode: str = option("pmi", group=METHOD, help="the target: pmi (the PMI target) or opsd (the teacher)")
    # The PMI target's anchor a in q = softmax(a + clip(Δ)/β). true: the frozen base read in the
    # student's context (one more forward a step), a fixed target. false: the student itself,
    # detached (the loss functions' default), a target that moves with the student: at every
    # step it asks for s + clip(Δ)/β whatever s already is, so it has no fixed point while Δ is
    # not zero (drift.py). The trainer's default is true because the comparison measured it
    # (docs/demo.md: on the toy the self anchor drifted into collapse, the frozen one
    # held; on the misread task a sweep of lr, β and clip found no setting where the self anchor
    # gained without drifting); `--anchor false` is the paper's choice, and configs/ writes it out.
    anchor: bool = option(
        True,
        group=METHOD,
        help="the PMI target's anchor: true the frozen base in the "
        "student's context, false the student itself (the paper's)",
    )
    beta: float = option(1.0, group=METHOD, help="the PMI target's inverse strength β (target = anchor + clip(Δ)/β)")
    clip: Optional[float] = option(10.0, group=METHOD, help="soft clip c of the PMI residual, c·tanh(Δ/c) (null: none)")
    center: bool = option(True, group=METHOD, help="subtract the PMI residual's mean over the vocabulary")
    loss_temperature: float = option(1.0, group=METHOD, help="every stream's logits are divided by it in the loss")
    jsd_beta: float = option(0.0, group=METHOD, help="the generalized JSD's weight: 0 KL(q‖p), 1 KL(p‖q)")
    entry_clip: Optional[float] = option(
        None, group=METHOD, help="clamp each vocabulary entry's KL summand to at most this (null: none)"
    )

    # Optimization.
    seed: int = option(0, group=OPTIMIZATION, help="seeds the model's start, the data order and the sampling")
    max_steps: int = option(100, group=OPTIMIZATION, help="optimizer steps to train (the run's length)")
    batch_size: int = option(4, group=OPTIMIZATION, help="rollouts per micro-batch (per rank under torchrun)")
    grad_accum: int = option(1, group=OPTIMIZATION, help="micro-batches per optimizer step")
    lr: float = option(1e-4, group=OPTIMIZATION, help="AdamW's peak learning rate")
    weight_decay: float = option(0.0, group=OPTIMIZATION, help="AdamW's weight decay")
    warmup_steps: int = option(0, group=OPTIMIZATION, help="steps of linear learning-rate warm-up")
    schedule: str = option(
        "constant",
        group=OPTIMIZATION,
        help="the learning rate after the warm-up: constant, cosine or linear (decay to 0)",
    )
    max_grad_norm: float = option(1.0, group=OPTIMIZATION, help="clip the gradients' global norm to this")
    sft_steps: int = option(
        0, group=OPTIMIZATION, help="the toy's supervised warm-up steps on the reference solutions, before distillation"
    )
    sft_lr: float = option(3e-3, group=OPTIMIZATION, help="the supervised warm-up's learning rate")
    sft_batch_size: int = option(32, group=OPTIMIZATION, help="the supervised warm-up's rows per step")

    # What it shows and keeps.
    output_dir: str = option("runs/opsd", group=LOGGING, help="where the run writes checkpoints and metrics")
    log_every: int = option(1, group=LOGGING, help="write a metrics row every this many steps")
    diagnostics_every: int = option(
        1, group=LOGGING, help="compute the decomposition diagnostics every this many steps"
    )
    markers: List[str] = option(
        group=LOGGING,
        factory=lambda: ["wait", "maybe", "perhaps", "check"],
        help="words counted in the rollouts (markers/<word>)",
    )
    tensorboard: bool = option(False, group=LOGGING, help="log to TensorBoard (the same as --report-to tensorboard)")
    # Experiment trackers, as transformers' report_to: any of "tensorboard", "trackio", "wandb",
    # "mlflow" (trackers.py), or "none"; each through its own library, on rank 0.
    report_to: List[str] = option(
        group=LOGGING,
        factory=list,
        help="experiment trackers to log to: tensorboard, trackio, wandb, mlflow or none (a list)",
    )
    eval_every: int = option(
        0, group=EVALUATION, help="evaluate every this many steps (0: before and after training only)"
    )
    eval_samples: int = option(1, group=EVALUATION, help="samples per held-out question")
    eval_temperature: float = option(0.0, group=EVALUATION, help="the evaluation's sampling temperature (0: greedy)")
    eval_limit: int = option(64, group=EVALUATION, help="held-out questions evaluated, at most")
    save_every: int = option(50, group=LOGGING, help="save a checkpoint every this many steps")
    keep_checkpoints: int = option(2, group=LOGGING, help="keep the newest this many checkpoint-<step> directories")
    # A step whose loss or gradients are not finite is skipped (no update); this many in a row stop the run.
    max_nonfinite_steps: int = option(
        5,
        group=OPTIMIZATION,
        help="stop after this many steps in a row with a non-finite loss or gradient (each skipped)",
    )
    # Warn when the student's KL from the frozen base passes this many nats per token (drift.py;
    # measured on the diagnostics steps); None: never.
    drift_warn_kl: Optional[float] = option(
        0.3,
        group=LOGGING,
        help="warn when the student's KL from the frozen base passes this, in nats per token (null: never)",
    )
    resume: bool = option(False, group=LOGGING, help="continue output_dir's run from its latest checkpoint")
    overwrite: bool = option(
        False, group=LOGGING, help="replace the run in a non-empty output_dir (else it is refused)"
    )
    # Keys --resume may change although they change the run (the keys in RESUME_MAY_CHANGE always may).
    allow_config_change: List[str] = option(
        group=LOGGING, factory=list, help="keys --resume may change although they change the run"
    )

    def loss_options(self) -> LossOptions:
        return LossOptions(
            pmi=self.mode == "pmi",
            beta=self.beta,
            clip=self.clip,
            center=self.center,
            temperature=self.loss_temperature,
            jsd_beta=self.jsd_beta,
            entry_clip=self.entry_clip,
        )

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
                check_data_file(key, getattr(self, key))
            if self.sft_steps:
                raise ValueError(
                    "config: sft_steps (the supervised warm-up) is for the toy model only; "
                    f"with model_path {self.model_path!r} set it to 0"
                )
        return self

    def torch_device(self):
        import torch

        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)


def check_data_file(key: str, path: Optional[str]) -> None:
    """A data file that is there and is a file (a directory was called missing)."""
    if path is None or os.path.isfile(path):
        return
    if os.path.isdir(path):
        raise ValueError(f"config: {key} {path!r} is a directory; name a .jsonl, .json or .parquet file in it")
    what = "is not a regular file" if os.path.exists(path) else "does not exist"
    raise ValueError(f"config: {key} {path!r} {what}")


# Keys a resumed run may change: they do not change what the steps compute (or, for max_steps,
# they are how a run is extended). Any other changed key needs --allow-config-change KEY.
RESUME_MAY_CHANGE = frozenset(
    {
        "max_steps",
        "eval_every",
        "eval_samples",
        "eval_temperature",
        "save_every",
        "log_every",
        "keep_checkpoints",
        "max_nonfinite_steps",
        "diagnostics_every",
        "markers",
        "tensorboard",
        "gradient_checkpointing",
        "output_dir",
        "resume",
        "overwrite",
        "allow_config_change",
        "architecture",
        "packed",
        "max_tokens_per_micro_batch",
        "attn_implementation",
        "drift_warn_kl",
        "base_cache",
        "report_to",
    }
)


def changed_keys(saved: dict, config: TrainConfig) -> List[str]:
    """'key (saved -> now)' for each key that differs from the saved run's and may not change."""
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    allowed = RESUME_MAY_CHANGE | set(config.allow_config_change)
    return [
        f"{key} ({saved.get(key, '<unset>')!r} -> {value!r})"
        for key, value in now.items()
        if key not in allowed and saved.get(key, "<unset>") != value
    ]


def read_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            values = load_config_values(path, fh)  # JSON, or YAML by extension
    except OSError as err:
        raise ValueError(f"--config {path}: cannot be read ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    if not isinstance(values, dict):
        raise ValueError(
            f"--config {path}: expected a mapping of config keys (a JSON object, or YAML key: value "
            f"lines), got {type(values).__name__}"
        )
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {sorted(unknown)}")
    # report_to may be one string, as transformers' and TRL's configs write it ("wandb", "all" aside).
    if isinstance(values.get("report_to"), str):
        values["report_to"] = coerce_flag("report_to", values["report_to"], List[str], False)
    return values


def parse_config(
    argv=None, description: str = "", toy_defaults: Optional[dict] = None, prog: str = "pmi-opsd train"
) -> TrainConfig:
    """--config FILE (JSON or YAML), then --key value for any key (a bare --resume, --overwrite, ... is true).
    The toy's defaults (TOY_DEFAULTS unless given) come under both."""
    return parse_args(argv, description, toy_defaults, prog)[0]


def parse_args(argv=None, description: str = "", toy_defaults: Optional[dict] = None, prog: str = "pmi-opsd train"):
    """(config, the dry-run flags): --dry-run prints the plan (plan.py) and loads nothing, so
    the paths need not exist."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        allow_abbrev=False,  # --max-step is a typo
        usage="%(prog)s [--config FILE] [--dry-run] [--KEY VALUE ...]",
    )
    parser.add_argument("--config", help="a JSON or YAML (.yaml, .yml) file of config keys")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the step's plan (tokens, memory per GPU) from the model's config.json or "
        "the architecture key; no weights are loaded, nothing is downloaded",
    )
    parser.add_argument("--world-size", type=int, default=1, help="--dry-run: GPUs the step is split over")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="--dry-run: the longest context's prompt length assumed (default 512, or what fits "
        "the model's positions beside max_new_tokens)",
    )
    types = field_types(TrainConfig)
    # Each key's help is its field's (config_help.py), in groups; the toy's defaults beside the others.
    add_config_arguments(parser, TrainConfig, types, TOY_DEFAULTS if toy_defaults is None else toy_defaults)
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
        output_dir = values.get(
            "output_dir", defaults["output_dir"] if values.get("model_path", TOY) == TOY else TrainConfig.output_dir
        )
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

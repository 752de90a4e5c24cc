"""Purified OPSD in TRL: `PurifiedOPSDTrainer` is TRL's SDFT trainer (TRL's on-policy
self-distillation trainer) with a third, reference-only context and the PMI-KL loss of
`fused_pmi_kl`. Needs trl 1.16 (pip install "pmi-kernels[trl]").

Switching from SDFT changes the two classes and adds the PMI options:

    from pmi_kernels.integrations.trl import PurifiedOPSDConfig, PurifiedOPSDTrainer
    args = PurifiedOPSDConfig(output_dir="out", pmi_mode="pmi", pmi_beta=1.0, pmi_clip=10.0)
    trainer = PurifiedOPSDTrainer(model, args=args, train_dataset=dataset, peft_config=lora)
    trainer.train()

Kept from SDFT: the dataset ("prompt", "privileged_context": the reference solution), the
rollouts (transformers or vLLM), the teacher's prompt (`teacher_prompt_template`, which must
format {prompt} and {privileged_context} and nothing else), the teacher's weights
(`teacher_model_kind`: "base" is the adapter switched off under PEFT, else a frozen copy;
"live"; "ema"), accelerate and DDP as TRL runs them (tested; FSDP and DeepSpeed
are routed as in TRL's DistillationTrainer, untested here), `num_loss_tokens_to_skip`,
`temperature` (the loss reads logits / temperature, as SDFT's does) and the logging.

What changes:
- a reference-only context, `refonly_prompt_template` over {privileged_context} without the
  question (system turns of a conversational prompt are kept), followed by the same completion;
- the loss is fused_pmi_kl over final hidden states and the lm_head: the full vocabulary, and
  no [B, T, V] logits anywhere. A micro-batch's loss is its sum over completion tokens divided
  by the completion tokens of the whole optimizer step on all processes (TRL's
  num_items_in_batch, counted as its DistillationTrainer counts it), where SDFT averages per
  sequence; SDFT's distillation_* options do not apply;
- training is on-policy: each rollout is trained on in the optimizer step that sampled it
  (steps_per_generation == gradient_accumulation_steps, num_iterations == 1).

Logged besides SDFT's metrics (masked means per completion token over the logging interval,
every micro-batch weighted by its tokens, over all processes): self_distillation/distillation_loss
(the loss), pmi/kl_target_student (KL(q || p)), entropy (the student's), pmi/entropy_target, and
with pmi_log_diagnostics the decomposition of the teacher's signal from `pmi_diagnostics`, as
diag/<key>.

Rows: the datasets' rows are checked when the trainer is built, and each batch's as it is prepared
(before any rollout): a prompt (a str, or messages ending with a user turn; one kind in a
dataset) or privileged_context (a str or messages) that is missing, None or of another type,
and a context that renders to no tokens (no position would predict the first completion token),
are a ValueError naming the row, the field and the template.

Positions: every context is read with position ids counted from its attention mask (0 at its
first real token), as generate() sampled the rollouts; left padding moves nothing (a model with
learned absolute positions, GPT-2's, reads a left-padded prompt as it reads it alone). Mixed
precision: the loss's forwards run under accelerate's autocast (bf16=True / fp16=True), as the
model's own forward does under accelerate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import datasets
import torch
from trl.experimental.sdft import SDFTConfig, SDFTTrainer
from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder, _extract_last_user_text
from trl.models.utils import _ForwardRedirection

from .. import fused_pmi_kl, pmi_diagnostics, validation
from ..backends import DIAGNOSTICS
from ..options import LossOptions
from ..prompts import template_fields
from .models import decoder_and_head

MODES = ("pmi", "opsd")
# Config key -> LossOptions field; each is checked by LossOptions, under the config's name.
LOSS_OPTION_KEYS = {
    "pmi_beta": "beta",
    "pmi_clip": "clip",
    "pmi_center": "center",
    "pmi_jsd_beta": "jsd_beta",
    "pmi_entry_clip": "entry_clip",
    "temperature": "temperature",
}
# fused_pmi_kl's per-position statistics -> logged names ("entropy" is TRL's name for the student's).
STAT_LOG_NAMES = {
    "kl_target_student": "pmi/kl_target_student",
    "entropy_student": "entropy",
    "entropy_target": "pmi/entropy_target",
}
# A dataset row's fields, as SDFT reads them.
ROW_FIELDS = ("prompt", "privileged_context")
# Each context a row renders to (before the completion): its name in messages, the config key of
# its template (the student's is the prompt itself) and the row's fields in it.
CONTEXTS = {
    "student": ("the student's context", None, ("prompt",)),
    "teacher": ("the teacher's context", "teacher_prompt_template", ROW_FIELDS),
    "refonly": ("the reference-only context", "refonly_prompt_template", ("privileged_context",)),
}


@dataclass
class PurifiedOPSDConfig(SDFTConfig):
    r"""SDFTConfig plus the options of the PMI target (pmi_kernels/reference.py).

    Parameters:
        pmi_mode (`str`, defaults to `"pmi"`): "pmi", the PMI target
            q = softmax(anchor + c*tanh(centered(log p_T - log p_R)/c)/beta); or "opsd", standard
            on-policy self-distillation (q = p_T, no reference-only context in the loss).
        refonly_prompt_template (`str`, defaults to `"{privileged_context}"`): the reference-only
            context, over {privileged_context} and without {prompt}.
        pmi_beta (`float`, defaults to 1.0): the PMI residual is scaled by 1/beta.
        pmi_clip (`float` or `None`, defaults to 10.0): the soft clip c of the PMI residual; None or
            inf turns it off (c*tanh(x/c) tends to x; on a command line: --pmi_clip inf).
        pmi_center (`bool`, defaults to True): center the PMI residual over the vocabulary.
        pmi_jsd_beta (`float`, defaults to 0.0): the loss's generalized-JSD weight; 0 is KL(q || p),
            1 is KL(p || q).
        pmi_entry_clip (`float` or `None`): clip each summand of the divergence to this.
        pmi_anchor (`bool`, defaults to False): the target's anchor is the teacher's weights read on
            the student's context (one more forward), instead of the student's own logits.
        pmi_log_diagnostics (`bool`, defaults to True): log `pmi_diagnostics`' masked means (one more
            sweep over the head; in "opsd" mode also the reference-only forward they need).
    """

    pmi_mode: str = field(default="pmi", metadata={"help": "'pmi' (the PMI target) or 'opsd' (q = p_T)."})
    refonly_prompt_template: str = field(
        default="{privileged_context}",
        metadata={"help": "The reference-only context: a template over {privileged_context}, without {prompt}."},
    )
    pmi_beta: float = field(default=1.0, metadata={"help": "Scale 1/beta of the PMI residual."})
    pmi_clip: float | None = field(default=10.0, metadata={"help": "Soft clip of the PMI residual (inf or None: off)."})
    pmi_center: bool = field(default=True, metadata={"help": "Center the PMI residual over the vocabulary."})
    pmi_jsd_beta: float = field(default=0.0, metadata={"help": "Generalized JSD weight: 0 is KL(q||p), 1 KL(p||q)."})
    pmi_entry_clip: float | None = field(default=None, metadata={"help": "Clip of each divergence summand."})
    pmi_anchor: bool = field(default=False, metadata={"help": "Anchor the target on the teacher's weights."})
    pmi_log_diagnostics: bool = field(default=True, metadata={"help": "Log the decomposition diagnostics."})

    def __post_init__(self):
        super().__post_init__()
        validation.check_choice("pmi_mode", self.pmi_mode, MODES)
        if isinstance(self.pmi_clip, float) and self.pmi_clip == math.inf:
            self.pmi_clip = None  # the clip's limit; a command line cannot say None
        for key, option in LOSS_OPTION_KEYS.items():
            try:
                LossOptions(**{option: getattr(self, key)})
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
        for key in ("pmi_anchor", "pmi_log_diagnostics"):
            validation.check_bool(key, getattr(self, key))
        if self.pmi_anchor and self.pmi_mode != "pmi":
            raise ValueError("pmi_anchor needs pmi_mode='pmi' (in 'opsd' mode the target is p_T, with no anchor)")
        self._check_template(
            "refonly_prompt_template",
            ("privileged_context",),
            "the reference-only context has the reference and no question",
        )
        # SDFT checks its template for the substrings "{prompt}" and "{privileged_context}", which
        # "{{prompt}}" (a literal: the teacher without the question) and an unknown field pass.
        self._check_template("teacher_prompt_template", ROW_FIELDS, "the teacher's context has both")
        self._check_sdft_options()

    def _check_template(self, key: str, wanted: tuple, why: str):
        """The template formats exactly the wanted fields ({{ and }} are literal braces)."""
        template = getattr(self, key)
        try:
            fields = set(template_fields(template))
        except ValueError as err:
            raise ValueError(f"{key}: {err}, got {template!r}") from None
        if fields != set(wanted):
            names = " and ".join(f"{{{name}}}" for name in wanted)
            raise ValueError(f"{key} must format {names} and no other field ({why}), got {template!r}")

    def _check_sdft_options(self):
        if self.use_teacher_server:
            raise ValueError(
                "use_teacher_server must be False: the loss reads the teacher's final hidden states "
                "locally (a vLLM server returns top-k log-probabilities)"
            )
        if self.num_iterations != 1:
            raise ValueError(
                f"num_iterations must be 1, got {self.num_iterations}: the loss is on-policy (no "
                "importance-sampling correction for reused rollouts)"
            )
        if self.steps_per_generation != self.gradient_accumulation_steps:
            raise ValueError(
                f"steps_per_generation (also set through generation_batch_size) must equal "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}), got "
                f"{self.steps_per_generation}: each rollout is trained on in the optimizer step that "
                "sampled it, and the step's token count normalizes the loss (so SDFT computes no "
                "old log-probabilities either, which would take [B, T, V] logits)"
            )

    def loss_options(self) -> dict:
        """fused_pmi_kl's keyword options."""
        return dict(
            beta=self.pmi_beta,
            clip=self.pmi_clip,
            center=self.pmi_center,
            temperature=self.temperature,
            jsd_beta=self.pmi_jsd_beta,
            entry_clip=self.pmi_entry_clip,
        )


def completion_hidden_states(decoder, input_ids, attention_mask, completion_length: int) -> torch.Tensor:
    """[B, T, H]: the final hidden states that predict the last T tokens of input_ids (the
    completion), each row at the positions its attention mask counts (left padding takes none,
    as in generate()). The last token predicts nothing trained on, so it is not read."""
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    hidden = decoder(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=False,
    ).last_hidden_state
    return hidden.narrow(1, hidden.size(1) - completion_length, completion_length)


class ReferenceOnlyContextBuilder(DemonstrationTeacherContextBuilder):
    """SDFT's teacher-context builder (tokenize, left-pad, append the completion), with the
    reference-only prompt: the privileged context in refonly_prompt_template, no question.
    A conversational prompt keeps its earlier turns (the system prompt) and has its last user
    turn replaced, so that the teacher's and the reference-only contexts differ by the question
    alone - the variable whose pointwise mutual information the target keeps."""

    def _compose_teacher_prompt(self, prompt, privileged_context):
        text = self.trainer.args.refonly_prompt_template.format(
            privileged_context=self._stringify_privileged_context(privileged_context)
        )
        if isinstance(prompt, list):
            _extract_last_user_text(prompt)  # the same check as the teacher's: the last turn is the user's
            return prompt[:-1] + [{"role": "user", "content": text}]
        return text

    def build(self, prompts, privileged_contexts, completion_ids, completion_mask):
        built = super().build(prompts, privileged_contexts, completion_ids, completion_mask)
        return {
            "refonly_input_ids": built["teacher_input_ids"],
            "refonly_attention_mask": built["teacher_attention_mask"],
        }


def preview(value, limit: int = 60) -> str:
    """A value's repr for an error message, cut to limit characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_messages(messages, where: str, roles: bool) -> None:
    """A list of chat messages as TRL reads them: each a dict with a 'content' (a str, or a list
    of parts, each a dict) and, in a prompt, a str 'role'."""
    if not messages:
        raise ValueError(f"{where} is an empty list of messages")
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        parts_ok = isinstance(content, str) or (
            isinstance(content, list) and all(isinstance(part, Mapping) for part in content)
        )
        if not parts_ok or (roles and not isinstance(message.get("role"), str)):
            raise ValueError(
                f"{where}[{index}] must be a message, a dict with a str 'role' and a 'content' (a str "
                f"or a list of parts), got {preview(message)}"
            )


def check_row(row, where: str) -> bool:
    """A dataset row's fields, as SDFT reads them: the prompt a str or a conversation that ends with
    a user turn (the teacher's and the reference-only contexts replace that turn), the
    privileged context a str or a list of messages (TRL would format anything else with str()).
    Returns whether the prompt is a conversation."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} must be a dict with {', '.join(map(repr, ROW_FIELDS))}, got {preview(row)}")
    for key in ROW_FIELDS:
        if row.get(key) is None:
            raise ValueError(
                f"{where}: {key} is {'None' if key in row else 'missing'} (SDFT reads a row's "
                f"{' and '.join(ROW_FIELDS)})"
            )
    prompt, privileged_context = row["prompt"], row["privileged_context"]
    if isinstance(prompt, list):
        check_messages(prompt, f"{where}: prompt", roles=True)
        if prompt[-1]["role"] != "user":
            raise ValueError(
                f"{where}: prompt must end with a user turn (the teacher's and the reference-only "
                f"contexts replace it), got a last turn of role {prompt[-1]['role']!r}"
            )
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt must be a str or a list of messages, got {preview(prompt)}")
    if isinstance(privileged_context, list):
        check_messages(privileged_context, f"{where}: privileged_context", roles=False)
    elif not isinstance(privileged_context, str):
        raise ValueError(
            f"{where}: privileged_context must be a str or a list of messages, got {preview(privileged_context)}"
        )
    return isinstance(prompt, list)


def check_same_kind(first: tuple, other: tuple) -> None:
    """TRL tokenizes a batch as its first row's kind: (conversational, where) of two rows must agree."""
    if other[0] != first[0]:
        kinds = ("text", "a conversation")
        raise ValueError(
            f"{other[1]}: prompt is {kinds[other[0]]} but {first[1]}'s is {kinds[first[0]]} (a "
            "dataset's prompts are all text or all conversations)"
        )


def reads_refonly(args: PurifiedOPSDConfig) -> bool:
    """Whether the reference-only context is built (the PMI target or the diagnostics read it)."""
    return args.pmi_mode == "pmi" or args.pmi_log_diagnostics


def render_contexts(args: PurifiedOPSDConfig, row) -> dict:
    """{context name: its prompt (text or messages)} of a checked row, composed as the trainer's
    context builders compose them."""
    holder = SimpleNamespace(args=args)  # the builders read only their trainer's args
    builders = {"teacher": DemonstrationTeacherContextBuilder(holder)}
    if reads_refonly(args):
        builders["refonly"] = ReferenceOnlyContextBuilder(holder)
    composed = {
        name: builder._compose_teacher_prompt(row["prompt"], row["privileged_context"])
        for name, builder in builders.items()
    }
    return {"student": row["prompt"], **composed}


def no_tokens_error(args: PurifiedOPSDConfig, where: str, row, context: str) -> ValueError:
    label, template_key, fields = CONTEXTS[context]
    source = ", ".join(f"{key}={preview(row[key])}" for key in fields)
    if template_key is not None:
        source = f"{template_key}={getattr(args, template_key)!r} over {source}"
    return ValueError(
        f"{where}: {label} renders to no tokens ({source}): no position would predict the first completion token"
    )


def check_dataset(args: PurifiedOPSDConfig, dataset, name: str, tokenizer) -> None:
    """Every row's fields, and, where a text prompt renders a context to blank text, that the
    tokenizer gives it tokens (the batch check tokenizes every context exactly, at the latest)."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        return  # SDFT refuses iterable datasets; an unsized one is checked batch by batch
    if isinstance(dataset, datasets.Dataset):
        for key in ROW_FIELDS:
            if key not in dataset.column_names:
                raise ValueError(f"{name} has no {key!r} column (its columns: {dataset.column_names})")
        rows = enumerate(dataset.select_columns(list(ROW_FIELDS)))  # not the other columns' values
    else:
        rows = ((index, dataset[index]) for index in range(len(dataset)))
    first, blank = None, []
    for index, row in rows:
        where = f"{name} row {index}"
        kind = (check_row(row, where), where)
        first = first or kind
        check_same_kind(first, kind)
        if not kind[0]:
            blank += [
                (where, row, context, text) for context, text in render_contexts(args, row).items() if not text.strip()
            ]
    if blank and tokenizer is not None:  # as SDFT tokenizes text (its truncation keeps a context's last tokens)
        ids = tokenizer(text=[text for *_, text in blank])["input_ids"]
        for (where, row, context, _), row_ids in zip(blank, ids):
            if len(row_ids) == 0:
                raise no_tokens_error(args, where, row, context)


def check_datasets(args: PurifiedOPSDConfig, train_dataset, eval_dataset, tokenizer) -> None:
    """The rows of train_dataset and eval_dataset (one, or a dict of them), each named in errors."""
    check_dataset(args, train_dataset, "train_dataset", tokenizer)
    named = eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]
    for key, dataset in named:
        check_dataset(args, dataset, "eval_dataset" if key is None else f"eval_dataset[{key!r}]", tokenizer)


class PurifiedOPSDTrainer(SDFTTrainer):
    """SDFTTrainer with the reference-only context and the PMI-KL loss (module docstring)."""

    _tag_names = ["trl", "sdft", "pmi-kernels", "purified-opsd"]
    _name = "Purified OPSD"
    config_cls = PurifiedOPSDConfig

    def __init__(
        self,
        model,
        args: PurifiedOPSDConfig = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        if not isinstance(args, PurifiedOPSDConfig):
            raise ValueError(
                f"args must be a PurifiedOPSDConfig (SDFTConfig plus the pmi_* options), got {type(args).__name__}"
            )
        if isinstance(model, torch.nn.Module):  # before SDFT copies a teacher or starts vLLM
            decoder_and_head(model)
        # The datasets' rows too; without a tokenizer (SDFT loads the model's), after SDFT's set-up.
        if processing_class is not None:
            check_datasets(args, train_dataset, eval_dataset, processing_class)
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers, peft_config)
        if processing_class is None:
            check_datasets(args, train_dataset, eval_dataset, self.processing_class)
        self.refonly_context_builder = ReferenceOnlyContextBuilder(self)
        self._forward_redirection = _ForwardRedirection()
        self._pmi_sums = {"train": defaultdict(float), "eval": defaultdict(float)}  # since the last log
        # Fail before any rollout on a model whose hidden states and head cannot be read.
        decoder_and_head(self.accelerator.unwrap_model(self.model))
        decoder_and_head(self.accelerator.unwrap_model(self.teacher_model))

    def _check_batch(self, inputs) -> None:
        """Each row's fields, and that each of its contexts has tokens as the trainer tokenizes them,
        before any is sampled from: this sees what the datasets' check could not (a context whose
        text has no tokens, an eval_dataset given to evaluate()). The contexts go through SDFT's own
        tokenization once more (little next to the rollouts); a row's repeats (its generations) are
        checked once."""
        rows = [row for index, row in enumerate(inputs) if index == 0 or row != inputs[index - 1]]
        wheres = [
            f"the row with prompt={preview(row.get('prompt'))}" if isinstance(row, Mapping) else "a row" for row in rows
        ]
        kinds = [(check_row(row, where), where) for row, where in zip(rows, wheres)]
        for kind in kinds:
            check_same_kind(kinds[0], kind)
        rendered = [render_contexts(self.args, row) for row in rows]
        for context in rendered[0]:
            ids = self._tokenize_prompts([contexts[context] for contexts in rendered])
            for row, where, row_ids in zip(rows, wheres, ids):
                if len(row_ids) == 0:
                    raise no_tokens_error(self.args, where, row, context)

    @property
    def _reads_refonly(self) -> bool:
        return reads_refonly(self.args)

    def _loss_mask(self, batch) -> torch.Tensor:
        """The completion tokens that count: SDFT's, less the first num_loss_tokens_to_skip."""
        mask = batch["completion_mask"]
        if self.num_loss_tokens_to_skip > 0:
            positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)
            mask = mask * (positions >= self.num_loss_tokens_to_skip).long()
        return mask

    def _prepare_training_batch(self, inputs):
        """SDFT's batch (rollouts, teacher contexts) plus the reference-only contexts and the
        completion tokens of the whole generation batch on all processes, which is one optimizer
        step's (steps_per_generation == gradient_accumulation_steps)."""
        self._check_batch(inputs)
        batch = super()._prepare_training_batch(inputs)
        if self._reads_refonly:
            batch.update(
                self.refonly_context_builder.build(
                    [example["prompt"] for example in inputs],
                    [example.get("privileged_context") for example in inputs],
                    batch["completion_ids"],
                    batch["completion_mask"],
                )
            )
        # 0-d, so split_tensor_dict hands it whole to every micro-batch of the step.
        batch["num_items_in_batch"] = self.accelerator.gather(self._loss_mask(batch).sum()).sum()
        return batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """transformers' num_items_in_batch counts dataset labels, which this trainer has none of
        (it is None): the count comes from the rollouts, as in TRL's DistillationTrainer."""
        if return_outputs:
            raise ValueError("PurifiedOPSDTrainer does not return outputs")
        normalizer = None  # evaluation: the mean over the batch's completion tokens
        if self.model.training:
            # Divided by the process count because DDP averages the processes' gradients.
            normalizer = inputs["num_items_in_batch"].clamp(min=1) / self.accelerator.num_processes
        # Through the wrapper's forward, so that DDP prepares its backward and FSDP/DeepSpeed
        # gather the parameters, the lm_head included; under the autocast that accelerate puts
        # on the model's own forward, which the redirection bypasses.
        unwrapped = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            loss, totals = self._forward_redirection(model, unwrapped, self._pmi_loss, unwrapped, inputs, normalizer)
        # Gathered here, outside the wrapped forward (a collective inside it risks a hang).
        self._log_pmi_metrics(self.accelerator.gather(totals.unsqueeze(0)).sum(0))
        return loss

    def _pmi_loss(self, student, inputs, normalizer):
        """(loss, totals): totals = [completion tokens, then the sums over them of the loss, each
        statistic and each diagnostic], in the order _log_pmi_metrics reads them."""
        completion_length = inputs["completion_ids"].size(1)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        decoder, head = decoder_and_head(student)
        hidden = completion_hidden_states(decoder, input_ids, attention_mask, completion_length)
        frozen, frozen_head = self._frozen_hidden_states(inputs, input_ids, attention_mask, completion_length)
        mask = self._loss_mask(inputs).bool()
        frozen_weight = frozen_head.weight.detach()
        frozen_bias = None if frozen_head.bias is None else frozen_head.bias.detach()
        loss, stats = fused_pmi_kl(
            hidden,
            head.weight,
            frozen["teacher"],
            frozen["refonly"] if self.args.pmi_mode == "pmi" else None,
            frozen.get("anchor"),
            lm_head_bias=head.bias,
            frozen_weight=frozen_weight,
            frozen_bias=frozen_bias,
            mask=mask,
            normalizer=normalizer,
            return_stats=True,
            check_finite=False,
            **self.args.loss_options(),
        )
        totals = [mask.sum(), *(stats[key].sum() for key in ("loss", *STAT_LOG_NAMES))]
        if self.args.pmi_log_diagnostics:
            totals += self._diagnostic_sums(
                hidden[mask].detach(), {k: v[mask] for k, v in frozen.items()}, head, frozen_weight, frozen_bias
            )
        return loss, torch.stack([t.detach().float() for t in totals])

    def _frozen_hidden_states(self, inputs, student_ids, student_mask, completion_length):
        """({"teacher", "refonly", "anchor"}: [B, T, H] without gradient, the frozen lm_head),
        read with the teacher's weights as SDFT routes them (adapter off, EMA adapter, frozen copy
        or the live student)."""
        contexts = {"teacher": (inputs["teacher_input_ids"], inputs["teacher_attention_mask"])}
        if self._reads_refonly:
            contexts["refonly"] = (inputs["refonly_input_ids"], inputs["refonly_attention_mask"])
        if self.args.pmi_anchor:
            contexts["anchor"] = (student_ids, student_mask)
        teacher = self.accelerator.unwrap_model(self.teacher_model)

        def read(teacher):
            decoder, head = decoder_and_head(teacher)
            states = {
                name: completion_hidden_states(decoder, ids, mask, completion_length)
                for name, (ids, mask) in contexts.items()
            }
            return states, head

        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            if self.teacher_model is self.model:  # the student's own modules, already gathered
                return read(teacher)
            # A separate frozen copy: through its own wrapper, so FSDP/DeepSpeed gather its shards.
            return self._forward_redirection(self.teacher_model, teacher, read, teacher)

    def _diagnostic_sums(self, student, frozen, head, frozen_weight, frozen_bias):
        """Sums over the counted tokens of each pmi_diagnostics entry (NaN, where a norm is 0, as 0)."""
        dtype = student.dtype  # under autocast the head may be fp32 masters of bf16 hidden states
        bias = None if head.bias is None else head.bias.detach().to(dtype)
        diagnostics = pmi_diagnostics(
            student,
            frozen["teacher"],
            frozen["refonly"],
            frozen.get("anchor"),
            lm_head_weight=head.weight.detach().to(dtype),
            lm_head_bias=bias,
            frozen_weight=frozen_weight.to(dtype),
            frozen_bias=None if frozen_bias is None else frozen_bias.to(dtype),
            beta=self.args.pmi_beta,
            clip=self.args.pmi_clip,
            center=self.args.pmi_center,
            temperature=self.args.temperature,
            check_finite=False,
        )
        return [value.nan_to_num().sum() for value in diagnostics.values()]

    def _metric_names(self):
        """The logged names of _pmi_loss's totals after the token count and the loss."""
        names = list(STAT_LOG_NAMES.values())
        if self.args.pmi_log_diagnostics:
            names += [f"diag/{key}" for key in DIAGNOSTICS]
        return names

    def _log_pmi_metrics(self, totals: torch.Tensor) -> None:
        """Add a micro-batch's sums to the interval's: the means are taken when TRL logs (log),
        so that each token weighs the same, however the micro-batches split them."""
        sums = self._pmi_sums["train" if self.model.training else "eval"]
        for name, value in zip(("tokens", "loss", *self._metric_names()), totals.tolist(), strict=True):
            sums[name] += value

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums = self._pmi_sums[mode]
        if sums:
            count = max(sums["tokens"], 1.0)
            self._log_self_distillation_metric(mode, sums["loss"] / count)
            for name in self._metric_names():
                self._metrics[mode][name] = [sums[name] / count]
            sums.clear()
        super().log(logs, start_time)

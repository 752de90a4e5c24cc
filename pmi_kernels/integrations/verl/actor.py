"""The PMI loss inside verl's FSDP actor: an engine that reads the three contexts on the rollout
batch it holds, and a loss function in verl's form that normalizes as its loss_agg_mode says.

verl 0.9's actor is a `TrainingWorker` around an `FSDPEngineWithLMHead` (the model engine;
0.9 has no `DataParallelPPOActor`). Its `forward_backward_batch` splits a mini-batch into
micro-batches (micro_batch_size_per_gpu or use_dynamic_bsz), calls `forward_step` on each, runs
the backward of the loss it returns and defers the gradient sync to the last micro-batch; the
worker steps the optimizer once per mini-batch. `PMIEngineMixin` replaces `forward_step` only
for a training step with a `PMILoss`; every other call (old and reference log-probs, a plain
PPO loss) is verl's own. Per micro-batch it:

1. builds, for each sample, the teacher context (reference + question) and the reference-only
   context (reference alone) from the sample's question and reference fields with the
   project's templates (pmi_kernels.prompts, as the trainer and the TRL integration do),
   followed by the sample's response tokens;
2. reads them (and the anchor: the student's own input under the frozen base) without gradient,
   as one right-padded batch each, with the frozen base for teacher_weights "base" (the LoRA
   adapter switched off, or, for full fine-tuning, verl's reference model in the same worker);
3. runs the student's forward as verl prepares it (remove-padding when verl uses it), keeping
   the decoder's final hidden states (a forward hook) and computing logits for one position
   only, unless the policy-gradient loss is added (use_task_rewards), which reads verl's log-probs;
4. calls fused_pmi_kl on the hidden states of the response tokens [B, R, H] and the lm_head
   (gathered under FSDP2 by pmi_kernels.heads), reduction "none"; `PMILoss` aggregates the
   per-token losses with verl's `agg_loss` over `response_mask`.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
from tensordict import TensorDict
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id, get_device_name
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from ... import fused_pmi_kl, pmi_diagnostics
from ...backends import DIAGNOSTICS, STATS
from ...prompts import prompt_ids, rollout_positions
from ..models import decoder_and_head
from .config import TEMPLATE_KINDS, PMIConfig


class _ThroughOutput(torch.autograd.Function):
    """hidden, unchanged, made to hand a (zero) gradient to the model's output too. FSDP2 gathers
    the root unit's parameters (embeddings, final norm) again for the backward in a hook on the
    root forward's outputs; verl reshards the root after its forward, so a backward that reached
    the decoder's states only through the hook's side would read freed parameters."""

    @staticmethod
    def forward(ctx, hidden, output):
        ctx.output_shape, ctx.output_dtype = output.shape, output.dtype
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.output_shape, dtype=ctx.output_dtype)


@contextlib.contextmanager
def captured_hidden(decoder):
    """A list that receives the decoder's final hidden states at each forward inside the block."""
    box: List[torch.Tensor] = []

    def keep(module, args, output):
        box.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


def sequence_lengths(data: TensorDict):
    """(prompt lengths, response lengths) [B] of a micro-batch, as verl's no_padding_2_padding reads them."""
    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        return prompts.offsets().diff(), responses.offsets().diff()
    attention_mask = data["attention_mask"]
    width = prompts.shape[1]
    return attention_mask[:, :width].sum(1), attention_mask[:, width:].sum(1)


def response_ids(data: TensorDict) -> List[List[int]]:
    """Each sample's response tokens (its last response-length tokens of input_ids)."""
    values, offsets = data["input_ids"].values(), data["input_ids"].offsets()
    _, lengths = sequence_lengths(data)
    return [values[int(end) - int(n) : int(end)].tolist() for end, n in zip(offsets[1:], lengths)]


def response_mask(data: TensorDict) -> torch.Tensor:
    mask = data["response_mask"]
    return (mask.to_padded_tensor(0) if mask.is_nested else mask).bool()


def sample_field(data: TensorDict, dotted: str, config_key: str) -> list:
    """The dotted field (`extra_info.reference`) of every sample, as a list."""
    name, *path = dotted.split(".")
    if name not in data.keys():
        raise ValueError(
            f"pmi.{config_key}: the batch has no field {name!r} (it has {sorted(data.keys())}); put "
            "it in the dataset's parquet, as verl's data preprocessing writes extra_info"
        )
    column = data[name]
    values = column.tolist() if hasattr(column, "tolist") else list(column)
    out = []
    for index, value in enumerate(values):
        for part in path:
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"pmi.{config_key}: sample {index} has no {dotted!r}")
            value = value[part]
        if not isinstance(value, str):
            raise ValueError(f"pmi.{config_key}: sample {index}'s {dotted!r} is a {type(value).__name__}, not a str")
        out.append(value)
    return out


class PMILoss:
    """verl's loss-function protocol (config-bound, called as (model_output, data, dp_group)):
    the per-token PMI losses the engine computed, aggregated as actor.loss_agg_mode says over
    response_mask with the mini-batch's global token / sequence counts (verl's agg_loss), plus,
    with use_task_rewards, verl's ppo_loss, the PMI term weighted by loss_coef (as verl's
    distillation weights its distillation_loss_coef)."""

    def __init__(self, actor_config, pmi: PMIConfig):
        self.actor_config, self.pmi = actor_config, pmi

    def __call__(self, model_output: dict, data: TensorDict, dp_group=None):
        config = self.actor_config
        info = config.global_batch_info
        info.update(
            dp_size=data["dp_size"],
            batch_num_tokens=data["batch_num_tokens"],
            global_batch_size=data["global_batch_size"],
            loss_scale_factor=config.loss_scale_factor,
        )
        mask = response_mask(data)
        pmi_loss = agg_loss(
            loss_mat=model_output["pmi_losses"], loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **info
        )
        metrics = dict(model_output.get("pmi_metrics", {}))
        # Normalized over the global mini-batch: each micro-batch's share sums to the loss (verl's convention).
        metrics["pmi/loss"] = Metric(AggregationType.SUM, pmi_loss.detach())
        if not self.pmi.use_task_rewards:
            return pmi_loss, metrics
        policy_loss, policy_metrics = ppo_loss(config, model_output, data, dp_group)
        policy_metrics.update(metrics)
        return policy_loss + self.pmi.loss_coef * pmi_loss, policy_metrics


class PMIEngineMixin:
    """forward_step of an FSDPEngineWithLMHead, with the PMI loss for a PMILoss training step."""

    pmi_steps = 0  # optimizer steps taken, for pmi.diagnostics_every
    # The engine of verl's reference model (the frozen base), for teacher_weights "base" without
    # LoRA; PMIActorRolloutRefWorker sets it.
    pmi_reference_engine = None

    def optimizer_step(self):
        self.pmi_steps += 1
        return super().optimizer_step()

    def forward_step(self, micro_batch: TensorDict, loss_function, forward_only):
        if forward_only or not isinstance(loss_function, PMILoss):
            return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        self._check_pmi_supported(micro_batch)
        pmi = loss_function.pmi
        micro_batch = micro_batch.to(get_device_id())
        model_inputs, output_args = self.prepare_model_inputs(micro_batch=micro_batch)
        autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        autocast = (
            contextlib.nullcontext()
            if autocast_dtype == torch.float32
            else torch.autocast(device_type=get_device_name(), dtype=autocast_dtype)
        )
        diagnose = bool(pmi.diagnostics_every) and (self.pmi_steps + 1) % pmi.diagnostics_every == 0
        decoder, head = decoder_and_head(self.module, "pmi")
        with autocast:
            # The frozen contexts first: their peak never sits on the student's activations.
            frozen, frozen_head = self._frozen_states(micro_batch, model_inputs, pmi, diagnose)
            keep_logits = {} if pmi.use_task_rewards else {"logits_to_keep": 1}
            with captured_hidden(decoder) as box:
                raw_output = self.module(**model_inputs, use_cache=False, **keep_logits)
            hidden = _ThroughOutput.apply(box[-1], raw_output.logits)
            student = no_padding_2_padding(self._packed_values(hidden, micro_batch), micro_batch)
            model_output = {}
            if pmi.use_task_rewards:
                model_output = self.prepare_model_outputs(
                    output=raw_output, output_args=output_args, micro_batch=micro_batch, logits_processor_func=None
                )
            mask = response_mask(micro_batch)
            student = student[:, : mask.shape[1]]
            losses, stats = fused_pmi_kl(
                student,
                head.weight,
                frozen["teacher"],
                frozen.get("refonly") if pmi.reads_refonly else None,
                frozen.get("anchor"),
                lm_head_bias=head.bias,
                **frozen_head,
                mask=mask,
                reduction="none",
                return_stats=True,
                check_finite=False,
                **pmi.loss_options().keywords(),
            )
            model_output["pmi_losses"] = losses
            model_output["pmi_metrics"] = self._pmi_metrics(
                stats, mask, student, frozen, head, frozen_head, pmi, diagnose
            )
            loss, metrics = loss_function(
                model_output=model_output, data=micro_batch, dp_group=self.get_data_parallel_group()
            )
        # verl's own outputs (nested log-probs, entropy), detached as verl's forward_step returns them.
        kept = {k: v.detach() for k, v in model_output.items() if not k.startswith("pmi_")}
        output = {"model_output": kept, "loss": loss.detach().item(), "metrics": metrics}
        return loss, output

    def _check_pmi_supported(self, micro_batch: TensorDict) -> None:
        if self.use_ulysses_sp:
            raise ValueError(
                "pmi: ulysses_sequence_parallel_size > 1 is not supported (each rank would hold a slice "
                "of the hidden states; the frozen contexts are read whole)"
            )
        if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
            raise ValueError(
                "pmi: actor_rollout_ref.model.use_fused_kernels must be false (the fused kernels "
                "return log-probs, not the hidden states the PMI loss reads)"
            )

    def _packed_values(self, hidden: torch.Tensor, micro_batch: TensorDict) -> torch.Tensor:
        """[total tokens, H]: the decoder's states of every sample's tokens, in order. Remove-padding
        packs them in one row (with a static pad after them); the padded path holds one row each."""
        lengths = micro_batch["input_ids"].offsets().diff()
        total = int(lengths.sum())
        if hidden.dim() == 3 and hidden.shape[0] == 1 and hidden.shape[1] >= total:
            return hidden[0, :total]
        return torch.cat([row[: int(n)] for row, n in zip(hidden, lengths)])

    @contextlib.contextmanager
    def _frozen_model(self, pmi: PMIConfig):
        """The module to read the frozen contexts with, and its lm_head as fused_pmi_kl's frozen
        head keywords: the current weights; or the base, which is the adapter switched off under
        LoRA (whose head is the student's: PEFT's all-linear leaves it out) or, for full
        fine-tuning, verl's reference model."""
        if pmi.teacher_weights == "current":
            yield self.module, {}
        elif self._is_lora:
            with self.disable_adapter():
                yield self.module, {}
        else:
            if self.pmi_reference_engine is None:
                raise ValueError(
                    "pmi.teacher_weights: 'base' without LoRA reads verl's reference model, which this "
                    "actor worker does not hold (set actor_rollout_ref.actor.use_kl_loss=true; "
                    "kl_loss_coef=0 leaves the loss unchanged)"
                )
            module = self.pmi_reference_engine.module
            _, head = decoder_and_head(module, "pmi")
            yield (
                module,
                {
                    "frozen_weight": head.weight.detach(),
                    "frozen_bias": None if head.bias is None else head.bias.detach(),
                },
            )

    @torch.no_grad()
    def _frozen_states(self, micro_batch: TensorDict, model_inputs: dict, pmi: PMIConfig, diagnose: bool):
        """({"teacher", "refonly", "anchor"}: [B, R, H] states of the response tokens, without
        gradient; the frozen head's keywords for fused_pmi_kl)."""
        responses = response_ids(micro_batch)
        questions = sample_field(micro_batch, pmi.question_key, "question_key")
        references = sample_field(micro_batch, pmi.reference_key, "reference_key")
        tokenizer = self.model_config.tokenizer
        width = response_mask(micro_batch).shape[1]
        kinds = [kind for kind in TEMPLATE_KINDS if kind == "teacher" or pmi.reads_refonly or diagnose]
        states = {}
        with self._frozen_model(pmi) as (module, frozen_head):
            decoder, _ = decoder_and_head(module, "pmi")
            for kind in kinds:
                prompts = [
                    prompt_ids(tokenizer, pmi.templates, kind, {"question": q, "solution": s}, pmi.use_chat_template)
                    for q, s in zip(questions, references)
                ]
                states[kind] = self._read_contexts(module, decoder, prompts, responses, width)
            if pmi.anchor and (pmi.reads_refonly or diagnose):
                with captured_hidden(decoder) as box:
                    module(**model_inputs, use_cache=False, logits_to_keep=1)
                anchor = no_padding_2_padding(self._packed_values(box[-1], micro_batch), micro_batch)
                states["anchor"] = anchor[:, :width]
        return states, frozen_head

    def _read_contexts(self, module, decoder, prompts: List[List[int]], responses: List[List[int]], width: int):
        """[B, width, H]: for each sample, the states of prompt + response[:-1] that predict its
        response tokens (contexts.rollout_positions), zero past the response; one right-padded forward."""
        sequences = [p + r[:-1] for p, r in zip(prompts, responses)]
        longest = max(map(len, sequences))
        device = get_device_id()
        ids = torch.zeros(len(sequences), longest, dtype=torch.long, device=device)
        attention = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence, device=device)
            attention[row, : len(sequence)] = 1
        positions = torch.arange(longest, device=device).expand_as(ids)
        with captured_hidden(decoder) as box:
            module(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False, logits_to_keep=1)
        hidden = box[-1]
        out = hidden.new_zeros(len(sequences), width, hidden.shape[-1])
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            out[row, : len(response)] = hidden[row, rollout_positions(len(prompt), len(response))]
        return out

    def _pmi_metrics(
        self,
        stats: Dict[str, torch.Tensor],
        mask,
        student,
        frozen,
        head,
        frozen_head: dict,
        pmi: PMIConfig,
        diagnose: bool,
    ) -> dict:
        """pmi/<statistic>: masked means over the micro-batch's response tokens (verl averages the
        micro-batches' values); on diagnostics steps pmi/diag/<key> of pmi_diagnostics too."""
        count = mask.sum().clamp(min=1)
        metrics = {f"pmi/{key}": Metric(AggregationType.MEAN, (stats[key].sum() / count).item()) for key in STATS}
        if diagnose:
            dtype = student.dtype  # under autocast: bf16 states, fp32 master weights

            def cast(x):
                return None if x is None else x.detach().to(dtype)

            diagnostics = pmi_diagnostics(
                student[mask].detach(),
                frozen["teacher"][mask],
                frozen["refonly"][mask],
                frozen["anchor"][mask] if "anchor" in frozen else None,
                lm_head_weight=cast(head.weight),
                lm_head_bias=cast(head.bias),
                **{key: cast(x) for key, x in frozen_head.items()},
                check_finite=False,
                **pmi.loss_options().target_keywords(),
            )
            for key in DIAGNOSTICS:
                value = diagnostics[key].nan_to_num().sum() / count
                metrics[f"pmi/diag/{key}"] = Metric(AggregationType.MEAN, value.item())
        return metrics


_ENGINE_CLASSES: Dict[type, type] = {}


def pmi_engine_class(base: type) -> type:
    """`base` (verl's FSDPEngineWithLMHead, or a subclass) with PMIEngineMixin's forward_step."""
    if base not in _ENGINE_CLASSES:
        _ENGINE_CLASSES[base] = type(f"PMI{base.__name__}", (PMIEngineMixin, base), {})
    return _ENGINE_CLASSES[base]

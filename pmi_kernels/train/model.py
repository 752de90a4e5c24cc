"""The model a run trains: loaded (a Hugging Face causal LM, local or a hub id, or the toy one), its contexts'
lengths checked, wrapped for LoRA or full fine-tuning, and the toy's supervised warm-up."""

from __future__ import annotations

import copy
import os
import random
from typing import Dict, List, Optional

import torch

from .checkpoint import error_line
from .config import TOY, TrainConfig
from .contexts import KINDS
from .data.packing import VARLEN, check_model_attention, register_varlen, resolve_attn_implementation
from .data.tokenized import length_error
from .demo.tasks import warmup_target
from .demo.toy import toy_model, toy_tokenizer
from .interrupts import StopRequest, fault_point
from .run_dir import TOY_BASE


def load_model(config: TrainConfig, device):
    """(tokenizer, model): a Hugging Face causal LM (a local directory or a hub id); or the toy one,
    built (to be warmed up) or, on --resume, the warmed-up base the run saved. Its attention is
    config.attn_implementation (packing.py), checked against the model's config before the weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_config = None if config.model_path == TOY else AutoConfig.from_pretrained(config.model_path)
    attn = resolve_attn_implementation(config.attn_implementation, device, model_config)
    if model_config is not None:
        check_model_attention(model_config, attn, config.packed)
    if attn == VARLEN:
        register_varlen()
    if config.model_path == TOY:
        if config.resume:
            path = os.path.join(config.output_dir, TOY_BASE)
            try:
                base = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
            except Exception as err:  # noqa: BLE001 (a damaged file raises many kinds; name the directory)
                raise ValueError(
                    f"--resume: {path}, the toy run's warmed-up base, cannot be loaded "
                    f"({error_line(err)}); the run cannot continue without it"
                ) from err
            return toy_tokenizer(), base.to(device)
        tokenizer = toy_tokenizer()
        model = toy_model(tokenizer, config.seed)
        model.set_attn_implementation(attn)
        return tokenizer, model.to(device)
    dtype = torch.bfloat16 if device.type == "cuda" and config.bf16 else torch.float32
    # A hub id loads through the Hugging Face cache (downloaded unless HF_HUB_OFFLINE=1), as from_pretrained does.
    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=dtype, attn_implementation=attn)
    return tokenizer, model.to(device)


def position_limit(model) -> Optional[int]:
    """The most positions the model reads (None: no limit stated)."""
    return getattr(model.config, "max_position_embeddings", None)


def check_lengths(model, contexts: Dict[str, List[List[int]]], max_new_tokens: int) -> None:
    """Every context has a token (its last predicts the rollout's first) and, with a full
    rollout, fits the model's positions (else generation fails, or asks the allocator for a
    tensor as long as the text). `contexts` is keyed by the templates.<kind> that made them."""
    limit = position_limit(model)
    for what, prompts in contexts.items():
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(
                    f"{what}: row {i} renders to no tokens (a context's last token predicts the rollout's first)"
                )
            if limit is not None and len(prompt) + max_new_tokens > limit:
                raise length_error(what, i, len(prompt), max_new_tokens, limit)


def check_lora_targets(model, config: TrainConfig) -> None:
    """With LoRA, each of lora_targets names linear or embedding layers of the model (as peft
    matches a name: the end of a module's dotted name), and none is the output head: the loss
    reads the head's weight itself (fused_pmi_kl), so an adapter there would never train."""
    if not config.lora:
        return
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    for target in config.lora_targets:
        matched = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not matched:
            layers = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, m in modules.items()
                    if isinstance(m, torch.nn.Linear) and m is not head
                }
            )
            raise ValueError(
                f"lora_targets: {target!r} names no module of the model (its linear layers: {', '.join(layers)})"
            )
        other = next((m for m in matched if not isinstance(m, (torch.nn.Linear, torch.nn.Embedding))), None)
        if other is not None:
            raise ValueError(
                f"lora_targets: {target!r} names a {type(other).__name__}, not a linear or embedding layer"
            )
        if any(m is head for m in matched):
            raise ValueError(
                f"lora_targets: {target!r} is the output head, whose weight the loss reads itself "
                "(an adapter there would never train); leave it out"
            )


def lora_config(rank: int, alpha: int, targets, **extra):
    """The run's LoRA adapter, as the trainer wraps its model and export.py rebuilds it."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, **extra)


def wrap_model(model, config: TrainConfig):
    """(trained model, frozen base or None). LoRA: the base is the same model, adapter off;
    full fine-tuning: a frozen copy, made when a frozen stream or the anchor reads the base."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora:
        from peft import get_peft_model

        return get_peft_model(model, lora_config(config.lora_rank, config.lora_alpha, config.lora_targets)), None
    needs_base = config.teacher_weights == "base" or config.anchor
    return model, copy.deepcopy(model).eval().requires_grad_(False) if needs_base else None


def supervised_warmup(model, config: TrainConfig, tokenizer, train_rows, prompts, device, stop: StopRequest) -> None:
    """Teacher-forced cross-entropy from each context to the reference solution (the toy's
    first lesson): a tiny model has to be taught to read a reference in its context before
    it can act as its own teacher, as a real LLM already can. A stop signal ends it (raises)."""
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft_lr)
    rng = random.Random(config.seed)
    model.train()
    for _ in tqdm(range(config.sft_steps), desc="warm-up", mininterval=2):
        fault_point("warmup-step")
        stop.check("the supervised warm-up")
        rows = rng.sample(range(len(train_rows)), min(config.sft_batch_size, len(train_rows)))
        seqs, labels = [], []
        for i in rows:
            kind = rng.choice(KINDS)
            prompt = prompts[kind][i]
            target = warmup_target(train_rows[i], kind, rng)
            answer = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            seqs.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs], device=device)
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels], device=device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        loss = model(input_ids=ids, attention_mask=attention, labels=lab).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

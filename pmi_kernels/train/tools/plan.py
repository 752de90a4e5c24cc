"""`pmi-opsd train --dry-run`: a step's plan from the model's architecture alone (its
config.json, or the config's architecture key): tokens per step, and the memory of weights,
optimizer state, activations and the loss per GPU, before any weight is downloaded or loaded.

The numbers are estimates for the trainer's GPU setting (bf16 weights, bf16 autocast, one data-
parallel replica per GPU: the step's rollouts split over --world-size GPUs, the weights on each;
with fsdp, weights, gradients and optimizer state split over them too).
Parameter counts are exact for Llama-, Qwen2/3- and OLMo2/3-style decoders. Activations are the
bytes autograd keeps for the student's forward, per token and layer, measured on those layers
under bf16 autocast (24H + 8I + 13 q + 12 kv + 64 bytes, + 20r with LoRA; H hidden, I intermediate,
q and kv the attention projections' widths); with gradient checkpointing each layer keeps its
input (2H bytes) and one layer's activations are rebuilt at a time. The backward's transients
and the allocator's slack come on top.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Tuple

from ..config import TOY, TrainConfig
from ..config_checks import ARCHITECTURE
from ..distributed import World, check_world
from ..hub import cached_config_json

GIB = 2**30
DEFAULT_PROMPT_TOKENS = 512
LORA_SHAPES = {  # module -> (fan in, fan out) in terms of the architecture
    "q_proj": ("H", "Q"),
    "k_proj": ("H", "KV"),
    "v_proj": ("H", "KV"),
    "o_proj": ("Q", "H"),
    "gate_proj": ("H", "I"),
    "up_proj": ("H", "I"),
    "down_proj": ("I", "H"),
}


def architecture(config: TrainConfig) -> Tuple[Dict, str]:
    """(the architecture numbers, where they came from): model_path's config.json, the toy
    model's, or the config's architecture key."""
    path = cached_config_json(config.model_path) or os.path.join(config.model_path, "config.json")  # a hub id's
    if config.model_path == TOY:
        from ..demo.toy import toy_model, toy_tokenizer

        return toy_model(toy_tokenizer()).config.to_dict(), "the toy model (train/toy.py)"
    if os.path.isfile(path):
        with open(path) as fh:
            values = json.load(fh)
        values = values.get("text_config", values)
        given = config.architecture
        differ = sorted(k for k in given if k in values and values[k] != given[k])
        note = f"; the architecture key differs in {differ}, config.json wins" if differ else ""
        return values, f"{path}{note}"
    if config.architecture:
        return dict(config.architecture), "the config's architecture key"
    raise ValueError(
        f"--dry-run: model_path {config.model_path!r} has no config.json and the config has no "
        f"architecture key (config.json's {sorted(ARCHITECTURE)})"
    )


def check_shape(arch: Dict, source: str, sequence: int) -> None:
    """What the model itself would refuse, from its numbers alone: attention heads that do not
    split the hidden size (with no head_dim given) or key/value heads that do not group the query
    heads; and a context plus rollout past its positions (the run's check_lengths)."""
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    if not arch.get("head_dim") and arch["hidden_size"] % heads:
        raise ValueError(
            f"--dry-run: {source}: num_attention_heads {heads} does not divide hidden_size "
            f"{arch['hidden_size']} (and no head_dim is given)"
        )
    if kv > heads or heads % kv:
        raise ValueError(f"--dry-run: {source}: num_key_value_heads {kv} does not group num_attention_heads {heads}")
    limit = arch.get("max_position_embeddings")
    if limit and sequence > limit:
        raise ValueError(
            f"--dry-run: the prompt (--prompt-tokens) plus max_new_tokens ({sequence:,} tokens) exceeds "
            f"the model's {limit:,} positions ({source}); the run would refuse it"
        )


def shape(arch: Dict) -> Dict[str, int]:
    heads = arch["num_attention_heads"]
    head_dim = arch.get("head_dim") or arch["hidden_size"] // heads
    return {
        "H": arch["hidden_size"],
        "I": arch["intermediate_size"],
        "L": arch["num_hidden_layers"],
        "V": arch["vocab_size"],
        "Q": heads * head_dim,
        "KV": (arch.get("num_key_value_heads") or heads) * head_dim,
        "D": head_dim,
    }


def parameter_count(arch: Dict) -> int:
    """Every parameter of the causal LM: embeddings, the lm_head unless tied, and per layer the
    projections (biases: Qwen2's q/k/v, or all four with attention_bias), the MLP, the norms and
    any q/k norms."""
    s = shape(arch)
    H, inter, Q, KV = s["H"], s["I"], s["Q"], s["KV"]
    kind = arch.get("model_type", "")
    biases = Q + 2 * KV if kind == "qwen2" else Q + 2 * KV + H if arch.get("attention_bias") else 0
    attention = 2 * H * Q + 2 * H * KV + biases
    qk_norm = 2 * s["D"] if kind.startswith("qwen3") else Q + KV if kind.startswith("olmo") else 0
    layer = attention + 3 * H * inter + 2 * H + qk_norm
    return s["L"] * layer + root_parameter_count(arch)


def root_parameter_count(arch: Dict) -> int:
    """What is not in a decoder layer: the embeddings, the lm_head unless tied, the final norm
    (FSDP2's root unit in the trainer)."""
    s = shape(arch)
    return s["V"] * s["H"] * (1 if arch.get("tie_word_embeddings", False) else 2) + s["H"]


def lora_count(arch: Dict, rank: int, targets: List[str]) -> int:
    """Adapter parameters of LoRA on the decoder's projections and the input embeddings; another
    target is refused, as the run refuses a name that is not a layer of the model."""
    s = shape(arch)
    known = [*LORA_SHAPES, "embed_tokens"]
    unknown = sorted(set(targets) - set(known))
    if unknown:
        raise ValueError(
            f"lora_targets: the plan counts adapters on {', '.join(known)}, not {', '.join(map(repr, unknown))}"
        )
    per_layer = sum(rank * (s[LORA_SHAPES[t][0]] + s[LORA_SHAPES[t][1]]) for t in set(targets) if t in LORA_SHAPES)
    return s["L"] * per_layer + (rank * (s["V"] + s["H"]) if "embed_tokens" in targets else 0)


def activation_bytes(s: Dict[str, int], lora_rank: int) -> int:
    """Bytes autograd keeps per token and layer of a bf16-autocast forward (module docstring)."""
    return 24 * s["H"] + 8 * s["I"] + 13 * s["Q"] + 12 * s["KV"] + 64 + 20 * lora_rank


def plan(config: TrainConfig, world_size: int, prompt_tokens: Optional[int] = None) -> Dict:
    """The plan's numbers (bytes and tokens); a ValueError for what torchrun at world_size would
    refuse (distributed.check_world). prompt_tokens: the longest context's prompt assumed (None:
    512, or what fits the model's positions beside max_new_tokens)."""
    check_world(config, World(size=world_size))
    arch, source = architecture(config)
    if prompt_tokens is None:
        room = (arch.get("max_position_embeddings") or 2**62) - config.max_new_tokens
        prompt_tokens = max(1, min(DEFAULT_PROMPT_TOKENS, room))
    check_shape(arch, source, prompt_tokens + config.max_new_tokens)
    s = shape(arch)
    H, L = s["H"], s["L"]
    b = 2 if config.bf16 else 4  # the weights' and activations' bytes per value
    params = parameter_count(arch)
    trainable = lora_count(arch, config.lora_rank, config.lora_targets) if config.lora else params
    state_bytes = 4 if config.lora else b  # peft keeps adapters in fp32; full fine-tuning trains the bf16 weights
    frozen_copy = not config.lora and (config.teacher_weights == "base" or config.anchor)
    copies = 2 if frozen_copy else 1
    shards = world_size if config.fsdp else 1  # FSDP2: weights, gradients and optimizer state split over the ranks
    root = root_parameter_count(arch)
    # FSDP2 gathers the root unit (which stays gathered between forward and backward) of each copy
    # and up to two layers at a time (the one running and the one prefetched).
    gathered = (copies * root + 2 * (params - root) // s["L"]) * b if config.fsdp else 0
    pmi_streams = config.mode == "pmi" or config.diagnostics_every == 1  # refonly and the anchor are read
    contexts = 2 + pmi_streams * (1 + config.anchor)
    rollouts = config.batch_size * config.grad_accum
    per_rank = math.ceil(config.batch_size / world_size)  # rollouts of a micro-batch on one GPU
    sequence = prompt_tokens + config.max_new_tokens - 1
    budget = config.max_tokens_per_micro_batch if config.packed else sequence
    pack_rollouts = max(1, min(per_rank, (budget or per_rank * sequence) // sequence))
    pack = pack_rollouts * sequence
    per_token_layer = activation_bytes(s, config.lora_rank if config.lora else 0) * b // 2
    activations = {"on": L * pack * 2 * H * b // 2 + pack * per_token_layer, "off": L * pack * per_token_layer}
    rollout_tokens = pack_rollouts * config.max_new_tokens
    loss = 2**30 + (contexts + 1) * rollout_tokens * H * b  # workspace, the streams' states, grad of the student's
    kv_cache = per_rank * (prompt_tokens + config.max_new_tokens) * L * 2 * s["KV"] * b
    return {
        "source": source,
        "arch": s,
        "params": params,
        "trainable": trainable,
        "world_size": world_size,
        "rollouts": rollouts,
        "rollout_tokens": rollouts * config.max_new_tokens,
        "contexts": contexts,
        "context_tokens": rollouts * contexts * sequence,
        "per_rank": per_rank,
        "pack_rollouts": pack_rollouts,
        "pack_tokens": pack,
        "prompt_tokens": prompt_tokens,
        "weights": params * b * copies // shards + gathered + (trainable * 4 if config.lora else 0),
        "frozen_copy": frozen_copy,
        "gradients": trainable * state_bytes // shards,
        "optimizer": 2 * trainable * state_bytes // shards,
        "fsdp": config.fsdp,
        "activations": activations,
        "loss": loss,
        "kv_cache": kv_cache,
        "checkpointing": "on" if config.gradient_checkpointing else "off",
    }


def format_plan(p: Dict, config: TrainConfig) -> str:
    s = p["arch"]

    def gib(x: float) -> str:
        return f"{x / GIB:8.1f} GiB"

    training = {k: p["gradients"] + p["activations"][k] + p["loss"] for k in ("on", "off")}
    persistent = p["weights"] + p["optimizer"]
    peak = {k: persistent + max(p["kv_cache"], training[k]) for k in ("on", "off")}
    tuning = (
        f"LoRA r{config.lora_rank}"
        if config.lora
        else "full fine-tuning" + (" (+ a frozen copy)" if p["frozen_copy"] else "")
    )

    def mark(on: str) -> str:
        return "  <- this config" if p["checkpointing"] == on else ""

    lines = [
        f"model: {p['source']}",
        f"  {p['params'] / 1e9:.2f} B parameters: {s['L']} layers, hidden {s['H']:,}, intermediate {s['I']:,}, "
        f"vocab {s['V']:,}; {'bf16' if config.bf16 else 'fp32'}",
        f"  {tuning}: {p['trainable'] / 1e6:,.1f} M trainable",
        f"step: {p['rollouts']} rollouts x {config.max_new_tokens:,} tokens = {p['rollout_tokens']:,} rollout tokens "
        "at most",
        f"  {p['contexts']} contexts per rollout (prompts of {p['prompt_tokens']:,} tokens assumed, --prompt-tokens): "
        f"{p['context_tokens']:,} context tokens",
        f"per GPU at world size {p['world_size']} "
        + (
            "(FSDP2: weights, gradients and optimizer state sharded; weights include the gathered root unit and two "
            "layers):"
            if p["fsdp"]
            else "(data parallel, the whole model on each GPU):"
        ),
        f"  {p['per_rank']} rollouts a micro-batch, packed {p['pack_rollouts']} to a forward: {p['pack_tokens']:,} "
        f"tokens (max_tokens_per_micro_batch {config.max_tokens_per_micro_batch})",
        "memory per GPU, estimated:",
        f"  weights                          {gib(p['weights'])}",
        f"  optimizer state (AdamW)          {gib(p['optimizer'])}",
        f"  gradients                        {gib(p['gradients'])}",
        f"  activations, checkpointing on    {gib(p['activations']['on'])}",
        f"  activations, checkpointing off   {gib(p['activations']['off'])}",
        f"  loss (1 GiB workspace + states)  {gib(p['loss'])}",
        f"  sampling KV cache                {gib(p['kv_cache'])}",
        f"  peak, checkpointing on           {gib(peak['on'])}{mark('on')}",
        f"  peak, checkpointing off          {gib(peak['off'])}{mark('off')}",
        "  (peak: weights + optimizer state + the larger of the sampling KV cache and training's",
        "  gradients + activations + loss; the backward's transients come on top)",
    ]
    return "\n".join(lines)

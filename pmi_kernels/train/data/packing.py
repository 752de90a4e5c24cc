"""Packed forwards: the rollouts of a micro-batch through the model in one forward per context.

A pack lays several sequences (prompt + rollout[:-1], as contexts.py reads one) end to end in
a single row, without padding; position_ids restart at 0 for each, and attention stays inside
each sequence. Every linear layer, norm and adapter runs once over the whole pack; attention:

- "varlen" (registered here as an attention implementation for transformers) is given the
  sequences' boundaries (cu_seq_lens): on CUDA in bf16 or fp16 PyTorch's own
  torch.nn.attention.varlen.varlen_attn runs them in one kernel; elsewhere (a CPU, or fp32
  weights, which a flash kernel would round to bf16) each sequence goes through sdpa on its own
  (its own causal attention, nothing of size [N, N]).
- "flash_attention_2" (the flash-attn package, CUDA) is given the same boundaries.
- "sdpa" and "eager" are given an explicit block-diagonal causal mask [1, 1, N, N] (a sliding-
  window layer's keeps its window): O(N^2) in time and memory, kept for models or setups where
  nothing else runs. transformers derives such a mask from restarting position_ids only when
  no cache is passed; nothing here relies on that.

The final hidden states are gathered at the positions that predict each rollout token: rows in
the order of the pack's rollouts, the same in every context.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

VARLEN = "varlen"
IMPLEMENTATIONS = ("auto", "flash_attention_2", VARLEN, "sdpa", "eager")
SEQUENCE_AWARE = ("flash_attention_2", VARLEN)  # given cu_seq_lens, no mask
# Set while a packed forward runs: "varlen" attention then needs the boundaries.
_PACKED_FORWARD = contextvars.ContextVar("packed_forward", default=False)


@dataclass
class Pack:
    ids: torch.Tensor  # [1, N]: the sequences end to end
    positions: torch.Tensor  # [1, N]: restarting at 0 for each sequence
    lengths: List[int]  # each sequence's length
    gather: torch.Tensor  # [sum of rollout lengths]: the positions predicting each rollout token


def pack_sequences(prompts: Sequence[List[int]], rollouts: Sequence[List[int]], device) -> Pack:
    """Each prompt + rollout[:-1] end to end; every rollout non-empty."""
    ids, positions, lengths, gather = [], [], [], []
    for prompt, rollout in zip(prompts, rollouts):
        if not rollout:
            raise ValueError("pack_sequences: an empty rollout has no tokens to read")
        seq = prompt + rollout[:-1]
        start = len(ids)
        gather.extend(range(start + len(prompt) - 1, start + len(prompt) - 1 + len(rollout)))
        ids.extend(seq)
        positions.extend(range(len(seq)))
        lengths.append(len(seq))

    def as_tensor(x: List[int]) -> torch.Tensor:
        return torch.tensor(x, device=device, dtype=torch.long)

    return Pack(as_tensor(ids)[None], as_tensor(positions)[None], lengths, as_tensor(gather))


def block_causal_mask(lengths: List[int], device, window=None) -> torch.Tensor:
    """[N, N] bool, True where query i may attend to key j: same sequence, j <= i (and i - j <
    window for a sliding-window layer)."""
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    index = torch.arange(seq.numel(), device=device)
    allowed = (seq[:, None] == seq[None, :]) & (index[None, :] <= index[:, None])
    if window is not None:
        allowed &= index[:, None] - index[None, :] < window
    return allowed


def _as_mask(allowed: torch.Tensor, implementation: str, dtype) -> torch.Tensor:
    """The [1, 1, N, N] mask in the form the implementation takes: bool for sdpa, additive for eager."""
    if implementation == "sdpa":
        return allowed[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )[None, None]


def packed_hidden(decoder, prompts: Sequence[List[int]], rollouts: Sequence[List[int]], device) -> torch.Tensor:
    """[sum T, H]: the decoder's final hidden states that predict each rollout token, every
    sequence in one forward."""
    pack = pack_sequences(prompts, rollouts, device)
    config = decoder.config
    implementation = config._attn_implementation
    kwargs = {}
    if implementation in SEQUENCE_AWARE:
        cu = torch.tensor([0, *torch.tensor(pack.lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
        longest = max(pack.lengths)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if implementation == VARLEN:  # a 4-D mask is passed on as it is: no [N, N] mask is built
            kwargs["attention_mask"] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
            kwargs["pack_window"] = every_layer_window(decoder)  # for layers that do not pass their window on
    else:
        kwargs["attention_mask"] = block_masks(
            config, pack.lengths, implementation, device, every_layer_window(decoder)
        )
    token = _PACKED_FORWARD.set(True)
    try:
        hidden = decoder(input_ids=pack.ids, position_ids=pack.positions, use_cache=False, **kwargs).last_hidden_state
    finally:
        _PACKED_FORWARD.reset(token)
    return hidden[0, pack.gather]


def block_masks(config, lengths: List[int], implementation: str, device, window_all: Optional[int] = None):
    """The pack's masks for "sdpa" or "eager": block-diagonal causal, and where layers attend
    within a sliding window, the window's too (per layer type, or every layer's: window_all)."""
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32
    if window_all:
        return _as_mask(block_causal_mask(lengths, device, window_all), implementation, dtype)
    full = _as_mask(block_causal_mask(lengths, device), implementation, dtype)
    if "sliding_attention" not in (getattr(config, "layer_types", None) or []):
        return full
    window = _as_mask(block_causal_mask(lengths, device, config.sliding_window), implementation, dtype)
    return {"full_attention": full, "sliding_attention": window}


def every_layer_window(decoder) -> Optional[int]:
    """The window every layer attends within, for a model without layer types whose forward
    builds a sliding-window mask from config.sliding_window (Mistral, Phi-3, Starcoder2,
    PhiMoE); None for others (Llama ignores a sliding_window key its config may carry)."""
    config = decoder.config
    window = getattr(config, "sliding_window", None)
    if getattr(config, "layer_types", None) is not None or not window:
        return None
    return window if _builds_window_mask(type(decoder)) else None


@functools.lru_cache(maxsize=None)
def _builds_window_mask(decoder_class) -> bool:
    try:
        return "create_sliding_window_causal_mask" in inspect.getsource(decoder_class.forward)
    except (OSError, TypeError):
        return False


def rollout_groups(
    micro_batch: Sequence, prompts: Dict[str, List[List[int]]], packed: bool, budget, alone_above: Optional[int] = None
) -> List[List]:
    """A micro-batch's (example index, rollout) pairs, empty rollouts dropped, in the groups read
    together: in order, packs of at most `budget` tokens in every context (None: one pack; a
    rollout whose context alone is longer goes alone), or one rollout each when not packed. A
    sequence longer than `alone_above` in any context goes alone too (rope_switch_length)."""
    pairs = [(i, rollout) for i, rollout in micro_batch if rollout]
    if not packed:
        return [[pair] for pair in pairs]
    groups, size, open_pack = [], 0, False
    for i, rollout in pairs:
        length = max(len(contexts[i]) for contexts in prompts.values()) + len(rollout) - 1
        alone = alone_above is not None and length > alone_above
        if alone or not open_pack or (budget is not None and size + length > budget):
            groups.append([])
            size = 0
        groups[-1].append((i, rollout))
        size += length
        open_pack = not alone
    return groups


def rope_switch_length(config) -> Optional[int]:
    """The sequence length past which the model's rotary frequencies change for every position
    (longrope, Phi-3: from the longest position in the forward), or None. A pack must not mix
    sequences on both sides of it: the short ones would get the long ones' frequencies."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kinds = rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]
    for kind in kinds:
        if isinstance(kind, dict) and kind.get("rope_type", kind.get("type")) == "longrope":
            return kind.get("original_max_position_embeddings") or config.original_max_position_embeddings
    return None


def check_isolation(decoder, sequences: Sequence[List[int]], vocab_size: int, device) -> None:
    """Packs two sequences, then changes every token of one: the other's hidden states must not
    move. Fails (ValueError) where the model's attention lets a pack's sequences see each other:
    decoder layers that do not hand the boundaries on, a mask the model does not honour."""
    first, second = ([seq[i % len(seq)] for i in range(8)] for seq in sequences)

    def changed(seq: List[int]) -> List[int]:
        return [(token + 1) % vocab_size for token in seq]

    def states(a, b):
        hidden = packed_hidden(decoder, [a[:1], b[:1]], [a[1:] + [0], b[1:] + [0]], device)
        return hidden[: len(a)], hidden[len(a) :]

    with torch.no_grad():
        a, b = states(first, second)
        b_after = states(changed(first), second)[1]
        a_before = states(first, changed(second))[0]
    # A pack's sequences that see each other move by tens of percent; 5% leaves room for bf16
    # kernels whose sums are not deterministic (atomic adds), which move by an ulp or two.
    for what, x, y in (("later", b, b_after), ("earlier", a, a_before)):
        if (x - y).abs().max() > 0.05 * x.abs().max():
            raise ValueError(
                f"packed true: with attn_implementation {decoder.config._attn_implementation!r} this "
                f"model's {what} sequence of a pack sees the other (its hidden states moved when the "
                "other changed); set packed false (or, where attention is what mixes them, another "
                "attn_implementation)"
            )


# ---- attention implementations ------------------------------------------------------------
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def needs_eager(model_config) -> Optional[str]:
    """Why only "eager" attention runs the model exactly (None: any runs it): soft-capped
    attention logits (Gemma 2; flash-attn has them too) or attention sinks (GPT-OSS)."""
    if getattr(model_config, "model_type", None) == "gpt_oss":
        return "its attention has sinks"
    if getattr(model_config, "attn_logit_softcapping", None) is not None:
        return "its attention logits are soft-capped (attn_logit_softcapping)"
    return None


def uses_alibi(model_config) -> bool:
    """Positions as ALiBi biases (Bloom, Falcon's alibi, MPT), built from a padding mask."""
    attn = getattr(model_config, "attn_config", None)
    return (
        getattr(model_config, "model_type", None) == "bloom"
        or bool(getattr(model_config, "alibi", False))
        or bool(attn.get("alibi") if isinstance(attn, dict) else getattr(attn, "alibi", False))
    )


def attention_dropout(model_config) -> float:
    """The attention probabilities' dropout the model's config sets (0 for none)."""
    keys = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")
    values = [getattr(model_config, key, 0) for key in keys]
    return max([v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)] or [0])


def takes_registered_attention(model_config) -> bool:
    """Whether the model's causal-LM class calls attention through transformers' registry (where
    "varlen" is registered); older ones (Falcon, GPT-Neo, MPT, StableLM) do not."""
    return _causal_lm_flag(model_config, "_supports_attention_backend")


def _causal_lm_flag(model_config, flag: str) -> bool:
    """A support flag of the model's causal-LM class (False for a config with none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return bool(getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)], flag, False))
    except KeyError:
        return False


def check_model_attention(model_config, implementation: str, packed: bool) -> None:
    """Refuse, before the weights load, an attention the model does not run exactly with."""
    why = needs_eager(model_config)
    if why and implementation != "eager" and not (implementation == "flash_attention_2" and "soft" in why):
        raise ValueError(
            f"config: attn_implementation {implementation!r} cannot run this model exactly: {why}; use "
            "'eager' (or 'auto', which picks it)"
        )
    if implementation == VARLEN and not takes_registered_attention(model_config):
        raise ValueError(
            f"config: attn_implementation {VARLEN!r} cannot run this model: its attention does not go "
            "through transformers' registry; use 'sdpa' or 'eager' (or 'auto', which picks one)"
        )
    if implementation == VARLEN and attention_dropout(model_config) > 0:
        raise ValueError(
            f"config: attn_implementation {VARLEN!r} has no attention dropout, which this model's config "
            "sets; use 'sdpa' or 'eager' (or 'auto', which picks sdpa)"
        )
    if packed and uses_alibi(model_config):
        raise ValueError(
            "config: packed true cannot run this model: its positions are ALiBi biases, built from a "
            "padding mask, which a pack cannot restart per sequence; set packed false"
        )


def resolve_attn_implementation(name: str, device, model_config=None) -> str:
    """The implementation a run uses; "auto": "eager" for a model only it runs exactly
    (needs_eager), else flash-attn's varlen kernels on CUDA when installed, else "varlen"
    (torch's varlen_attn on CUDA, per-sequence sdpa elsewhere)."""
    cuda = torch.device(device).type == "cuda"
    if name == "auto" and model_config is not None and needs_eager(model_config):
        return "eager"
    if (
        name == "auto"
        and model_config is not None
        and (not takes_registered_attention(model_config) or attention_dropout(model_config) > 0)
    ):
        return "sdpa" if _causal_lm_flag(model_config, "_supports_sdpa") else "eager"
    if name == "auto":
        name = "flash_attention_2" if cuda and flash_attn_installed() else VARLEN
    if name == "flash_attention_2" and not (cuda and flash_attn_installed()):
        raise ValueError(
            "config: attn_implementation 'flash_attention_2' needs a CUDA device and the flash-attn package; use 'auto'"
        )
    if name == VARLEN and cuda and not torch_varlen_available():
        raise ValueError(
            f"config: attn_implementation {VARLEN!r} on CUDA needs a torch with "
            f"torch.nn.attention.varlen (this is {torch.__version__}); use 'sdpa'"
        )
    return name


def segment_attention(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's contract for causal self-attention, one sdpa call per sequence: q [N, Hq, D],
    k and v [N, Hkv, D], sequence i spanning cu_seq_q[i]:cu_seq_q[i + 1]; window_size (left, 0)."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        mask = None if window_size[0] < 0 else block_causal_mask([end - start], q.device, window_size[0] + 1)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=enable_gqa
        ).transpose(0, 1)
    return out


def varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None, **kwargs
):
    """transformers' attention interface over sequence boundaries: query [1, Hq, N, D], key and
    value [1, Hkv, N, D], the boundaries in cu_seq_lens_q/k; returns ([1, N, Hq, D], None).
    Without boundaries (generation, a plain forward) it is transformers' sdpa with its mask; in
    a packed forward attention_mask is packed_hidden's placeholder, unused."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise ValueError(
            f"{VARLEN} attention has no attention sinks (this model's attention adds them); use "
            "attn_implementation 'eager'"
        )
    if kwargs.get("cu_seq_lens_q") is None:
        if _PACKED_FORWARD.get():
            raise ValueError(
                f"{type(module).__name__} was not handed the pack's sequence boundaries (the model's "
                "decoder layers do not pass them on to attention), so the pack's sequences would "
                f"attend to each other: use attn_implementation 'sdpa' or 'eager', or packed false"
            )
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            softcap=softcap,
            **kwargs,
        )
    if softcap is not None or (module.training and dropout > 0):
        raise ValueError(f"{VARLEN} attention has no softcap or dropout; use attn_implementation 'eager'")
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN} attention takes one packed row, got a batch of {query.shape[0]}")
    dtype = query.dtype
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, heads, D]
    # The layer's window, where its attention does not hand it on (Qwen2-MoE keeps it on the
    # module; PhiMoE windows every layer from its config: packed_hidden's pack_window).
    sliding_window = sliding_window or getattr(module, "sliding_window", None) or kwargs.get("pack_window")
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    lengths = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"]
    if not (query.is_cuda and dtype in (torch.float16, torch.bfloat16)):  # flash runs half precision only
        out = segment_attention(
            q, k, v, *lengths, scale=scaling, window_size=window, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out[None], None
    return flash_varlen(q, k, v, lengths, scaling, window)[None], None


def flash_varlen(q, k, v, lengths, scale, window):
    """torch's varlen_attn across the versions users have: torch 2.11's takes is_causal and no
    scale, window or enable_gqa (the newer keywords are used where the signature has them)."""
    from torch.nn.attention.varlen import varlen_attn

    takes = _parameters(varlen_attn)
    options = {}
    if "window_size" in takes:
        options["window_size"] = window
    elif window == (-1, 0):
        options["is_causal"] = True
    else:
        raise ValueError(
            f"{VARLEN} attention with a sliding window needs torch's varlen_attn with window_size "
            f"(torch {torch.__version__} has none); use attn_implementation 'sdpa'"
        )
    if "enable_gqa" in takes:
        options["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    default_scale = q.shape[-1] ** -0.5
    if "scale" in takes:
        options["scale"] = scale
    elif scale is not None and scale != default_scale:
        q = q * (scale / default_scale)
    return varlen_attn(q, k, v, *lengths, **options)


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> frozenset:
    """fn's parameter names, read once per function (flash_varlen runs in every layer's attention)."""
    return frozenset(inspect.signature(fn).parameters)


def register_varlen() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)  # the masks of forwards that are not packed

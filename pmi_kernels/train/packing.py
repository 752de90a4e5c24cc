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

import functools
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

VARLEN = "varlen"
IMPLEMENTATIONS = ("auto", "flash_attention_2", VARLEN, "sdpa", "eager")
SEQUENCE_AWARE = ("flash_attention_2", VARLEN)  # given cu_seq_lens, no mask


@dataclass
class Pack:
    ids: torch.Tensor        # [1, N]: the sequences end to end
    positions: torch.Tensor  # [1, N]: restarting at 0 for each sequence
    lengths: List[int]       # each sequence's length
    gather: torch.Tensor     # [sum of rollout lengths]: the positions predicting each rollout token


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
    as_tensor = lambda x: torch.tensor(x, device=device, dtype=torch.long)  # noqa: E731
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
        ~allowed, torch.finfo(dtype).min)[None, None]


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
    else:
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32
        full = _as_mask(block_causal_mask(pack.lengths, device), implementation, dtype)
        kwargs["attention_mask"] = full
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            window = _as_mask(block_causal_mask(pack.lengths, device, config.sliding_window), implementation, dtype)
            kwargs["attention_mask"] = {"full_attention": full, "sliding_attention": window}
    hidden = decoder(input_ids=pack.ids, position_ids=pack.positions, use_cache=False, **kwargs).last_hidden_state
    return hidden[0, pack.gather]


def rollout_groups(micro_batch: Sequence, prompts: Dict[str, List[List[int]]], packed: bool, budget) -> List[List]:
    """A micro-batch's (example index, rollout) pairs, empty rollouts dropped, in the groups read
    together: in order, packs of at most `budget` tokens in every context (None: one pack; a
    rollout whose context alone is longer goes alone), or one rollout each when not packed."""
    pairs = [(i, rollout) for i, rollout in micro_batch if rollout]
    if not packed:
        return [[pair] for pair in pairs]
    groups, size = [], 0
    for i, rollout in pairs:
        length = max(len(contexts[i]) for contexts in prompts.values()) + len(rollout) - 1
        if not groups or (budget is not None and size + length > budget):
            groups.append([])
            size = 0
        groups[-1].append((i, rollout))
        size += length
    return groups


# ---- attention implementations ------------------------------------------------------------
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_attn_implementation(name: str, device) -> str:
    """The implementation a run uses; "auto": flash-attn's varlen kernels on CUDA when installed,
    else "varlen" (torch's varlen_attn on CUDA, per-sequence sdpa elsewhere)."""
    cuda = torch.device(device).type == "cuda"
    if name == "auto":
        name = "flash_attention_2" if cuda and flash_attn_installed() else VARLEN
    if name == "flash_attention_2" and not (cuda and flash_attn_installed()):
        raise ValueError("config: attn_implementation 'flash_attention_2' needs a CUDA device and the flash-attn "
                         "package; use 'auto'")
    if name == VARLEN and cuda and not torch_varlen_available():
        raise ValueError(f"config: attn_implementation {VARLEN!r} on CUDA needs a torch with "
                         f"torch.nn.attention.varlen (this is {torch.__version__}); use 'sdpa'")
    return name


def segment_attention(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                      enable_gqa=False):
    """varlen_attn's contract for causal self-attention, one sdpa call per sequence: q [N, Hq, D],
    k and v [N, Hkv, D], sequence i spanning cu_seq_q[i]:cu_seq_q[i + 1]; window_size (left, 0)."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        mask = None if window_size[0] < 0 else block_causal_mask([end - start], q.device, window_size[0] + 1)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
    return out


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     softcap=None, **kwargs):
    """transformers' attention interface over sequence boundaries: query [1, Hq, N, D], key and
    value [1, Hkv, N, D], the boundaries in cu_seq_lens_q/k; returns ([1, N, Hq, D], None).
    Without boundaries (generation, a plain forward) it is transformers' sdpa with its mask; in
    a packed forward attention_mask is packed_hidden's placeholder, unused."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if kwargs.get("cu_seq_lens_q") is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    if softcap is not None or (module.training and dropout > 0):
        raise ValueError(f"{VARLEN} attention has no softcap or dropout; use attn_implementation 'sdpa'")
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN} attention takes one packed row, got a batch of {query.shape[0]}")
    dtype = query.dtype
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, heads, D]
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    lengths = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"]
    if not (query.is_cuda and dtype in (torch.float16, torch.bfloat16)):  # flash runs half precision only
        out = segment_attention(q, k, v, *lengths, scale=scaling, window_size=window, enable_gqa=q.shape[1] != k.shape[1])
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
        raise ValueError(f"{VARLEN} attention with a sliding window needs torch's varlen_attn with window_size "
                         f"(torch {torch.__version__} has none); use attn_implementation 'sdpa'")
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

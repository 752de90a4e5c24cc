"""Tokenized contexts and the final hidden states of the rollout tokens in each.

A context is prompt ids P (length L) followed by the rollout y (length T). The hidden state
at position L - 1 + k predicts y_k, so the model reads P + y[:-1] and we keep positions
L - 1 ... L + T - 2: T states, one per rollout token, in every context alike, whatever the
prompt's length. These states are the final decoder output (after the final norm); the
lm_head is never applied here - fused_pmi_kl does that.
"""
from __future__ import annotations

from typing import List

import torch

from ..prompts import render

KINDS = ("student", "teacher", "refonly")


def prompt_ids(tokenizer, templates: dict, kind: str, example: dict, use_chat: bool) -> List[int]:
    text = render(templates, kind, example["question"], example["solution"], tokenizer, use_chat)
    chat = use_chat and getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=not chat).input_ids


def rollout_positions(prompt_len: int, rollout_len: int) -> slice:
    """Positions whose hidden states predict the rollout tokens."""
    return slice(prompt_len - 1, prompt_len - 1 + rollout_len)


def rollout_hidden(decoder, prompt: List[int], rollout: List[int], device) -> torch.Tensor:
    """[T, H]: the decoder's final hidden states that predict each rollout token."""
    ids = torch.tensor(prompt + rollout[:-1], device=device)[None]
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
    return hidden[rollout_positions(len(prompt), len(rollout))]


def trim_rollout(tokens: List[int], eos_id, pad_id) -> List[int]:
    """Generated ids up to and including the first EOS; padding dropped."""
    out = []
    for tok in tokens:
        if tok == eos_id:
            out.append(tok)
            break
        if tok != pad_id:
            out.append(tok)
    return out

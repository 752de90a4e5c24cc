"""Every row's prompt ids in each context, as prompts.prompt_ids gives them, tokenized a chunk of
rows per call (one call per row took a second for the toy's 2,000 rows; a chunk at a time, a
stop signal is heard between calls).

Given the model's positions, a long text's length is checked on prefixes first, so that a row
far too long for the model is refused after tokenizing about as much text as would fit, not all
of it (a 2 MB question took 24 s and 1.4 GB of a Hugging Face tokenizer; 30 MB, over 16 GB)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ...prompts import render
from ..interrupts import StopRequest, fault_point

CHUNK_ROWS = 256  # texts per tokenizer call
PREFIX_CHARS = 4096  # a text longer than this is measured on prefixes of 4096, 8192, ... characters first
# A prefix cut inside a word can take a few tokens more than the same characters in the whole
# text: a prefix counts as too long only this far past the budget.
PREFIX_SLACK = 8


def length_error(
    what: str, row: int, tokens: int, max_new_tokens: int, positions: int, at_least: bool = False
) -> ValueError:
    count = f"more than {tokens}" if at_least else str(tokens)
    return ValueError(
        f"{what}: row {row}: its context ({count} tokens) plus max_new_tokens ({max_new_tokens}) "
        f"exceeds the model's {positions} positions"
    )


def contexts_ids(
    tokenizer,
    templates: dict,
    kinds: Sequence[str],
    rows: List[dict],
    use_chat: bool,
    split: str = "train",
    positions: Optional[int] = None,
    max_new_tokens: int = 0,
    stop: Optional[StopRequest] = None,
) -> Dict[str, List[List[int]]]:
    """{kind: each row's prompt ids}. With `positions` (the model's), a text whose prefix alone
    leaves no room for max_new_tokens is refused (ValueError, named templates.<kind> (<split>))
    before the whole text is tokenized; model.check_lengths checks the exact lengths."""
    stop = stop or StopRequest()
    special = not (use_chat and getattr(tokenizer, "chat_template", None))
    out = {}
    for kind in kinds:
        texts = [render(templates, kind, row["question"], row["solution"], tokenizer, use_chat) for row in rows]
        if positions is not None:
            for i, text in enumerate(texts):
                past = _prefix_past_budget(tokenizer, text, special, positions - max_new_tokens, stop)
                if past is not None:
                    raise length_error(f"templates.{kind} ({split})", i, past, max_new_tokens, positions, True)
        ids = []
        for start in range(0, len(texts), CHUNK_ROWS):
            fault_point("tokenize-chunk")
            stop.check_local("tokenizing the data")
            ids += tokenizer(texts[start : start + CHUNK_ROWS], add_special_tokens=special).input_ids
        out[kind] = ids
    return out


def _prefix_past_budget(tokenizer, text: str, special: bool, budget: int, stop: StopRequest) -> Optional[int]:
    """A count of tokens the whole text surely has past `budget`, found on prefixes of doubling
    length (from PREFIX_CHARS characters); None when no prefix shorter than the text shows it."""
    chars = PREFIX_CHARS
    while chars < len(text):
        stop.check_local("tokenizing the data")
        count = len(tokenizer(text[:chars], add_special_tokens=special).input_ids) - PREFIX_SLACK
        if count > budget:
            return count
        chars *= 2
    return None

"""Every row's prompt ids in each context, as contexts.prompt_ids gives them, tokenized in one
call per context kind: one call per row took a second for the toy's 2,000 rows."""
from __future__ import annotations

from typing import Dict, List, Sequence

from .prompts import render


def contexts_ids(tokenizer, templates: dict, kinds: Sequence[str], rows: List[dict],
                 use_chat: bool) -> Dict[str, List[List[int]]]:
    chat = use_chat and getattr(tokenizer, "chat_template", None)
    out = {}
    for kind in kinds:
        texts = [render(templates, kind, row["question"], row["solution"], tokenizer, use_chat) for row in rows]
        out[kind] = tokenizer(texts, add_special_tokens=not chat).input_ids if texts else []
    return out

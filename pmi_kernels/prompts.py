"""The three (four) contexts of on-policy self-distillation, as prompt templates.

    student   the question alone                                  (gradient)
    teacher   the reference solution, then the question (OPSD)   (no gradient)
    refonly   the reference solution without the question        (no gradient)
    anchor    the student's context, run by the frozen base      (no gradient)

Every context is followed by the same rollout tokens. Templates are str.format strings over
{question} and {solution}; the config can replace any of them.

A context is prompt ids P (length L) followed by the rollout y (length T). The hidden state
at position L - 1 + k predicts y_k, so a model reads P + y[:-1] and the positions
L - 1 ... L + T - 2 give T states, one per rollout token, in every context alike, whatever the
prompt's length (rollout_positions). The trainer and the integrations (TRL, verl) build their
contexts from this module alone: it imports nothing of the trainer.
"""

from __future__ import annotations

import string
from typing import List

DEFAULT_TEMPLATES = {
    "student": "Question: {question}\nAnswer: ",
    "teacher": "Here is a reference solution:\n{solution}\nQuestion: {question}\nAnswer: ",
    "refonly": "Here is a reference solution:\n{solution}\nAnswer: ",
}


def render(templates: dict, kind: str, question: str, solution: str, tokenizer=None, use_chat: bool = True) -> str:
    """One context's prompt text; wrapped in the tokenizer's chat template when it has one."""
    text = templates[kind].format(question=question, solution=solution)
    if use_chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def prompt_ids(tokenizer, templates: dict, kind: str, example: dict, use_chat: bool) -> List[int]:
    """The token ids of one context's prompt for an example with "question" and "solution"."""
    text = render(templates, kind, example["question"], example["solution"], tokenizer, use_chat)
    chat = use_chat and getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=not chat).input_ids


def rollout_positions(prompt_len: int, rollout_len: int) -> slice:
    """Positions whose hidden states predict the rollout tokens."""
    return slice(prompt_len - 1, prompt_len - 1 + rollout_len)


def template_fields(template: str) -> List[str]:
    """The names formatted into a str.format template ({{ and }} are literal braces). Fields
    must be plain names: an index, attribute, conversion or format spec ({question:>99999999})
    is a ValueError, as a malformed template is."""
    if not isinstance(template, str):
        raise ValueError(f"a template is a str, got {type(template).__name__}")
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            field = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"the field {{{field}}} is not a plain {{name}}")
        names.append(name)
    return names

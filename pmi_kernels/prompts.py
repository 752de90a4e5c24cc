"""The three (four) contexts of on-policy self-distillation, as prompt templates.

    student   the question alone                                  (gradient)
    teacher   the reference solution, then the question (OPSD)   (no gradient)
    refonly   the reference solution without the question        (no gradient)
    anchor    the student's context, run by the frozen base      (no gradient)

Every context is followed by the same rollout tokens. Templates are str.format strings over
{question} and {solution}; the config can replace any of them.
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
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


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

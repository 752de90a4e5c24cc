"""The three (four) contexts of on-policy self-distillation, as prompt templates.

    student   the question alone                                  (gradient)
    teacher   the reference solution, then the question (OPSD)   (no gradient)
    refonly   the reference solution without the question        (no gradient)
    anchor    the student's context, run by the frozen base      (no gradient)

Every context is followed by the same rollout tokens. Templates are str.format strings over
{question} and {solution}; the config can replace any of them.
"""
from __future__ import annotations

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

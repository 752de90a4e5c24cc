"""The embedded tasks (config key `toy_task`), built in code like the toy model.

"arithmetic": the original toy. The reference is the worked solution itself ("7 + 5 = 12. The
answer is \\boxed{12}."), so it holds everything the question does: the PMI residual has
nothing left to teach (cos(Δ_total, Δ_ref) ~ 0.8 on it).

"shortcut": the reference carries a shortcut and the question carries what the reference does
not. The reference gives the method and the final answer, never the numbers:

    question   Ana has 7 apples and gets 5 more. How many now?
    reference  Add them. The answer is \\boxed{12}.
    worked     7 + 5 = 12. Wait, let me check: 12 - 5 = 7. The answer is \\boxed{12}.
    shortcut   The answer is \\boxed{12}.

What each context sees, and what the warm-up teaches it to write (`warmup` of each row):

    student    the question alone: the worked solution (half of them with the check)
    teacher    the reference, then the question: with the answer in view it takes the shortcut
               (copies the answer, no work) half the time, else works, rarely checking
    refonly    the reference alone: as the teacher, but it never sees the numbers, so its
               work is a guess

The teacher's shortcut is built in, as the paper reports LLM teachers behave with the answer in
view (shorter, more confident, fewer "wait"s): the toy shows what each target does with such a
teacher, not that a teacher behaves so. What the decomposition should find on a student's
worked rollout (the comparison prints it, per part: compare.py): at the first token, where a
rollout works or answers at once, the teacher's pull to the shortcut comes mostly from the
reference (log p_R - log p larger than the PMI residual Δ = log p_T - log p_R); at the
operands the teacher reads the question and the reference-only teacher cannot (Δ large: the
part that transfers); at the result both copy the reference's answer (Δ small, the
reference-induced part large). So standard OPSD (target p_T) teaches the student to answer at
once and to stop checking, which fails without the reference; the PMI target leaves the work
and the checks in place.
"""
from __future__ import annotations

import random
from typing import Dict, List

from .toy import draw_problems, toy_problems

TASKS = ("shortcut", "arithmetic")
# Warm-up targets of the contexts that see the reference, as (kind of target, share).
WITH_REFERENCE = (("shortcut", 0.5), ("worked", 0.4), ("checked", 0.1))
WITHOUT_REFERENCE = (("worked", 0.5), ("checked", 0.5))


def problems(task: str, count: int, seed: int) -> List[Dict]:
    """Rows of {question, solution (the reference the teacher reads), answer, warmup (what the
    warm-up teaches each context to write: a list of (text, share))}."""
    if task not in TASKS:
        raise ValueError(f"toy_task must be one of {TASKS}, got {task!r}")
    if task == "arithmetic":
        return toy_problems(count, seed)  # every context is taught the reference itself
    rows = []
    for name, item, a, b, adds in draw_problems(count, seed):
        if adds:
            question = f"{name} has {a} {item}s and gets {b} more. How many now?"
            answer, work, check, method = a + b, f"{a} + {b} = {a + b}", f"{a + b} - {b} = {a}", "Add them"
        else:
            question = f"{name} has {a + b} {item}s and gives {b} away. How many left?"
            answer, work, check, method = a, f"{a + b} - {b} = {a}", f"{a} + {b} = {a + b}", "Subtract"
        final = f"The answer is \\boxed{{{answer}}}."
        texts = {"shortcut": final, "worked": f"{work}. {final}",
                 "checked": f"{work}. Wait, let me check: {check}. {final}"}
        with_reference = [(texts[kind], share) for kind, share in WITH_REFERENCE]
        rows.append({"question": question, "solution": f"{method}. {final}", "answer": str(answer),
                     "warmup": {"student": [(texts[kind], share) for kind, share in WITHOUT_REFERENCE],
                                "teacher": with_reference, "refonly": with_reference}})
    return rows


def warmup_target(row: Dict, kind: str, rng: random.Random) -> str:
    """The text the warm-up teaches context `kind` to write for this row (drawn by share); a row
    without `warmup` (a data file's) is taught its solution."""
    choices = row.get("warmup", {}).get(kind)
    if not choices:
        return row["solution"]
    texts, shares = zip(*choices)
    return rng.choices(texts, weights=shares)[0]

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

"misread": the shortcut task, plus a weakness of the student's that only the question can
mend. Half the questions carry a distractor, a quantity of another item between the two
numbers that matter:

    question   Ana has 7 apples and 3 books and gets 5 more apples. How many apples now?
    reference  Add them. The answer is \\boxed{12}.
    right      7 + 5 = 12. The answer is \\boxed{12}.
    misread    7 + 3 = 10. The answer is \\boxed{10}.

The student's warm-up writes the misread (its arithmetic right, on the wrong operand) on
MISREAD_SHARE of the distractor questions, so the warmed-up student misreads many of them; the
teacher, which reads the question with the reference beside it, is taught the right operands
(and keeps its shortcut habit, as above); the reference-only teacher cannot know the operands.
So at the second operand of a misread rollout the PMI residual Δ = log p_T - log p_R holds
"read the question right" (the teacher names 5, the reference-only teacher guesses), which the
student can learn because it sees the question; log p_R - log p holds the shortcut as before.
Nothing the loss or the accuracy reads says which part is which: the loss sees the three
contexts, the accuracy the answer; the rows' `operands` (the right reading) feed only the
comparison's error breakdown (misread and slip rates).
"""

from __future__ import annotations

import random
from typing import Dict, List

from .toy import ITEMS, NAMES, draw_problems, toy_problems

TASKS = ("misread", "shortcut", "arithmetic")
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
    if task == "misread":
        return misread_problems(count, seed)
    rows = []
    for name, item, a, b, adds in draw_problems(count, seed):
        if adds:
            question = f"{name} has {a} {item}s and gets {b} more. How many now?"
            answer, work, check, method = a + b, f"{a} + {b} = {a + b}", f"{a + b} - {b} = {a}", "Add them"
        else:
            question = f"{name} has {a + b} {item}s and gives {b} away. How many left?"
            answer, work, check, method = a, f"{a + b} - {b} = {a}", f"{a} + {b} = {a + b}", "Subtract"
        final = f"The answer is \\boxed{{{answer}}}."
        texts = {
            "shortcut": final,
            "worked": f"{work}. {final}",
            "checked": f"{work}. Wait, let me check: {check}. {final}",
        }
        with_reference = [(texts[kind], share) for kind, share in WITH_REFERENCE]
        rows.append(
            {
                "question": question,
                "solution": f"{method}. {final}",
                "answer": str(answer),
                "warmup": {
                    "student": [(texts[kind], share) for kind, share in WITHOUT_REFERENCE],
                    "teacher": with_reference,
                    "refonly": with_reference,
                },
            }
        )
    return rows


VALIDATION_SEED = 1_000_003  # added to the run's seed: the validation draw's seed


def validation_problems(task: str, count: int, seed: int, taken: List[Dict]) -> List[Dict]:
    """`count` problems of the task drawn by another seed (seed + VALIDATION_SEED), none of
    whose questions is among `taken` (the run's training and held-out rows): the rows settings
    are chosen on (config key toy_eval_split), so that the held-out rows are never tuned on."""
    seen = {row["question"] for row in taken}
    rows, drawn = [], 2 * count + 100
    while len(rows) < count:
        fresh = [row for row in problems(task, drawn, seed + VALIDATION_SEED) if row["question"] not in seen]
        rows = list({row["question"]: row for row in fresh}.values())[:count]  # also no question twice
        drawn *= 2
    return rows


def warmup_target(row: Dict, kind: str, rng: random.Random) -> str:
    """The text the warm-up teaches context `kind` to write for this row (drawn by share); a row
    without `warmup` (a data file's) is taught its solution."""
    choices = row.get("warmup", {}).get(kind)
    if not choices:
        return row["solution"]
    texts, shares = zip(*choices)
    return rng.choices(texts, weights=shares)[0]


# The misread task: the share of questions with a distractor quantity, and the share of the
# student's warm-up solutions to them that add or subtract the distractor instead.
DISTRACTOR_SHARE = 0.5
MISREAD_SHARE = 0.6


def misread_problems(count: int, seed: int) -> List[Dict]:
    """The shortcut task's problems with one-digit operands, half of them with a distractor quantity
    of another item between the two numbers that matter; on those the student's warm-up adds
    (subtracts) the distractor instead MISREAD_SHARE of the time, the teacher's never. Each
    row also keeps `operands`, the right reading (left, right, distractor or None), which only
    the comparison's error breakdown reads."""
    rng = random.Random(f"misread-{seed}")  # its own stream: the other tasks' draws stay as they are
    rows = []
    for _ in range(count):
        # One-digit operands (sums up to 18): a two-layer model learns their arithmetic in the
        # warm-up, so a misread mended shows in the accuracy instead of ending in a slip.
        name, item, a, b, adds = (
            rng.choice(NAMES),
            rng.choice(ITEMS),
            rng.randint(2, 9),
            rng.randint(1, 9),
            rng.random() < 0.5,
        )
        other = rng.choice([i for i in ITEMS if i != item])
        left = a if adds else a + b
        # In the second operand's range (1 to 9, and at most the first: no negative results), never it.
        distractor = rng.choice([n for n in range(1, min(9, left) + 1) if n != b])
        has_distractor = rng.random() < DISTRACTOR_SHARE
        answer = a + b if adds else a
        aside = f" and {distractor} {other}s" if has_distractor else ""
        if adds:
            question = f"{name} has {left} {item}s{aside} and gets {b} more {item}s. How many {item}s now?"
        else:
            question = f"{name} has {left} {item}s{aside} and gives {b} {item}s away. How many {item}s left?"

        def solutions(right: int) -> Dict[str, str]:
            result = left + right if adds else left - right
            work, check = (
                (f"{left} + {right} = {result}", f"{result} - {right} = {left}")
                if adds
                else (f"{left} - {right} = {result}", f"{result} + {right} = {left}")
            )
            final = f"The answer is \\boxed{{{result}}}."
            return {
                "shortcut": final,
                "worked": f"{work}. {final}",
                "checked": f"{work}. Wait, let me check: {check}. {final}",
            }

        right = solutions(b)
        student = [(right[kind], share) for kind, share in WITHOUT_REFERENCE]
        if has_distractor:
            wrong = solutions(distractor)
            student = [(right[kind], share * (1 - MISREAD_SHARE)) for kind, share in WITHOUT_REFERENCE] + [
                (wrong[kind], share * MISREAD_SHARE) for kind, share in WITHOUT_REFERENCE
            ]
        with_reference = [(right[kind], share) for kind, share in WITH_REFERENCE]
        method = "Add them" if adds else "Subtract"
        rows.append(
            {
                "question": question,
                "solution": f"{method}. {right['shortcut']}",
                "answer": str(answer),
                "operands": [left, b, distractor if has_distractor else None],
                "warmup": {"student": student, "teacher": with_reference, "refonly": with_reference},
            }
        )
    return rows

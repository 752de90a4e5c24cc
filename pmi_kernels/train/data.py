"""Questions with reference solutions: local jsonl/parquet through `datasets`, or the toy task."""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

from .config import TOY, TrainConfig
from .tasks import problems


def load_rows(path: str) -> List[Dict]:
    from datasets import load_dataset
    kind = "parquet" if path.endswith(".parquet") else "json"
    if os.path.getsize(path) == 0:
        return []
    try:
        return list(load_dataset(kind, data_files=path, split="train"))
    except Exception as err:  # noqa: BLE001 (datasets raises many kinds; name the file)
        raise ValueError(f"{path}: could not be read as {kind}: {type(err).__name__}: {err}") from err


def extract_answer(text: str, pattern: str) -> Optional[str]:
    """The last match of the answer pattern's first group, stripped; None if there is none."""
    found = re.findall(pattern, text)
    return found[-1].strip() if found else None


def load_examples(config: TrainConfig):
    """(train, eval) lists of {"question", "solution", "answer"}; errors name the problem."""
    if config.model_path == TOY:
        rows = problems(config.toy_task, 2000 + config.eval_limit, config.seed)
        return rows[config.eval_limit:], rows[:config.eval_limit]
    splits = []
    for key in ("train_file", "eval_file"):
        path = getattr(config, key)
        splits.append([] if path is None else [_example(row, i, path, config) for i, row in enumerate(load_rows(path))])
    train, held_out = splits
    if not train:
        raise ValueError(f"train_file {config.train_file!r} has no rows")
    return train, held_out[:config.eval_limit]


def _example(row: Dict, index: int, path: str, config: TrainConfig) -> Dict:
    for key in (config.question_field, config.solution_field):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{path}: row {index} has no text field {key!r}")
    solution = row[config.solution_field]
    if config.answer_field:
        if row.get(config.answer_field) is None:
            raise ValueError(f"{path}: row {index} has no field {config.answer_field!r}")
        answer = str(row[config.answer_field]).strip()
    else:
        answer = extract_answer(solution, config.answer_pattern)
        if answer is None:
            raise ValueError(f"{path}: row {index}: answer_pattern finds no answer in the solution")
    return {"question": row[config.question_field], "solution": solution, "answer": answer}

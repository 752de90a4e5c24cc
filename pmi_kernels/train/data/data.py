"""Questions with reference solutions: local JSON Lines, a JSON array or parquet, or the toy task.

A file is read a line (a parquet batch) at a time, so a bad row is named by its line and a stop
signal is heard between rows; nothing is copied into a cache."""

from __future__ import annotations

import json
import re
from typing import Dict, Iterator, List, Optional, Tuple

from ..config import TOY, TrainConfig
from ..demo.tasks import problems, validation_problems
from ..interrupts import StopRequest, fault_point

PARQUET_BATCH = 256  # rows read from a parquet file at a time

Row = Tuple[str, Dict]  # (where it is: "line 3" or "row 2", the row)


def load_rows(path: str, stop: Optional[StopRequest] = None) -> List[Row]:
    """Every row of a local data file with where it is in the file (for errors). JSON: one object
    a line (blank lines skipped), or one JSON array of objects; parquet: its rows."""
    stop = stop or StopRequest()
    rows = []
    for row in _parquet_rows(path) if path.endswith(".parquet") else _json_rows(path):
        fault_point("data-row")
        stop.check_local("reading the data")
        rows.append(row)
    return rows


def _json_rows(path: str) -> Iterator[Row]:
    with open(path, "rb") as fh:
        first = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        fh.seek(0)
        if first == b"[":
            yield from _json_array(path, fh)
            return
        for number, raw in enumerate(fh, 1):
            text = _decode(path, f"line {number}", raw[3:] if number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw)
            if text.strip():
                yield f"line {number}", _json_object(path, f"line {number}", text)


def _json_array(path: str, fh) -> Iterator[Row]:
    text = _decode(path, "the file", fh.read())
    try:
        items = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON array of objects or one object a line")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: item {index} of the array is a {type(item).__name__}, not a JSON object")
        yield f"item {index}", item


def _decode(path: str, where: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: {where}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _json_object(path: str, where: str, text: str) -> Dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: {where}: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}: {where}: a JSON {type(row).__name__}, not an object of fields")
    return row


def _parquet_rows(path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"row {index}", row
                index += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: could not be read as parquet: {type(err).__name__}: {err}") from err


def extract_answer(text: str, pattern: str) -> Optional[str]:
    """The last match of the answer pattern's first group, stripped; None if there is none."""
    found = re.findall(pattern, text)
    return found[-1].strip() if found else None


def load_examples(config: TrainConfig, stop: Optional[StopRequest] = None):
    """(train, eval) lists of {"question", "solution", "answer"}; errors name the file and the row.
    A stop signal ends the reading (raises Interrupted)."""
    if config.model_path == TOY:
        rows = problems(config.toy_task, 2000 + config.eval_limit, config.seed)
        train, held_out = rows[config.eval_limit :], rows[: config.eval_limit]
        if config.toy_eval_split == "validation":
            return train, validation_problems(config.toy_task, config.eval_limit, config.seed, rows)
        return train, held_out
    splits = []
    for key in ("train_file", "eval_file"):
        path = getattr(config, key)
        rows = [] if path is None else load_rows(path, stop)
        splits.append([_example(row, where, path, config) for where, row in rows])
    train, held_out = splits
    if not train:
        raise ValueError(f"train_file {config.train_file!r} has no rows")
    return train, held_out[: config.eval_limit]


def _example(row: Dict, where: str, path: str, config: TrainConfig) -> Dict:
    for key in (config.question_field, config.solution_field):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{path}: {where} has no text field {key!r}")
    solution = row[config.solution_field]
    if config.answer_field:
        if row.get(config.answer_field) is None:
            raise ValueError(f"{path}: {where} has no field {config.answer_field!r}")
        answer = str(row[config.answer_field]).strip()
    else:
        answer = extract_answer(solution, config.answer_pattern)
        if answer is None:
            raise ValueError(f"{path}: {where}: answer_pattern finds no answer in the solution")
    return {"question": row[config.question_field], "solution": solution, "answer": answer}

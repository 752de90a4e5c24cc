"""What the loop shows and keeps: a JSONL of per-step metrics (and the trackers'), marker
counts in rollouts, and `pmi-opsd plot` that draws the metrics file as one PNG."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from typing import Dict, List, Optional

from .checkpoint import write_file_atomically


def count_markers(texts: List[str], markers: List[str]) -> Dict[str, int]:
    """Whole-word, case-insensitive counts of each epistemic marker over the rollouts."""
    return {m: sum(len(re.findall(rf"\b{re.escape(m)}\b", t, flags=re.IGNORECASE)) for t in texts) for m in markers}


class StepTimer:
    """Seconds spent in each part of a step (logged as time/<part>). On CUDA a part ends with a
    synchronize, so the kernels it queued count in it."""

    PARTS = ("sampling", "forwards", "loss", "diagnostics", "backward", "all_reduce", "optimizer")

    def __init__(self, device):
        self.device = device
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    @contextlib.contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                import torch

                torch.cuda.synchronize(self.device)
            self.seconds[part] += time.perf_counter() - start


class MetricsLog:
    def __init__(self, output_dir: str, trackers=()):
        """trackers (trackers.py): each gets every row too."""
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.trackers = list(trackers)

    def write(self, record: Dict) -> None:
        record = {key: finite_or_none(value) for key, value in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        """End the trackers' runs (once)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()


def finite_or_none(value):
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(path: str) -> List[Dict]:
    """The rows of a metrics file (a last line cut short by a kill left out); a line that is not a
    metrics row is a ValueError naming it."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if not line.endswith("\n"):  # the last line, cut short by a kill
                    break
                raise ValueError(f"{path}: line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(f"{path}: line {number}: not a metrics row (a JSON object with an integer step)")
            rows.append(row)
    return rows


def _step_rows(path: str):
    """(line, row) for each row of the file with an integer step; a line cut short by a kill is skipped."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                yield line, row


def accuracy_at(path: str, step: int) -> Optional[float]:
    """The first evaluation's accuracy at `step` in the metrics file; None if it has none."""
    found = (row["eval/accuracy"] for _, row in _step_rows(path) if row["step"] == step and "eval/accuracy" in row)
    return next(found, None)


def evaluated_at(path: str, step: int) -> bool:
    """Whether the metrics file has an evaluation at `step`."""
    return accuracy_at(path, step) is not None


def cut_metrics(path: str, step: int, redo_evaluation: bool) -> None:
    """Keep the rows up to `step` (a resumed run writes the later ones again; with
    redo_evaluation, the evaluation rows at `step` too) and drop a line cut short by a kill.
    The file is replaced by rename, never rewritten in place."""
    if not os.path.isfile(path):
        return
    kept = []
    for line, row in _step_rows(path):
        evaluation_only = set(row) == {"step", "eval/accuracy"}
        if row["step"] < step or (row["step"] == step and not (redo_evaluation and evaluation_only)):
            kept.append(line if line.endswith("\n") else line + "\n")
    write_file_atomically(path, "".join(kept))  # its temporary's name is one the next start removes


def plot_metrics(path: str, out: str) -> str:
    """One PNG: a panel per numeric metric, over steps (evaluation points as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
    if not keys:
        raise ValueError(f"{path}: no numeric metrics to plot")
    cols = 3
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, ms=3)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

"""`pmi-opsd train` and `pmi-opsd plot` (also `python -m pmi_kernels.train`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import parse_config

USAGE = """pmi-opsd train [--config FILE] [--output-dir DIR] [--max-steps N] [--resume] [--KEY VALUE ...]
pmi-opsd plot  [--metrics FILE] [--out PNG]

With no --model-path, train runs the embedded default: a tiny model and arithmetic task built
locally, taught briefly by supervised fine-tuning, then distilled with the PMI target."""


def train(argv) -> dict:
    from .loop import Trainer
    config = parse_config(argv, description="On-policy self-distillation with the PMI target.")
    trainer = Trainer(config)
    result = trainer.train()
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"accuracy before training: {fmt(result['accuracy_before'])}   "
          f"after: {fmt(result['accuracy_after'])}   steps: {result['steps']}"
          + ("   (interrupted; resume with --resume)" if result["interrupted"] else ""))
    print(f"metrics: {trainer.metrics.path}")
    with open(os.path.join(config.output_dir, "result.json"), "w") as fh:
        json.dump(result, fh)
    return result


def plot(argv) -> str:
    from .metrics import plot_metrics
    parser = argparse.ArgumentParser(description="Draw a run's metrics.jsonl as one PNG.")
    parser.add_argument("--metrics", default="runs/toy/metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: beside the metrics file)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(args.metrics) or ".", "metrics.png")
    print(f"wrote {plot_metrics(args.metrics, out)}")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("train", "plot"):
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        (train if argv[0] == "train" else plot)(argv[1:])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

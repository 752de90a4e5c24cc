"""`pmi-opsd train` and `pmi-opsd plot` (also `python -m pmi_kernels.train`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .checkpoint import write_file_atomically
from .config import parse_args
from .interrupts import Interrupted, StopRequest, TrainingFailed
from .metrics import finite_or_none

USAGE = """pmi-opsd train [--config FILE] [--output-dir DIR] [--max-steps N] [--resume | --overwrite] [--KEY VALUE ...]
pmi-opsd train --config FILE --dry-run [--world-size N] [--prompt-tokens N]
pmi-opsd plot  [--metrics FILE] [--out PNG]
pmi-opsd compare [--seeds 0,1,2] [--output-dir DIR] [--KEY VALUE ...]
pmi-opsd export CHECKPOINT OUT [--merge]

With no --model-path, train runs the embedded default: a tiny model and a task built
locally, taught briefly by supervised fine-tuning, then distilled with the PMI target.
--dry-run prints a step's plan (tokens, memory per GPU) from the model's config.json or the
config's architecture key, loading and downloading nothing (configs/ has the paper's recipes).
compare runs standard OPSD and the PMI target (frozen-base and self anchors) from one warmed-up
base and prints them side by side (the main job). export writes a checkpoint's model as a
standalone Hugging Face directory (--merge: LoRA merged into the base).
Every checkpoint-<step>/ also loads as it is with from_pretrained (docs/training.md)."""


# The top-level modules of pyproject's "train" extra: the subcommands need them, the kernels do not.
TRAIN_EXTRA_MODULES = {"transformers", "peft", "datasets", "tqdm", "matplotlib", "yaml", "tensorboard"}


def train(argv) -> int:
    """The exit code: 0 done, 1 the run failed (e.g. non-finite steps, a full disk), 130/143
    interrupted by SIGINT/SIGTERM (its last consistent state saved), 2 bad input (from main)."""
    config, flags = parse_args(argv, description="On-policy self-distillation with the PMI target.")
    if flags.dry_run:
        from .tools.plan import format_plan, plan

        print(format_plan(plan(config, flags.world_size, flags.prompt_tokens), config))
        return 0
    from .distributed import leave_process_group
    from .loop import Trainer

    stop = StopRequest()
    try:
        with stop.catching():  # from the start: a signal during loading or the warm-up is caught too
            try:
                trainer = Trainer(config, stop)
            except Interrupted as err:
                if os.environ.get("RANK", "0") == "0":
                    what = (
                        "the run is as it was; continue it with --resume"
                        if config.resume
                        else "the run had no checkpoint yet; start it again"
                    )
                    print(
                        f"interrupted by {signal.Signals(err.signum).name} during {err.where}: {what}", file=sys.stderr
                    )
                return err.exit_code
            result = trainer.train()
    finally:
        leave_process_group()  # under torchrun, whether the run ended well or not
    if not trainer.world.main:  # rank 0 reports for the run
        return 128 + signal.Signals[result["interrupted"]] if result["interrupted"] else 0

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    print(
        f"accuracy before training: {fmt(result['accuracy_before'])}   "
        f"after: {fmt(result['accuracy_after'])}   steps: {result['steps']}"
    )
    print(f"metrics: {trainer.metrics.path}")
    write_file_atomically(
        os.path.join(config.output_dir, "result.json"),
        json.dumps({key: finite_or_none(value) for key, value in result.items()}, allow_nan=False),
    )
    if result["interrupted"]:
        print(
            f"interrupted by {result['interrupted']} during {result['where']}: "
            f"{os.path.join(config.output_dir, result['checkpoint'])} holds step {result['steps']}; "
            "continue with --resume",
            file=sys.stderr,
        )
        return 128 + signal.Signals[result["interrupted"]]
    return 0


def plot(argv) -> int:
    from .metrics import plot_metrics

    parser = argparse.ArgumentParser(prog="pmi-opsd plot", description="Draw a run's metrics.jsonl as one PNG.")
    parser.add_argument(
        "--metrics",
        default="runs/toy/metrics.jsonl",
        help="a run's metrics.jsonl, in its output_dir (default: %(default)s)",
    )
    parser.add_argument("--out", default=None, help="PNG path (default: beside the metrics file)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.metrics):
        missing = "is not a file" if os.path.exists(args.metrics) else "does not exist"
        raise ValueError(f"--metrics {args.metrics}: {missing} (a run's metrics.jsonl, in its output_dir)")
    out = args.out or os.path.join(os.path.dirname(args.metrics) or ".", "metrics.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ValueError(f"--out {out}: its directory does not exist")
    print(f"wrote {plot_metrics(args.metrics, out)}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("train", "plot", "compare", "export"):
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown subcommand {argv[0]!r} (train, plot, compare or export)\n", file=sys.stderr)
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        if argv[0] == "compare":
            from .demo.compare import main as compare

            return compare(argv[1:])
        if argv[0] == "export":
            from .export import main as export

            return export(argv[1:])
        return train(argv[1:]) if argv[0] == "train" else plot(argv[1:])
    except (ValueError, TrainingFailed) as err:
        if not getattr(err, "from_rank_zero", False):  # under torchrun, rank 0 has said it
            print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        print(
            f"error: pmi-opsd {argv[0]} needs the 'train' extra (no module named {err.name!r}): "
            "pip install 'pmi-kernels[train]'",
            file=sys.stderr,
        )
        return 2
    except OSError as err:  # the system refused a read or write (a full disk, a lost mount): one line too
        print(f"error: {err.strerror or err}{f': {err.filename}' if err.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Experiment trackers (config key `report_to`, as transformers' TrainingArguments.report_to):
tensorboard, trackio, wandb, mlflow, through each one's own library, on rank 0 only. Each gets
the run's config once when the run starts and every row metrics.jsonl gets, with the same keys
(numbers only; a null, a non-finite value, is left out), at the row's step.

Where they write: tensorboard in <output_dir>/tensorboard; trackio in its local database
(TRACKIO_DIR, else $HF_HOME/trackio); wandb as wandb.init does (WANDB_MODE=offline: files under
<output_dir>/wandb to `wandb sync` later); mlflow to MLFLOW_TRACKING_URI, else the file store
<output_dir>/mlruns (MLFLOW_ALLOW_FILE_STORE=true is set for it: mlflow 3 keeps that store in
maintenance: set it too to read the store, e.g. `MLFLOW_ALLOW_FILE_STORE=true mlflow ui
--backend-store-uri <output_dir>/mlruns`, with the full `mlflow` package: the trackers extra's
mlflow-skinny has no UI). The project
(trackio, wandb) is TRACKIO_PROJECT / WANDB_PROJECT, else "pmi-opsd"; mlflow's experiment
MLFLOW_EXPERIMENT_NAME, else "pmi-opsd"; the run's name is the output directory's. A resumed
run is a new tracker run, logged from its resumed step on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Dict, List, Optional

TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow")
# The module each tracker needs, and the extra that installs it.
LIBRARIES = {
    "tensorboard": ("tensorboard", "train"),
    "trackio": ("trackio", "trackers"),
    "wandb": ("wandb", "trackers"),
    "mlflow": ("mlflow", "trackers"),
}
PROJECT = "pmi-opsd"


def requested(config) -> List[str]:
    """The trackers the config asks for: report_to's, and tensorboard when the older
    `tensorboard: true` says so."""
    names = [name for name in config.report_to if name != "none"]
    if config.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check_report_to(config) -> None:
    """Each name is a tracker (or "none", alone), and its library is installed: a one-line
    error naming the extra otherwise, when the config is checked, before any model loads."""
    for name in config.report_to:
        if name not in TRACKERS + ("none",):
            raise ValueError(f"config: report_to: {name!r} is not one of {', '.join(TRACKERS + ('none',))}")
    if "none" in config.report_to and len(config.report_to) > 1:
        raise ValueError(f"config: report_to: 'none' with trackers {config.report_to}: name the trackers, or none")
    for name in requested(config):
        module, extra = LIBRARIES[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"config: report_to {name}: its library is not installed "
                f"(pip install 'pmi-kernels[{extra}]', or pip install {module})"
            )


def numbers(record: Dict) -> Dict[str, float]:
    """The record's numbers (booleans as 0/1), without the step and the nulls."""
    return {key: float(value) for key, value in record.items() if key != "step" and isinstance(value, (int, float))}


def run_name(config) -> str:
    return os.path.basename(os.path.abspath(config.output_dir))


class TensorBoard:
    def __init__(self, config, values: Dict, purge_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an earlier writer logged at this step and after.
        self.writer = SummaryWriter(os.path.join(config.output_dir, "tensorboard"), purge_step=purge_step)
        self.writer.add_text("config", "```\n" + json.dumps(values, indent=1) + "\n```", 0)

    def log(self, record: Dict) -> None:
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class Trackio:
    def __init__(self, config, values: Dict, purge_step: Optional[int]):
        import trackio

        self.trackio = trackio
        trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_name(config), config=values, embed=False
        )

    def log(self, record: Dict) -> None:
        self.trackio.log(numbers(record), step=record["step"])

    def finish(self) -> None:
        self.trackio.finish()


class Wandb:
    def __init__(self, config, values: Dict, purge_step: Optional[int]):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run_name(config),
            config=values,
            dir=config.output_dir,
        )

    def log(self, record: Dict) -> None:
        self.run.log(numbers(record), step=record["step"])

    def finish(self) -> None:
        self.run.finish()


class Mlflow:
    def __init__(self, config, values: Dict, purge_step: Optional[int]):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a store in the run's directory, no server, no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks for it
            mlflow.set_tracking_uri("file://" + os.path.abspath(os.path.join(config.output_dir, "mlruns")))
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
        mlflow.start_run(run_name=run_name(config))
        # Parameters are short strings (mlflow caps them); the whole config is also an artifact.
        mlflow.log_params({key: str(value)[:500] for key, value in values.items()})
        mlflow.log_dict(values, "config.json")

    def log(self, record: Dict) -> None:
        self.mlflow.log_metrics(numbers(record), step=record["step"])

    def finish(self) -> None:
        self.mlflow.end_run()


CLASSES = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": Wandb, "mlflow": Mlflow}


def start_trackers(config, main: bool, purge_step: Optional[int] = None) -> List:
    """The config's trackers, started with its keys (rank 0; none on the other ranks)."""
    if not main:
        return []
    from .checkpoint import error_line

    values = json.loads(json.dumps(dataclasses.asdict(config)))
    started = []
    for name in requested(config):
        try:
            started.append(CLASSES[name](config, values, purge_step))
        except Exception as err:  # noqa: BLE001 (a tracker's own errors: login, server, store; name it)
            for tracker in started:
                tracker.finish()
            raise ValueError(f"report_to {name}: the tracker did not start ({error_line(err)})") from err
    return started
